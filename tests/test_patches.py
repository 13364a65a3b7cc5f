"""patches/: they apply cleanly to the pinned upstream files; the patched Megatron-LM loss_func
computes what megatron_agg computes (imported with Megatron-LM's own modules stubbed); the patched
verl Megatron engine gives verl's single-process gradients under every layout (4 CPU ranks)."""

from __future__ import annotations

import builtins
import hashlib
import shutil
import subprocess
import types
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from megatron_agg import DeferredLossHook, LossTerm, PackedSequences, reference_loss

from conftest import REPO, SUMMARY, torchrun

VENDORED = REPO / "patches" / "upstream"
SHARED = REPO.parent / "shared" / "upstream"  # on the dev machines; CI has the vendored copies
PATCHES = {  # patch -> (upstream folder, files it touches)
    "megatron-lm/pretrain_gpt.patch": ("Megatron-LM", ["pretrain_gpt.py"]),
    "verl/megatron_engine.patch": ("verl", [
        "verl/trainer/ppo/core_algos.py",
        "verl/workers/engine/megatron/transformer_impl.py",
        "verl/workers/utils/losses.py",
    ]),
}


def upstream_root() -> Path:
    return SHARED if SHARED.is_dir() else VENDORED


def test_vendored_upstream_files_are_unmodified():
    for line in (VENDORED / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = VENDORED / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
        # README.md describes the folder (ours, and the team's in shared/, which grows with new
        # releases); every other file is an upstream file and must be byte-identical.
        if SHARED.is_dir() and (SHARED / name).exists() and Path(name).name != "README.md":
            assert (SHARED / name).read_bytes() == path.read_bytes(), f"{name} differs from ../shared/upstream"


@pytest.mark.parametrize("patch", sorted(PATCHES))
def test_patch_applies_cleanly_and_reverts(patch, tmp_path):
    folder, files = PATCHES[patch]
    for f in files:
        target = tmp_path / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(upstream_root() / folder / f, target)
    patch_file = str(REPO / "patches" / patch)
    run = partial(subprocess.run, cwd=tmp_path, capture_output=True, text=True)
    check = run(["git", "apply", "--check", "-v", patch_file])
    assert check.returncode == 0, check.stderr
    assert run(["git", "apply", patch_file]).returncode == 0
    assert run(["git", "apply", "--check", "-R", patch_file]).returncode == 0  # revertible
    assert run(["git", "apply", "-R", patch_file]).returncode == 0
    for f in files:  # reverted byte for byte
        assert (tmp_path / f).read_bytes() == (upstream_root() / folder / f).read_bytes()


# -- the patched Megatron-LM loss_func -----------------------------------------------------------
_REAL = ("torch", "megatron_agg", "functools", "typing", "json", "os", "warnings", "time", "math")


def load_patched_pretrain_gpt(tmp_path: Path, args: SimpleNamespace) -> types.ModuleType:
    """Apply the patch to a copy of pretrain_gpt.py and import it with every Megatron-LM import
    stubbed (only torch, megatron_agg and the standard library are real)."""
    shutil.copy(upstream_root() / "Megatron-LM" / "pretrain_gpt.py", tmp_path / "pretrain_gpt.py")
    proc = subprocess.run(["git", "apply", str(REPO / "patches" / "megatron-lm" / "pretrain_gpt.patch")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    real_import = builtins.__import__

    class Stub(types.ModuleType):  # any attribute, dunders included (e.g. __version__)
        def __getattr__(self, attr):
            return mock.MagicMock(name=f"{self.__name__}.{attr}")

    def stubbing_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name.split(".")[0] in _REAL:
            return real_import(name, globals, locals, fromlist, level)
        return Stub(name)

    module = types.ModuleType("patched_pretrain_gpt")
    module.__dict__["__builtins__"] = dict(vars(builtins), __import__=stubbing_import)
    code = compile((tmp_path / "pretrain_gpt.py").read_text(), "pretrain_gpt.py", "exec")
    exec(code, module.__dict__)
    module.get_args = lambda: args
    rerun = mock.MagicMock()
    module.get_rerun_state_machine = lambda: rerun
    return module


def megatron_config() -> SimpleNamespace:
    """What the deferred hook reads of the model's TransformerConfig (the patch passes the model)."""
    return SimpleNamespace(calculate_per_token_loss=True, finalize_model_grads_func=lambda *a, **k: None)


def mlm_args(**kw) -> SimpleNamespace:
    base = dict(logits_load_dir=None, check_for_nan_in_loss_and_grad=False, check_for_spiky_loss=False,
                calculate_per_token_loss=True, loss_agg_mode=None, exclude_fully_masked_seqs=False,
                loss_scale_factor=None)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("mode,exclude", [("token-mean", False), ("seq-mean-token-sum", False),
                                          ("seq-mean-token-mean", False), ("seq-mean-token-mean", True),
                                          ("seq-mean-token-sum-norm", False)])
def test_patched_loss_func_equals_megatron_agg(mode, exclude, tmp_path, megatron_cpu):
    args = mlm_args(loss_agg_mode=mode, exclude_fully_masked_seqs=exclude)
    mlm = load_patched_pretrain_gpt(tmp_path, args)
    g = torch.Generator().manual_seed(0)
    output = torch.rand(3, 8, generator=g)
    mask = (torch.rand(3, 8, generator=g) < 0.5).float()
    mask[1] = 0
    # get_batch stashes the whole-sequence counts before the CP split; forward_step takes them
    mlm._megatron_agg_stash_counts({"loss_mask": mask})
    counts = mlm._megatron_agg_take_counts()
    loss, num_tokens, report = mlm.loss_func(mask, output, model=megatron_config(), megatron_agg_counts=counts)
    hook = DeferredLossHook(mode, exclude_fully_masked_seqs=exclude)
    hook.install(megatron_config())
    ours = hook.loss_func(mask)(output)
    assert torch.equal(loss, ours[0]) and torch.equal(num_tokens, ours[1])
    assert torch.equal(report["lm loss"], ours[2]["loss"])
    # Megatron-LM logs sum / count: the exact loss of the (one-rank) global batch
    term = LossTerm(mode, exclude_fully_masked_seqs=exclude)
    lm = report["lm loss"]
    assert float(lm[0] / lm[1]) == pytest.approx(float(reference_loss([output], [mask], term)), rel=1e-6)


def test_patched_loss_func_packed_and_unchanged_without_the_flag(tmp_path, megatron_cpu):
    output = torch.rand(1, 12)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0]], dtype=torch.float32)
    batch = {"loss_mask": mask, "cu_seqlens": torch.tensor([[0, 3, 7, 10]]), "cu_seqlens_padded": None}
    mlm = load_patched_pretrain_gpt(tmp_path, mlm_args(loss_agg_mode="seq-mean-token-mean"))
    mlm._megatron_agg_stash_counts(batch)
    loss, num_tokens, report = mlm.loss_func(mask, output, model=megatron_config(),
                                             megatron_agg_counts=mlm._megatron_agg_take_counts())
    packed = PackedSequences([0, 3, 7, 10])
    assert int(num_tokens) == 3  # sequences, not rows
    expected = sum(output[0, a:b][mask[0, a:b] != 0].mean() for a, b in ((0, 3), (3, 7), (7, 10))) / 3
    assert float(loss / num_tokens) == pytest.approx(float(expected), rel=1e-6)
    assert DeferredLossHook.sequence_token_counts(mask, packed).tolist() == [2.0, 3.0, 1.0]
    # without --loss-agg-mode the upstream loss is untouched: sum of masked losses, token count
    (tmp_path / "plain").mkdir()
    plain = load_patched_pretrain_gpt(tmp_path / "plain", mlm_args())
    plain._megatron_agg_stash_counts(batch)
    loss, num_tokens, report = plain.loss_func(mask, output, megatron_agg_counts=plain._megatron_agg_take_counts())
    assert float(loss) == pytest.approx(float((output * mask).sum())) and int(num_tokens) == 6


def test_loss_agg_mode_with_distillation_or_modelopt_is_refused_not_ignored(tmp_path, megatron_cpu):
    """Offline distillation (--logits-load-dir) and ModelOpt come first in loss_func and reduce the
    per-token losses themselves: --loss-agg-mode with them raises instead of being ignored."""
    mlm = load_patched_pretrain_gpt(tmp_path, mlm_args(loss_agg_mode="token-mean", logits_load_dir="/teacher"))
    with pytest.raises(ValueError, match="--logits-load-dir"):
        mlm.loss_func(torch.ones(1, 4), torch.ones(1, 4), model=megatron_config())
    (tmp_path / "mo").mkdir()
    mlm = load_patched_pretrain_gpt(tmp_path / "mo", mlm_args(loss_agg_mode="token-mean", modelopt_enabled=True))
    mlm.has_nvidia_modelopt = True
    with pytest.raises(ValueError, match="ModelOpt"):
        mlm.loss_func(torch.ones(1, 4), torch.ones(1, 4), model=megatron_config())


def test_patched_loss_func_requires_per_token_loss(tmp_path, megatron_cpu):
    mlm = load_patched_pretrain_gpt(tmp_path, mlm_args(loss_agg_mode="token-mean", calculate_per_token_loss=False))
    with pytest.raises(ValueError, match="--calculate-per-token-loss"):
        mlm.loss_func(torch.ones(1, 4), torch.ones(1, 4))


# -- the patched verl Megatron engine ------------------------------------------------------------
def verl_trees(tmp_path: Path) -> tuple:
    """Copies of verl's pinned files: (patched, original)."""
    patched, original = tmp_path / "patched", tmp_path / "original"
    for root in (patched, original):
        shutil.copytree(upstream_root() / "verl" / "verl", root / "verl")
    proc = subprocess.run(["git", "apply", str(REPO / "patches" / "verl" / "megatron_engine.patch")],
                          cwd=patched, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return patched, original


def test_patched_verl_engine_gradients_equal_verls_definition(tmp_path):
    patched, original = verl_trees(tmp_path)
    proc = torchrun(4, [str(REPO / "tests" / "support" / "verl_check.py"), "--verl-root", str(patched),
                        "--original-root", str(original)], timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok  ", "FAIL"))]
    assert proc.returncode == 0 and len(lines) == 65, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert all(line.startswith("ok") for line in lines), "\n".join(lines)
    SUMMARY.append("verl: the patched Megatron engine (forward_backward_batch → ppo_loss/value_loss/sft_loss "
                   "→ agg_loss → StepShares) gives verl's dp=1 gradients in 62 configurations (ppo: DP4, TP2×DP2, "
                   "PP2×DP2, PP2×VPP2×DP2, CP2×DP2 × 5 modes; value and sft: DP4, CP2×DP2; each with the "
                   "2-tuple and calculate_per_token_loss); the unpatched engine fails 2 controls")


def test_patched_verl_agg_loss_is_unchanged_without_megatron_agg(tmp_path):
    """The FSDP engine and the dp=1 definition go through agg_loss without StepShares: the patch
    must not change a single number there."""
    import importlib
    import sys

    sys.path.insert(0, str(REPO / "tests" / "support"))
    saved = dict(sys.modules)
    try:
        verl_check = importlib.import_module("verl_check")
        verl_check.install_verl_stubs()
        patched, original = verl_trees(tmp_path)
        new = verl_check.import_verl(patched).core_algos.agg_loss
        old = verl_check.import_verl(original).core_algos.agg_loss
        g = torch.Generator().manual_seed(0)
        loss, mask = torch.randn(5, 7, generator=g), (torch.rand(5, 7, generator=g) > 0.4).float()
        mask[2] = 0
        for mode in ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            for kw in ({}, {"dp_size": 4, "batch_num_tokens": 50, "global_batch_size": 20, "loss_scale_factor": 3}):
                assert torch.equal(new(loss, mask, mode, **kw), old(loss, mask, mode, **kw)), (mode, kw)
                assert torch.equal(new(loss, mask, mode, megatron_agg=None, **kw), old(loss, mask, mode, **kw))
    finally:
        sys.path.remove(str(REPO / "tests" / "support"))
        for name in set(sys.modules) - set(saved):
            del sys.modules[name]
        sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", None) != "_StubFinder"]
