"""Megatron-Bridge's real training loop with megatron_agg's adapter, end to end on 4 CPU ranks.

Run under ``torchrun`` (4 ranks; ``scripts/run_bridge_e2e.sh`` builds the venv and launches it)::

    torchrun --nproc-per-node 4 tests/support/bridge_run.py --out results/bridge_e2e

One launch runs Bridge 0.6.2's ``pretrain(cfg, forward_step)`` once per layout (TP2×DP2 and PP2×DP2
with unpacked rows, CP2×DP2 with packed sequences), each for one training step per loss mode: step
``k`` uses :class:`megatron_agg.bridge.BridgeForwardStep` of mode ``k`` (the previous step's hook is
uninstalled first); after every step Bridge's own ``evaluate()`` runs one forward-only pass (under
``torch.no_grad()``, no finalize) over validation data through the next step's hook, so each step
from the second on proves that an evaluation leaves the training step that follows it exact, and
Bridge's validation loss of that evaluation (its sum / count over DP×CP, read in ``on_eval_end``)
must equal the mode's definition over the evaluated micro-batches at those weights (the report
fails if a step had no evaluation before it). Then one more ``pretrain`` on TP2×DP2, the control:
Bridge's own ``forward_step``
(``masked_next_token_loss``) with Bridge's defaults (no ``calculate_per_token_loss``), which must miss;
and one on TP2×DP2 with the adapter but without ``configure(cfg)`` (Bridge's default
``calculate_per_token_loss=False``), which every rank must refuse before any gradient. Between
layouts Bridge's ``pretrain`` destroys Megatron's global state itself (``destroy_global_state``); the
gloo groups it built are destroyed here as well (``destroy_model_parallel`` leaves them alive).

Every micro-batch differs in its mask counts (random 0/1 masks, some rows fully masked; packed rows
of 2–4 documents with padding), per micro-batch and per rank. After all runs rank 0 assembles the
full gradients (TP/PP shards of the DP-rank-0, CP-rank-0 ranks) captured *after Bridge's
finalize_model_grads* (DP all-reduce, tied embeddings, the ``num_tokens`` division) and before the
optimizer step, and compares them with those of one process that holds every rank's micro-batches
and computes the loss by its definition (:func:`megatron_agg.reference_loss`) with the plain-PyTorch
reference GPT (packed documents evaluated one by one), at the weights of that step; and Bridge's
logged ``lm loss`` (its sum / count over DP×CP, read through a Bridge callback, ``on_train_step_end``)
with the definition's loss.

Nothing of Bridge or Megatron-Core is edited. What this runner installs from outside, and why (none
of it is on the loss path: batch reading, the CP split, the model, ``loss_func``, the schedule and
``finalize_model_grads`` are Bridge's and Megatron's own):

- stand-in modules: ``transformer_engine`` + ``transformer_engine.pytorch`` only *while*
  ``megatron.bridge.peft.lora_layers`` is imported (it imports TE unconditionally and ``import
  megatron.bridge`` reaches it; left in ``sys.modules`` Megatron-Core would believe TE present);
  ``nvidia_resiliency_ext`` / ``.inprocess`` (a type hint in ``training/pretrain.py``; the registry's
  release breaks megatron-core 0.19's import), ``datasets`` and ``megatron.energon`` (imported by
  Bridge's SFT/energon data modules, unused on this path): empty modules;
- the CPU shim (``megatron_agg.compare.cpu.cpu_shim``: CUDA device arguments, streams, RNG tracker
  -> CPU); ``initialize_megatron(allow_no_cuda=True)``; ``compile_helpers`` skipped (the wheel ships
  the prebuilt helper, not its Makefile);
- ``megatron.core.utils.tex.thd_get_partitioned_indices`` (Transformer Engine, absent): the
  per-document CP split of packed rows, written out literally from TE's documented layout (every
  document cut into ``2·cp`` chunks, rank ``r`` holding chunks ``r`` and ``2·cp−1−r``);
- the layer spec: Megatron's local GPT spec with ``tests/support/cp_attention.py``'s attention
  (the local ``DotProductAttention`` refuses CP and packed sequences; TE's is CUDA-only);
- capture only: ``megatron.bridge.training.setup.finalize_model_grads`` (records parameters and
  ``main_grad`` after Megatron's finalize) and the data iterator handed to ``forward_step``
  (records each training micro-batch as read, before the CP split).

A run that fails names every rank's error, earliest first (the cause; its peers time out later), the
end of the earliest traceback, and the stacks of each rank that was blocked for 90 s: CI keeps only
what is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import faulthandler
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import signal
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "support"))

TOLERANCE = 1e-5
CONTROL_MARGIN = 1e-3
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
LAYOUTS = {"tp2-dp2": dict(tp=2), "pp2-dp2": dict(pp=2), "cp2-dp2": dict(cp=2, packed=True)}
MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64)
SEQ, VOCAB, MICRO_BATCHES = 32, 64, 3
STACKS_AFTER_SECONDS = 90


def _compare_module(name: str):
    """``megatron_agg.compare.<name>`` (the CPU kit compare ships), imported when first needed."""
    return importlib.import_module(f"megatron_agg.compare.{name}")


# ---------------------------------------------------------------------------------------------
# Stand-in modules (see the module docstring)
# ---------------------------------------------------------------------------------------------
class _AnyAttribute(type):
    def __getattr__(cls, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return cls


class _Placeholder(metaclass=_AnyAttribute):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


def _stand_in(name: str, package: bool = False) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder

    module.__getattr__ = __getattr__
    return module


class _TransformerEngineForLoraOnly(importlib.abc.MetaPathFinder):
    """Shows a stand-in ``transformer_engine.pytorch`` to ``megatron.bridge.peft.lora_layers`` only."""

    TARGET = "megatron.bridge.peft.lora_layers"

    def find_spec(self, name, path, target=None):
        if name != self.TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        exec_module = spec.loader.exec_module

        def exec_with_te(module):
            te, te_pytorch = _stand_in("transformer_engine", True), _stand_in("transformer_engine.pytorch")
            te.pytorch = te_pytorch
            sys.modules.update({"transformer_engine": te, "transformer_engine.pytorch": te_pytorch})
            try:
                exec_module(module)
            finally:
                sys.modules.pop("transformer_engine", None)
                sys.modules.pop("transformer_engine.pytorch", None)

        spec.loader.exec_module = exec_with_te
        return spec


def install_stand_ins() -> None:
    for name, package in (("nvidia_resiliency_ext", True), ("nvidia_resiliency_ext.inprocess", False),
                          ("datasets", False)):
        sys.modules.setdefault(name, _stand_in(name, package))
    import megatron  # noqa: F401  (namespace package: megatron.core, megatron.bridge)

    sys.modules.setdefault("megatron.energon", _stand_in("megatron.energon", True))
    sys.meta_path.insert(0, _TransformerEngineForLoraOnly())


def per_document_positions(cu: Sequence[int], cp: int, rank: int) -> List[int]:
    """Positions held by CP ``rank`` when every document is cut into ``2·cp`` chunks (TE's layout)."""
    out: List[int] = []
    for start, end in zip(cu[:-1], cu[1:]):
        chunk = (end - start) // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            out.extend(range(start + c * chunk, start + (c + 1) * chunk))
    return out


class _CpuTex:
    @staticmethod
    def thd_get_partitioned_indices(cu_seqlens, total_tokens, world_size, rank):
        cu = [int(x) for x in cu_seqlens.reshape(-1).tolist()]
        assert cu[-1] == int(total_tokens), (cu, total_tokens)
        return torch.tensor(per_document_positions(cu, world_size, rank), dtype=torch.int64, device=cu_seqlens.device)


# ---------------------------------------------------------------------------------------------
# Data: ragged masks, packed rows
# ---------------------------------------------------------------------------------------------
class RaggedData(torch.utils.data.Dataset):
    """Sample ``i`` is a function of ``i`` only: unpacked rows (``[SEQ]``, a random share of the
    tokens masked, every 5th row fully masked) or packed rows (2–4 documents with padded lengths a
    multiple of 4 = 2·cp, real lengths shorter, ``cu_seqlens_q`` / ``cu_seqlens_q_padded``)."""

    def __init__(self, packed: bool, size: int = 4096, first: int = 0) -> None:
        self.packed, self.size, self.first = packed, size, first

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + self.first + idx)
        tokens = torch.randint(1, VOCAB - 1, (SEQ,), generator=g)
        labels = torch.randint(1, VOCAB - 1, (SEQ,), generator=g)
        if not self.packed:
            keep = float(torch.rand((), generator=g)) * 0.9 + 0.05
            mask = (torch.rand(SEQ, generator=g) < keep).float()
            if idx % 5 == 3:
                mask.zero_()
            return dict(tokens=tokens, labels=labels, loss_mask=mask, position_ids=torch.arange(SEQ))
        cuts = sorted(torch.randperm(SEQ // 4 - 1, generator=g)[: int(torch.randint(1, 4, (), generator=g))].add(1).tolist())
        padded = [0] + [4 * c for c in cuts] + [SEQ]
        real = [padded[0]]
        mask = torch.zeros(SEQ)
        position_ids = torch.zeros(SEQ, dtype=torch.long)
        for k, (a, b) in enumerate(zip(padded[:-1], padded[1:])):
            length = int(torch.randint(max(1, b - a - 3), b - a + 1, (), generator=g))
            real.append(real[-1] + length)
            position_ids[a:b] = torch.arange(b - a)
            if k % 3 != 2:  # every third document carries no loss
                mask[a:a + length] = (torch.rand(length, generator=g) < 0.7).float()
        return dict(tokens=tokens, labels=labels, loss_mask=mask, position_ids=position_ids,
                    cu_seqlens_q=torch.tensor(real, dtype=torch.int32),
                    cu_seqlens_q_padded=torch.tensor(padded, dtype=torch.int32),
                    max_seqlen_q=torch.tensor(max(b - a for a, b in zip(padded[:-1], padded[1:]))))


def dataset_config(packed: bool):
    from megatron.bridge.data.base import DatasetProvider

    @dataclasses.dataclass
    class RaggedProvider(DatasetProvider):
        packed: bool = False
        seq_length: int = SEQ
        skip_getting_attention_mask_from_dataset: bool = True

        def build_datasets(self, context):
            return RaggedData(self.packed), RaggedData(self.packed, first=100_000), None

    return RaggedProvider(packed=packed, dataloader_type="single", num_workers=0, pin_memory=False,
                          persistent_workers=False)


# ---------------------------------------------------------------------------------------------
# Bridge's config
# ---------------------------------------------------------------------------------------------
def bridge_config(layout: Dict[str, Any], steps: int, world: int):
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training import config as C
    from megatron.bridge.training.tokenizers.config import TokenizerConfig

    from cp_attention import layer_spec

    tp, pp, cp = layout.get("tp", 1), layout.get("pp", 1), layout.get("cp", 1)
    dp = world // (tp * pp * cp)
    mbs = 1 if layout.get("packed") else 2
    model = GPTModelProvider(
        **MODEL, seq_length=SEQ, vocab_size=VOCAB, make_vocab_size_divisible_by=16,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        position_embedding_type="learned_absolute", normalization="LayerNorm", hidden_dropout=0.0,
        attention_dropout=0.0, init_method_std=0.02, share_embeddings_and_output_weights=True,
        use_cpu_initialization=True, gradient_accumulation_fusion=False, masked_softmax_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        cross_entropy_loss_fusion=False, bf16=False, fp16=False, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, transformer_layer_spec=layer_spec(),
    )
    return C.ConfigContainer(
        model=model,
        train=C.TrainingConfig(micro_batch_size=mbs, global_batch_size=mbs * MICRO_BATCHES * dp, train_iters=steps),
        # Bridge's evaluate() after every step: forward only, under no_grad, through the same forward_step
        validation=C.ValidationConfig(eval_iters=1, eval_interval=1),
        optimizer=C.OptimizerConfig(optimizer="sgd", lr=0.01, min_lr=0.0, weight_decay=0.0, clip_grad=0.0,
                                    bf16=False, fp16=False, params_dtype=torch.float32,
                                    use_distributed_optimizer=False),
        scheduler=C.SchedulerConfig(lr_decay_style="constant", lr_warmup_iters=0, start_weight_decay=0.0,
                                    end_weight_decay=0.0, weight_decay_incr_style="constant"),
        dataset=dataset_config(bool(layout.get("packed"))),
        logger=C.LoggerConfig(log_interval=1),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=VOCAB),
        checkpoint=C.CheckpointConfig(save=None, load=None, save_interval=None),
        dist=C.DistributedInitConfig(distributed_backend="gloo", distributed_timeout_minutes=2),
        ddp=C.DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False,
                                            grad_reduce_in_fp32=True),
        rng=C.RNGConfig(seed=1234),
        rerun_state_machine=C.RerunStateMachineConfig(rerun_mode="disabled"),
    )


# ---------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------
class Capture:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.batches: List[Dict[str, Any]] = []
        self.params: Dict[int, List[Dict[str, Any]]] = {}
        self.logged: List[Dict[str, float]] = []
        self.eval_logged: Dict[int, Dict[str, float]] = {}  # step -> Bridge's validation loss just before it
        self.step = 0

    @staticmethod
    def coords() -> Dict[str, int]:
        from megatron.core import parallel_state as ps

        return dict(dp=ps.get_data_parallel_rank(), tp=ps.get_tensor_model_parallel_rank(),
                    pp=ps.get_pipeline_model_parallel_rank(), cp=ps.get_context_parallel_rank(),
                    last=int(ps.is_pipeline_last_stage()))

    def record_batch(self, batch: Dict[str, Any]) -> None:
        """A micro-batch as read; under ``torch.no_grad()`` one of Bridge's evaluation (``eval=1``)."""
        evaluation = int(not torch.is_grad_enabled())
        keep = {k: v.detach().clone().cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        index = sum(b["step"] == self.step and b["eval"] == evaluation for b in self.batches)
        keep.update(self.coords(), step=self.step, index=index, eval=evaluation)
        self.batches.append(keep)

    def record_params(self, model: Sequence[torch.nn.Module]) -> None:
        full_name = _compare_module("gpt").full_name
        coords = self.coords()
        records = self.params.setdefault(self.step, [])
        if coords["dp"] != 0 or coords["cp"] != 0:
            return
        for chunk in model:
            inner = chunk
            while hasattr(inner, "module"):
                inner = inner.module
            for local, p in inner.named_parameters():
                grad = getattr(p, "main_grad", None)
                if grad is None:
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                records.append(dict(name=full_name(chunk, local), data=p.detach().clone().cpu(),
                                    grad=grad.detach().clone().float().cpu(),
                                    tensor_model_parallel=bool(getattr(p, "tensor_model_parallel", False)),
                                    partition_dim=int(getattr(p, "partition_dim", -1)), **coords))


CAPTURE = Capture()


def logged_loss_callback():
    """A Bridge callback recording each step's reduced ``loss_dict`` and each evaluation's
    ``total_loss_dict`` (Bridge's sum / count over DP×CP; the latter on the last stage)."""
    from megatron.bridge.training.callbacks import Callback

    class LoggedLoss(Callback):
        def on_train_step_end(self, context):
            CAPTURE.logged.append({k: float(v) for k, v in (context.loss_dict or {}).items()})

        def on_eval_end(self, context):
            if context.total_loss_dict:
                CAPTURE.eval_logged[CAPTURE.step] = {k: float(v) for k, v in context.total_loss_dict.items()}

    return LoggedLoss()


class _Recording:
    def __init__(self, iterator: Any) -> None:
        self.iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        CAPTURE.record_batch(batch)
        return batch


class ModePerStep:
    """Bridge ``forward_step``: step ``k`` with ``BridgeForwardStep(modes[k])`` (the previous step's
    hook uninstalled first); ``modes=None``: Bridge's own ``gpt_step.forward_step`` (the control)."""

    def __init__(self, modes: Optional[Sequence[str]]) -> None:
        from megatron_agg.bridge import BridgeForwardStep

        self.steps = [BridgeForwardStep(m) for m in modes] if modes is not None else None
        self.current: Optional[int] = None

    def configure(self, cfg: Any) -> None:
        if self.steps is not None:
            self.steps[0].configure(cfg)

    def __call__(self, state, data_iterator, model, return_schedule_plan: bool = False):
        step = state.train_state.step  # an evaluation after step k runs with k + 1: that step's hook
        CAPTURE.step = step
        data = _Recording(data_iterator) if data_iterator is not None else None
        if self.steps is None:
            from megatron.bridge.training.gpt_step import forward_step

            return forward_step(state, data, model, return_schedule_plan)
        step = min(step, len(self.steps) - 1)  # the evaluation after the last step: the last hook
        if self.current != step:
            if self.current is not None:
                self.steps[self.current].hook.uninstall()
            self.current = step
        return self.steps[step](state, data, model, return_schedule_plan)

    def finish(self) -> None:
        if self.steps is not None and self.current is not None:
            self.steps[self.current].hook.uninstall()


@contextlib.contextmanager
def cpu_environment():
    from megatron.bridge.training import initialize as bridge_initialize
    from megatron.bridge.training import setup as bridge_setup
    from megatron.core import utils as core_utils
    from megatron.core.datasets import utils as datasets_utils

    cpu_shim = _compare_module("cpu").cpu_shim
    patches: List[Tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        patches.append((obj, name, getattr(obj, name, None)))
        setattr(obj, name, value)

    original_init = bridge_initialize.initialize_megatron
    patch(bridge_setup, "initialize_megatron", functools.partial(original_init, allow_no_cuda=True))
    patch(bridge_initialize, "compile_helpers", lambda *a, **k: None)
    patch(datasets_utils, "compile_helpers", lambda *a, **k: None)
    if getattr(core_utils, "tex", None) is None:
        patch(core_utils, "tex", _CpuTex())
    original_finalize = bridge_setup.finalize_model_grads

    def finalize_model_grads(model, *args, **kwargs):
        out = original_finalize(model, *args, **kwargs)
        CAPTURE.record_params(model)
        return out

    patch(bridge_setup, "finalize_model_grads", finalize_model_grads)
    try:
        with cpu_shim():
            yield
    finally:
        for obj, name, old in reversed(patches):
            setattr(obj, name, old)


def destroy_gloo_groups() -> None:
    """Destroy every process group but the default one (Megatron's destroy keeps them alive)."""
    world = dist.group.WORLD
    for group in list(getattr(dist.distributed_c10d, "_world").pg_map.keys()):
        if group is not world and group is not None:
            try:
                dist.destroy_process_group(group)
            except Exception:  # already gone
                pass


def run_layout(name: str, modes: Optional[Sequence[str]], world: int, out: Path,
               configure: bool = True) -> Dict[str, Any]:
    """One Bridge ``pretrain``: one step per mode (``None``: Bridge's own forward_step, one step);
    ``configure=False`` leaves Bridge's default ``calculate_per_token_loss=False`` (a refusal)."""
    from megatron.bridge.training.pretrain import pretrain

    layout = dict(LAYOUTS[name])
    CAPTURE.reset()
    steps = len(modes) if modes is not None else 1
    cfg = bridge_config(layout, steps, world)
    forward_step = ModePerStep(modes)
    if configure:
        forward_step.configure(cfg)
    start = time.time()
    error, error_at, trace = None, None, None
    # a run blocked this long (one takes seconds) dumps this rank's stacks; Bridge's groups time out at 120 s
    stacks = open(out / f"{name}.stacks.rank{dist.get_rank()}.txt", "w+")
    faulthandler.dump_traceback_later(STACKS_AFTER_SECONDS, file=stacks)
    try:
        pretrain(cfg, forward_step, callbacks=[logged_loss_callback()])
    except Exception as exc:
        error, error_at, trace = f"{type(exc).__name__}: {exc}", time.time() - start, traceback.format_exc()
        traceback.print_exc()
    finally:
        faulthandler.cancel_dump_traceback_later()
        forward_step.finish()
    stacks.seek(0)
    blocked = stacks.read()
    stacks.close()
    dist.barrier()
    destroy_gloo_groups()
    return dict(batches=CAPTURE.batches, params=CAPTURE.params, logged=CAPTURE.logged, eval_logged=CAPTURE.eval_logged,
                error=error, error_at=error_at, trace=trace, blocked=blocked, seconds=time.time() - start,
                packed=bool(layout.get("packed")))


# ---------------------------------------------------------------------------------------------
# Reference and comparison (rank 0)
# ---------------------------------------------------------------------------------------------
def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max())
    diff = float((a.float() - b.float()).abs().max())
    return diff / scale if scale > 0 else diff


def assemble(records: Sequence[Dict[str, Any]]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], float]:
    shards: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
    for p in records:
        shards.setdefault(p["name"], {}).setdefault(p["tp"], []).append(p)
    weights, grads, replica_err = {}, {}, 0.0
    for name, by_tp in shards.items():
        parts = [by_tp[r][0] for r in sorted(by_tp)]
        pairs = [(c, by_tp[r][0]) for r in sorted(by_tp) for c in by_tp[r][1:]]
        if parts[0]["tensor_model_parallel"] and len(parts) > 1:
            dim = parts[0]["partition_dim"]
            weights[name] = torch.cat([p["data"] for p in parts], dim=dim)
            grads[name] = torch.cat([p["grad"] for p in parts], dim=dim)
        else:
            weights[name], grads[name] = parts[0]["data"], parts[0]["grad"]
            pairs += [(c, parts[0]) for c in parts[1:]]
        for copy, original in pairs:
            replica_err = max(replica_err, _relative_error(copy["grad"], original["grad"]))
    return weights, grads, replica_err


def step_batches(runs: Sequence[Dict[str, Any]], step: int, evaluation: bool = False) -> List[Dict[str, Any]]:
    """Every DP rank's micro-batches of ``step`` (``evaluation``: of the evaluation just before it),
    as read by its last stage's TP-0, CP-0 rank."""
    out = [b for run in runs for b in run["batches"]
           if b["step"] == step and b["eval"] == int(evaluation) and b["last"] and b["tp"] == 0 and b["cp"] == 0]
    return sorted(out, key=lambda b: (b["dp"], b["index"]))


def documents(mb: Dict[str, Any]) -> List[Tuple[int, int, int]]:
    cu = mb.get("cu_seqlens_q_padded")
    rows, length = mb["tokens"].shape
    if cu is None:
        return [(r, 0, length) for r in range(rows)]
    cu = [int(x) for x in cu.reshape(-1).tolist()]
    return [(0, a, b) for a, b in zip(cu[:-1], cu[1:])]


def definition_loss(mode: str, batches: Sequence[Dict[str, Any]], mean_of_means: bool = False):
    from megatron_agg import reference_loss

    per_token_loss = _compare_module("reference_gpt").per_token_loss
    spec = types.SimpleNamespace(**MODEL)

    def per_batch(w, mb):
        losses, masks = [], []
        for row, a, b in documents(mb):
            losses.append(per_token_loss(w, spec, mb["tokens"][row:row + 1, a:b], mb["position_ids"][row:row + 1, a:b],
                                         mb["labels"][row:row + 1, a:b]))
            masks.append(mb["loss_mask"][row:row + 1, a:b])
        return losses, masks

    def loss_fn(w):
        if mean_of_means:  # Megatron's own averaging: the mean of per-micro-batch token means
            parts = [reference_loss(*per_batch(w, mb), "token-mean") for mb in batches]
            return sum(parts) / len(parts)
        losses, masks = [], []
        for mb in batches:
            l, m = per_batch(w, mb)
            losses += l
            masks += m
        return reference_loss(losses, masks, mode)

    return loss_fn


def compare(records: Sequence[Dict[str, Any]], runs: Sequence[Dict[str, Any]], step: int, mode: str,
            world: int, micro_batches: int) -> Dict[str, Any]:
    reference_grads = _compare_module("gpt").reference_grads
    weights, grads, replica_err = assemble(records)
    batches = step_batches(runs, step)
    problems = []
    dp = len({b["dp"] for b in batches})
    if len(batches) != dp * micro_batches or dp == 0:
        problems.append(f"captured {len(batches)} micro-batches over {dp} DP ranks, expected {micro_batches} each")

    def error_against(loss_fn) -> Tuple[float, str]:
        ref = reference_grads(weights, loss_fn)
        if set(ref) != set(grads):
            problems.append(f"parameters differ: {sorted(set(ref) ^ set(grads))}")
        errors = {n: _relative_error(grads[n], ref[n]) for n in ref if n in grads}
        worst = max(errors, key=errors.get)
        return errors[worst], worst

    loss_fn = definition_loss(mode, batches)
    grad_err, worst = error_against(loss_fn)
    with torch.no_grad():
        ref_loss = float(loss_fn(weights))
    logged = [run["logged"][step]["lm loss"] for run in runs
              if len(run["logged"]) > step and "lm loss" in run["logged"][step]]
    if not logged:
        problems.append("no logged lm loss")
    logged_loss = logged[0] if logged else float("nan")
    loss_err = abs(logged_loss - ref_loss) / max(abs(ref_loss), 1e-30)
    others = {m: error_against(definition_loss(m, batches))[0] for m in MODES if m != mode}
    counts = [dict(dp=b["dp"], mb=b["index"], tokens=int(b["loss_mask"].sum()), sequences=len(documents(b)))
              for b in batches]
    # Bridge's evaluate() just before this step (after the previous one's update: these weights), through
    # this step's hook: its validation loss is the definition's over the evaluated micro-batches
    evaluated = step_batches(runs, step, evaluation=True)
    eval_loss = eval_ref = eval_err = eval_apart = None
    if step > 0:
        if len(evaluated) != dp * micro_batches:
            problems.append(f"captured {len(evaluated)} evaluated micro-batches before step {step}, expected "
                            f"{dp * micro_batches}")
        eval_logged = [run["eval_logged"][step]["lm loss"] for run in runs if step in run["eval_logged"]]
        if evaluated and eval_logged:
            with torch.no_grad():
                eval_ref = float(definition_loss(mode, evaluated)(weights))
                eval_others = {m: float(definition_loss(m, evaluated)(weights)) for m in MODES if m != mode}
            eval_loss = eval_logged[0]
            eval_err = abs(eval_loss - eval_ref) / max(abs(eval_ref), 1e-30)
            # the check can fail: every other mode's validation loss differs from this one's
            eval_apart = min(abs(v - eval_ref) / max(abs(eval_ref), 1e-30) for v in eval_others.values())
        else:
            problems.append(f"no validation loss logged before step {step}")
    return dict(grad_err=grad_err, worst_param=worst, replica_err=replica_err, other_modes=others,
                loss=logged_loss, ref_loss=ref_loss, loss_err=loss_err, problems=problems, counts=counts,
                evaluated_before=len(evaluated), eval_loss=eval_loss, eval_ref=eval_ref, eval_err=eval_err,
                eval_apart=eval_apart)


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/bridge_e2e")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: " + ", ".join(LAYOUTS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no-control", action="store_true", help="skip the control (Bridge's own loss)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <rank pid>: every thread's stack, in the log
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    start = time.time()
    install_stand_ins()
    import megatron.bridge.training.pretrain  # noqa: F401  (the import, timed)

    import_seconds = time.time() - start
    # The default group outlives the runs: Bridge's pretrain keeps a group it did not create.
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=4))  # > Bridge's own groups' 2
    modes = [m for m in args.modes.split(",") if m]
    plan = [(name, modes, "exact") for name in args.layouts.split(",") if name]
    if not args.no_control:
        plan += [("tp2-dp2", None, "control"), ("tp2-dp2", ["token-mean"], "refusal")]
    results: Dict[str, Dict[str, Any]] = {}
    with cpu_environment():
        for name, run_modes, kind in plan:
            key = name if kind == "exact" else f"{name}.{kind}"
            run = run_layout(name, run_modes, world, out, configure=kind != "refusal")
            torch.save(run, out / f"{key}.rank{rank}.pt")
            dist.barrier()
            if rank == 0:
                print(f"bridge_run: {key} ran in {run['seconds']:.1f}s" + (f" (error: {run['error']})" if run["error"] else ""),
                      flush=True)
            results[key] = dict(modes=run_modes)
    train_seconds = time.time() - start - import_seconds
    dist.barrier()
    if rank != 0:
        return 0
    return report(plan, out, world, import_seconds, train_seconds)


#: What the adapter says when Bridge's default calculate_per_token_loss=False is left in place.
REFUSAL = "calculate_per_token_loss=True"


def main_thread(stacks: str, frames: int = 14) -> List[str]:
    """The innermost frames of the thread that runs this script, from a faulthandler dump."""
    threads = stacks.split("\nThread ")
    mine = next((t for t in threads if "bridge_run.py" in t), threads[-1])
    return [re.sub(r'"\S*/(site-packages|work/[^/]+)/', '"', line.strip()) for line in mine.splitlines()[1:frames + 1]]


def first_failures(runs: Sequence[Dict[str, Any]]) -> str:
    """Every rank's error, earliest first (the first is the cause; a peer blocked on it times out later),
    and the end of the earliest one's traceback: CI keeps only what is printed."""
    failed = sorted((run["error_at"] or 0.0, rank, run) for rank, run in enumerate(runs) if run["error"])
    parts = [f"rank {rank} after {at:.1f}s: {run['error'][:300]}" for at, rank, run in failed]
    trace = (failed[0][2].get("trace") or "").strip().splitlines()[-12:]
    for rank, run in enumerate(runs):
        if run.get("blocked"):
            trace += [f"rank {rank} blocked for {STACKS_AFTER_SECONDS}s in:"] + ["  " + f for f in main_thread(run["blocked"])]
    # continuation lines start with "bridge e2e" too: run_bridge_e2e.sh prints the log's lines that do
    return "; ".join(parts) + "".join(f"\nbridge e2e   | {line}" for line in trace)


def report(plan, out: Path, world: int, import_seconds: float, train_seconds: float) -> int:
    start = time.time()
    lines, results, status = [], [], 0
    for name, modes, kind in plan:
        key = name if kind == "exact" else f"{name}.{kind}"
        runs = [torch.load(out / f"{key}.rank{r}.pt", weights_only=False) for r in range(world)]
        error = next((r["error"] for r in runs if r["error"]), None)
        if kind == "refusal":  # configure() not called: every rank must refuse before any gradient
            refused = [bool(r["error"]) and REFUSAL in r["error"] for r in runs]
            finalized = sum(len(r["params"]) for r in runs)
            ok = all(refused) and finalized == 0
            status |= 0 if ok else 1
            results.append(dict(run=key, mode=None, control=True, kind=kind, passed=ok, refused_ranks=sum(refused),
                                finalize_calls=finalized, error=error))
            lines.append(f"bridge e2e refusal ({name}, configure() not called): {'PASS' if ok else 'FAIL'} — "
                         f"{sum(refused)}/{world} ranks raised before any gradient (finalize ran {finalized} times): "
                         f"{(error or 'no error')[:160]}")
            continue
        if error is not None:
            status = 1
            lines.append(f"bridge e2e {key}: FAIL — " + first_failures(runs))
            results.append(dict(run=key, error=error, errors={r: run["error"] for r, run in enumerate(runs)}))
            continue
        params: Dict[int, List[Dict[str, Any]]] = {}
        for run in runs:
            for step, records in run["params"].items():
                params.setdefault(step, []).extend(records)
        per_mode = []
        for step, mode in enumerate(modes if modes is not None else ["token-mean"]):
            r = compare(params.get(step, []), runs, step, mode, world, MICRO_BATCHES)
            r.update(run=key, mode=mode, step=step, control=modes is None, kind=kind)
            if modes is None:  # the control: Bridge's own loss against the token-mean definition
                r["explained"] = None
                ref = _compare_module("gpt").reference_grads
                weights, grads, _ = assemble(params.get(step, []))
                mom = ref(weights, definition_loss("token-mean", step_batches(runs, step), mean_of_means=True))
                r["explained"] = max(_relative_error(grads[n], mom[n]) for n in mom)
                r["passed"] = r["grad_err"] >= CONTROL_MARGIN and not r["problems"]
            else:
                r["passed"] = (r["grad_err"] <= TOLERANCE and r["loss_err"] <= TOLERANCE
                               and r["replica_err"] <= TOLERANCE and not r["problems"]
                               and (step == 0 or (r["eval_err"] is not None and r["eval_err"] <= TOLERANCE
                                                  and r["eval_apart"] >= 1e-3)))
            per_mode.append(r)
            results.append(r)
            print(f"  {key:<16} step {step} {mode:<24} grad err {r['grad_err']:.2e} ({r['worst_param']}), logged lm loss "
                  f"{r['loss']:.6f} vs {r['ref_loss']:.6f} (err {r['loss_err']:.1e}), "
                  + (f"validation loss before it {r['eval_loss']:.6f} vs {r['eval_ref']:.6f} (err {r['eval_err']:.1e}), "
                     if r["eval_err"] is not None else "") + f"other modes "
                  f">= {min(r['other_modes'].values()):.1e}: " + ("PASS" if r["passed"] else "FAIL")
                  + (f" {r['problems']}" if r["problems"] else ""), flush=True)
        ok = all(r["passed"] for r in per_mode)
        eval_errs = [r["eval_err"] for r in per_mode if r["eval_err"] is not None]
        status |= 0 if ok else 1
        tokens = sorted({c["tokens"] for r in per_mode for c in r["counts"]})
        if modes is None:
            r = per_mode[0]
            lines.append(f"bridge e2e control ({name}, Bridge's masked_next_token_loss, calculate_per_token_loss off): "
                         f"{'PASS' if ok else 'FAIL'} — misses the token-mean definition by {r['grad_err']:.1e} "
                         f"(must be >= {CONTROL_MARGIN:g}); equals the mean of per-micro-batch token means to "
                         f"{r['explained']:.1e}; its logged lm loss is the exact token mean (err {r['loss_err']:.1e})")
        else:
            lines.append(f"bridge e2e {name}{' [packed]' if runs[0]['packed'] else ''}: {'PASS' if ok else 'FAIL'} "
                         f"{sum(r['passed'] for r in per_mode)}/{len(per_mode)} modes exact — max grad err "
                         f"{max(r['grad_err'] for r in per_mode):.1e}, logged lm loss err "
                         f"{max(r['loss_err'] for r in per_mode):.1e} (tol {TOLERANCE:g}); other modes' definitions "
                         f"missed by >= {min(v for r in per_mode for v in r['other_modes'].values()):.1e}; valid tokens "
                         f"per micro-batch {tokens[0]}-{tokens[-1]}; steps 1-{len(per_mode) - 1} each after "
                         f"Bridge's evaluate() through their hook, its validation loss err "
                         f"{max(eval_errs, default=float('nan')):.1e} (other modes' >= "
                         f"{min((r['eval_apart'] for r in per_mode if r['eval_apart'] is not None), default=float('nan')):.1e})")
    compare_seconds = time.time() - start
    (out / "summary.json").write_text(json.dumps(dict(tolerance=TOLERANCE, control_margin=CONTROL_MARGIN,
                                                      import_seconds=import_seconds, train_seconds=train_seconds,
                                                      compare_seconds=compare_seconds, results=results), indent=1,
                                                 default=str))
    print()
    for line in lines:
        print(line)
    print(f"bridge e2e: {'PASS' if status == 0 else 'FAIL'} — import {import_seconds:.0f}s, Bridge pretrain "
          f"{train_seconds:.0f}s, reference {compare_seconds:.0f}s; {out / 'summary.json'}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
