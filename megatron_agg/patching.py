"""``megatron-agg patch``: apply (or revert) the integration patch that fits an upstream checkout.

    megatron-agg patch --target megatron-lm --path /path/to/Megatron-LM [--release R] [--revert] [--check]
    megatron-agg patch --target verl --path /path/to/verl [--release R] [--revert] [--check]

The patches ship with the package (``patches/<target>/<release>/<file>.patch``; installed as
``megatron_agg/_patches``). Which one fits is decided, in this order:

1. ``--release R``, when given;
2. the touched files are byte-identical (sha256) to the pinned, unmodified upstream copies of a
   release, or to those copies with the release's patch applied: that release. The copies stay in
   the repository (``patches/upstream/``, for the tests); what ships is their sha256 manifest
   (``upstream/SHA256SUMS``) and that of the patched copies (``upstream/PATCHED.SHA256SUMS``),
   both written by ``scripts/update_upstream_sums.sh``;
3. the version the checkout declares — Megatron-LM: ``megatron/core/package_info.py`` (``0.16.x``
   → the ``core_v0.16.1`` patch, ``0.20`` and later → ``main``), else the installed megatron-core
   (a folder with only ``pretrain_gpt.py`` and friends next to the megatron-core wheel); verl:
   ``verl/version/version`` or ``__version__`` in ``verl/__init__.py`` (``0.9.0``, ``0.9.1``, a
   ``0.10`` development version → ``main``).

Then ``git apply --check`` (``patch --dry-run`` where git is missing) decides: the patch applies
→ it is applied; it reverts → the checkout is already patched (nothing to do); neither → an
error that names the detected release, the patches tried and what to do. Nothing is written
unless the whole patch applies. The checkout need not be a git repository.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "TARGETS",
    "Detection",
    "PatchError",
    "PatchResult",
    "Target",
    "detect_release",
    "patch_path",
    "patched_digests_of_copies",
    "patches_root",
    "pinned_digests",
    "pinned_folder",
    "release_for_version",
    "run_patch",
]


class PatchError(RuntimeError):
    """A patch could not be applied or reverted; the message says what was found and what to do."""


@dataclass(frozen=True)
class Target:
    """An upstream project megatron_agg ships patches for.

    Attributes:
        name: the ``--target`` name (also the folder under ``patches/``).
        patch_name: the patch's file name inside ``patches/<name>/<release>/``.
        files: the files the patch touches, relative to the checkout's root.
        pinned: release → folder of its pinned, unmodified copies, relative to ``patches/upstream``.
    """

    name: str
    patch_name: str
    files: tuple[str, ...]
    pinned: Mapping[str, str] = field(default_factory=dict)

    @property
    def releases(self) -> tuple[str, ...]:
        """The releases with a patch, oldest first (``main`` last)."""
        return tuple(self.pinned)


MEGATRON_LM = Target(
    name="megatron-lm",
    patch_name="pretrain_gpt.patch",
    files=("pretrain_gpt.py",),
    pinned={
        "core_v0.13.1": "releases/Megatron-LM-core_v0.13.1",
        "core_v0.14.0": "releases/Megatron-LM-core_v0.14.0",
        "core_v0.15.3": "releases/Megatron-LM-core_v0.15.3",
        "core_v0.16.1": "releases/Megatron-LM-core_v0.16.1",
        "core_v0.17.1": "releases/Megatron-LM-core_v0.17.1",
        "core_v0.18.2": "releases/Megatron-LM-core_v0.18.2",
        "core_r0.19.0": "releases/Megatron-LM-core_r0.19.0",
        "main": "Megatron-LM",
    },
)
VERL = Target(
    name="verl",
    patch_name="megatron_engine.patch",
    files=(
        "verl/trainer/ppo/core_algos.py",
        "verl/workers/engine/megatron/transformer_impl.py",
        "verl/workers/utils/losses.py",
    ),
    pinned={"v0.9.0": "releases/verl-0.9.0", "v0.9.1": "releases/verl-0.9.1", "main": "verl"},
)
#: ``--target`` name → :class:`Target`.
TARGETS: dict[str, Target] = {t.name: t for t in (MEGATRON_LM, VERL)}

#: Megatron-LM: the minor version of megatron-core's 0.x line → the patch of that line.
_MEGATRON_LM_LINES = {13: "core_v0.13.1", 14: "core_v0.14.0", 15: "core_v0.15.3", 16: "core_v0.16.1",
                      17: "core_v0.17.1", 18: "core_v0.18.2", 19: "core_r0.19.0"}
#: Megatron-LM ``main`` declares the next minor version (0.20.0 at the pinned commit).
_MEGATRON_LM_MAIN_FROM = 20


@dataclass(frozen=True)
class Detection:
    """Which release a checkout is, and how that was found.

    Attributes:
        release: the release whose patch fits, or ``None`` when it could not be told.
        how: one line saying how (``"pretrain_gpt.py is byte-identical to the pinned core_v0.16.1
            copy"``, ``"megatron/core/package_info.py says 0.16.0"``, ``"chosen with --release"``) or, for
            ``None``, why not.
    """

    release: str | None
    how: str


@dataclass(frozen=True)
class PatchResult:
    """What :func:`run_patch` did.

    Attributes:
        action: ``"applied"``, ``"reverted"``, ``"already-patched"``, ``"not-patched"`` (a revert
            with nothing to revert), ``"would-apply"`` or ``"would-revert"`` (``check=True``).
        target, release, patch: the target's name, the release and the patch file used.
        detection: how the release was found.
        files: the files the patch touches (absolute paths).
    """

    action: str
    target: str
    release: str
    patch: Path
    detection: Detection
    files: tuple[Path, ...]

    def lines(self, prog: str = "megatron-agg patch") -> list[str]:
        """The report printed by the console script."""
        names = ", ".join(str(f) for f in self.files)
        head = f"{prog}: {self.target} {self.release} ({self.detection.how})"
        body = {
            "applied": f"applied {self.patch} to {names}",
            "reverted": f"reverted {self.patch} from {names}; the files are upstream's again",
            "already-patched": f"{names}: already patched with {self.patch}; nothing to do",
            "not-patched": f"{names}: not patched with {self.patch}; nothing to revert",
            "would-apply": f"{self.patch} applies cleanly to {names} (--check: nothing written)",
            "would-revert": f"{self.patch} reverts cleanly from {names} (--check: nothing written)",
        }[self.action]
        return [head, f"{prog}: {body}"]


# -- where the patches are ---------------------------------------------------------------------------
def patches_root() -> Path:
    """The folder holding ``megatron-lm/``, ``verl/`` and ``upstream/``: ``megatron_agg/_patches``
    in an installed package, the repository's ``patches/`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_patches", here.parent / "patches"):
        if (candidate / MEGATRON_LM.name).is_dir():
            return candidate
    raise PatchError(
        f"the patches are missing: neither {here / '_patches'} (an installed megatron_agg) nor "
        f"{here.parent / 'patches'} (a source checkout) exists. Reinstall megatron_agg."
    )


def patch_path(target: Target, release: str) -> Path:
    """``patches/<target>/<release>/<patch_name>``."""
    return patches_root() / target.name / release / target.patch_name


def pinned_folder(target: Target, release: str) -> Path:
    """The folder of ``release``'s pinned, unmodified upstream files (files at their upstream paths).

    Only in a source checkout: an installed megatron_agg ships their digests, not the copies
    (:func:`pinned_digests`)."""
    return patches_root() / "upstream" / target.pinned[release]


#: The manifests under ``upstream/``: sha256 of every pinned copy, and of each release's touched
#: files with its patch applied (``sha256sum`` lines: ``<digest>  ./<folder>/<file>``).
MANIFEST = "SHA256SUMS"
PATCHED_MANIFEST = "PATCHED.SHA256SUMS"


def _read_manifest(name: str) -> dict[str, str]:
    """``<folder>/<file>`` → sha256, from ``upstream/<name>``."""
    path = patches_root() / "upstream" / name
    if not path.is_file():
        raise PatchError(f"the release manifest {path} is missing: reinstall megatron_agg.")
    digests = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name_ = line.split(maxsplit=1)
            digests[name_[2:] if name_.startswith("./") else name_] = digest
    return digests


def _digests_in(manifest: Mapping[str, str], target: Target, release: str) -> dict[str, str] | None:
    names = {f: f"{target.pinned[release]}/{f}" for f in target.files}
    if not all(n in manifest for n in names.values()):
        return None
    return {f: manifest[n] for f, n in names.items()}


def pinned_digests(target: Target, release: str, patched: bool = False) -> dict[str, str] | None:
    """sha256 of each file ``target``'s patch touches, in ``release``'s pinned, unmodified copy (with
    ``patched``: with the release's patch applied), from the shipped manifests; ``None``: not listed
    (with ``patched``: the patch does not apply to the pinned copy)."""
    return _digests_in(_read_manifest(PATCHED_MANIFEST if patched else MANIFEST), target, release)


# -- which release -----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version_tuple(version: str) -> tuple[int, int, int] | None:
    match = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def release_for_version(target: Target, version: str) -> str | None:
    """The release whose patch fits a checkout that declares ``version`` (``None``: no patch)."""
    parsed = _version_tuple(version)
    if parsed is None:
        return None
    major, minor, patch = parsed
    if target is MEGATRON_LM:
        if major != 0:
            return None
        if minor >= _MEGATRON_LM_MAIN_FROM:
            return "main"
        return _MEGATRON_LM_LINES.get(minor)
    if target is VERL:
        if (major, minor) == (0, 9) and f"v0.9.{patch}" in target.pinned and not re.search(r"dev|rc", version):
            return f"v0.9.{patch}"
        if (major, minor) >= (0, 10):
            return "main"
        return None
    return None


def _declared_version(target: Target, root: Path) -> tuple[str | None, str]:
    """The version ``root`` declares, and where it was read (or why none was found)."""
    if target is MEGATRON_LM:
        info = root / "megatron" / "core" / "package_info.py"
        if info.is_file():
            text = info.read_text(errors="replace")
            parts = [re.search(rf"^{name}\s*=\s*['\"]?([0-9A-Za-z]*)['\"]?", text, re.MULTILINE)
                     for name in ("MAJOR", "MINOR", "PATCH")]
            if all(parts):
                return ".".join(p.group(1) for p in parts), "megatron/core/package_info.py"
            return None, "megatron/core/package_info.py has no MAJOR/MINOR/PATCH"
        return _installed("megatron-core", "no megatron/core/package_info.py in the checkout")
    if target is VERL:
        version_file = root / "verl" / "version" / "version"
        if version_file.is_file():
            return version_file.read_text().strip(), "verl/version/version"
        init = root / "verl" / "__init__.py"
        if init.is_file():
            match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", init.read_text(errors="replace"), re.MULTILINE)
            if match:
                return match.group(1), "verl/__init__.py"
        return _installed("verl", "no verl/version/version nor __version__ in verl/__init__.py")
    return None, "unknown target"


def _installed(distribution: str, why: str) -> tuple[str | None, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution), f"{why}; the installed {distribution}"
    except PackageNotFoundError:
        return None, f"{why}, and {distribution} is not installed"


def patched_digests_of_copies(target: Target, release: str) -> dict[str, str] | None:
    """sha256 of each file of ``release``'s pinned copy with its patch applied (``None``: it does
    not apply there), computed from the copies in a temporary folder: what
    ``scripts/update_upstream_sums.sh`` writes to ``upstream/PATCHED.SHA256SUMS`` (source checkout
    only; :func:`detect_release` reads the manifest)."""
    pinned, patch = pinned_folder(target, release), patch_path(target, release)
    if not (patch.is_file() and all((pinned / f).is_file() for f in target.files)):
        return None
    with tempfile.TemporaryDirectory(prefix="megatron_agg_patch_") as tmp:
        for f in target.files:
            (Path(tmp) / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pinned / f, Path(tmp) / f)
        if _applies(patch, Path(tmp), check=False)[0]:
            return {f: _sha256(Path(tmp) / f) for f in target.files}
    return None


def detect_release(target: Target, root: Path) -> Detection:
    """Which of ``target``'s releases ``root`` is.

    In this order: the files are byte-identical to a release's pinned copy; or to that copy with
    the release's patch applied (an already patched checkout); else the version the checkout
    declares (:func:`release_for_version`)."""
    what = target.files[0] if len(target.files) == 1 else f"the {len(target.files)} patched files"
    verb = "is" if len(target.files) == 1 else "are"
    if all((root / f).is_file() for f in target.files):
        digests = {f: _sha256(root / f) for f in target.files}
        pinned, patched = _read_manifest(MANIFEST), _read_manifest(PATCHED_MANIFEST)
        for release in target.releases:
            if _digests_in(pinned, target, release) == digests:
                return Detection(release, f"{what} {verb} byte-identical to the pinned {release} copy")
        for release in target.releases:
            if _digests_in(patched, target, release) == digests:
                return Detection(release, f"{what} {verb} byte-identical to the pinned {release} copy with its patch")
    version, source = _declared_version(target, root)
    if version is None:
        return Detection(None, f"the files match no pinned release copy and the version is unknown ({source})")
    release = release_for_version(target, version)
    if release is None:
        return Detection(None, f"{source} says {version}, a release without a patch")
    return Detection(release, f"{source} says {version}")


# -- applying --------------------------------------------------------------------------------------------
def _applies(patch: Path, root: Path, reverse: bool = False, check: bool = True) -> tuple[bool, str]:
    """Run ``git apply`` (or ``patch -p1``) in ``root``; (succeeded, its first error line)."""
    if shutil.which("git"):
        cmd = ["git", "apply", *(["-R"] if reverse else []), *(["--check"] if check else []), str(patch)]
    elif shutil.which("patch"):
        cmd = ["patch", "-p1", "--forward", "--fuzz=0", "--no-backup-if-mismatch", "-r", os.devnull, "-s",
               *(["-R"] if reverse else []), *(["--dry-run"] if check else []), "-i", str(patch)]
    else:
        raise PatchError("neither git nor patch is installed: install one of them (git apply is used when present).")
    proc = subprocess.run(cmd, check=False, cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, LC_ALL="C", GIT_CONFIG_NOSYSTEM="1"))
    message = next((line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()), "")
    return proc.returncode == 0, message


def _fitting(target: Target, root: Path, skip: Sequence[str]) -> tuple[list[str], list[str]]:
    """Releases (other than ``skip``) whose patch applies to, and whose patch reverts from, ``root``."""
    applies, reverts = [], []
    for release in target.releases:
        if release in skip or not patch_path(target, release).is_file():
            continue
        if _applies(patch_path(target, release), root)[0]:
            applies.append(release)
        elif _applies(patch_path(target, release), root, reverse=True)[0]:
            reverts.append(release)
    return applies, reverts


def run_patch(target: str, path: os.PathLike, release: str | None = None, revert: bool = False,
              check: bool = False) -> PatchResult:
    """Apply (or, with ``revert``, revert) the patch of ``target`` that fits the checkout at ``path``.

    Args:
        target: ``"megatron-lm"`` or ``"verl"``.
        path: the checkout's root (the folder with ``pretrain_gpt.py``, or the one holding ``verl/``).
        release: the release whose patch to use; default: detected (:func:`detect_release`).
        revert: revert the patch instead of applying it.
        check: only say what would happen; write nothing.

    Returns what was done. Applying to an already patched checkout (or reverting an unpatched one)
    does nothing and says so. Raises :class:`PatchError` when no patch fits, with the detected
    release, the patches tried and what to do.
    """
    if target not in TARGETS:
        raise PatchError(f"unknown target {target!r}; one of {', '.join(TARGETS)}.")
    spec = TARGETS[target]
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise PatchError(f"{root} is not a folder: pass --path the root of a {target} checkout.")
    missing = [f for f in spec.files if not (root / f).is_file()]
    if missing:
        raise PatchError(f"{root} has no {', '.join(missing)}: pass --path the root of a {target} checkout "
                         f"(the folder that holds {spec.files[0]}).")
    if release is not None:
        if release not in spec.pinned:
            raise PatchError(f"no {target} patch for release {release!r}; --release is one of {', '.join(spec.releases)}.")
        detection = Detection(release, "chosen with --release")
    else:
        detection = detect_release(spec, root)
    files = tuple(root / f for f in spec.files)
    releases = ", ".join(spec.releases)
    if detection.release is None:
        applies, reverts = _fitting(spec, root, skip=())
        raise PatchError(f"cannot tell which {target} release {root} is: {detection.how}. Tried every "
                         f"release's patch: {_hint(applies, reverts, revert)} Pass --release (one of {releases}).")
    patch = patch_path(spec, detection.release)
    if not patch.is_file():
        raise PatchError(f"the {detection.release} patch is missing from this installation ({patch}); "
                         "reinstall megatron_agg.")
    forward, forward_error = _applies(patch, root)
    backward, backward_error = (False, "") if forward else _applies(patch, root, reverse=True)

    def result(action: str) -> PatchResult:
        return PatchResult(action, target, detection.release, patch, detection, files)

    if not revert and backward:
        return result("already-patched")
    if revert and forward:
        return result("not-patched")
    if not revert and forward:
        if not check:
            _run_or_raise(patch, root, reverse=False)
        return result("would-apply" if check else "applied")
    if revert and backward:
        if not check:
            _run_or_raise(patch, root, reverse=True)
        return result("would-revert" if check else "reverted")
    applies, reverts = _fitting(spec, root, skip=(detection.release,))
    others = [r for r in spec.releases if r != detection.release]
    doing = "revert" if revert else "apply"
    error = (backward_error if revert else forward_error) or f"git apply{' -R' if revert else ''} failed"
    # What the checkout holds comes first: the files match no release's pinned copy (patched or not),
    # so the release came from a version declaration (possibly the installed megatron-core's) or --release.
    what = "is not byte-identical" if len(spec.files) == 1 else "are not byte-identical"
    raise PatchError(
        f"{', '.join(spec.files)} in {root} {what} to any release's pinned copy, patched or not (local "
        f"edits?); taken as {target} {detection.release} ({detection.how}), but the {detection.release} patch "
        f"({patch}) does not {doing} cleanly: {error}. Also tried the other "
        f"releases' patches ({', '.join(others)}): {_hint(applies, reverts, revert)} "
        f"Otherwise {', '.join(spec.files)} {_is_not_unmodified(len(spec.files))} of a supported release: "
        "check out the release's files (or undo local edits) and run again."
    )


def _is_not_unmodified(count: int) -> str:
    return "is not the unmodified file" if count == 1 else "are not the unmodified files"


def _hint(applies: Sequence[str], reverts: Sequence[str], revert: bool) -> str:
    """What the other releases' patches say about the files."""
    if revert and reverts:
        return f"the {' and '.join(reverts)} patch reverts: pass --release {reverts[0]} if that is the release."
    if not revert and reverts:
        return f"the files look patched with the {' and '.join(reverts)} patch already."
    if not revert and applies:
        return f"the {' and '.join(applies)} patch applies: pass --release {applies[0]} if that is the release."
    if revert and applies:
        return "the files look unpatched (nothing to revert)."
    return "none fits either."


def _run_or_raise(patch: Path, root: Path, reverse: bool) -> None:
    ok, error = _applies(patch, root, reverse=reverse, check=False)
    if not ok:  # the check passed a moment ago: the files changed under us
        raise PatchError(f"{'reverting' if reverse else 'applying'} {patch} failed: {error}")
