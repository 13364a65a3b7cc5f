"""patches/verl/<release>/megatron_engine.patch for every supported verl release: it applies to the
release's pinned files without offset and reverts byte for byte, the pinned files are upstream's,
the release patch adds what the main patch adds (but the lifted refusal where the release has none),
``agg_loss`` is unchanged without megatron_agg, and the patched engine gives verl's single-process
gradients under every layout (4 CPU ranks, one launch for all releases: tests/support/verl_check.py).
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SUMMARY, torchrun

PATCHES = REPO / "patches" / "verl"
VENDORED = REPO / "patches" / "upstream"
SHARED = REPO.parent / "shared" / "upstream"  # on the dev machines; CI has the vendored copies
FILES = [
    "verl/trainer/ppo/core_algos.py",
    "verl/workers/engine/megatron/transformer_impl.py",
    "verl/workers/utils/losses.py",
]
#: release -> (its pinned files below patches/upstream, whether its engine run covers every mode:
#: the others run token-mean and seq-mean-token-mean, the mode whose engine code differs between
#: releases; agg_loss is the same code in all three).
RELEASES = {
    "v0.9.0": ("releases/verl-0.9.0", False),
    "v0.9.1": ("releases/verl-0.9.1", False),
    "main": ("verl", True),
}
#: Checks verl_check.py prints per release: (layouts × modes + value/sft runs) × 2 conventions + 4 controls.
CHECKS = {True: (5 * 5 + 6) * 2 + 4, False: (5 * 2 + 6) * 2 + 4}


def pinned(release: str) -> Path:
    return VENDORED / RELEASES[release][0]


def patch_file(release: str) -> Path:
    return PATCHES / release / "megatron_engine.patch"


def git_apply(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "apply", *args], check=False, cwd=cwd, capture_output=True, text=True)


def verl_trees(release: str, root: Path) -> tuple[Path, Path]:
    """Copies of the release's pinned files below ``root``: (patched, original)."""
    patched, original = root / release / "patched", root / release / "original"
    for tree in (patched, original):
        shutil.copytree(pinned(release) / "verl", tree / "verl")
    proc = git_apply(patched, str(patch_file(release)))
    assert proc.returncode == 0, proc.stderr
    return patched, original


def added_lines_by_hunk(patch: Path) -> list[list[str]]:
    hunks: list[list[str]] = []
    for line in patch.read_text().splitlines():
        if line.startswith("@@"):
            hunks.append([])
        elif line.startswith("+") and not line.startswith("+++"):
            hunks[-1].append(line[1:])
    return hunks


def test_one_patch_per_supported_release():
    """The layout `megatron-agg patch --target verl` relies on."""
    assert sorted(p.name for p in PATCHES.iterdir() if p.is_dir()) == sorted(RELEASES)
    assert all(patch_file(release).is_file() for release in RELEASES)


@pytest.mark.parametrize("release", RELEASES)
def test_patch_applies_without_offset_and_reverts(release, tmp_path):
    for f in FILES:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pinned(release) / f, tmp_path / f)
    patch = str(patch_file(release))
    check = git_apply(tmp_path, "--check", "-v", patch)
    assert check.returncode == 0, check.stderr
    assert "offset" not in check.stderr and "fuzz" not in check.stderr, check.stderr  # made for this release
    assert sorted(re.findall(r"^diff --git a/(\S+)", Path(patch).read_text(), re.MULTILINE)) == sorted(FILES)
    assert git_apply(tmp_path, patch).returncode == 0
    assert git_apply(tmp_path, "--check", "-R", patch).returncode == 0
    assert git_apply(tmp_path, "-R", patch).returncode == 0
    for f in FILES:  # reverted byte for byte
        assert (tmp_path / f).read_bytes() == (pinned(release) / f).read_bytes(), f


@pytest.mark.parametrize("release", RELEASES)
def test_vendored_files_equal_the_shared_upstream_copies(release):
    if not SHARED.is_dir():
        pytest.skip("no ../shared/upstream here (CI): the vendored copies are all there is")
    for name in ["LICENSE", *FILES]:
        assert (pinned(release) / name).read_bytes() == (SHARED / RELEASES[release][0] / name).read_bytes(), name
    assert sorted(str(p.relative_to(pinned(release))) for p in pinned(release).rglob("*") if p.is_file()) == sorted(
        ["LICENSE", *FILES])


@pytest.mark.parametrize("release", [r for r in RELEASES if r != "main"])
def test_release_patch_adds_what_the_main_patch_adds(release):
    """The same feature everywhere: every line a release patch adds is one the main patch adds, and
    the main patch's lines all appear, but its lifting of the seq-mean-token-mean refusal under
    calculate_per_token_loss where the release has no such refusal (verl PR #7915, v0.9.1)."""
    main_hunks = added_lines_by_hunk(patch_file("main"))
    ours = added_lines_by_hunk(patch_file(release))
    refusal = "loss_agg_mode='seq-mean-token-mean' is incompatible with" in (pinned(release) / FILES[1]).read_text()
    expected = [h for h in main_hunks if refusal or not any("and shares is None" in line for line in h)]
    assert ours == expected


@pytest.fixture
def verl_check():
    """tests/support/verl_check.py with verl's stand-in modules installed; uninstalled afterwards
    (the real modules the verl files import, torch's and Megatron's, stay: they cannot be reloaded)."""
    sys.path.insert(0, str(REPO / "tests" / "support"))
    saved, finders = dict(sys.modules), list(sys.meta_path)
    try:
        module = importlib.import_module("verl_check")
        module.install_verl_stubs()
        yield module
    finally:
        sys.path.remove(str(REPO / "tests" / "support"))
        sys.meta_path[:] = finders
        for name in list(sys.modules):
            if name in saved:
                sys.modules[name] = saved[name]
            elif name == "verl_check" or name.split(".")[0] in ("verl", "omegaconf", "tensordict", "mbridge"):
                del sys.modules[name]


@pytest.mark.parametrize("release", RELEASES)
def test_patched_agg_loss_is_unchanged_without_megatron_agg(release, tmp_path, verl_check):
    """The FSDP engine and the dp=1 definition go through agg_loss without StepShares: the patch
    must not change a single number there."""
    patched, original = verl_trees(release, tmp_path)
    new = verl_check.import_verl(patched).core_algos.agg_loss
    old = verl_check.import_verl(original).core_algos.agg_loss
    g = torch.Generator().manual_seed(0)
    loss, mask = torch.randn(5, 7, generator=g), (torch.rand(5, 7, generator=g) > 0.4).float()
    mask[2] = 0
    for mode in ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        for kw in ({}, {"dp_size": 4, "batch_num_tokens": 50, "global_batch_size": 20, "loss_scale_factor": 3}):
            assert torch.equal(new(loss, mask, mode, **kw), old(loss, mask, mode, **kw)), (mode, kw)
            assert torch.equal(new(loss, mask, mode, megatron_agg=None, **kw), old(loss, mask, mode, **kw))


# -- the patched engine, run for real on 4 CPU ranks: one launch for the selected releases --------
@pytest.fixture(scope="module")
def engine_run(request, tmp_path_factory) -> tuple[subprocess.CompletedProcess, float]:
    """One launch for the releases whose engine items this session selected: ``main`` in the full
    tier, the pinned releases (per upstream release, like the Megatron-LM end-to-end runs) in the
    e2e tier (``run_tests.sh --e2e``)."""
    selected = [r for r in RELEASES if any(
        item.originalname == "test_patched_verl_engine_gradients_equal_verls_definition"
        and item.callspec.params.get("release") == r for item in request.session.items)]
    root = tmp_path_factory.mktemp("verl_trees")
    args = [str(REPO / "tests" / "support" / "verl_check.py")]
    for release in selected:
        args += ["--tree", release, *map(str, verl_trees(release, root))]
    reduced = [release for release in selected if not RELEASES[release][1]]
    if reduced:
        args += ["--reduced", *reduced]
    t0 = time.perf_counter()
    proc = torchrun(4, args, timeout=1800)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("release", [r if RELEASES[r][1] else pytest.param(r, marks=pytest.mark.e2e)
                                     for r in RELEASES])
def test_patched_verl_engine_gradients_equal_verls_definition(release, engine_run):
    proc, seconds = engine_run
    lines = [line for line in proc.stdout.splitlines() if re.match(rf"(ok  |FAIL) {re.escape(release)} ", line)]
    full = RELEASES[release][1]
    assert len(lines) == CHECKS[full], proc.stdout[-4000:] + proc.stderr[-4000:]
    assert all(line.startswith("ok") for line in lines), "\n".join(lines)
    timing = re.search(rf"^# {re.escape(release)}: ([0-9.]+)s", proc.stdout, re.MULTILINE)
    matrix = ("ppo: DP4, TP2×DP2, PP2×DP2, PP2×VPP2×DP2, CP2×DP2 × " +
              ("5 modes" if full else "token-mean, seq-mean-token-mean"))
    SUMMARY.append(
        f"verl {release}: the patched Megatron engine (forward_backward_batch → ppo_loss/value_loss/sft_loss → "
        f"agg_loss → StepShares) gives verl's dp=1 gradients in {CHECKS[full] - 4} configurations ({matrix}; "
        "value and sft: DP4, CP2×DP2; each with the 2-tuple and calculate_per_token_loss); 4 controls of the "
        f"unpatched engine hold ({timing.group(1) if timing else '?'}s of the {seconds:.0f}s launch)")
