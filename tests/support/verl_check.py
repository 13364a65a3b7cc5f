"""Run under torchrun with 4 ranks: verl's Megatron engine with ``patches/verl/<release>`` applied, on CPU.

``--tree RELEASE PATCHED ORIGINAL`` (repeatable: one launch checks several verl releases) names a
release (``v0.9.0``, ``v0.9.1``, ``main``) and two folders holding verl's files of that release
(``verl/workers/engine/megatron/transformer_impl.py``, ``verl/workers/utils/losses.py``,
``verl/trainer/ppo/core_algos.py``): PATCHED with the release's patch applied, ORIGINAL unpatched
(for the controls). They are imported for real; every other verl module they import is a small
stand-in (:func:`install_verl_stubs`), Megatron and megatron_agg are real.

One training step goes through the patched engine's own ``forward_backward_batch`` →
Megatron's schedule → the engine's ``postprocess_micro_batch_func`` → verl's ``ppo_loss``
(clipped policy loss + KL penalty, both through ``agg_loss``) with a tiny GPT whose per-token
log-probs feed the loss (under CP gathered over the CP group, the gather's backward keeping the
local slice, as verl's ``postprocess_packed_seqs`` does). The gradients must equal those of one
process that runs verl's *own* ``ppo_loss`` at ``dp_size=1`` on the whole global batch with the
plain-PyTorch model (1e-5 relative) for every mode, with and without
``calculate_per_token_loss``, under DP4, TP2×DP2, PP2×DP2, PP2×VPP2×DP2 and CP2×DP2.

Controls (must fail): the *unpatched* engine with a fully-masked response in the batch
(``seq-mean-token-mean``: its dp>1 denominator counts the empty sequences its dp=1 definition
leaves out), and with ``calculate_per_token_loss`` under CP2 (its ``routed_tokens // cp`` drops
tokens when a micro-batch's count is odd). Release-specific: the unpatched engine under
``calculate_per_token_loss`` refuses ``seq-mean-token-mean`` up to v0.9.0 and ``main`` (the patch
lifts that refusal), while v0.9.1 accepts it (verl PR #7915) and its gradients are off. Prints one
line per check, prefixed with the release; exits non-zero on any unexpected outcome.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import importlib.machinery
import importlib.util
import sys
import time
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist

from megatron_agg.layout import cp_local_positions, to_cp_local
from megatron_agg.compare import data as data_mod
from megatron_agg.compare.cpu import cpu_shim
from megatron_agg.compare.gpt import (
    TinyGPT,
    build_chunks,
    grad_error,
    load_full_weights,
    reference_grads,
    wrap_ddp,
)
from megatron_agg.compare.parallel import Layout, model_parallel
from megatron_agg.compare.reference_gpt import init_full_weights, per_token_loss

SPEC = TinyGPT(num_layers=4)
TOL = 1e-5
MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum"]
LAYOUTS = [Layout(), Layout(tp=2), Layout(pp=2), Layout(pp=2, vpp=2), Layout(cp=2)]
#: Whether the release's *unpatched* engine refuses ``seq-mean-token-mean`` under
#: ``calculate_per_token_loss`` (static CP). verl PR #7915 removed the refusal in v0.9.1.
REFUSES_SEQ_MEAN_PER_TOKEN = {"v0.9.0": True, "v0.9.1": False, "main": True}


# -- verl's other modules: small stand-ins with the behaviour the three files rely on -----------
class FakeTensorDict:
    """The parts of ``tensordict.TensorDict`` the engine and losses use (dense tensors only)."""

    def __init__(self, tensors: dict[str, torch.Tensor], non_tensor: dict[str, Any] | None = None):
        self.tensors = dict(tensors)
        self.non_tensor = dict(non_tensor or {})
        self.micro_batches: list[FakeTensorDict] = []

    def __getitem__(self, key: str) -> Any:
        return self.tensors[key] if key in self.tensors else self.non_tensor[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.tensors.get(key, self.non_tensor.get(key, default))

    def __contains__(self, key: str) -> bool:
        return key in self.tensors or key in self.non_tensor

    def keys(self):
        return self.tensors.keys()

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, *keys: str) -> FakeTensorDict:
        return FakeTensorDict({k: self.tensors[k] for k in keys}, self.non_tensor)

    def to_padded_tensor(self) -> FakeTensorDict:
        return self

    def to(self, device: Any) -> FakeTensorDict:
        return self


class _Stub(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return mock.MagicMock(name=f"{self.__name__}.{attr}")


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = _Stub(name)
    mod.__path__ = []  # a package, so that submodules can be stubbed too
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:  # `import a.b.c as x` reads the attributes of a and a.b
        setattr(sys.modules[parent], child, mod)
    return mod


class _StubFinder:
    """Any other ``verl.*`` (and ``mbridge``) module imported by the three files: a stub."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None):
        if (name.startswith("verl.") or name.split(".")[0] in ("verl", "mbridge")) and name not in sys.modules:
            return importlib.machinery.ModuleSpec(name, _StubLoader(), is_package=True)
        return None


class _StubLoader:
    @staticmethod
    def create_module(spec):
        mod = _Stub(spec.name)
        mod.__path__ = []
        return mod

    @staticmethod
    def exec_module(module):
        pass


def install_verl_stubs() -> None:
    sys.meta_path.insert(0, _StubFinder)
    class AggregationType(enum.Enum):
        MEAN = "mean"
        SUM = "sum"

    @dataclass
    class Metric:
        value: Any
        aggregation: Any = None

        @classmethod
        def from_dict(cls, d: dict[str, Any], aggregation: Any = None) -> dict[str, Metric]:
            return {k: cls(v, aggregation) for k, v in d.items()}

    def masked_sum(values, mask, axis=None):
        return (values * mask).sum() if axis is None else (values * mask).sum(axis)

    def masked_mean(values, mask, axis=None):
        s = masked_sum(values, mask, axis)
        return s / (mask.sum() + 1e-8) if axis is None else s / (mask.sum(axis) + 1e-8)

    def clip_by_value(x, tensor_min, tensor_max):
        return torch.max(torch.min(x, tensor_max), tensor_min)

    def get_non_tensor_data(data, key, default=None):
        return data.non_tensor.get(key, default)

    def assign_non_tensor(data, **kwargs):
        data.non_tensor.update(kwargs)

    class Registry:
        @staticmethod
        def register(**_: Any):
            return lambda cls: cls

    def prepare_micro_batches(data, **_: Any):
        """verl splits ``data``; its micro-batches carry its non-tensor fields (dp_size, ...)."""
        for mb in data.micro_batches:
            mb.non_tensor.update(data.non_tensor)
        return data.micro_batches, None

    def detach_tree(tree):  # v0.9.1: the engine detaches model_output before Megatron stores it
        if isinstance(tree, dict):
            return {k: detach_tree(v) for k, v in tree.items()}
        return tree.detach() if isinstance(tree, torch.Tensor) else tree

    def make_batch_generator(batches, vpp_size):
        return [iter(batches) for _ in range(vpp_size)] if vpp_size > 1 else iter(batches)

    for name in ["omegaconf", "tensordict", "verl", "verl.trainer", "verl.trainer.config", "verl.utils",
                 "verl.utils.dataset", "verl.utils.megatron", "verl.workers", "verl.workers.engine",
                 "verl.models", "verl.models.mcore"]:
        _module(name)
    sys.modules["omegaconf"].DictConfig = dict
    sys.modules["omegaconf"].OmegaConf = mock.MagicMock(name="OmegaConf")
    sys.modules["tensordict"].TensorDict = FakeTensorDict
    sys.modules["verl.trainer.config"].AlgoConfig = type("AlgoConfig", (), {})
    sys.modules["verl.trainer.config"].CheckpointConfig = type("CheckpointConfig", (), {})
    _module("verl.utils.torch_functional", masked_sum=masked_sum, masked_mean=masked_mean,
            clip_by_value=clip_by_value)
    _module("verl.utils.tensordict_utils", get_non_tensor_data=get_non_tensor_data,
            assign_non_tensor=assign_non_tensor)
    _module("verl.utils.import_utils", deprecated=lambda *a, **k: (lambda f: f))
    _module("verl.utils.metric", AggregationType=AggregationType, Metric=Metric)
    _module("verl.utils.dataset.dataset_utils",
            DatasetPadMode=enum.Enum("DatasetPadMode", {"NO_PADDING": "no_padding", "RIGHT_PADDING": "right"}))
    _module("verl.workers.config", ActorConfig=type("ActorConfig", (), {}), CriticConfig=type("CriticConfig", (), {}),
            HFModelConfig=object, McoreEngineConfig=object, McoreOptimizerConfig=object)
    _module("verl.workers.utils")
    _module("verl.workers.utils.padding", no_padding_2_padding=lambda tensor, data: tensor)
    _module("verl.utils.device", get_device_id=lambda: "cpu", get_device_name=lambda: "cpu",
            get_torch_device=lambda: torch.cpu)
    _module("verl.utils.megatron.pipeline_parallel", make_batch_generator=make_batch_generator)
    _module("verl.utils.megatron.router_replay_utils",
            RouterReplayHelper=SimpleNamespace(is_r2_record_action=lambda *a, **k: False,
                                               is_replay_backward_action=lambda *a, **k: False,
                                               is_replay_forward_action=lambda *a, **k: False))
    _module("verl.workers.engine.base", BaseEngine=object, BaseEngineCtx=object, EngineRegistry=Registry)
    _module("verl.workers.engine.utils",
            prepare_micro_batches=prepare_micro_batches, detach_tree=detach_tree,
            postprocess_batch_func=lambda output_lst, indices, data: {"losses": output_lst})
    _module("verl.workers.engine.megatron.utils", set_random_seed=lambda *a, **k: None)


def import_verl(root: Path) -> SimpleNamespace:
    """Import the three verl files under ``root`` (the stand-ins must be installed)."""
    for name in ["verl.trainer.ppo", "verl.trainer.ppo.core_algos", "verl.workers.utils.losses",
                 "verl.workers.engine.megatron", "verl.workers.engine.megatron.transformer_impl"]:
        sys.modules.pop(name, None)

    def load(name: str, path: Path, package: bool = False) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(
            name, path, submodule_search_locations=[str(path.parent)] if package else None)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    pkg = types.ModuleType("verl.trainer.ppo")
    pkg.__path__ = [str(root / "verl/trainer/ppo")]
    sys.modules["verl.trainer.ppo"] = pkg
    core_algos = load("verl.trainer.ppo.core_algos", root / "verl/trainer/ppo/core_algos.py")
    losses = load("verl.workers.utils.losses", root / "verl/workers/utils/losses.py")
    megatron_pkg = types.ModuleType("verl.workers.engine.megatron")
    megatron_pkg.__path__ = [str(root / "verl/workers/engine/megatron")]
    sys.modules["verl.workers.engine.megatron"] = megatron_pkg
    engine = load("verl.workers.engine.megatron.transformer_impl",
                  root / "verl/workers/engine/megatron/transformer_impl.py")
    return SimpleNamespace(core_algos=core_algos, losses=losses, engine=engine)


# -- the data of a GRPO-like step --------------------------------------------------------------
@dataclass
class Step:
    batch: data_mod.GlobalBatch
    attention: torch.Tensor  # [G, S] 1 for the real (prompt + response) tokens
    old_log_probs: torch.Tensor
    ref_log_prob: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor  # the critic's old values
    returns: torch.Tensor


def make_step(full: dict[str, torch.Tensor]) -> Step:
    batch = data_mod.make_global_batch(SPEC.vocab_size, seed=5)
    g, s = batch.tokens.shape
    attention = (torch.arange(s).unsqueeze(0) < torch.tensor(batch.lengths).unsqueeze(1)).float()
    pos = torch.arange(s).unsqueeze(0).expand(g, s)
    with torch.no_grad():
        log_probs = -per_token_loss(full, SPEC, batch.tokens, pos, batch.labels)
    gen = torch.Generator().manual_seed(9)
    old = log_probs + 0.3 * torch.randn(g, s, generator=gen)  # some ratios outside the clip range
    ref = log_probs + 0.2 * torch.randn(g, s, generator=gen)
    adv = torch.randn(g, 1, generator=gen).expand(g, s).contiguous()  # one advantage per response
    values = -log_probs + 0.1 * torch.randn(g, s, generator=gen)  # the critic below predicts the CE
    returns = -log_probs + 0.5 * torch.randn(g, s, generator=gen)
    return Step(batch, attention, old, ref, adv, values, returns)


def actor_config(mode: str) -> SimpleNamespace:
    cfg = SimpleNamespace(
        loss_agg_mode=mode, policy_loss={"loss_mode": "vanilla"}, clip_ratio=0.2, clip_ratio_low=None,
        clip_ratio_high=None, global_batch_info={}, loss_scale_factor=None, entropy_coeff=0.05,
        use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.1,
    )
    cfg.get = lambda key, default=None: getattr(cfg, key, default)
    return cfg


def loss_function(verl: SimpleNamespace, kind: str, mode: str):
    """verl's loss function as its trainer hands it to the engine."""
    if kind == "ppo":
        return partial(verl.losses.ppo_loss, config=actor_config(mode))
    if kind == "value":
        return partial(verl.losses.value_loss, config=SimpleNamespace(loss_agg_mode=mode, cliprange_value=0.05,
                                                                      loss_scale_factor=None))
    assert kind == "sft" and mode == "token-mean"
    return partial(verl.losses.sft_loss, config=SimpleNamespace())


def model_output(ce: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the engine's forward gives the loss functions, from the per-token cross entropy."""
    return {"log_probs": -ce, "entropy": 0.5 * ce, "values": ce}


def rows_data(step: Step, rows: slice, **non_tensor: Any) -> FakeTensorDict:
    b = step.batch
    mask = b.loss_mask[rows]
    return FakeTensorDict(
        {"input_ids": b.tokens[rows], "labels": b.labels[rows], "attention_mask": step.attention[rows],
         "loss_mask": mask, "response_mask": mask, "old_log_probs": step.old_log_probs[rows],
         "ref_log_prob": step.ref_log_prob[rows], "advantages": step.advantages[rows],
         "values": step.values[rows], "returns": step.returns[rows]},
        non_tensor,
    )


def reference(verl: SimpleNamespace, step: Step, full: dict[str, torch.Tensor], kind: str, mode: str):
    """verl's own definition: its loss function at dp_size=1 on the whole global batch, one process."""
    b = step.batch
    pos = torch.arange(b.seq_length).unsqueeze(0).expand_as(b.tokens)
    tokens = int((b.loss_mask != 0).sum()) if kind == "sft" else None  # sft_loss has no local fallback
    data = rows_data(step, slice(None), dp_size=1, batch_num_tokens=tokens, global_batch_size=None, **PAD[kind])
    fn = loss_function(verl, kind, mode)

    def loss_fn(w):
        loss, _ = fn(model_output=model_output(per_token_loss(w, SPEC, b.tokens, pos, b.labels)), data=data)
        return loss

    grads = reference_grads(full, loss_fn)
    assert max(float(g.abs().max()) for g in grads.values()) > 0, "the reference loss must depend on the weights"
    return grads


# -- the engine, run for real --------------------------------------------------------------
def gather_whole(local: torch.Tensor, s: int) -> torch.Tensor:
    """verl's CP gather: every rank's slice, this rank's differentiable (its backward keeps the
    local slice only), in whole-sequence order."""
    from megatron.core import parallel_state as ps

    cp, r = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    if cp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.detach().contiguous(), group=ps.get_context_parallel_group())
    whole = local.new_zeros(local.shape[0], s)
    for k in range(cp):
        whole = whole.index_copy(1, cp_local_positions(s, cp, k), local if k == r else parts[k])
    return whole


def fake_forward_step(batch_iter, model, logits_processor_func, postprocess_micro_batch_func):
    """Stands in for verl's model forward (``get_mcore_engine_forward_fn``): per-token log-probs of
    whole sequences on the last stage (CP slices gathered), hidden states elsewhere."""
    from megatron.core import parallel_state as ps

    batch = next(batch_iter)
    cp, r = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    tokens, labels = batch["input_ids"], batch["labels"]
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    local = lambda t: to_cp_local(t, cp, r).contiguous()
    output = model(local(tokens), local(pos), None, labels=local(labels))
    if output.dim() == 2:  # last stage: per-token cross entropy of this CP slice
        output = model_output(gather_whole(output, s))
    return output, partial(postprocess_micro_batch_func, data=batch)


def run_engine(verl: SimpleNamespace, step: Step, full, layout: Layout, kind: str, mode: str, per_token: bool):
    from megatron.core import parallel_state as ps

    chunks = build_chunks(SPEC_CP if layout.cp > 1 else SPEC, layout, calculate_per_token_loss=per_token)
    load_full_weights(chunks, full)
    model = wrap_ddp(chunks)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = data_mod.rows_for_rank(dp, dp_rank)
    data = rows_data(step, slice(rows[0].start, rows[-1].stop), global_batch_size=len(step.batch.tokens),
                     **PAD[kind])
    data.micro_batches = [rows_data(step, r) for r in rows]
    cls = verl.engine.MegatronEngineWithLMHead
    engine = cls.__new__(cls)
    engine.engine_config = SimpleNamespace(
        context_parallel_size=layout.cp, dynamic_context_parallel=False, pad_bshd_to_minibatch_max=False,
        use_remove_padding=True, use_fused_kernels=False,
    )
    engine.model_config = SimpleNamespace(mtp=SimpleNamespace(enable=False))
    engine.tf_config = model[0].config
    engine.module = model
    engine.forward_step = fake_forward_step
    engine.forward_backward_batch(data, loss_function(verl, kind, mode), forward_only=False)
    return model


def runs_for(full: bool) -> list[tuple]:
    """The (layout, loss kind, mode) runs: every layout × every mode (``full``), or every layout
    with ``seq-mean-token-mean`` (the mode whose handling differs between releases) and
    ``token-mean``."""
    modes = MODES if full else ["token-mean", "seq-mean-token-mean"]
    runs = [(layout, "ppo", mode) for layout in LAYOUTS for mode in modes]
    runs += [(layout, kind, mode) for layout in (Layout(), Layout(cp=2))
             for kind, mode in (("value", "token-mean"), ("value", "seq-mean-token-mean"), ("sft", "token-mean"))]
    return runs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", nargs=3, action="append", required=True, metavar=("RELEASE", "PATCHED", "ORIGINAL"),
                        help="a verl release and its patched and unpatched files (repeatable)")
    parser.add_argument("--reduced", nargs="*", default=[], metavar="RELEASE",
                        help="releases checked with the reduced matrix (runs_for(full=False))")
    parser.add_argument("--layer-spec", default="tests.support.cp_attention:layer_spec")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    assert world == 4
    global SPEC_CP
    module, _, fn = args.layer_spec.partition(":")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from dataclasses import replace

    SPEC_CP = replace(SPEC, layer_spec=getattr(importlib.import_module(module), fn))
    install_verl_stubs()
    failures = 0

    def report(name: str, ok: bool, detail: str) -> None:
        nonlocal failures
        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag)
        failures += int(flag)
        if rank == 0:
            print(f"{'ok  ' if int(flag) == 0 else 'FAIL'} {name}: {detail}", flush=True)

    full = init_full_weights(SPEC, seed=7)
    step = make_step(full)

    def check(verl, refs, layout, kind, mode, per_token):
        with cpu_shim(), model_parallel(layout):
            model = run_engine(verl, step, full, layout, kind, mode, per_token)
            err = torch.tensor([max(grad_error(model, refs[kind, mode]).values())], dtype=torch.float64)
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        return float(err)

    for release, patched_root, original_root in args.tree:
        t_release = time.perf_counter()
        patched = import_verl(Path(patched_root))
        runs = runs_for(full=release not in args.reduced)
        refs = {(kind, mode): reference(patched, step, full, kind, mode) for _, kind, mode in runs}
        for layout, kind, mode in runs:
            for per_token in (False, True):
                t0 = time.perf_counter()
                err = check(patched, refs, layout, kind, mode, per_token)
                conv = "3-tuple+per-token" if per_token else "2-tuple"
                report(f"{release} patched {layout.name(world)} {conv} {kind}_loss {mode}", err <= TOL,
                       f"grad err {err:.1e} ({time.perf_counter() - t0:.1f}s)")
        original = import_verl(Path(original_root))
        err = check(original, refs, Layout(), "ppo", "seq-mean-token-mean", False)
        report(f"{release} control unpatched dp4 seq-mean-token-mean (empty responses counted) fails", err > 1e-3,
               f"grad err {err:.1e}")
        err = check(original, refs, Layout(cp=2), "ppo", "token-mean", True)
        report(f"{release} control unpatched dp2-cp2 per-token token-mean (routed // cp) fails", err > 1e-3,
               f"grad err {err:.1e}")
        err = check(original, refs, Layout(), "ppo", "token-mean", False)
        report(f"{release} unpatched dp4 2-tuple token-mean is exact (the harness is fair)", err <= TOL,
               f"grad err {err:.1e}")
        refuses = REFUSES_SEQ_MEAN_PER_TOKEN[release]
        try:
            err, outcome = check(original, refs, Layout(cp=2), "ppo", "seq-mean-token-mean", True), "accepted"
        except ValueError as exc:  # every rank computes the loss (pp=1): every rank raises
            err, outcome = float("nan"), "refused" if "is incompatible with" in str(exc) else f"raised {exc}"
        ok = outcome == "refused" if refuses else (outcome == "accepted" and err > 1e-3)
        report(f"{release} control unpatched dp2-cp2 per-token seq-mean-token-mean is "
               f"{'refused' if refuses else 'accepted and inexact'}", ok, f"{outcome}, grad err {err:.1e}")
        if rank == 0:
            print(f"# {release}: {time.perf_counter() - t_release:.1f}s", flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


SPEC_CP = SPEC
PAD = {"ppo": {}, "value": {}, "sft": {"pad_mode": "right"}}  # sft_loss: the padded (response_mask) branch

if __name__ == "__main__":
    sys.exit(main())
