"""The supported megatron-core range is declared once and enforced at run time."""

import re
from pathlib import Path

import pytest

import megatron_agg
from megatron_agg.integration import SUPPORTED_MEGATRON_CORE, check_megatron_version, megatron_core_version


def test_setup_py_declares_the_same_range():
    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    declared = re.search(r'MEGATRON_CORE = "megatron-core([^"]+)"', setup).group(1)
    assert declared == ",".join(SUPPORTED_MEGATRON_CORE)


def test_installed_release_is_supported():
    assert check_megatron_version() == megatron_core_version()


@pytest.mark.parametrize("version", ["0.12.1", "0.20.0", "1.0.0", "0.9.0"])
def test_unsupported_releases_are_refused_with_the_range(version):
    with pytest.raises(RuntimeError, match=re.escape(" ".join(SUPPORTED_MEGATRON_CORE))):
        check_megatron_version(version)


def test_public_api():
    assert set(megatron_agg.__all__) >= {"LossHook", "LossTerm", "AggMode", "LossReturn", "reference_loss"}
