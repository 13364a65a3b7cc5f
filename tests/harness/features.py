"""The features suite: the gradient-equivalence proof under Megatron features beyond DP/TP/PP/CP.

Run under ``torchrun`` (gloo, CPU), every configuration in one launch::

    torchrun --nproc-per-node 4 -m harness.features --out results.json

Each configuration is one step (forward, backward and ``finalize_model_grads``, before the
optimizer; two steps where Megatron behaves differently from the second step on) of a small ``GPTModel`` on the ragged global batch of :mod:`.data`, run by
:class:`.matrix.Harness` exactly as the matrix runs it (the hook wrapping Megatron's
``forward_backward_func``, the single-process reference of :mod:`.reference_gpt` over the whole
global batch, the same collective count and loss-report checks), under one :class:`Feature`:

- ``sequence-parallel``: ``sequence_parallel=True`` (TP 2 and 4) with a torch LayerNorm that marks
  its weights ``sequence_parallel`` as Apex/TE norms do, so that ``finalize_model_grads``
  all-reduces their TP-partial gradients.
- ``distributed-optimizer``: ``use_distributed_optimizer=True``: the gradients are
  reduce-scattered and each DP rank owns one shard of every bucket of DDP's grad buffers; only
  the owned shards are compared, read from the buckets' ``grad_data``, and the shards of the DP
  group are shown to cover every element of every parameter exactly once.
- ``overlap-small-buckets`` (with and without the distributed optimizer):
  ``overlap_grad_reduce=True`` and 1,000-element buckets, two steps (Megatron learns the bucket
  order in the first and launches each bucket's reduction from the backward hooks in the second),
  compared after each step.
- ``moe-alltoall`` / ``moe-allgather``: a mixture-of-experts model (:class:`.gpt.TinyMoEGPT`: 4
  experts, top-2, no aux loss, no token dropping) with either token dispatcher, under expert
  parallelism 1 and 2 and expert TP 1 and 2, with sequence parallelism where TP > 1 (Megatron's
  MoE demands it). Under EP the ranks of an EP group exchange tokens in every micro-batch, so the
  batch is split by :data:`EQUAL_MICROBATCH_PLANS` there (equal micro-batch sizes on every DP
  rank, ragged masks); expert gradients are compared with the global expert each local one is.

Every feature runs the loss specs ``token-mean``, ``seq-mean-token-mean`` and the two-term GRPO
spec on the 2-tuple, 3-tuple and 3-tuple + ``calculate_per_token_loss`` paths, and has negative
controls that must miss the reference by more than :data:`.matrix.CONTROL_MARGIN`.

The **MoE auxiliary loss** (``moe_aux_loss_coeff=1e-2``) is not part of the global-batch loss the
hook makes exact: Megatron scales it itself. The ``moe-aux-loss`` check shows that the hook leaves
it exactly as Megatron's plain loss leaves it: ``g(hook, aux on) − g(hook, aux off)`` equals
``g(plain, aux on) − g(plain, aux off)`` (the plain loss: Megatron-LM's masked sum + token count,
or masked mean on the 2-tuple path), so the main-loss part ``g(hook, aux on) − aux part`` equals
the reference; a control shows the aux part is not negligible.

On the CPU three more gaps of :func:`.cpu.cpu_shim` are bridged while the suite runs (numerics
unchanged): :func:`cpu_backward` (CUDA-device allocations inside the backward pass, where the
shim's device mode is not active: sequence parallelism and the MoE dispatchers allocate there) and
:func:`cpu_moe` (the alltoall dispatcher's host copies of its split sizes, and the uneven list-style
``all_gather`` / ``reduce_scatter`` of expert TP, which gloo lacks).

The **wrappers** (:mod:`.wrappers`): ``torch-fsdp2`` (Megatron's ``TorchFullyShardedDataParallel``)
and ``megatron-fsdp/optim_grads`` (the default strategy), without and with ``overlap_grad_reduce``
(Megatron-LM's pairing: ``config.no_sync_func`` set exactly with it; ``+overlap`` in the setting;
``_MFSDP_SETTINGS``), under TP2×DP2 (every strategy on DP4 is the version matrix's wrapper probe,
per release), with equal micro-batch counts (FSDP's collectives run in every backward). Each rank's gradient is read
where the wrapper keeps it (:func:`wrapper_shard_error`: FSDP2's local shard, Megatron-FSDP's buffer
shard, ``main_grad``) and the shards are shown to cover every element as often as the wrapper holds
it. A configuration with an upstream defect of the installed release
(:data:`megatron_agg.megatron.wrapper_defects.WRAPPER_DEFECTS`, e.g. ``no_shard`` without overlap in
0.14-0.17) is not compared: the hook must refuse it on every rank, naming the defect (a
``refused:cannot-be-exact`` row; so is the deferred mode under FSDP2), and Megatron's own per-token 3-tuple, exact under DDP, must miss
there (the ``plain-per-token-3-tuple`` control; under FSDP2 it misses by ``T/dp`` in every
release, which the hook compensates).

The suite is a list of :class:`Feature` (and :class:`AuxCheck`) values.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_agg.megatron.averaging import LossReturn
from megatron_agg.groups import ParallelGroups
from megatron_agg.compare import data as data_mod
from megatron_agg.compare.cpu import cpu_shim
from megatron_agg.compare.gpt import TinyGPT, TinyMoEGPT, _shard, _unwrap, full_name, grad_error
from .matrix import (
    CONTROL_MARGIN,
    LOSS_SPECS,
    SEQ_MEAN_TOKEN_MEAN,
    TOKEN_MEAN,
    TOLERANCE,
    Control,
    GradErrorFn,
    Harness,
    LossSpec,
    Result,
    Variant,
    _local_times_dp,
    runs_in,
)
from megatron_agg.compare.controls import microbatch_plans
from megatron_agg.compare.layers import SequenceParallelLayerNorm, cpu_backward, with_norm
from megatron_agg.compare.parallel import Layout, model_parallel

__all__ = [
    "Feature",
    "FeatureControl",
    "AuxCheck",
    "FEATURES",
    "REFUSED",
    "AUX_CHECKS",
    "GRAD_READERS",
    "UnmarkedLayerNorm",
    "owned_shard_error",
    "main",
]

GRPO = next(s for s in LOSS_SPECS if s.name == "grpo:pg-token-mean+0.1*kl-seq-mean-token-mean+excl")
assert TOKEN_MEAN.name == "token-mean" and SEQ_MEAN_TOKEN_MEAN.name == "seq-mean-token-mean"
#: The loss specs every feature runs.
SPECS: Tuple[LossSpec, ...] = (TOKEN_MEAN, SEQ_MEAN_TOKEN_MEAN, GRPO)
#: The Megatron paths every feature runs.
PATHS: Tuple[Variant, ...] = (
    Variant(LossReturn.TWO_TUPLE),
    Variant(LossReturn.THREE_TUPLE),
    Variant(LossReturn.THREE_TUPLE, per_token=True),
)
WORLD = 4
#: Small buckets for the overlap feature (elements; Megatron's default is 40M).
SMALL_BUCKET = 1000


# ---------------------------------------------------------------------------------------------
# Sequence parallelism: a LayerNorm that marks its weights (Megatron's local spec has none)
# ---------------------------------------------------------------------------------------------
class UnmarkedLayerNorm(SequenceParallelLayerNorm):
    """The control: the same norm without the mark, so its TP-partial gradients stay partial."""

    mark = False


@contextlib.contextmanager
def cpu_moe() -> Any:
    """Megatron's MoE token dispatchers on the CPU, as they run on a GPU.

    - The alltoall dispatcher copies its split sizes to the host as numpy arrays
      (``maybe_move_tensor_to_cpu(..., as_numpy=True)``), which only converts CUDA tensors: on the
      CPU they stayed tensors, which ``all_to_all_single`` refuses as split sizes. Here CPU
      tensors become (copied) numpy arrays as well.
    - Under expert TP it gathers and reduce-scatters *uneven* token counts over the expert TP
      group with list-style ``all_gather`` / ``reduce_scatter``, which gloo lacks: emulated here
      with the same result (pad to the largest part, gather or all-reduce, cut).
    """
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.detach().clone().numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    all_gather, reduce_scatter = dist.all_gather, dist.reduce_scatter
    token_dispatcher.maybe_move_tensor_to_cpu = to_host
    dist.all_gather = _uneven_all_gather(all_gather)
    dist.reduce_scatter = _uneven_reduce_scatter(reduce_scatter)
    try:
        yield
    finally:
        token_dispatcher.maybe_move_tensor_to_cpu = original
        dist.all_gather, dist.reduce_scatter = all_gather, reduce_scatter


def _padded(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype)
    out[: tensor.shape[0]] = tensor
    return out


def _uneven_all_gather(original: Callable[..., Any]) -> Callable[..., Any]:
    """``all_gather(tensor_list, tensor)`` whose parts differ in their first dimension (gloo
    needs equal parts): gather parts padded to the largest, then cut each to its size."""

    @functools.wraps(original)
    def all_gather(tensor_list: List[torch.Tensor], tensor: torch.Tensor, group: Any = None,
                   async_op: bool = False) -> Any:
        if all(t.shape == tensor.shape for t in tensor_list):
            return original(tensor_list, tensor, group=group, async_op=async_op)
        assert not async_op and all(t.shape[1:] == tensor.shape[1:] for t in tensor_list)
        rows = max(t.shape[0] for t in tensor_list)
        parts = [torch.empty((rows, *tensor.shape[1:]), dtype=tensor.dtype) for _ in tensor_list]
        original(parts, _padded(tensor, rows), group=group)
        for out, part in zip(tensor_list, parts):
            out.copy_(part[: out.shape[0]])
        return None

    return all_gather


def _uneven_reduce_scatter(original: Callable[..., Any]) -> Callable[..., Any]:
    """``reduce_scatter(output, input_list)`` (SUM) with parts of different first dimensions, which
    gloo lacks: all-reduce the parts padded to the largest, keep this rank's part."""

    @functools.wraps(original)
    def reduce_scatter(output: torch.Tensor, input_list: List[torch.Tensor], op: Any = dist.ReduceOp.SUM,
                       group: Any = None, async_op: bool = False) -> Any:
        assert op == dist.ReduceOp.SUM and not async_op
        rows = max(t.shape[0] for t in input_list)
        stacked = torch.stack([_padded(t, rows) for t in input_list])
        dist.all_reduce(stacked, group=group)
        output.copy_(stacked[dist.get_rank(group)][: output.shape[0]])
        return None

    return reduce_scatter


#: Micro-batch plans for expert parallelism: the MoE dispatchers exchange tokens over the EP group
#: in every micro-batch, so the ranks of an EP group (different DP ranks) must run the same number
#: of micro-batches, and the allgather dispatcher gathers equal shapes: every DP rank runs the same
#: micro-batch sizes here (as Megatron-LM's data loader does). The masks stay ragged (different
#: valid-token counts per micro-batch and rank, fully masked rows 7, 15, 16), so a mean of local
#: means is still wrong, but the ranks' sequence counts are equal, so the local × dp control uses
#: the token-mean loss (token counts differ per rank).
EQUAL_MICROBATCH_PLANS: Dict[int, List[List[int]]] = {
    1: [[5, 3, 7, 1, 4, 4]],
    2: [[5, 3, 4], [5, 3, 4]],
    4: [[2, 4], [2, 4], [2, 4], [2, 4]],
}
assert all(data_mod.all_rows(p) == data_mod.NUM_SEQUENCES for p in EQUAL_MICROBATCH_PLANS.values())


# ---------------------------------------------------------------------------------------------
# Reading the gradients to compare
# ---------------------------------------------------------------------------------------------
def _rel(got: torch.Tensor, target: torch.Tensor, scale: float) -> float:
    diff = float((got.float() - target.float()).abs().max()) if got.numel() else 0.0
    return diff / scale if scale > 0 else diff


def owned_shard_error(model: Sequence[torch.nn.Module], ref: Dict[str, torch.Tensor], shift: int = 0,
                      fixed: Optional[int] = None) -> float:
    """The distributed optimizer's view: this DP rank's shard of every bucket of every grad
    buffer (dense and expert), read from ``bucket.grad_data`` where Megatron's reduce-scatter
    wrote it, against the matching elements of the reference gradients.

    Each parameter's slice of the shard is located through the buffer's ``param_index_map``
    (buffer offsets, padding included). The shards are proved to cover every element of every
    parameter exactly once over the buffer's DP group (one all-reduce of coverage counts per
    buffer); a gap or an overlap returns ``inf``. ``shift=k`` reads the shard of DP rank
    ``rank + k`` instead (the control: a shard this rank does not own must miss); ``fixed=r``
    the shard of DP rank ``r`` on every rank (the control of the coverage proof).
    """
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    worst = 0.0
    for chunk in model:
        names = {param: full_name(chunk, name) for name, param in _unwrap(chunk).named_parameters()}
        for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
            group, size = buffer.data_parallel_group, buffer.data_parallel_world_size
            rank = (group.rank() + shift) % size if fixed is None else fixed
            coverage = {param: torch.zeros(param.numel(), dtype=torch.int32) for param in buffer.params}
            for bucket in buffer.buckets:
                assert bucket.grad_data.numel() % size == 0
                length = bucket.grad_data.numel() // size
                data = shard_buffer(bucket.grad_data, size)[rank]
                lo_shard = bucket.offset + rank * length  # buffer offsets of this shard
                hi_shard = lo_shard + length
                for param in bucket.params_list:
                    start, end, _ = buffer.param_index_map[param]
                    lo, hi = max(start, lo_shard), min(end, hi_shard)
                    if lo >= hi:
                        continue
                    target_full = _shard(ref[names[param]], param).reshape(-1)
                    scale = float(target_full.abs().max())
                    worst = max(worst, _rel(data[lo - lo_shard: hi - lo_shard], target_full[lo - start: hi - start], scale))
                    coverage[param][lo - start: hi - start] += 1
            counts = torch.cat([coverage[p] for p in buffer.params]) if buffer.params else torch.zeros(0, dtype=torch.int32)
            dist.all_reduce(counts, group=group)
            if counts.numel() and not bool((counts == 1).all()):
                return math.inf
    return worst


def foreign_shard_error(model: Sequence[torch.nn.Module], ref: Dict[str, torch.Tensor]) -> float:
    """Control: the shard of the next DP rank, which this rank does not own (its elements hold
    this rank's local, unreduced gradients)."""
    return owned_shard_error(model, ref, shift=1)


def shard_0_everywhere_error(model: Sequence[torch.nn.Module], ref: Dict[str, torch.Tensor]) -> float:
    """Control: DP rank 0's shard read on every rank (covered dp times, the rest never)."""
    return owned_shard_error(model, ref, fixed=0)


def experts_ignoring_ep_error(model: Sequence[torch.nn.Module], ref: Dict[str, torch.Tensor]) -> float:
    """Control: every parameter's ``main_grad``, but local expert ``j`` compared with global
    expert ``j`` on every EP rank (no EP offset), as a comparison unaware of expert sharding would."""
    worst = 0.0
    for chunk in model:
        for name, param in _unwrap(chunk).named_parameters():
            full = full_name(chunk, name)
            parts, local = full.split("."), name.split(".")
            if parts[3:6] == ["mlp", "experts", "local_experts"]:
                parts[6] = local[6]
                full = ".".join(parts)
            target = _shard(ref[full], param)
            worst = max(worst, _rel(param.main_grad, target, float(target.abs().max())))
    return worst


def _reader(name: str, min_buckets: int, buckets: List[int]) -> GradErrorFn:
    """The :data:`GRAD_READERS` entry ``name``, which first records the model's number of DDP
    bucket groups in ``buckets`` and fails (``inf``) below ``min_buckets``."""
    read = GRAD_READERS[name]

    def reader(model: Sequence[torch.nn.Module], ref: Dict[str, torch.Tensor]) -> float:
        if not all(hasattr(c, "bucket_groups") for c in model):  # FSDP wrappers: no DDP buckets
            buckets.append(0)
            return read(model, ref)
        count = sum(len(c.bucket_groups) + len(c.expert_parallel_bucket_groups) for c in model)
        buckets.append(count)
        return math.inf if count < min_buckets else read(model, ref)

    return reader


def main_grad_error(model: Sequence[torch.nn.Module], ref: Dict[str, torch.Tensor]) -> float:
    return max(grad_error(model, ref).values())


def wrapper_shard_error(model: Sequence[torch.nn.Module], ref: Dict[str, torch.Tensor]) -> float:
    """Any wrapper's view (:func:`.wrappers.gather_main_grads`): the gradient each rank holds after
    ``finalize_model_grads`` (DDP's ``main_grad``, FSDP2's local DTensor shard, Megatron-FSDP's
    shard of its gradient buffer; an untied output layer folded into the word embeddings) against
    the same elements of the reference, relative to the largest value of each TP-local reference parameter.
    ``inf`` unless the ranks' pieces cover every element exactly as often as the wrapper should
    hold it (:func:`.wrappers.check_coverage`: once where it shards, on every rank where not).
    Collectives over the data×context-parallel group: every rank calls it."""
    from megatron_agg.compare.wrappers import check_coverage, gather_main_grads, shard_error

    shards = gather_main_grads(model)
    return math.inf if check_coverage(shards) else shard_error(shards, ref)


#: How a feature reads the gradients it compares (by name, so that results and a later
#: wrapper dimension can refer to them).
GRAD_READERS: Dict[str, GradErrorFn] = {
    "main_grad": main_grad_error,
    "wrapper-shards": wrapper_shard_error,
    "owned-shard": owned_shard_error,
    "foreign-shard": foreign_shard_error,
    "shard-0-everywhere": shard_0_everywhere_error,
    "experts-ignoring-ep": experts_ignoring_ep_error,
}


# ---------------------------------------------------------------------------------------------
# What is run
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureControl:
    """A negative (or positive) control of a feature: one configuration that changes one thing.

    ``breaker`` breaks the hook through its public arguments (as the matrix's controls do);
    ``norm`` builds the model with another LayerNorm; ``grads`` reads the gradients another way.
    ``expect_pass(layout)`` says whether the control should still pass (e.g. EP 1).
    """

    name: str
    variant: Variant
    spec: LossSpec
    expect_pass: Callable[[Layout], bool] = lambda layout: False
    breaker: Optional[Callable[[ParallelGroups], Dict[str, Any]]] = None
    norm: Optional[type] = None
    grads: Optional[str] = None
    plain: Optional[LossReturn] = None  # Megatron's own per-micro-batch loss instead of the hook


@dataclass(frozen=True)
class Feature:
    """A Megatron feature under which the hook must stay exact.

    Attributes:
        name: the feature's name in the results.
        model: ``"dense"`` (:class:`.gpt.TinyGPT`) or ``"moe"`` (:class:`.gpt.TinyMoEGPT`).
        layouts: the layouts it runs (DP from the world size; ``ep``/``etp`` for MoE).
        config: ``TransformerConfig`` overrides.
        ddp: ``DistributedDataParallelConfig`` options.
        sequence_parallel: ``True``/``False``, or ``None``: where TP > 1 (MoE under TP needs it).
        steps: optimizer steps per configuration, each compared after its finalize.
        grads: how the gradients are read (a :data:`GRAD_READERS` name).
        controls: run on every layout.
        equal_microbatches: split the batch by :data:`EQUAL_MICROBATCH_PLANS` on the layouts where
            this says so (expert parallelism), else by the ragged default plans.
        min_buckets: the fewest DDP bucket groups the model must have (the small-bucket feature:
            more than one, else it would not test bucketing).
        wrapper: how the model is wrapped (:data:`.wrappers.WRAPPERS`): ``"ddp"`` builds with
            :func:`.gpt.build_chunks`/``wrap_ddp(**ddp)``, the FSDP wrappers with
            :func:`.wrappers.build_chunks_for`/:func:`.wrappers.wrap_model` (``wrap`` its options,
            Megatron-LM's pairing: ``config.no_sync_func`` set exactly with ``overlap_grad_reduce``).
            A configuration whose set-up is in :data:`megatron_agg.megatron.wrapper_defects.WRAPPER_DEFECTS`
            for the installed release is not compared: the hook must refuse it on every rank
            (a ``refused:`` row) and Megatron's plain loss must miss there (a ``plain-...`` control).
        wrap: :func:`.wrappers.wrap_model` options (``strategy``, ``overlap_grad_reduce``, ...).
    """

    name: str
    model: str
    layouts: Tuple[Layout, ...]
    config: Mapping[str, Any] = field(default_factory=dict)
    ddp: Mapping[str, Any] = field(default_factory=dict)
    sequence_parallel: Optional[bool] = False
    steps: int = 1
    grads: str = "main_grad"
    specs: Tuple[LossSpec, ...] = SPECS
    variants: Tuple[Variant, ...] = PATHS
    controls: Tuple[FeatureControl, ...] = ()
    equal_microbatches: Callable[[Layout], bool] = lambda layout: False
    min_buckets: int = 1
    wrapper: str = "ddp"
    wrap: Mapping[str, Any] = field(default_factory=dict)

    def defect(self, variant: Variant) -> Optional[Any]:
        """The upstream defect (:mod:`megatron_agg.megatron.wrapper_defects`) of this feature's wrapper
        set-up on ``variant`` in the installed release, or ``None``."""
        if self.wrapper == "ddp":
            return None
        from megatron_agg.megatron.averaging import Wrapper
        from megatron_agg.megatron.releases import minor_release
        from megatron_agg.megatron.wrapper_defects import WrapperSetup, find_wrapper_defect

        overlap = bool(self.wrap.get("overlap_grad_reduce", False))
        setup = WrapperSetup.of(self.wrap.get("strategy"), no_sync=overlap and self.wrapper != "torch-fsdp2",
                                overlap=overlap, per_token=variant.per_token,
                                average_in_collective=variant.average_in_collective,
                                div_fusion=self.wrap.get("gradient_reduce_div_fusion", None) is not False,
                                low_precision_grads=False)  # wrap_model: fp32 gradients
        return find_wrapper_defect(Wrapper(self.wrapper), minor_release(), setup)

    def refusal(self, variant: Variant) -> Optional[str]:
        """What the hook's refusal of ``variant`` under this feature's wrapper must say (``None``:
        the hook must be exact): an upstream defect (:meth:`defect`), or the deferred mode under
        ``TorchFullyShardedDataParallel``, whose finalize never divides by the deferred denominator."""
        defect = self.defect(variant)
        if defect is not None:
            return defect.what
        if variant.deferred and self.wrapper == "torch-fsdp2":
            return "whose scale_gradients does nothing"
        return None

    def plans(self, layout: Layout) -> Optional[Dict[int, List[List[int]]]]:
        return EQUAL_MICROBATCH_PLANS if self.equal_microbatches(layout) else None

    def uses_sp(self, layout: Layout) -> bool:
        return self.sequence_parallel if self.sequence_parallel is not None else layout.tp > 1

    def setting(self, layout: Layout) -> str:
        """What the layout name does not say (sequence parallelism, overlapped reduction)."""
        overlap = self.wrapper != "ddp" and self.wrap.get("overlap_grad_reduce")
        return layout.name(WORLD) + ("+sp" if self.uses_sp(layout) else "") + ("+overlap" if overlap else "")


@dataclass(frozen=True)
class AuxCheck:
    """The MoE auxiliary-loss check on one layout and dispatcher (see the module docstring)."""

    name: str
    layout: Layout
    dispatcher: str
    coeff: float = 1e-2
    equal_microbatches: bool = True
    specs: Tuple[LossSpec, ...] = (TOKEN_MEAN, SEQ_MEAN_TOKEN_MEAN)
    variants: Tuple[Variant, ...] = PATHS


#: The hook told local totals × dp instead of the all-reduced ones (the matrix's control).
LOCAL_X_DP = FeatureControl("hook-local-x-dp", Variant(LossReturn.TWO_TUPLE), SEQ_MEAN_TOKEN_MEAN,
                            expect_pass=lambda layout: layout.dp(WORLD) == 1, breaker=_local_times_dp)
FOREIGN_SHARD = FeatureControl("compare-a-shard-not-owned", Variant(LossReturn.THREE_TUPLE, per_token=True),
                               TOKEN_MEAN, grads="foreign-shard")
#: Every rank reads DP rank 0's shard: the coverage proof must see the gaps and overlaps (inf).
SHARD_COVERAGE = FeatureControl("every-rank-reads-shard-0", Variant(LossReturn.THREE_TUPLE, per_token=True),
                                TOKEN_MEAN, grads="shard-0-everywhere")

_DENSE_4 = (Layout(), Layout(tp=2))  # dp4-tp1, dp2-tp2
#: The local totals × dp control with token-mean: under the equal plans every rank has the same
#: number of sequences, so sequence counts × dp happen to be right; token counts are not.
LOCAL_X_DP_TOKENS = replace(LOCAL_X_DP, spec=TOKEN_MEAN)
#: Megatron's own per-token 3-tuple (masked sum + token count), exact under DDP (the matrix's
#: native-per-token control): under FSDP2 the gradients come out x T/dp_cp (FSDP2 averages, and
#: scale_gradients never divides by T).
PLAIN_PER_TOKEN = FeatureControl("plain-per-token-3-tuple", Variant(LossReturn.THREE_TUPLE, per_token=True),
                                 TOKEN_MEAN, plain=LossReturn.THREE_TUPLE)
_WRAPPED = dict(grads="wrapper-shards", equal_microbatches=lambda layout: True)  # FSDP: equal micro-batch counts
#: The wrappers' paths: the features' three and the deferred mode (refused under FSDP2).
_WRAPPER_PATHS = PATHS + (Variant(LossReturn.THREE_TUPLE, per_token=True, deferred=True),)
#: Megatron-FSDP scales like DDP (the 3-tuple without per-token loss reduces as the 2-tuple does):
#: the mean path, the sum path and the deferred mode.
_MFSDP_PATHS = (PATHS[0], PATHS[2], _WRAPPER_PATHS[-1])
#: (strategy, overlap_grad_reduce, layouts): the default strategy in Megatron-LM's two settings
#: (the gradient-sharding strategies force overlap internally; the setting then only decides
#: no_sync_func) under TP2xDP2, with every path and spec here. Every strategy × setting × path on
#: DP4, the hook and Megatron's plain loss, is the version matrix's wrapper probe
#: (tests/support/wrapper_probe.py --strict, on every release, the installed one included): not
#: repeated here (issue 20).
_MFSDP_SETTINGS = (
    ("optim_grads", False, (Layout(tp=2),)), ("optim_grads", True, (Layout(tp=2),)),
)
#: torch-fsdp2 under TP2xDP2 (on DP4 it is in the wrapper probe).
_FSDP2_LAYOUTS = (Layout(tp=2),)
#: The ``control`` of a row whose set-up the hook refused, as it must.
REFUSED = "refused:cannot-be-exact"
_DISTOPT = {"use_distributed_optimizer": True}
_OVERLAP = {"overlap_grad_reduce": True, "bucket_size": SMALL_BUCKET}


#: MoE layouts on 4 ranks (dp = 4 / tp; expert dp = 4 / (etp·ep)): EP 1 and 2, attention TP 2
#: with expert TP 1 and 2 (Megatron's default etp is tp).
MOE_LAYOUTS: Tuple[Layout, ...] = (
    Layout(ep=1),  # dp4, edp4
    Layout(ep=2),  # dp4, edp2
    Layout(tp=2, ep=2, etp=1),  # dp2 (+sp), edp2
    Layout(tp=2, ep=2, etp=2),  # dp2 (+sp), expert TP 2, edp1
    Layout(tp=2, ep=1),  # dp2 (+sp), expert TP 2 (default), edp2
)


_MOE_CONTROLS = (
    # token-mean: with the equal plans of expert parallelism every rank has 6 sequences, so local
    # sequence counts × dp happen to be right; local token counts × dp are not.
    replace(LOCAL_X_DP, spec=TOKEN_MEAN),
    FeatureControl("experts-compared-ignoring-ep", Variant(LossReturn.THREE_TUPLE), TOKEN_MEAN,
                   expect_pass=lambda layout: layout.ep == 1, grads="experts-ignoring-ep"),
)

FEATURES: List[Feature] = [
    Feature("sequence-parallel", "dense", (Layout(tp=2), Layout(tp=4)), sequence_parallel=True,
            controls=(LOCAL_X_DP, FeatureControl("layernorm-not-marked-sequence-parallel",
                                                 Variant(LossReturn.THREE_TUPLE), TOKEN_MEAN,
                                                 norm=UnmarkedLayerNorm))),
    Feature("distributed-optimizer", "dense", _DENSE_4, ddp=_DISTOPT, grads="owned-shard",
            controls=(LOCAL_X_DP, FOREIGN_SHARD, SHARD_COVERAGE)),
    Feature("overlap-small-buckets", "dense", _DENSE_4, ddp=_OVERLAP, steps=2, controls=(LOCAL_X_DP,),
            min_buckets=4),
    Feature("overlap-small-buckets+distopt", "dense", _DENSE_4, ddp={**_OVERLAP, **_DISTOPT}, steps=2,
            grads="owned-shard", controls=(LOCAL_X_DP, FOREIGN_SHARD), min_buckets=4),
    Feature("torch-fsdp2", "dense", _FSDP2_LAYOUTS, wrapper="torch-fsdp2", controls=(LOCAL_X_DP_TOKENS, PLAIN_PER_TOKEN),
            variants=_WRAPPER_PATHS, **_WRAPPED),
    *(Feature(f"megatron-fsdp/{strategy}", "dense", layouts, wrapper="megatron-fsdp", specs=(TOKEN_MEAN, GRPO),
              variants=_MFSDP_PATHS,
              wrap={"strategy": strategy, "use_distributed_optimizer": True, "overlap_grad_reduce": overlap},
              controls=(LOCAL_X_DP_TOKENS,), **_WRAPPED)
      for strategy, overlap, layouts in _MFSDP_SETTINGS),
    Feature("moe-alltoall", "moe", MOE_LAYOUTS, config={"moe_token_dispatcher_type": "alltoall"},
            sequence_parallel=None, controls=_MOE_CONTROLS, equal_microbatches=lambda layout: layout.ep > 1),
    # The dispatchers differ where tokens cross expert-parallel ranks: allgather on the EP layouts.
    Feature("moe-allgather", "moe", tuple(m for m in MOE_LAYOUTS if m.ep > 1),
            config={"moe_token_dispatcher_type": "allgather"},
            sequence_parallel=None, controls=_MOE_CONTROLS, equal_microbatches=lambda layout: layout.ep > 1),
]

AUX_CHECKS: List[AuxCheck] = [
    AuxCheck("moe-aux-loss", Layout(ep=2), "alltoall"),
    AuxCheck("moe-aux-loss", Layout(tp=2, ep=2, etp=2), "allgather"),
]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


class Suite:
    """Runs the features and aux checks in one process group, one line per configuration."""

    def __init__(self, features: Sequence[Feature], aux_checks: Sequence[AuxCheck], tol: float) -> None:
        self.features = list(features)
        self.aux_checks = list(aux_checks)
        self.tol = tol
        self.rows: List[Dict[str, Any]] = []
        self.total = sum(len(f.layouts) * (sum(runs_in(v, s) for v in f.variants for s in f.specs) + len(f.controls)
                                           + (f.defect(PLAIN_PER_TOKEN.variant) is not None and PLAIN_PER_TOKEN not in f.controls)
                                           - sum(c.breaker is not None and f.defect(c.variant) is not None for c in f.controls))
                         for f in self.features)
        self.total += sum(len(a.variants) * (len(a.specs) + 1) for a in self.aux_checks)
        self.harnesses: Dict[str, Harness] = {}

    def harness(self, kind: str) -> Harness:
        if kind not in self.harnesses:
            model = TinyMoEGPT() if kind == "moe" else TinyGPT()
            harness = Harness(model, tol=self.tol)
            harness.compute_references(list(SPECS))
            self.harnesses[kind] = harness
        return self.harnesses[kind]

    def record(self, feature: str, setting: str, extra: Dict[str, Any], res: Result) -> None:
        row = {"feature": feature, "setting": setting, **asdict(res), **extra}
        self.rows.append(row)
        mark = "ok  " if row["passed"] else "FAIL"
        what = f"control {res.control}" if res.control else f"{res.variant:<20} {res.spec}"
        _log(f"[{len(self.rows):>4}/{self.total}] {mark} {feature:<30} {setting:<24} {what:<62} "
             f"grad_err={res.grad_err:.2e} loss_err={res.loss_err:.1e} report_err={res.report_err:.1e} "
             f"coll={'ok' if res.collectives_ok else 'BAD'} ({res.seconds:.2f}s)")

    def refusal(self, feature: Feature, setting: str, extra: Dict[str, Any], layout: Layout, variant: Variant,
                spec: LossSpec, run: Callable[[], Result], reason: str) -> None:
        """A set-up the hook cannot make exact (:meth:`Feature.refusal`): it must raise
        ``ValueError`` saying ``reason``, on every rank (each rank's outcome is all-reduced),
        before the step runs."""
        t0 = time.perf_counter()
        try:
            run()
            message = ""
        except ValueError as exc:
            message = str(exc)
        named = torch.tensor([1 if reason in message else 0])
        dist.all_reduce(named, op=dist.ReduceOp.MIN)
        res = Result(layout.name(WORLD), False, "unpacked", variant.name, spec.name, REFUSED,
                     0.0 if int(named) else math.inf, 0.0, 0.0, True, True, time.perf_counter() - t0)
        res.passed = bool(int(named))
        if not res.passed:
            print(f"[rank {dist.get_rank()}] expected a refusal saying {reason!r}, got: {message or 'no error'}", flush=True)
        self.record(feature.name, setting, {**extra, "refusal": message}, res)

    def run_feature(self, feature: Feature) -> None:
        harness = self.harness(feature.model)
        for layout in feature.layouts:
            sp = feature.uses_sp(layout)
            config = {**feature.config, **({"sequence_parallel": True} if sp else {})}
            model = with_norm(harness.model, SequenceParallelLayerNorm) if sp else None
            setting = feature.setting(layout)
            plans = feature.plans(layout)
            extra = {"steps": feature.steps, "grads": feature.grads, "sequence_parallel": sp,
                     "ddp": dict(feature.ddp), "config": dict(config),
                     "microbatch_plan": (plans or data_mod.MICROBATCH_PLANS)[layout.dp(WORLD)],
                     "expert_dp": layout.edp(WORLD) if feature.model == "moe" else None}
            wrapping = dict(wrapper=feature.wrapper, wrapper_options=dict(feature.wrap)) if feature.wrapper != "ddp" else {}
            if wrapping:
                extra.update(wrapper=feature.wrapper, wrap=dict(feature.wrap))
            controls = list(feature.controls)
            if feature.defect(PLAIN_PER_TOKEN.variant) is not None and PLAIN_PER_TOKEN not in controls:
                controls.append(PLAIN_PER_TOKEN)  # exact under DDP: shows that Megatron alone is wrong here
            with model_parallel(layout), microbatch_plans(plans):
                for variant in feature.variants:
                    reason = feature.refusal(variant)
                    for spec in feature.specs:
                        if not runs_in(variant, spec):  # the deferred mode carries one denominator
                            continue
                        buckets: List[int] = []

                        def run(variant: Variant = variant, spec: LossSpec = spec, buckets: List[int] = buckets) -> Result:
                            return harness.run(layout, variant, spec, model_spec=model, config_overrides=config,
                                               ddp_options=feature.ddp, steps=feature.steps,
                                               grad_error_fn=_reader(feature.grads, feature.min_buckets, buckets),
                                               **wrapping)

                        if reason is not None:
                            self.refusal(feature, setting, extra, layout, variant, spec, run, reason)
                            continue
                        res = run()
                        self.record(feature.name, setting, {**extra, "bucket_groups": max(buckets)}, res)
                for c in controls:
                    expect = c.expect_pass(layout)
                    control = Control(c.name, c.variant, c.spec, lambda dp, cp, expect=expect: expect, breaker=c.breaker,
                                      plain=c.plain)
                    norm_model = with_norm(harness.model, c.norm) if c.norm else model
                    grads = c.grads or feature.grads
                    buckets = []
                    if c.breaker is not None and feature.defect(c.variant) is not None:
                        continue  # the hook refuses this set-up whatever its groups: nothing to break
                    res = harness.run(layout, c.variant, c.spec, control, model_spec=norm_model,
                                      config_overrides=config, ddp_options=feature.ddp, steps=feature.steps,
                                      grad_error_fn=_reader(grads, feature.min_buckets, buckets), **wrapping)
                    self.record(feature.name, setting, {**extra, "grads": grads, "bucket_groups": max(buckets)}, res)

    def run_aux(self, check: AuxCheck) -> None:
        """Four kinds of run per path: the hook and Megatron's plain loss, each with the aux loss
        on and off; compares (hook on − hook off) with (plain on − plain off), and the hook's
        main-loss part (hook on − (plain on − plain off)) with the reference."""
        harness = self.harness("moe")
        layout = check.layout
        sp = layout.tp > 1
        model = with_norm(harness.model, SequenceParallelLayerNorm) if sp else None
        base = {"moe_token_dispatcher_type": check.dispatcher, **({"sequence_parallel": True} if sp else {})}
        aux_on = {**base, "moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": check.coeff}
        setting = f"{layout.name(WORLD)}{'+sp' if sp else ''}+{check.dispatcher}"

        def grads_of(variant: Variant, spec: LossSpec, control: Optional[Control], config: Dict[str, Any]):
            """This rank's gradients after finalize (by full name), its parameters, the result."""
            grads: Dict[str, torch.Tensor] = {}
            params: Dict[str, torch.Tensor] = {}

            def capture(model: Sequence[torch.nn.Module], ref: Dict[str, torch.Tensor]) -> float:
                for chunk in model:
                    for name, param in _unwrap(chunk).named_parameters():
                        grads[full_name(chunk, name)] = param.main_grad.detach().clone()
                        params[full_name(chunk, name)] = param
                return 0.0

            res = harness.run(layout, variant, spec, control, model_spec=model, config_overrides=config,
                              grad_error_fn=capture)
            return grads, params, res

        plans = EQUAL_MICROBATCH_PLANS if check.equal_microbatches else None
        with model_parallel(layout), microbatch_plans(plans):
            for variant in check.variants:
                plain = Control("megatron-plain", variant, TOKEN_MEAN, lambda dp, cp: True, plain=variant.loss_return)
                t0 = time.perf_counter()
                plain_on, params, _ = grads_of(variant, TOKEN_MEAN, plain, aux_on)
                plain_off, _, _ = grads_of(variant, TOKEN_MEAN, plain, base)
                t_plain = time.perf_counter() - t0
                aux_part = {n: plain_on[n] - plain_off[n] for n in plain_on}
                # the aux part's size, relative to the token-mean reference gradient's scale
                aux_size = _max_rel(aux_part, {n: torch.zeros_like(g) for n, g in aux_part.items()},
                                    harness.ref[TOKEN_MEAN.name][0], params)
                for spec in check.specs:
                    t0 = time.perf_counter()
                    hook_on, _, res_on = grads_of(variant, spec, None, aux_on)
                    hook_off, _, res_off = grads_of(variant, spec, None, base)
                    ref = harness.ref[spec.name][0]
                    # (hook on − hook off) − (plain on − plain off), relative to the reference's scale
                    diff_err = _max_rel({n: hook_on[n] - hook_off[n] for n in hook_on}, aux_part, ref, params)
                    # the main-loss part of the hook's gradient with the aux loss on, against the reference
                    main_err = _max_rel({n: hook_on[n] - aux_part[n] for n in hook_on}, None, ref, params)
                    off_err = _max_rel(hook_off, None, ref, params)  # the hook alone (aux off)
                    ok = res_on.collectives_ok and res_off.collectives_ok
                    stats = torch.tensor([diff_err, main_err, off_err, res_on.loss_err, res_on.report_err,
                                          0.0 if ok else 1.0, aux_size], dtype=torch.float64)
                    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
                    diff_err, main_err, off_err, loss_err, report_err, bad, size = (float(x) for x in stats)
                    res = Result(layout=layout.name(WORLD), packed=False, packing="unpacked", variant=variant.name,
                                 spec=spec.name, control=None, grad_err=max(diff_err, main_err, off_err),
                                 loss_err=loss_err, report_err=report_err, collectives_ok=bad == 0, expect_pass=True,
                                 seconds=time.perf_counter() - t0 + t_plain / len(check.specs))
                    res.finalize(self.tol)
                    self.record(check.name, setting, {"aux_coeff": check.coeff, "aux_diff_err": diff_err,
                                                      "aux_main_part_err": main_err, "aux_off_err": off_err,
                                                      "aux_size": size}, res)
                # Control: the hook's gradient with the aux loss on is not the reference's: the aux
                # part is there and not negligible, so the comparisons above could fail.
                t0 = time.perf_counter()
                hook_on, _, res_on = grads_of(variant, TOKEN_MEAN, None, aux_on)
                err = torch.tensor([_max_rel(hook_on, None, harness.ref[TOKEN_MEAN.name][0], params)],
                                   dtype=torch.float64)
                dist.all_reduce(err, op=dist.ReduceOp.MAX)
                res = Result(layout=layout.name(WORLD), packed=False, packing="unpacked", variant=variant.name,
                             spec=TOKEN_MEAN.name, control="aux-on-hook-vs-reference-without-aux",
                             grad_err=float(err[0]), loss_err=0.0, report_err=0.0,
                             collectives_ok=res_on.collectives_ok, expect_pass=False,
                             seconds=time.perf_counter() - t0)
                res.finalize(self.tol)
                self.record(check.name, setting, {"aux_coeff": check.coeff}, res)


def _max_rel(got: Dict[str, torch.Tensor], minus: Optional[Dict[str, torch.Tensor]], ref: Dict[str, torch.Tensor],
             params: Dict[str, torch.Tensor]) -> float:
    """max over this rank's parameters of ``|got − minus| / max|reference shard|`` (``minus``
    ``None``: the reference shard itself)."""
    worst = 0.0
    for name, param in params.items():
        target = _shard(ref[name], param)
        other = minus[name] if minus is not None else target
        worst = max(worst, _rel(got[name], other, float(target.abs().max())))
    return worst


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    parser.add_argument("--tol", type=float, default=TOLERANCE)
    parser.add_argument("--features", default=None,
                        help="comma-separated feature names (default: all; 'moe-aux-loss' for the aux checks)")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    # Megatron-FSDP warns on every rank, for every model, that it runs on "cpu", not "cuda:<current>".
    logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.ERROR)
    world = dist.get_world_size()
    if world != WORLD:
        raise SystemExit(f"the features suite runs on {WORLD} ranks, not {world}")
    chosen = set(args.features.split(",")) if args.features else None
    features = [f for f in FEATURES if chosen is None or f.name in chosen]
    aux = [a for a in AUX_CHECKS if chosen is None or a.name in chosen]
    t0 = time.perf_counter()
    suite = Suite(features, aux, args.tol)
    with cpu_shim(), cpu_backward(), cpu_moe():
        for feature in features:
            suite.run_feature(feature)
        for check in aux:
            suite.run_aux(check)
    rows = suite.rows
    failed = [r for r in rows if not r["passed"]]
    n_controls = sum(1 for r in rows if r["control"])
    seconds = time.perf_counter() - t0
    _log(f"world {world}: ran {len(rows)} configurations ({len(rows) - n_controls} exactness checks, "
         f"{n_controls} controls) of {len(features)} features and {len(aux)} MoE aux-loss checks in {seconds:.1f}s; "
         f"{len(failed)} failed")
    if args.out and dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": world, "suite": "features", "tolerance": args.tol, "seconds": seconds,
                       "control_margin": CONTROL_MARGIN, "results": rows}, f, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
