"""The supported megatron-core range is declared once and enforced at run time."""

import re
from pathlib import Path

import pytest

import megatron_agg
from megatron_agg.megatron.releases import SUPPORTED_MEGATRON_CORE, check_megatron_version, megatron_core_version


def test_setup_py_declares_the_same_range():
    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    declared = re.search(r'MEGATRON_CORE = "megatron-core([^"]+)"', setup).group(1)
    assert declared == ",".join(SUPPORTED_MEGATRON_CORE)


def test_installed_release_is_supported():
    assert check_megatron_version() == megatron_core_version()


@pytest.mark.parametrize("version", ["0.12.1", "0.9.0"])
def test_releases_below_the_floor_are_refused_with_the_range(version):
    with pytest.raises(RuntimeError, match=re.escape(" ".join(SUPPORTED_MEGATRON_CORE))):
        check_megatron_version(version)


def test_public_api():
    """Top level: what users need; the extension points live in megatron_agg.extend."""
    assert sorted(megatron_agg.__all__) == sorted([
        "LossHook", "DeferredLossHook", "StepShares", "AggConfig", "AggMode", "LossTerm", "LossReturn",
        "PackedSequences", "NonFiniteLossError", "reference_loss", "__version__"])
    for name in megatron_agg.__all__:
        assert getattr(megatron_agg, name) is not None, name


EXTEND = ["DEFAULT_MASK_NAME", "GROUP_SCOPES", "MegatronScaling", "ParallelGroups", "PerTokenLossFn", "Scaling",
          "StepSummary", "SumScaling"]


def test_extension_points_live_in_extend():
    import megatron_agg.extend as extend

    assert sorted(extend.__all__) == sorted(EXTEND)
    assert "extension points" in extend.__doc__
    assert not set(EXTEND) & set(megatron_agg.__all__)


@pytest.mark.parametrize("name", EXTEND)
def test_old_top_level_names_still_resolve_with_a_warning(name):
    """`from megatron_agg import Scaling` (and the others) keeps working, naming the new place."""
    import warnings

    import megatron_agg.extend as extend

    with pytest.warns(DeprecationWarning, match=re.escape(f"megatron_agg.extend import {name}")):
        got = getattr(megatron_agg, name)
    assert got is getattr(extend, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DeprecationWarning, match=re.escape(f"megatron_agg.extend")):
            exec(f"from megatron_agg import {name}", {})
    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        megatron_agg.NotAName  # noqa: B018


#: Test harness code: must never be in the wheel (it lives in tests/harness/).
HARNESS = re.compile(r"(^|/)(testing|harness|tests)/|(^|/)(matrix|features|megatron_lm|sync_guard)\.py$")
#: What of patches/upstream/ ships: the manifests, not the pinned copies.
MANIFESTS = {"megatron_agg/_patches/upstream/SHA256SUMS", "megatron_agg/_patches/upstream/PATCHED.SHA256SUMS"}


def test_installed_package_ships_the_library_only(tmp_path):
    """The wheel holds the library (with the CLI and compare's CPU kit) and the patches, no test
    harness and no pinned upstream copy; a (non-editable) install carries patches/ as
    megatron_agg/_patches, where `megatron-agg patch` finds every release's patch and recognises
    a pinned checkout by the shipped manifests, and applies and reverts the patch."""
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
    harness = sorted(n for n in shipped if HARNESS.search(n))
    assert not harness, f"test harness code in the wheel: {harness}"
    upstream = sorted(n for n in shipped if n.startswith("megatron_agg/_patches/upstream/") and n not in MANIFESTS)
    assert not upstream, f"pinned upstream copies in the wheel: {upstream}"
    assert MANIFESTS <= shipped, sorted(MANIFESTS - shipped)
    in_repo = {"megatron_agg/_patches/" + p.relative_to(repo / "patches").as_posix()
               for p in (repo / "patches").rglob("*") if p.is_file() and "__pycache__" not in p.parts
               and "upstream" not in p.relative_to(repo / "patches").parts}
    assert in_repo <= shipped, sorted(in_repo - shipped)
    package = {"megatron_agg/" + p.relative_to(repo / "megatron_agg").as_posix()
               for p in (repo / "megatron_agg").rglob("*.py") if "__pycache__" not in p.parts}
    assert package <= shipped, sorted(package - shipped)  # compare's CPU kit included

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
    assert not (site / "megatron_agg" / "_patches" / "upstream" / "releases").exists()
    for target in patching.TARGETS.values():
        for release in target.releases:
            assert patching.pinned_digests(target, release) is not None, (target.name, release)
            assert patching.pinned_digests(target, release, patched=True) is not None, (target.name, release)
    mlm = patching.TARGETS["megatron-lm"]
    for release in mlm.releases:
        assert patching.patch_path(mlm, release).is_file(), release
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    pinned = repo / "patches" / "upstream" / mlm.pinned["core_v0.18.2"] / "pretrain_gpt.py"  # the repo's copy
    shutil.copy(pinned, checkout / "pretrain_gpt.py")
    result = patching.run_patch("megatron-lm", checkout)
    assert (result.action, result.release) == ("applied", "core_v0.18.2")
    assert result.patch == site / "megatron_agg" / "_patches" / "megatron-lm" / "core_v0.18.2" / "pretrain_gpt.patch"
    assert "with its patch" in patching.detect_release(mlm, checkout).how  # recognised patched, by hash
    result = patching.run_patch("megatron-lm", checkout, revert=True)
    assert (result.action, result.release) == ("reverted", "core_v0.18.2")
    assert (checkout / "pretrain_gpt.py").read_bytes() == pinned.read_bytes()


def test_console_script_starts_without_the_compare_kit():
    """`megatron-agg --help` and `megatron-agg patch --help` load neither the test harness nor
    compare's CPU kit (the tiny GPT, the CPU shim, Megatron)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from megatron_agg.cli import main\n"
            "for argv in (['--help'], ['patch', '--help'], ['compare', '--help']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('megatron', 'harness')))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.strip().splitlines()[-1].split()
    assert "megatron_agg.cli" in loaded and "megatron_agg.compare" in loaded
    heavy = [m for m in loaded if m.startswith(("harness", "megatron.", "megatron_agg.testing"))
             or m.startswith("megatron_agg.compare.") and m != "megatron_agg.compare.checks"]
    assert not heavy, heavy
