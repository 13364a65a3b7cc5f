"""patches/: they apply cleanly to the pinned upstream files; the patched Megatron-LM loss_func
of every supported release computes what megatron_agg computes (imported with Megatron-LM's own
modules stubbed). The verl patches are checked in tests/test_patches_verl.py."""

from __future__ import annotations

import builtins
import functools
import hashlib
import itertools
import shutil
import subprocess
import tempfile
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import megatron_agg
from megatron_agg import DeferredLossHook, LossTerm, PackedSequences, reference_loss
from megatron_agg.patching import TARGETS

from conftest import REPO

VENDORED = REPO / "patches" / "upstream"
SHARED = REPO.parent / "shared" / "upstream"  # on the dev machines; CI has the vendored copies
MEGATRON_LM = TARGETS["megatron-lm"]


def upstream_root() -> Path:
    return SHARED if SHARED.is_dir() else VENDORED


@dataclass(frozen=True)
class MLMRelease:
    """What a Megatron-LM release's pretrain_gpt.py has, as far as the patch is concerned."""

    name: str
    #: the keys get_batch_on_this_tp_rank returns (get_batch unpacks them by position)
    batch_keys: tuple
    #: cu_seqlens (packed rows) reach get_batch
    packing: bool = False
    #: packed rows with context parallelism: the patch refuses them (the release cannot cut them)
    packed_cp_refused: bool = False
    #: --hybrid-context-parallel exists (refused)
    hybrid: bool = False
    #: get_batch passes use_per_sequence_balancing=--dataloader-inter-document-masking and not --sft
    per_row: bool = False
    #: --logits-load-dir (offline distillation) exists (refused)
    distillation: bool = False
    #: ModelOpt is switched on by modelopt_args_enabled(args) (else by args.modelopt_enabled)
    modelopt_fn: bool = False

    @property
    def folder(self) -> Path:
        return upstream_root() / MEGATRON_LM.pinned[self.name]

    @property
    def patch(self) -> Path:
        return REPO / "patches" / "megatron-lm" / self.name / "pretrain_gpt.patch"


_ROWS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")
_THD = _ROWS + ("cu_seqlens", "max_seqlen", "local_cp_size")
_KEYS = ("attention_mask", "cu_seqlens", "cu_seqlens_padded", "hybrid_cp_group", "labels", "local_cp_size",
         "loss_mask", "max_seqlen", "position_ids", "tokens")
RELEASES = {r.name: r for r in [
    MLMRelease("core_v0.13.1", _ROWS, modelopt_fn=True),
    MLMRelease("core_v0.14.0", _ROWS, modelopt_fn=True),
    MLMRelease("core_v0.15.3", _ROWS),
    MLMRelease("core_v0.16.1", _THD, packing=True, packed_cp_refused=True, hybrid=True),
    MLMRelease("core_v0.17.1", _THD, packing=True, packed_cp_refused=True, hybrid=True),
    MLMRelease("core_v0.18.2", _KEYS, packing=True, hybrid=True),
    MLMRelease("core_r0.19.0", _KEYS, packing=True, hybrid=True, per_row=True, distillation=True),
    MLMRelease("main", _KEYS, packing=True, hybrid=True, per_row=True, distillation=True),
]}
PACKING = [r for r, spec in RELEASES.items() if spec.packing]


def test_every_shipped_release_is_tested():
    assert tuple(RELEASES) == MEGATRON_LM.releases
    assert sorted(p.name for p in (REPO / "patches" / "megatron-lm").iterdir()) == sorted(RELEASES)
    assert not (REPO / "patches" / "megatron-lm" / "pretrain_gpt.patch").exists()  # moved to main/


def test_vendored_upstream_files_are_unmodified():
    listed = set()
    for line in (VENDORED / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = VENDORED / name
        listed.add(path.resolve())
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
        # README.md describes the folder (ours, and the team's in shared/, which grows with new
        # releases); every other file is an upstream file and must be byte-identical.
        if SHARED.is_dir() and (SHARED / name).exists() and Path(name).name != "README.md":
            assert (SHARED / name).read_bytes() == path.read_bytes(), f"{name} differs from ../shared/upstream"
    on_disk = {p.resolve() for p in VENDORED.rglob("*") if p.is_file() and p.name != "SHA256SUMS"
               and "__pycache__" not in p.parts}
    assert on_disk == listed, f"not in SHA256SUMS (run scripts/update_upstream_sums.sh): {sorted(on_disk - listed)}"
    for release in RELEASES.values():  # every release's pinned copy is vendored, with its license
        folder = VENDORED / MEGATRON_LM.pinned[release.name]
        assert (folder / "pretrain_gpt.py").is_file() and (folder / "LICENSE").is_file(), folder


@pytest.mark.parametrize("release", RELEASES)
def test_patch_applies_cleanly_and_reverts(release, tmp_path):
    spec = RELEASES[release]
    original = spec.folder / "pretrain_gpt.py"
    shutil.copy(original, tmp_path / "pretrain_gpt.py")
    run = partial(subprocess.run, cwd=tmp_path, capture_output=True, text=True)
    check = run(["git", "apply", "--check", "-v", str(spec.patch)])
    assert check.returncode == 0, check.stderr
    assert run(["git", "apply", str(spec.patch)]).returncode == 0
    patched = (tmp_path / "pretrain_gpt.py").read_text()
    added = [line for line in spec.patch.read_text().splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert "[megatron_agg]" in patched and len(added) > 50
    assert run(["git", "apply", "--check", "-R", str(spec.patch)]).returncode == 0  # revertible
    assert run(["git", "apply", "-R", str(spec.patch)]).returncode == 0
    assert (tmp_path / "pretrain_gpt.py").read_bytes() == original.read_bytes()  # reverted byte for byte


# -- the patched Megatron-LM pretrain_gpt.py, imported with Megatron-LM stubbed --------------------
_REAL = ("torch", "megatron_agg", "functools", "typing", "json", "os", "warnings", "time", "math")


@functools.cache
def patched_source(release: str) -> str:
    """pretrain_gpt.py of ``release`` with its patch applied (git apply, once per session)."""
    spec = RELEASES[release]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(spec.folder / "pretrain_gpt.py", Path(tmp) / "pretrain_gpt.py")
        proc = subprocess.run(["git", "apply", str(spec.patch)], cwd=tmp, capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        return (Path(tmp) / "pretrain_gpt.py").read_text()


def load_pretrain_gpt(release: str, args: SimpleNamespace, patched: bool = True) -> types.ModuleType:
    """Import ``release``'s pretrain_gpt.py (patched, or as upstream ships it) with every
    Megatron-LM import stubbed: only torch, megatron_agg and the standard library are real."""
    real_import = builtins.__import__

    class Stub(types.ModuleType):  # any attribute, dunders included (e.g. __version__)
        def __getattr__(self, attr):
            return mock.MagicMock(name=f"{self.__name__}.{attr}")

    def stubbing_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name.split(".")[0] in _REAL:
            return real_import(name, globals, locals, fromlist, level)
        return Stub(name)

    source = patched_source(release) if patched else (RELEASES[release].folder / "pretrain_gpt.py").read_text()
    module = types.ModuleType(f"pretrain_gpt_{release}")
    module.__dict__["__builtins__"] = dict(vars(builtins), __import__=stubbing_import)
    exec(compile(source, "pretrain_gpt.py", "exec"), module.__dict__)  # noqa: S102 - the file under test
    module.get_args = lambda: args
    module.get_rerun_state_machine = lambda: mock.MagicMock()
    module.has_nvidia_modelopt = False  # the stubbed import of megatron.post_training "succeeded"
    if "modelopt_args_enabled" in module.__dict__:  # core_v0.13/0.14: ModelOpt is on when its args are set
        module.modelopt_args_enabled = lambda a: getattr(a, "modelopt_enabled", False)
    return module


class FakeModel:
    """The model forward_step calls (returns the given per-token losses), and the config the
    deferred hook checks when loss_func hands it the model."""

    def __init__(self, output: torch.Tensor):
        self.output = output
        self.calculate_per_token_loss = True
        self.finalize_model_grads_func = lambda *a, **k: None

    def __call__(self, *args, **kwargs):
        return self.output


def mlm_args(**kw) -> SimpleNamespace:
    base = {"logits_load_dir": None, "check_for_nan_in_loss_and_grad": False, "check_for_spiky_loss": False,
            "calculate_per_token_loss": True, "loss_agg_mode": None, "exclude_fully_masked_seqs": False,
            "loss_scale_factor": None, "context_parallel_size": 1, "hybrid_context_parallel": False, "sft": False,
            "dataloader_inter_document_masking": False, "use_legacy_models": False, "micro_batch_size": 1,
            "seq_length": 8, "pipeline_model_parallel_size": 1, "create_attention_mask_in_dataloader": False,
            "mtp_num_layers": None}
    return SimpleNamespace(**{**base, **kw})


def forward_step(mlm: types.ModuleType, release: str, mask: torch.Tensor, output: torch.Tensor,
                 cu_seqlens=None) -> tuple:
    """Run the module's own get_batch and forward_step on one micro-batch (Megatron-core's batch
    functions replaced: the TP broadcast hands over the batch, the CP split is recorded).

    Returns (the loss_func forward_step returned, the loss_mask it holds, what was stashed when
    the CP split ran)."""
    spec = RELEASES[release]
    b, s = mask.shape
    full = {
        "tokens": torch.zeros(b, s, dtype=torch.long), "labels": torch.zeros(b, s, dtype=torch.long),
        "loss_mask": mask, "attention_mask": None, "position_ids": torch.arange(s).expand(b, s),
        "cu_seqlens": None if cu_seqlens is None else torch.tensor([cu_seqlens], dtype=torch.int32),
        "cu_seqlens_padded": None, "hybrid_cp_group": None, "local_cp_size": None,
        "max_seqlen": None if cu_seqlens is None else torch.tensor(
            [max(b2 - a for a, b2 in itertools.pairwise(cu_seqlens))], dtype=torch.int32),
    }
    at_split = []

    def cp_split(batch, *args, **kwargs):
        at_split.append(mlm._MEGATRON_AGG.get("pending", "nothing stashed"))
        return batch

    mlm.get_batch_on_this_tp_rank = lambda *a, **k: {key: full[key] for key in spec.batch_keys}
    mlm.get_batch_on_this_cp_rank = cp_split
    mlm.get_thd_batch_on_this_cp_rank = lambda batch, *a, **k: (cp_split(batch), None)
    mlm.flatten_batch_for_packed_sequences = lambda batch: batch
    mlm.is_first_or_last_pipeline_stage = lambda *a, **k: True
    model = FakeModel(output)
    result = mlm.forward_step(iter(()), model)
    _, loss_partial = result
    assert loss_partial.func is mlm.loss_func and loss_partial.keywords["model"] is model
    assert len(at_split) == 1, "get_batch did not reach the context-parallel split"
    return loss_partial, loss_partial.args[0], at_split[0]


def _batch(packed: bool) -> tuple:
    """(per-token losses, mask, cu_seqlens or None): ragged, with a fully masked sequence."""
    g = torch.Generator().manual_seed(0)
    if packed:
        mask = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1]], dtype=torch.float32)
        return torch.rand(1, 12, generator=g), mask, [0, 3, 7, 12]  # sequence 1 is fully masked
    mask = (torch.rand(3, 8, generator=g) < 0.5).float()
    mask[1] = 0
    return torch.rand(3, 8, generator=g), mask, None


MODES = [("token-mean", False), ("token-sum", False), ("seq-mean-token-sum", False), ("seq-mean-token-mean", False),
         ("seq-mean-token-mean", True), ("seq-mean-token-sum-norm", False)]


@pytest.mark.parametrize("release,packed", [(r, False) for r in RELEASES] + [(r, True) for r in PACKING])
@pytest.mark.parametrize("mode,exclude", MODES)
def test_patched_loss_equals_megatron_agg(release, packed, mode, exclude, megatron_cpu):
    """get_batch → forward_step → loss_func of the patched file: the counts are stashed from the
    whole mask before the CP split, and the loss, num_tokens and 'lm loss' report are
    megatron_agg's own; Megatron-LM's sum / count logging gives the exact loss."""
    output, mask, cu = _batch(packed)
    args = mlm_args(loss_agg_mode=mode, exclude_fully_masked_seqs=exclude, sft=packed)
    mlm = load_pretrain_gpt(release, args)
    loss_partial, _, stashed = forward_step(mlm, release, mask, output, cu)
    packed_seqs = PackedSequences(cu) if packed else None
    counts, stashed_packing = stashed
    assert torch.equal(counts, DeferredLossHook.sequence_token_counts(mask, packed_seqs))
    assert (stashed_packing is None) == (not packed)
    loss, num_tokens, report = loss_partial(output)

    hook = DeferredLossHook(mode, exclude_fully_masked_seqs=exclude)
    hook.install(FakeModel(output))
    ours = hook.loss_func(mask, packed_seqs=packed_seqs)(output)
    assert torch.equal(loss, ours[0]) and torch.equal(num_tokens, ours[1])
    assert torch.equal(report["lm loss"], ours[2]["loss"])
    if packed:
        if mode.startswith("seq-mean"):
            assert int(num_tokens) == (2 if exclude else 3)  # sequences, not rows
        elif mode == "token-sum":
            assert int(num_tokens) == 1  # the step's one divisor, on its first micro-batch
        docs = list(itertools.pairwise(cu))
        outputs, masks = [output[:, a:b] for a, b in docs], [mask[:, a:b] for a, b in docs]
    else:
        outputs, masks = [output], [mask]
    lm = report["lm loss"]
    expected = reference_loss(outputs, masks, LossTerm(mode, exclude_fully_masked_seqs=exclude))
    assert float(lm[0] / lm[1]) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("release", RELEASES)
def test_without_the_flag_the_loss_is_upstreams(release, megatron_cpu):
    """Without --loss-agg-mode the patched loss_func is the release's own, number for number, and
    get_batch stashes nothing."""
    for packed in (False, True) if RELEASES[release].packing else (False,):
        output, mask, cu = _batch(packed)
        mlm = load_pretrain_gpt(release, mlm_args(sft=packed))
        loss_partial, _, stashed = forward_step(mlm, release, mask, output, cu)
        assert stashed is None and loss_partial.keywords["megatron_agg_counts"] is None
        upstream = load_pretrain_gpt(release, mlm_args(sft=packed), patched=False)
        theirs = upstream.loss_func(mask, output, model=FakeModel(output))
        ours = loss_partial(output)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        assert torch.equal(ours[2]["lm loss"], theirs[2]["lm loss"])
        assert float(ours[0]) == pytest.approx(float((output * mask).sum())) and int(ours[1]) == int(mask.sum())


def expected_cp_layout(release: str, inter_document_masking: bool, sft: bool) -> str:
    """Megatron-LM's get_batch: use_per_sequence_balancing=args.dataloader_inter_document_masking
    and not is_sft (core_r0.19.0, main) cuts a packed row as a whole; the other releases have no
    such option (packed rows are cut per document)."""
    per_row = RELEASES[release].per_row and inter_document_masking and not sft
    return "per-row" if per_row else "load-balanced"


@pytest.mark.parametrize("release", RELEASES)
def test_cp_layout_passed_to_the_hook_is_get_batchs(release, megatron_cpu):
    for inter_document_masking in (False, True):
        for sft in (False, True):
            args = mlm_args(loss_agg_mode="token-mean", dataloader_inter_document_masking=inter_document_masking,
                            sft=sft)
            mlm = load_pretrain_gpt(release, args)
            spy = mock.MagicMock(wraps=DeferredLossHook)
            with mock.patch.object(megatron_agg, "DeferredLossHook", spy):
                hook = mlm._megatron_agg_hook()
            assert spy.call_count == 1 and isinstance(hook, DeferredLossHook)
            kwargs = spy.call_args.kwargs
            assert kwargs["cp_layout"] == expected_cp_layout(release, inter_document_masking, sft), (
                inter_document_masking, sft)
            assert spy.call_args.args == ("token-mean",)
            assert kwargs["exclude_fully_masked_seqs"] is False and kwargs["loss_scale_factor"] is None


@pytest.mark.parametrize("release", RELEASES)
def test_refusals(release, megatron_cpu):
    """--loss-agg-mode without --calculate-per-token-loss, or with a loss path that reduces the
    per-token losses itself (ModelOpt; offline distillation where the release has it), or with
    hybrid context parallelism (where the release has it): a clear error, not a silently ignored
    flag. Packed rows under CP are refused where the release cannot cut them."""
    spec = RELEASES[release]
    output, mask, cu = _batch(False)
    mlm = load_pretrain_gpt(release, mlm_args(loss_agg_mode="token-mean", calculate_per_token_loss=False))
    with pytest.raises(ValueError, match="--calculate-per-token-loss"):
        mlm.loss_func(mask, output)

    refused = [({"modelopt_enabled": True}, "ModelOpt")]
    if spec.distillation:
        refused.append(({"logits_load_dir": "/teacher"}, "--logits-load-dir"))
    if spec.hybrid:
        refused.append(({"hybrid_context_parallel": True}, "--hybrid-context-parallel"))
    for kw, message in refused:
        mlm = load_pretrain_gpt(release, mlm_args(loss_agg_mode="token-mean", **kw))
        mlm.has_nvidia_modelopt = True
        with pytest.raises(ValueError, match=message):
            mlm.loss_func(mask, output, model=FakeModel(output))
        with pytest.raises(ValueError, match=message):  # already in get_batch, on every rank that reads data
            forward_step(mlm, release, mask, output)
        # without --loss-agg-mode the same set-up is upstream's business
        plain = load_pretrain_gpt(release, mlm_args(**kw))
        forward_step(plain, release, mask, output)

    if spec.packing:
        output, mask, cu = _batch(True)
        args = mlm_args(loss_agg_mode="token-mean", sft=True, context_parallel_size=2)
        mlm = load_pretrain_gpt(release, args)
        if spec.packed_cp_refused:
            with pytest.raises(ValueError, match="cu_seqlens_padded=None"):
                forward_step(mlm, release, mask, output, cu)
        else:  # per-document (or per-row) cut: counted before the split
            forward_step(mlm, release, mask, output, cu)
