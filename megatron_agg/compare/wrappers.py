"""Megatron's three data-parallel wrappers on the CPU, and each rank's gradient read back from them.

Megatron-LM trains a model wrapped in one of:

- ``"ddp"``: ``megatron.core.distributed.DistributedDataParallel`` (the default; delegated to
  :func:`megatron_agg.compare.gpt.wrap_ddp`).
- ``"torch-fsdp2"``: ``megatron.core.distributed.TorchFullyShardedDataParallel``
  (``--use-torch-fsdp2``): PyTorch FSDP2 (``fully_shard``) over the data×context-parallel group.
  Megatron-LM requires ``--untie-embeddings-and-output-weights`` and no pipeline parallelism with
  it; on the local layer spec it also needs ``transformer_impl="local"`` (else it would shard the
  spec's ``ColumnParallelLinear`` modules a second time inside already sharded layers; 0.13 does
  so regardless, :func:`wrap_model` leaves them out there). :func:`build_chunks_for` builds
  chunks that way.
- ``"megatron-fsdp"``: Megatron-FSDP (``--use-megatron-fsdp``; ``--use-custom-fsdp`` in 0.13),
  ``megatron.core.distributed.fsdp.mcore_fsdp_adapter.FullyShardedDataParallel``
  (``megatron.core.distributed.custom_fsdp.FullyShardedDataParallel`` in 0.13) with a
  ``data_parallel_sharding_strategy`` of :data:`STRATEGIES`.

:func:`wrap_model` wraps :func:`~megatron_agg.compare.gpt.build_chunks` chunks in one of them and
sets ``config.finalize_model_grads_func``/``no_sync_func``/``grad_sync_func`` as Megatron-LM's
``training.py`` does: ``no_sync_func`` only for DDP and Megatron-FSDP with
``overlap_grad_reduce=True`` (``no_sync="megatron-lm"``, the default), or always / never.

:func:`gather_main_grads` returns, per parameter, the gradient this rank holds after Megatron's
``finalize_model_grads`` as a :class:`GradShard`: the values, which elements of the (TP-local)
parameter they are, and on how many data×context-parallel ranks each element is expected
(1: sharded, e.g. the distributed optimizer's or FSDP's shard; ``dp_cp``: replicated).
:func:`check_coverage` proves that the shards of a step cover every element exactly that often;
:func:`fit_factor` fits ``g ≈ c · g_ref`` against the single-process reference gradients of
:func:`~megatron_agg.compare.gpt.reference_grads` (``c = 1`` and a zero residual: exact).

Everything runs under :func:`megatron_agg.compare.cpu.cpu_shim` (gloo, CPU; it emulates NCCL's
``AVG`` and ``PREMUL_SUM`` reductions, builds Megatron's ``"cuda"`` device meshes on the CPU).
Megatron-FSDP needs ``einops``. What else Megatron's wrappers need on a CPU without Transformer
Engine, :func:`wrap_model` does while wrapping (each documented where it is done): Megatron-FSDP on
``device="cpu"``, a stand-in for the missing ``TELinear`` class, an out-of-place attention mask
(Megatron-FSDP <= 0.15), torch's removed ``_mesh_resources.child_to_root_mapping`` (0.14), and
the upstream fix of ``TorchFullyShardedDataParallel.finish_grad_sync`` (0.16-0.18,
``backport_fixes``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from .gpt import TinyGPT, _unwrap, build_chunks, full_name, load_full_weights, wrap_ddp
from .parallel import Layout

__all__ = [
    "WRAPPERS",
    "STRATEGIES",
    "NO_SYNC_MODES",
    "megatron_fsdp_class",
    "build_chunks_for",
    "full_weights_for",
    "wrap_model",
    "wrapper_of",
    "tfsdp_accepts_force_all_reduce",
    "GradShard",
    "gather_main_grads",
    "check_coverage",
    "shard_error",
    "FactorFit",
    "fit_factor",
]

#: The wrappers :func:`wrap_model` knows.
WRAPPERS = ("ddp", "torch-fsdp2", "megatron-fsdp")
#: Megatron-FSDP's ``data_parallel_sharding_strategy`` values (ZeRO-0/1/2/3).
STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
#: How :func:`wrap_model` sets ``config.no_sync_func``.
NO_SYNC_MODES = ("megatron-lm", "always", "never")

_OUTPUT = "output_layer.weight"
_EMBEDDING = "embedding.word_embeddings.weight"


# ---------------------------------------------------------------------------------------------
# Building and wrapping
# ---------------------------------------------------------------------------------------------
def megatron_fsdp_class() -> type:
    """Megatron-FSDP's Megatron-Core wrapper class of the installed release (0.20: the class its
    ``FullyShardedDataParallel`` factory builds by default, ``FullyShardedDataParallelV1``)."""
    try:
        from megatron.core.distributed.fsdp import mcore_fsdp_adapter
    except ImportError:  # megatron-core 0.13: "custom FSDP"
        from megatron.core.distributed.custom_fsdp import FullyShardedDataParallel
        return FullyShardedDataParallel
    return getattr(mcore_fsdp_adapter, "FullyShardedDataParallelV1", None) or mcore_fsdp_adapter.FullyShardedDataParallel


def _config_fields(cls: type) -> set:
    return {f.name for f in dataclasses.fields(cls)}


def build_chunks_for(spec: TinyGPT, layout: Layout, wrapper: str, **config_overrides: Any) -> List[torch.nn.Module]:
    """:func:`~megatron_agg.compare.gpt.build_chunks` for ``wrapper``.

    Every wrapper gets ``transformer_impl="local"`` (the chunks use the local layer spec; what
    Megatron-LM's ``--transformer-impl local`` sets). ``"torch-fsdp2"`` gets an output layer of
    its own (``share_embeddings_and_output_weights=False``): FSDP2 shards the embedding as a unit
    of its own, so a tied output layer would multiply by a sharded weight (Megatron-LM asserts
    ``--untie-embeddings-and-output-weights`` with ``--use-torch-fsdp2``). Load it with
    :func:`full_weights_for` (the output layer starts equal to the word embeddings, so the model
    computes what the tied model computes) and fold its gradient back with
    :func:`gather_main_grads` (``fold_output_layer=True``).
    """
    from megatron.core.transformer import TransformerConfig

    _check_wrapper(wrapper)
    if "transformer_impl" in _config_fields(TransformerConfig):
        config_overrides.setdefault("transformer_impl", "local")
    return build_chunks(spec, layout, tie_embeddings=wrapper != "torch-fsdp2", **config_overrides)


def full_weights_for(chunks: Sequence[torch.nn.Module], full: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``full`` plus ``output_layer.weight`` (a copy of the word embeddings) if a chunk has an
    untied output layer (see :func:`build_chunks_for`)."""
    untied = any(
        name == _OUTPUT and full_name(c, name) == _OUTPUT for c in chunks for name, _ in _unwrap(c).named_parameters()
    )
    if untied and _OUTPUT not in full:
        full = dict(full)
        full[_OUTPUT] = full[_EMBEDDING].clone()
    return full


def _check_wrapper(wrapper: str) -> None:
    if wrapper not in WRAPPERS:
        raise ValueError(f"Unknown wrapper {wrapper!r}; expected one of {WRAPPERS}.")


def wrap_model(
    chunks: Sequence[torch.nn.Module],
    wrapper: str,
    *,
    full_weights: Optional[Dict[str, torch.Tensor]] = None,
    strategy: Optional[str] = None,
    average_in_collective: bool = False,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
    bucket_size: Optional[int] = None,
    reshard_after_forward: bool = True,
    gradient_reduce_div_fusion: Optional[bool] = None,
    no_sync: str = "megatron-lm",
    backport_fixes: bool = True,
) -> List[torch.nn.Module]:
    """Wrap every chunk in ``wrapper`` (:data:`WRAPPERS`) as Megatron-LM's ``get_model`` does, and
    set the config hooks its ``train`` sets.

    Args:
        chunks: this rank's model chunks (:func:`build_chunks_for`; model parallel state set up).
        wrapper: ``"ddp"``, ``"torch-fsdp2"`` or ``"megatron-fsdp"``.
        full_weights: full (TP=PP=1) weights to load *before* wrapping (FSDP shards the
            parameters it is given: loading afterwards would have to go through its buffers).
        strategy: Megatron-FSDP's ``data_parallel_sharding_strategy`` (:data:`STRATEGIES`);
            required for ``"megatron-fsdp"``, refused otherwise.
        average_in_collective, use_distributed_optimizer, overlap_grad_reduce,
            overlap_param_gather, bucket_size: ``DistributedDataParallelConfig`` fields, as
            Megatron-LM's ``--ddp-average-in-collective`` etc. set them (``bucket_size`` only
            with ``overlap_grad_reduce``, as Megatron-LM). ``"torch-fsdp2"`` ignores all of them
            but ``average_in_collective``, which is recorded in its config (megatron_agg reads it)
            and has no effect on FSDP2; it refuses ``use_distributed_optimizer`` (Megatron-LM
            asserts the same). Megatron-FSDP forces ``overlap_grad_reduce`` for ``optim_grads``
            and ``optim_grads_params`` and ``overlap_param_gather`` for ``optim_grads_params``
            (0.14+ in its constructor; 0.13 asserts them, so they are set here).
        reshard_after_forward: ``TorchFullyShardedDataParallelConfig`` field (``"torch-fsdp2"``).
        gradient_reduce_div_fusion: Megatron-FSDP's ``DistributedDataParallelConfig`` field
            (``None``: Megatron's default, ``True``: the ``1/dp`` pre-scaling is fused into the
            reduction as NCCL's ``PREMUL_SUM``, which :func:`~megatron_agg.compare.cpu.cpu_shim`
            emulates on gloo; ``False``, Megatron-LM's ``--no-gradient-reduce-div-fusion``: the
            gradient data is multiplied in place first, a different code path: megatron-core
            0.13-0.15 multiply the wrong tensor there, see the probe's report).
        no_sync: ``"megatron-lm"``: ``config.no_sync_func`` (and ``grad_sync_func``) only for
            DDP and Megatron-FSDP with ``overlap_grad_reduce=True`` (as requested here, before
            Megatron-FSDP forces it), as Megatron-LM's ``train``; ``"always"``: every wrapper's
            ``no_sync`` (what :func:`~megatron_agg.compare.gpt.wrap_ddp` sets); ``"never"``: none.
        backport_fixes: apply the upstream fixes a release lacks and without which no step runs:
            megatron-core 0.16.0-0.18.x call ``finish_grad_sync(force_all_reduce=...)`` in
            ``finalize_model_grads`` but ``TorchFullyShardedDataParallel`` inherits
            ``_BaseDataParallel.finish_grad_sync(self)`` (a ``TypeError`` on every step; fixed in
            0.19.0 by Megatron-LM commit 6ee356a, PR #4953, which adds the keyword and ignores it):
            the same method is set on the instance. ``False``: the release as shipped.

    Returns the wrapped chunks, gradient buffers zeroed.
    """
    _check_wrapper(wrapper)
    if no_sync not in NO_SYNC_MODES:
        raise ValueError(f"no_sync must be one of {NO_SYNC_MODES}, got {no_sync!r}.")
    if (strategy is not None) != (wrapper == "megatron-fsdp"):
        raise ValueError(f"strategy= is for 'megatron-fsdp' only and required there; got wrapper={wrapper!r}, "
                         f"strategy={strategy!r}.")
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"Unknown Megatron-FSDP strategy {strategy!r}; expected one of {STRATEGIES}.")
    if full_weights is not None:
        load_full_weights(chunks, full_weights_for(chunks, full_weights))
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads

    requested_overlap = overlap_grad_reduce
    if not overlap_grad_reduce:
        bucket_size = None  # Megatron-LM: "Set bucket_size to infinity if overlap_grad_reduce is False"
    if wrapper == "ddp":
        options: Dict[str, Any] = {}
        if overlap_grad_reduce:
            options.update(overlap_grad_reduce=True, bucket_size=bucket_size)
        if overlap_param_gather:
            options["overlap_param_gather"] = True
        wrapped = _wrap_ddp(chunks, average_in_collective, use_distributed_optimizer, options)
    elif wrapper == "torch-fsdp2":
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import TorchFullyShardedDataParallel
        from megatron.core.distributed.torch_fully_sharded_data_parallel_config import (
            TorchFullyShardedDataParallelConfig,
        )

        if use_distributed_optimizer:
            raise ValueError("torch-fsdp2 does not take Megatron's distributed optimizer (Megatron-LM asserts "
                             "'--use-torch-fsdp2 is not supported with MCore's distributed optimizer').")
        if ps.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("torch-fsdp2 does not support pipeline parallelism (Megatron-LM asserts it).")
        config = TorchFullyShardedDataParallelConfig(reshard_after_forward=reshard_after_forward,
                                                     average_in_collective=average_in_collective)
        import inspect

        # megatron-core 0.13's constructor has no disable_bucketing (Megatron-LM core_v0.13.1 passes
        # it anyway: a TypeError in get_model with --use-torch-fsdp2).
        parameters = inspect.signature(TorchFullyShardedDataParallel.__init__).parameters
        options: Dict[str, Any] = {}
        if "disable_bucketing" not in parameters:
            # 0.13 also shards every ColumnParallelLinear, which the local spec has inside the
            # (already sharded) layers; 0.14+ leave it out for transformer_impl="local" themselves.
            options["sub_modules_to_wrap"] = _tfsdp_units(chunks[0].config, parameters)
        wrapped = [TorchFullyShardedDataParallel(c.config, config, c, **options,
                                                 **({"disable_bucketing": i > 0} if "disable_bucketing" in parameters else {}))
                   for i, c in enumerate(chunks)]
        if backport_fixes and not tfsdp_accepts_force_all_reduce():
            for m in wrapped:
                m.finish_grad_sync = _finish_grad_sync_ignoring_force(m)
    else:
        fields = _config_fields(DistributedDataParallelConfig)
        if strategy in ("optim_grads", "optim_grads_params"):
            overlap_grad_reduce = True
        if strategy == "optim_grads_params":
            overlap_param_gather = True
        kwargs: Dict[str, Any] = dict(
            data_parallel_sharding_strategy=strategy,
            grad_reduce_in_fp32=True,
            average_in_collective=average_in_collective,
            use_distributed_optimizer=use_distributed_optimizer,
            overlap_grad_reduce=overlap_grad_reduce,
            overlap_param_gather=overlap_param_gather,
            bucket_size=bucket_size,
        )
        if gradient_reduce_div_fusion is not None:
            kwargs["gradient_reduce_div_fusion"] = gradient_reduce_div_fusion
        kwargs["use_megatron_fsdp" if "use_megatron_fsdp" in fields else "use_custom_fsdp"] = True
        config = DistributedDataParallelConfig(**{k: v for k, v in kwargs.items() if k in fields})
        cls = megatron_fsdp_class()
        _torch_mesh_compat()
        for chunk in chunks:
            _out_of_place_attention_mask(chunk)
        # Megatron-LM passes no device: Megatron-FSDP takes cuda:<current>, and allocates its
        # temporary buckets inside backward hooks, where the CPU shim's device rewriting (a torch
        # function mode) is not active. The CPU is this run's current device.
        with _without_transformer_engine_types():
            wrapped = [cls(c.config, config, c, disable_bucketing=i > 0, device=torch.device("cpu"))
                       for i, c in enumerate(chunks)]
    model_config = wrapped[0].config
    model_config.finalize_model_grads_func = finalize_model_grads
    model_config.no_sync_func = None
    model_config.grad_sync_func = None
    if no_sync == "always" or (no_sync == "megatron-lm" and requested_overlap and wrapper != "torch-fsdp2"):
        syncs = [m.no_sync for m in wrapped]
        model_config.no_sync_func = syncs if len(syncs) > 1 else syncs[0]
        if no_sync == "megatron-lm":  # --align-grad-reduce (default on)
            starts = [m.start_grad_sync for m in wrapped]
            model_config.grad_sync_func = starts if len(starts) > 1 else starts[0]
    for m in wrapped:
        m.zero_grad_buffer()
    return wrapped


def _torch_mesh_compat() -> None:
    """Megatron-FSDP 0.14 lists sub-meshes through ``_mesh_resources.child_to_root_mapping``, a
    private ``DeviceMesh`` table that newer torch (2.13) no longer has. No sub-mesh is created
    here, so an empty table answers what the old one would (idempotent; torch never reads it)."""
    try:
        from torch.distributed.device_mesh import _mesh_resources
    except ImportError:
        return
    if not hasattr(_mesh_resources, "child_to_root_mapping"):
        _mesh_resources.child_to_root_mapping = {}


def _masked_fill(attention_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``megatron.core.transformer.utils.attention_mask_func`` without the in-place update."""
    return attention_scores.masked_fill(attention_mask, -10000.0)


def _out_of_place_attention_mask(chunk: torch.nn.Module) -> None:
    """The local spec's softmax masks the attention scores in place (``masked_fill_``). Megatron-FSDP
    up to 0.15 (no FSDP units: ``no_shard``/``optim``/``optim_grads``) passes every module's inputs
    through an autograd Function whose outputs are views, and autograd forbids modifying those in
    place (a ``RuntimeError`` in the first forward; Transformer Engine's attention does not modify
    in place). The same values, computed out of place."""
    from megatron.core.transformer import utils

    for module in chunk.modules():
        if getattr(module, "mask_func", None) is utils.attention_mask_func:
            module.mask_func = _masked_fill


class _NoTransformerEngineLinear:
    """Stands for Transformer Engine's ``TELinear`` where TE is not installed: no module is one."""


@contextlib.contextmanager
def _without_transformer_engine_types() -> Iterator[None]:
    """Megatron-FSDP's adapter (0.16) tests ``isinstance(module, (TELinear,))`` with TP > 1; without
    Transformer Engine ``TELinear`` is Megatron's placeholder (a ``MagicMock``), not a class, and
    that raises ``TypeError``. While wrapping, a class no module is an instance of stands in (the
    answer without TE: not a TELinear)."""
    import sys

    adapter = sys.modules.get("megatron.core.distributed.fsdp.mcore_fsdp_adapter")
    original = getattr(adapter, "TELinear", object)
    if adapter is None or isinstance(original, type):
        yield
        return
    adapter.TELinear = _NoTransformerEngineLinear
    try:
        yield
    finally:
        adapter.TELinear = original


def _tfsdp_units(config: Any, parameters: Any) -> set:
    """TorchFullyShardedDataParallel's default ``sub_modules_to_wrap``, without
    ``ColumnParallelLinear`` for ``transformer_impl="local"`` (what 0.14+ do)."""
    from megatron.core import tensor_parallel

    units = set(parameters["sub_modules_to_wrap"].default)
    if getattr(config, "transformer_impl", "local") == "local":
        units.discard(tensor_parallel.ColumnParallelLinear)
    return units


def tfsdp_accepts_force_all_reduce() -> bool:
    """Whether ``TorchFullyShardedDataParallel.finish_grad_sync`` takes the ``force_all_reduce``
    that this release's ``finalize_model_grads`` passes (or finalize passes none)."""
    import inspect

    from megatron.core.distributed import TorchFullyShardedDataParallel, finalize_model_grads

    if "force_all_reduce" not in inspect.signature(finalize_model_grads).parameters:
        return True
    return "force_all_reduce" in inspect.signature(TorchFullyShardedDataParallel.finish_grad_sync).parameters


def _finish_grad_sync_ignoring_force(module: torch.nn.Module):
    base = type(module).finish_grad_sync

    def finish_grad_sync(force_all_reduce: bool = False) -> None:  # Megatron-LM 6ee356a (0.19.0)
        base(module)

    return finish_grad_sync


def _wrap_ddp(chunks: Sequence[torch.nn.Module], average_in_collective: bool, use_distributed_optimizer: bool,
              options: Dict[str, Any]) -> List[torch.nn.Module]:
    """:func:`~megatron_agg.compare.gpt.wrap_ddp`, with further ``DistributedDataParallelConfig``
    fields where it takes them (else the same wrapping, done here)."""
    import inspect

    takes_options = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(wrap_ddp).parameters.values())
    if not options or takes_options:
        return wrap_ddp(chunks, average_in_collective=average_in_collective,
                        use_distributed_optimizer=use_distributed_optimizer, **options)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, average_in_collective=average_in_collective,
                                           use_distributed_optimizer=use_distributed_optimizer, **options)
    return [DistributedDataParallel(c.config, config, c, disable_bucketing=i > 0) for i, c in enumerate(chunks)]


def wrapper_of(chunk: torch.nn.Module) -> str:
    """Which of :data:`WRAPPERS` ``chunk`` is wrapped in."""
    from megatron.core.distributed import DistributedDataParallel, TorchFullyShardedDataParallel

    if isinstance(chunk, DistributedDataParallel):
        return "ddp"
    if isinstance(chunk, TorchFullyShardedDataParallel):
        return "torch-fsdp2"
    if isinstance(chunk, megatron_fsdp_class()):
        return "megatron-fsdp"
    raise TypeError(f"{type(chunk).__name__} is none of Megatron's data-parallel wrappers {WRAPPERS}.")


# ---------------------------------------------------------------------------------------------
# Reading the gradients back
# ---------------------------------------------------------------------------------------------
@dataclass
class GradShard:
    """The part of one parameter's gradient that this rank holds after the step.

    ``index`` are positions in the flattened TP-local parameter (``numel`` elements), ``values``
    the gradient there (float32). ``replicas`` is how many data×context-parallel ranks are
    expected to hold each element: 1 for a sharded gradient, ``dp_cp`` for a replicated one.
    """

    name: str  # the reference (TP=PP=1) name
    values: torch.Tensor
    index: torch.Tensor
    numel: int
    replicas: int
    tp_partition_dim: Optional[int] = None  # the dim the TP-local parameter is cut along, if any
    tp_size: int = 1
    tp_rank: int = 0

    def target(self, ref: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference gradient at the same elements."""
        full = ref[self.name]
        if self.tp_partition_dim is not None and self.tp_size > 1:
            full = full.chunk(self.tp_size, dim=self.tp_partition_dim)[self.tp_rank]
        flat = full.reshape(-1).to(torch.float32)
        assert flat.numel() == self.numel, (self.name, flat.numel(), self.numel)
        return flat[self.index]


def _tp_info(param: torch.Tensor) -> Dict[str, Any]:
    if not getattr(param, "tensor_model_parallel", False):
        return {}
    from megatron.core import parallel_state as ps

    return dict(tp_partition_dim=param.partition_dim, tp_size=ps.get_tensor_model_parallel_world_size(),
                tp_rank=ps.get_tensor_model_parallel_rank())


def _dp_cp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size(with_context_parallel=True)


def _ddp_shards(chunk: torch.nn.Module) -> List[GradShard]:
    """Megatron DDP: ``main_grad``; with the distributed optimizer only the bucket shard this rank
    reduce-scattered into is the reduced gradient (the rest of the buffer holds local sums)."""
    distributed = bool(chunk.ddp_config.use_distributed_optimizer)
    owned: Dict[torch.nn.Parameter, torch.Tensor] = {}
    if distributed:
        buffers = list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))
        for buffer in buffers:
            group = buffer.data_parallel_group
            size, rank = dist.get_world_size(group), dist.get_rank(group)
            for param, (start, end, bucket_id) in buffer.param_index_map.items():
                bucket = buffer.buckets[bucket_id]
                shard = bucket.grad_data.numel() // size
                lo = max(start, bucket.offset + rank * shard)
                hi = min(end, bucket.offset + (rank + 1) * shard)
                owned[param] = torch.arange(lo - start, max(hi, lo) - start)
    dp_cp = _dp_cp_size()
    shards = []
    for name, param in _unwrap(chunk).named_parameters():
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
        flat = grad.detach().reshape(-1).to(torch.float32)
        index = owned[param] if distributed else torch.arange(flat.numel())
        shards.append(GradShard(full_name(chunk, name), flat[index].clone(), index, flat.numel(),
                                1 if distributed else dp_cp, **_tp_info(param)))
    return shards


def _tfsdp_shards(chunk: torch.nn.Module) -> List[GradShard]:
    """Megatron's TorchFullyShardedDataParallel: FSDP2's sharded ``param.grad`` (a DTensor)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Replicate, Shard

    shards = []
    for name, param in _unwrap(chunk).named_parameters():
        numel = param.numel()
        positions = torch.arange(numel).view(param.shape)
        replicas = 1
        if isinstance(param, DTensor):
            mesh = param.device_mesh
            for dim, placement in enumerate(param.placements):
                coordinate = mesh.get_local_rank(dim)
                if isinstance(placement, Shard):
                    pieces = torch.chunk(positions, mesh.size(dim), dim=placement.dim)
                    positions = pieces[coordinate] if coordinate < len(pieces) else positions.narrow(placement.dim, 0, 0)
                elif isinstance(placement, Replicate):
                    replicas *= mesh.size(dim)
                else:
                    raise NotImplementedError(f"{name}: placement {placement} is not supported")
        grad = param.grad
        if grad is None:
            values = torch.zeros(positions.numel())
        else:
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            values = local.detach().reshape(-1).to(torch.float32).clone()
        index = positions.reshape(-1)
        assert values.numel() == index.numel(), (name, values.numel(), index.numel())
        shards.append(GradShard(full_name(chunk, name), values, index, numel, replicas, **_tp_info(param)))
    return shards


def _mfsdp_shards(chunk: torch.nn.Module) -> List[GradShard]:
    """Megatron-FSDP: what ``update_main_grads`` hands the optimizer, read from the gradient
    buffer: the rank's (virtual) shard of each parameter unless the strategy is ``no_shard``."""
    owner = chunk if hasattr(chunk, "param_and_grad_buffer") else chunk.module
    buffer = owner.param_and_grad_buffer
    sharded = buffer.ddp_config.data_parallel_sharding_strategy != "no_shard"
    dp_cp = _dp_cp_size()
    shards = []
    for param, name in buffer.param_to_name.items():
        group = buffer.parameter_groups[buffer.param_to_param_group[param]]
        gbuf = group.main_grad_buffer
        numel = param.numel()
        if gbuf is None or not param.requires_grad:
            continue
        item = gbuf.param_idx[param]
        values = gbuf.get_item(item, only_shard=sharded).detach().reshape(-1).to(torch.float32).clone()
        start, end = gbuf._get_item_slice_in_shard(item) if sharded else (0, numel)
        if values.numel() == 0:
            start = end = 0
        index = torch.arange(start, end)
        assert values.numel() == index.numel(), (name, values.numel(), index.numel())
        shards.append(GradShard(full_name(chunk, name), values, index, numel, 1 if sharded else dp_cp,
                                **_tp_info(param)))
    return shards


def _fold_output_layer(shards: Dict[str, GradShard]) -> None:
    """Add an untied output layer's gradient into the word embeddings' (the tied reference's)."""
    out = shards.pop(_OUTPUT, None)
    if out is None:
        return
    emb = shards[_EMBEDDING]
    if not torch.equal(out.index, emb.index):  # e.g. flat buffers laid out differently: go by position
        values = torch.zeros(emb.numel)
        values[emb.index] += emb.values
        values[out.index] += out.values
        assert set(out.index.tolist()) <= set(emb.index.tolist()), "output layer shard outside the embedding's"
        emb.values = values[emb.index]
    else:
        emb.values = emb.values + out.values


def gather_main_grads(model: Sequence[torch.nn.Module], fold_output_layer: bool = True) -> Dict[str, GradShard]:
    """This rank's gradient of every parameter after the step, by reference name (see
    :class:`GradShard`), for DDP, torch-fsdp2 and Megatron-FSDP chunks alike.

    Call it after Megatron's schedule returned (``finalize_model_grads`` has run). With
    ``fold_output_layer`` an untied output layer's gradient is added to the word embeddings'
    (the reference model ties them; see :func:`build_chunks_for`).
    """
    shards: Dict[str, GradShard] = {}
    for chunk in model:
        kind = wrapper_of(chunk)
        pieces = {"ddp": _ddp_shards, "torch-fsdp2": _tfsdp_shards, "megatron-fsdp": _mfsdp_shards}[kind](chunk)
        for piece in pieces:
            assert piece.name not in shards, f"{piece.name} in two chunks"
            shards[piece.name] = piece
    if fold_output_layer:
        _fold_output_layer(shards)
    return shards


def shard_error(shards: Dict[str, GradShard], ref: Dict[str, torch.Tensor]) -> float:
    """The largest relative difference of this rank's gradient shards from the reference.

    Each :class:`GradShard` (the elements of a TP-local parameter this rank holds) is compared
    with the same elements of the full reference gradient ``ref``, relative to the largest value
    of the reference's TP-local parameter: ``max|g − g_ref| / max|g_ref|`` (for a whole
    ``main_grad``, exactly what :func:`megatron_agg.compare.gpt.grad_error` computes).
    """
    worst = 0.0
    for shard in shards.values():
        whole = dataclasses.replace(shard, index=torch.arange(shard.numel)).target(ref)
        scale = float(whole.abs().max()) if whole.numel() else 0.0
        if shard.values.numel() == 0:
            continue
        diff = float((shard.values.float() - shard.target(ref).float()).abs().max())
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def check_coverage(shards: Dict[str, GradShard], group: Any = None) -> Dict[str, str]:
    """Count over ``group`` (default: Megatron's data×context-parallel group, whose ranks hold the
    same parameters) how often each element of each parameter is held; return the parameters whose
    counts are not exactly their :attr:`GradShard.replicas` everywhere (empty: every element is
    held exactly as often as expected, e.g. once for sharded gradients). A collective: call on
    every rank of ``group``."""
    if group is None:
        from megatron.core import parallel_state as ps

        group = ps.get_data_parallel_group(with_context_parallel=True)
    problems: Dict[str, str] = {}
    for name in sorted(shards):
        shard = shards[name]
        counts = torch.zeros(shard.numel, dtype=torch.int64)
        counts.index_add_(0, shard.index, torch.ones_like(shard.index))
        dist.all_reduce(counts, group=group)
        expected = torch.tensor([shard.replicas], dtype=torch.int64)
        dist.all_reduce(expected, op=dist.ReduceOp.MAX, group=group)
        low, high = int(counts.min()), int(counts.max())
        if low != int(expected) or high != int(expected):
            problems[name] = f"held {low}..{high} times, expected {int(expected)}"
    return problems


@dataclass(frozen=True)
class FactorFit:
    """``g ≈ factor · g_ref`` over every element every rank holds (see :func:`fit_factor`)."""

    factor: float  # <g, g_ref> / <g_ref, g_ref>
    residual: float  # ||g − factor·g_ref|| / ||factor·g_ref||: 0 when g is exactly a multiple
    max_residual: float  # max|g − factor·g_ref| / max|factor·g_ref|
    raw_error: float  # max|g − g_ref| / max|g_ref| (what an exactness test compares)
    rank_factor_min: float  # the same fit per rank (a rank-dependent error shows here)
    rank_factor_max: float

    @property
    def exact(self) -> bool:
        return self.raw_error <= 1e-5


def fit_factor(shards: Dict[str, GradShard], ref: Dict[str, torch.Tensor], group: Any = None) -> FactorFit:
    """Fit one scalar ``c`` to ``g ≈ c · g_ref`` over every rank of ``group`` (default WORLD: TP and
    PP ranks hold different parameters, DP ranks different shards; replicated elements count once
    per holder on both sides of the ratio). A collective: call on every rank of ``group``."""
    g = [s.values.to(torch.float64) for s in shards.values()]
    r = [s.target(ref).to(torch.float64) for s in shards.values()]
    g_all = torch.cat(g) if g else torch.zeros(0, dtype=torch.float64)
    r_all = torch.cat(r) if r else torch.zeros(0, dtype=torch.float64)
    local = torch.stack([(g_all * r_all).sum(), (r_all * r_all).sum()])
    sums = local.clone()
    dist.all_reduce(sums, group=group)
    c = float(sums[0] / sums[1]) if float(sums[1]) > 0 else math.nan
    resid = torch.stack([((g_all - c * r_all) ** 2).sum(), (g_all - c * r_all).abs().max() if g_all.numel() else
                         torch.zeros((), dtype=torch.float64)])
    dist.all_reduce(resid[:1], group=group)
    maxes = torch.stack([
        resid[1],
        (c * r_all).abs().max() if r_all.numel() else torch.zeros((), dtype=torch.float64),
        (g_all - r_all).abs().max() if g_all.numel() else torch.zeros((), dtype=torch.float64),
        r_all.abs().max() if r_all.numel() else torch.zeros((), dtype=torch.float64),
    ])
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    per_rank = torch.tensor([float(local[0] / local[1]) if float(local[1]) > 0 else math.nan], dtype=torch.float64)
    size = dist.get_world_size(group)
    gathered = [torch.zeros_like(per_rank) for _ in range(size)]
    dist.all_gather(gathered, per_rank, group=group)
    factors = [float(t) for t in gathered if not math.isnan(float(t))]
    norm = math.sqrt(float(sums[1])) * abs(c) if not math.isnan(c) else math.nan
    return FactorFit(
        factor=c,
        residual=math.sqrt(float(resid[0])) / norm if norm and norm > 0 else math.nan,
        max_residual=float(maxes[0] / maxes[1]) if float(maxes[1]) > 0 else math.nan,
        raw_error=float(maxes[2] / maxes[3]) if float(maxes[3]) > 0 else math.nan,
        rank_factor_min=min(factors) if factors else math.nan,
        rank_factor_max=max(factors) if factors else math.nan,
    )
