"""``megatron-agg patch``: detects the release of a Megatron-LM / verl checkout, applies the patch of
that release, is idempotent, reverts byte for byte, and says clearly (one ``error:`` line, exit 1)
when no patch fits. Runs on temporary copies of the pinned upstream files (no network, no GPU)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_agg import cli
from megatron_agg.patching import (TARGETS, PatchError, patch_path, patched_digests_of_copies, patches_root,
                                   pinned_digests, pinned_folder, run_patch)

from conftest import REPO

MLM = TARGETS["megatron-lm"]
VERL = TARGETS["verl"]
#: megatron/core/package_info.py of each line (what a Megatron-LM checkout declares)
MLM_VERSIONS = {"core_v0.13.1": (13, 1), "core_v0.14.0": (14, 0), "core_v0.15.3": (15, 3), "core_v0.16.1": (16, 1),
                "core_v0.17.1": (17, 1), "core_v0.18.2": (18, 2), "core_r0.19.0": (19, 1), "main": (20, 0)}


def checkout(target, release: str, root: Path, version=None, edit=None) -> Path:
    """A copy of ``release``'s pinned files under ``root`` (optionally with a package_info.py /
    verl/version/version declaring ``version``, and ``edit`` applied to the first file)."""
    for f in target.files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pinned_folder(target, release) / f, root / f)
    if version is not None and target is MLM:
        info = root / "megatron" / "core" / "package_info.py"
        info.parent.mkdir(parents=True, exist_ok=True)
        major, minor, patch = version.split(".")
        info.write_text(f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\nPRE_RELEASE = ''\n")
    elif version is not None:
        (root / "verl" / "version").mkdir(parents=True, exist_ok=True)
        (root / "verl" / "version" / "version").write_text(version + "\n")
    if edit is not None:
        first = root / target.files[0]
        first.write_text(edit(first.read_text()))
    return root


def snapshot(target, root: Path) -> dict:
    return {f: (root / f).read_bytes() for f in target.files}


def patched_by_git(target, release: str, files: dict, tmp: Path) -> dict:
    """``files`` with the release's patch applied by plain git apply (the expected result)."""
    for f, data in files.items():
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp / f).write_bytes(data)
    subprocess.run(["git", "apply", str(patch_path(target, release))], cwd=tmp, check=True, capture_output=True)
    return snapshot(target, tmp)


def cycle(target, release: str, root: Path, expected_how: str, tmp: Path, **kw) -> None:
    """check → apply → apply again (no-op) → check revert → revert → revert again (no-op)."""
    original = snapshot(target, root)
    expected = patched_by_git(target, release, original, tmp / "expected")
    result = run_patch(target.name, root, check=True, **kw)
    assert (result.action, result.release) == ("would-apply", release) and expected_how in result.detection.how
    assert snapshot(target, root) == original  # --check writes nothing
    result = run_patch(target.name, root, **kw)
    assert (result.action, result.release) == ("applied", release), result
    assert snapshot(target, root) == expected
    assert result.patch == patch_path(target, release) and result.files == tuple(root / f for f in target.files)
    again = run_patch(target.name, root, **kw)
    assert (again.action, again.release) == ("already-patched", release)
    assert snapshot(target, root) == expected
    assert run_patch(target.name, root, revert=True, check=True, **kw).action == "would-revert"
    assert run_patch(target.name, root, revert=True, **kw).action == "reverted"
    assert snapshot(target, root) == original  # byte for byte
    assert run_patch(target.name, root, revert=True, **kw).action == "not-patched"


def test_patches_are_found():
    """From the source checkout (editable install) or the installed package (tests/test_packaging.py
    builds a wheel and checks the installed copy)."""
    import megatron_agg

    assert patches_root() in (REPO / "patches", Path(megatron_agg.__file__).resolve().parent / "_patches")
    for target in TARGETS.values():
        for release in target.releases:
            assert pinned_folder(target, release).is_dir(), (target.name, release)
    for release in MLM.releases:
        assert patch_path(MLM, release).is_file()


@pytest.mark.parametrize("target,release", [(t, r) for t in TARGETS.values() for r in t.releases],
                         ids=lambda v: getattr(v, "name", v))
def test_shipped_manifests_match_the_pinned_copies(target, release):
    """The wheel ships the pinned copies' digests, not the copies: `patch` recognises a release
    (unmodified, or already patched) by upstream/SHA256SUMS and upstream/PATCHED.SHA256SUMS, which
    must say what the copies and the patches in the repository give (scripts/update_upstream_sums.sh)."""
    import hashlib

    folder = pinned_folder(target, release)
    assert pinned_digests(target, release) == {f: hashlib.sha256((folder / f).read_bytes()).hexdigest()
                                               for f in target.files}
    assert pinned_digests(target, release, patched=True) == patched_digests_of_copies(target, release), \
        "upstream/PATCHED.SHA256SUMS is stale: run scripts/update_upstream_sums.sh"


@pytest.mark.parametrize("release", MLM.releases)
def test_megatron_lm_release_detected_by_its_files(release, tmp_path):
    """A folder with the release's pretrain_gpt.py only (next to the megatron-core wheel):
    recognised by its sha256 — also once patched, whatever megatron-core is installed."""
    root = checkout(MLM, release, tmp_path / "mlm")
    cycle(MLM, release, root, f"byte-identical to the pinned {release} copy", tmp_path)
    run_patch("megatron-lm", root)
    result = run_patch("megatron-lm", root)
    assert result.action == "already-patched" and "with its patch" in result.detection.how


@pytest.mark.parametrize("release", MLM.releases)
def test_megatron_lm_release_detected_by_package_info(release, tmp_path):
    """A checkout whose pretrain_gpt.py is not the pinned one (here: a changed first line) is
    matched by megatron/core/package_info.py: the patch of that minor line."""
    minor, patch = MLM_VERSIONS[release]
    root = checkout(MLM, release, tmp_path / "mlm", version=f"0.{minor}.{patch}",
                    edit=lambda text: "# a local comment\n" + text)
    cycle(MLM, release, root, f"megatron/core/package_info.py says 0.{minor}.{patch}", tmp_path / "x")


def test_another_patch_of_the_same_line_and_main_by_version(tmp_path):
    """0.16.0 takes the core_v0.16.1 patch; a megatron-core newer than the last release line is main."""
    root = checkout(MLM, "core_v0.16.1", tmp_path / "a", version="0.16.0", edit=lambda t: "# local\n" + t)
    assert run_patch("megatron-lm", root).release == "core_v0.16.1"
    root = checkout(MLM, "main", tmp_path / "b", version="0.21.0", edit=lambda t: "# local\n" + t)
    assert run_patch("megatron-lm", root).release == "main"


def test_release_override(tmp_path):
    root = checkout(MLM, "core_v0.18.2", tmp_path / "mlm", version="0.16.1")  # package_info says otherwise
    original = snapshot(MLM, root)
    result = run_patch("megatron-lm", root, release="core_v0.18.2")
    assert result.action == "applied" and result.detection.how == "chosen with --release"
    assert run_patch("megatron-lm", root, release="core_v0.18.2", revert=True).action == "reverted"
    assert snapshot(MLM, root) == original
    with pytest.raises(PatchError, match=r"core_v0\.18\.2 patch applies: pass --release core_v0\.18\.2"):
        run_patch("megatron-lm", root, release="core_v0.13.1")
    with pytest.raises(PatchError, match="no megatron-lm patch for release 'v9'"):
        run_patch("megatron-lm", root, release="v9")
    assert snapshot(MLM, root) == original


def _run_cli(argv, capsys) -> tuple:
    code = cli.main(["patch", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_modified_file_no_patch_fits_is_a_clear_error(tmp_path, capsys):
    """get_batch edited where the patch goes: nothing is written, one error line names the
    detected release, the patches tried and what to do; exit status 1, no traceback."""
    def edit(text):
        return text.replace("batch = get_batch_on_this_cp_rank(", "batch = my_own_cp_split(", 1)

    root = checkout(MLM, "core_r0.19.0", tmp_path / "mlm", version="0.19.1", edit=edit)
    original = snapshot(MLM, root)
    code, out, err = _run_cli(["--target", "megatron-lm", "--path", str(root)], capsys)
    assert code == 1 and out == "" and snapshot(MLM, root) == original
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron-agg patch: error: ") and "Traceback" not in err
    for expected in ("core_r0.19.0", "package_info.py says 0.19.1", "does not apply cleanly",
                     "Also tried the other releases' patches", "main", "none fits either", "check out"):
        assert expected in lines[0], expected


def test_an_edited_checkout_without_package_info_names_its_files_first(tmp_path, capsys):
    """The release then comes from the installed megatron-core: the error line says first what the
    checkout holds (files that match no pinned copy), then where the release was read."""
    root = checkout(MLM, "core_r0.19.0", tmp_path / "mlm",
                    edit=lambda t: t.replace("batch = get_batch_on_this_cp_rank(", "batch = my_own_cp_split(", 1))
    code, out, err = _run_cli(["--target", "megatron-lm", "--path", str(root)], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1
    found = err.index(f"pretrain_gpt.py in {root} is not byte-identical to any release's pinned copy")
    assert found < err.index("the installed megatron-core") < err.index("does not apply cleanly")


def test_unknown_release_and_not_a_checkout(tmp_path, capsys):
    root = checkout(MLM, "core_v0.13.1", tmp_path / "old", version="0.12.3", edit=lambda t: "# local\n" + t)
    code, _, err = _run_cli(["--target", "megatron-lm", "--path", str(root)], capsys)
    assert code == 1 and "0.12.3, a release without a patch" in err and "--release" in err
    assert "core_v0.13.1 patch applies: pass --release core_v0.13.1" in err  # the hint
    code, _, err = _run_cli(["--target", "megatron-lm", "--path", str(tmp_path / "nowhere")], capsys)
    assert code == 1 and err.count("\n") == 1 and "is not a folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run_cli(["--target", "verl", "--path", str(tmp_path / "empty")], capsys)
    assert code == 1 and "has no verl/trainer/ppo/core_algos.py" in err


def test_cli_reports_what_it_did(tmp_path, capsys):
    root = checkout(MLM, "core_v0.15.3", tmp_path / "mlm")
    code, out, err = _run_cli(["--target", "megatron-lm", "--path", str(root)], capsys)
    assert code == 0 and err == ""
    assert out.splitlines() == [
        ("megatron-agg patch: megatron-lm core_v0.15.3 (pretrain_gpt.py is byte-identical to the pinned "
         "core_v0.15.3 copy)"),
        f"megatron-agg patch: applied {patch_path(MLM, 'core_v0.15.3')} to {root / 'pretrain_gpt.py'}",
    ]
    code, out, _ = _run_cli(["--target", "megatron-lm", "--path", str(root)], capsys)
    assert code == 0 and "already patched" in out and "nothing to do" in out
    code, out, _ = _run_cli(["--target", "megatron-lm", "--path", str(root), "--revert"], capsys)
    assert code == 0 and "reverted" in out


def test_inside_another_git_repository_and_with_patch_instead_of_git(tmp_path, monkeypatch):
    """The checkout may sit in a subfolder of an unrelated git repository; without git, patch(1)."""
    outer = tmp_path / "outer"
    outer.mkdir()
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    root = checkout(MLM, "core_v0.17.1", outer / "third_party" / "megatron")
    cycle(MLM, "core_v0.17.1", root, "byte-identical", tmp_path)
    if shutil.which("patch") is None:
        pytest.skip("patch(1) is not installed")
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "git" else real_which(name))
    root = checkout(MLM, "core_v0.14.0", tmp_path / "nogit")
    cycle(MLM, "core_v0.14.0", root, "byte-identical", tmp_path / "x")


# -- verl ----------------------------------------------------------------------------------------------
def _verl_patch_or_skip(release: str) -> None:
    if not patch_path(VERL, release).is_file():
        pytest.skip(f"patches/verl/{release}/{VERL.patch_name} is not there yet (the verl patches are made separately)")


@pytest.mark.parametrize("release", VERL.releases)
def test_verl_release_detected_by_its_files(release, tmp_path):
    _verl_patch_or_skip(release)
    root = checkout(VERL, release, tmp_path / "verl")
    cycle(VERL, release, root, f"byte-identical to the pinned {release} copy", tmp_path)


@pytest.mark.parametrize("release,version", [("v0.9.0", "0.9.0"), ("v0.9.1", "0.9.1"), ("main", "0.10.0.dev")])
def test_verl_release_detected_by_its_version_file(release, version, tmp_path):
    _verl_patch_or_skip(release)
    root = checkout(VERL, release, tmp_path / "verl", version=version, edit=lambda t: "# local\n" + t)
    cycle(VERL, release, root, f"verl/version/version says {version}", tmp_path)


def test_revert_of_an_edited_patched_file_is_a_clear_error(tmp_path, capsys):
    root = checkout(MLM, "core_v0.18.2", tmp_path / "mlm", version="0.18.2")
    assert run_patch("megatron-lm", root).action == "applied"
    path = root / "pretrain_gpt.py"
    path.write_text(path.read_text().replace("_megatron_agg_stash_counts(batch)\n", "_megatron_agg_stash_counts(batch)  # mine\n", 1))
    edited = snapshot(MLM, root)
    code, out, err = _run_cli(["--target", "megatron-lm", "--path", str(root), "--revert"], capsys)
    assert code == 1 and out == "" and snapshot(MLM, root) == edited
    assert err.count("\n") == 1 and "does not revert cleanly" in err and "package_info.py says 0.18.2" in err
