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


def test_installed_package_ships_the_patches(tmp_path):
    """A (non-editable) install of the wheel carries patches/ as megatron_agg/_patches, where
    `megatron-agg patch` finds every release's patch and pinned copy, and applies them."""
    import importlib.util
    import shutil
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parent.parent
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(repo / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("megatron_agg", "patches"):
        shutil.copytree(repo / name, src / name, ignore=ignore)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, check=False)
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("megatron_agg-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    in_repo = {"megatron_agg/_patches/" + p.relative_to(repo / "patches").as_posix()
               for p in (repo / "patches").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert in_repo <= shipped, sorted(in_repo - shipped)

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                              "--target", str(site), str(wheel)], capture_output=True, text=True, check=False)
    assert install.returncode == 0, install.stderr
    # the installed patching module, loaded on its own (it needs only the standard library)
    spec = importlib.util.spec_from_file_location("installed_patching", site / "megatron_agg" / "patching.py")
    patching = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = patching  # dataclasses look their module up
    try:
        spec.loader.exec_module(patching)
    finally:
        del sys.modules[spec.name]
    assert patching.patches_root() == site / "megatron_agg" / "_patches"
    for target in patching.TARGETS.values():
        for release in target.releases:
            assert patching.pinned_folder(target, release).is_dir(), (target.name, release)
    mlm = patching.TARGETS["megatron-lm"]
    for release in mlm.releases:
        assert patching.patch_path(mlm, release).is_file(), release
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(patching.pinned_folder(mlm, "core_v0.18.2") / "pretrain_gpt.py", checkout / "pretrain_gpt.py")
    result = patching.run_patch("megatron-lm", checkout)
    assert (result.action, result.release) == ("applied", "core_v0.18.2")
    assert result.patch == site / "megatron_agg" / "_patches" / "megatron-lm" / "core_v0.18.2" / "pretrain_gpt.patch"
