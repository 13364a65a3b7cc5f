"""A model's set-up as Megatron holds it: groups, context-parallel layout, config and wrappers.

- :func:`resolve_groups` — the process groups of a step: from the caller's ``pg_collection``
  (a ``megatron.core.process_groups_config.ProcessGroupCollection``) where one is given,
  else from ``megatron.core.parallel_state``.
- :func:`step_averaging` — what Megatron will do to this step's losses and gradients, read
  from the model chunks' ``TransformerConfig`` and DDP config (see
  :mod:`megatron_agg.megatron.averaging`).
- :func:`wrap_finalize` — Megatron's ``finalize_model_grads_func`` wrapped so that a step's checks
  run before the gradients are reduced (the deferred hook and ``StepShares``).
- the refusals of set-ups that cannot be exact: dynamic (hybrid) context parallelism
  (:func:`refuse_unsupported_layouts`), wrappers megatron_agg does not know (:func:`wrapper_of`)
  and known wrapper defects (:func:`refuse_wrapper_defects`).

Everything is read from this rank's objects (Megatron imported lazily): no collective.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch

from ..groups import ParallelGroups, group_size
from ..layout import CP_LAYOUTS
from .averaging import GradReduction, LossReturn, MegatronAveraging, Wrapper, wrapper_behaviour
from .releases import _import, megatron_core_version, minor_release
from .wrapper_defects import WrapperSetup, find_wrapper_defect

__all__ = [
    "resolve_groups",
    "checked_cp_layout",
    "DYNAMIC_CP_SWITCHES",
    "dynamic_cp_switches",
    "refuse_unsupported_layouts",
    "token_scaled_auxiliary_losses",
    "model_config",
    "wrap_finalize",
    "finalize_owner",
    "unwrap_finalize",
    "wrapper_of",
    "step_wrapper",
    "step_averaging",
    "wrapper_setup",
    "refuse_wrapper_defects",
]


def resolve_groups(pg_collection: Any = None, grad_finalize_pgs: Any = None,
                   cp_layout: str = "load-balanced") -> ParallelGroups:
    """The step's :class:`ParallelGroups`, from the caller's groups where the release has them.

    ``cp_layout`` says how the caller's data loader cut the rows over the context-parallel group
    (:data:`megatron_agg.layout.CP_LAYOUTS`); it is told, never guessed.

    - ``pg_collection`` (megatron-core >= 0.15, a ``ProcessGroupCollection``): ``dp``, ``cp``,
      ``dp_cp`` and ``pp`` are taken from it (``use_mpu_process_groups()`` sets them all). With
      0.19's GTP weight rematerialization (a ``gtp_remat`` group of size > 1) the data is split
      over the *full* data-parallel group: ``dp_cp_gtp_remat`` is used for ``dp_cp`` and the full
      pure-DP group, which no collection carries, comes from ``parallel_state``.
    - ``grad_finalize_pgs`` (megatron-core 0.14): ``cp``, ``dp_cp`` and ``pp`` from it; it has no
      pure-DP group, so ``dp`` comes from ``parallel_state``.
    - neither (0.13, or a caller that passes none): everything from ``parallel_state``.

    A group that is missing or ``None`` in a given collection is a ``ValueError`` (0.19's
    collection answers ``None`` for unset fields, which would otherwise mean WORLD).
    """
    ps = _import("megatron.core.parallel_state")
    given = pg_collection if pg_collection is not None else grad_finalize_pgs
    if given is None:
        if not ps.model_parallel_is_initialized():
            raise ValueError(
                "Megatron's model parallel state is not initialized and no pg_collection was given; "
                "call megatron.core.parallel_state.initialize_model_parallel(...) first, or pass "
                "pg_collection= to the wrapped forward_backward function or to LossHook."
            )
        return ParallelGroups(
            dp=ps.get_data_parallel_group(),
            cp=ps.get_context_parallel_group(),
            dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
            pp=ps.get_pipeline_model_parallel_group(),
            mp=ps.get_model_parallel_group(),
            tp=ps.get_tensor_model_parallel_group(),
            cp_layout=cp_layout,
        )
    kind = "pg_collection" if pg_collection is not None else "grad_finalize_pgs"
    needed = ("dp", "cp", "dp_cp", "pp") if pg_collection is not None else ("cp", "dp_cp", "pp")
    missing = [n for n in needed if getattr(given, n, None) is None]
    if missing:
        raise ValueError(
            f"{kind} has no {', '.join(missing)} group(s) (missing or None), which megatron_agg "
            "needs to count the step's totals once per data-parallel replica; set them, e.g. "
            "with ProcessGroupCollection.use_mpu_process_groups(), or "
            "pg_collection.dp = parallel_state.get_data_parallel_group()."
        )
    dp_cp = given.dp_cp
    dp = getattr(given, "dp", None) if pg_collection is not None else None
    if group_size(getattr(given, "gtp_remat", None)) > 1:
        dp_cp = getattr(given, "dp_cp_gtp_remat", None) or ps.get_data_parallel_group(with_context_parallel=True)
        dp = None
    if dp is None:
        dp = ps.get_data_parallel_group()
    mp = getattr(given, "mp", None)
    if mp is None:  # 0.14's GradFinalizeProcessGroups has none; 0.15+ collections may leave it unset
        mp = ps.get_model_parallel_group() if ps.model_parallel_is_initialized() else None
    tp = getattr(given, "tp", None)
    if tp is None and ps.model_parallel_is_initialized():
        tp = ps.get_tensor_model_parallel_group()
    return ParallelGroups(dp=dp, cp=given.cp, dp_cp=dp_cp, pp=given.pp, mp=mp, tp=tp, cp_layout=cp_layout)


def checked_cp_layout(cp_layout: Optional[str], groups: Optional[ParallelGroups] = None) -> str:
    """A front end's ``cp_layout`` argument: one of :data:`~megatron_agg.layout.CP_LAYOUTS` other
    than ``"contiguous"`` (Megatron cuts load-balanced), default ``"load-balanced"``; with explicit
    ``groups`` it must agree with ``groups.cp_layout`` (or be left out)."""
    if groups is not None:
        if cp_layout is not None and cp_layout != groups.cp_layout:
            raise ValueError(
                f"cp_layout={cp_layout!r} but the groups given say cp_layout={groups.cp_layout!r}; "
                "give it once (ParallelGroups(..., cp_layout=...)) or make them agree."
            )
        return groups.cp_layout
    if cp_layout is None:
        return "load-balanced"
    allowed = tuple(c for c in CP_LAYOUTS if c != "contiguous")
    if cp_layout not in allowed:
        raise ValueError(
            f"cp_layout must be one of {allowed} (how Megatron's data loader cut each row over the "
            f"context-parallel ranks), got {cp_layout!r}."
        )
    return cp_layout


#: Megatron's switches for context parallelism with a group size per sample: ``--hybrid-context-
#: parallel`` (megatron-core 0.16–0.20, Megatron-LM main), renamed ``dynamic_context_parallel`` on
#: Megatron-LM's development branch, where ``sequence_packing_scheduler`` also moves samples between
#: the DP×CP ranks and picks ``num_microbatches`` per step.
DYNAMIC_CP_SWITCHES = ("hybrid_context_parallel", "dynamic_context_parallel", "sequence_packing_scheduler")


def dynamic_cp_switches(config: Any) -> List[str]:
    """The :data:`DYNAMIC_CP_SWITCHES` set on Megatron's config, as ``"name=value"`` (empty: none).
    Reads the config only: no collective."""
    return [f"{name}={getattr(config, name)!r}" for name in DYNAMIC_CP_SWITCHES
            if getattr(config, name, None) not in (None, False, "", "none", "None")]


def refuse_unsupported_layouts(config: Any, entry: str) -> None:
    """Raise ``ValueError`` for Megatron set-ups whose token layout the prepared entry points
    cannot make exact.

    Dynamic (hybrid) context parallelism (any of :data:`DYNAMIC_CP_SWITCHES` set on the config)
    assigns the sub-samples of a packed batch over the DP×CP ranks with a context-parallel group
    size chosen per sample (``hybrid_cp_schedule.py``: its own schedule, data iterator and
    ``num_microbatches`` per rank), so neither the pure data-parallel totals nor the fixed ``2·cp``
    chunk layout describe where a sequence's tokens are. (The deferred mode makes ``token-mean``
    and ``token-sum`` exact there: :meth:`megatron_agg.DeferredLossHook.check_config`.) Reads the
    config only: no collective."""
    switched = dynamic_cp_switches(config)
    if switched:
        raise ValueError(
            f"{entry} does not support dynamic (hybrid) context parallelism ({', '.join(switched)}): "
            "each sample gets its own context-parallel group size and the samples move between the "
            "data×context-parallel ranks, so the step's totals and the per-sequence token layout "
            "megatron_agg relies on do not hold and the loss would not be exact. Use fixed context "
            "parallelism (context_parallel_size), or the deferred mode with token-mean or token-sum "
            "(DeferredLossHook, exact under dynamic context parallelism)."
        )


#: MoE load-balancing loss types whose coefficient is ``moe_aux_loss_coeff`` (an entry of it when
#: ``moe_router_load_balancing_type`` is a list, megatron-core >= 0.14).
_AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")


def token_scaled_auxiliary_losses(config: Any) -> List[str]:
    """The losses Megatron adds *inside* the model whose weight, under
    ``calculate_per_token_loss=True``, relies on ``finalize_model_grads`` dividing by the step's
    valid-token count.

    With per-token loss the MoE router multiplies its load-balancing loss (``aux_loss``,
    ``seq_aux_loss``, ``global_aux_loss``) and its z-loss by the micro-batch's local token count
    (``router.py``: "To correct this scaling, we need to scale the aux_loss by num_local_tokens"),
    and the MTP head (``gpt_model.py``) adds the *sum* of its per-token losses; all of them are
    then divided by ``Σ num_tokens`` with the main loss. Each entry names the setting that makes
    it active (``"MoE load-balancing loss 'aux_loss' (moe_aux_loss_coeff=0.01)"``). Reads the
    config only (the same fields in megatron-core 0.13–0.19); the router's own rule decides: a
    coefficient ``> 0`` for the load-balancing types, a z-loss coefficient that is set and
    non-zero, ``mtp_num_layers > 0`` with a non-zero ``mtp_loss_scaling_factor``."""
    active: List[str] = []
    if getattr(config, "num_moe_experts", None):
        types = getattr(config, "moe_router_load_balancing_type", "aux_loss")
        coeffs = getattr(config, "moe_aux_loss_coeff", 0.0)
        pairs = (zip(types, coeffs if isinstance(coeffs, (list, tuple)) else [coeffs] * len(types))
                 if isinstance(types, (list, tuple)) else [(types, coeffs)])
        for kind, coeff in pairs:
            if kind in _AUX_LOSS_TYPES and coeff is not None and float(coeff) > 0:
                active.append(f"MoE load-balancing loss {kind!r} (moe_aux_loss_coeff={coeff:g})")
        z_coeff = getattr(config, "moe_z_loss_coeff", None)
        if z_coeff:
            active.append(f"MoE router z-loss (moe_z_loss_coeff={z_coeff:g})")
    mtp_layers = getattr(config, "mtp_num_layers", None)
    if mtp_layers and getattr(config, "mtp_loss_scaling_factor", 0.1):
        active.append(f"multi-token prediction loss (mtp_num_layers={mtp_layers}, "
                      f"mtp_loss_scaling_factor={config.mtp_loss_scaling_factor:g})")
    return active


def model_config(model_or_config: Any) -> Any:
    """Megatron's ``TransformerConfig`` of a model (chunks, DDP-wrapped or not), or the config itself."""
    if not isinstance(model_or_config, (list, tuple, torch.nn.Module)) and hasattr(
        model_or_config, "calculate_per_token_loss"
    ):
        return model_or_config
    chunks = _model_chunks(model_or_config)
    if not chunks:
        raise ValueError("Expected Megatron model chunks (or a TransformerConfig), got an empty list.")
    get_model_config = _import("megatron.core.utils", "get_model_config")
    return get_model_config(chunks[0])


#: The attribute that marks a megatron_agg wrapper (of ``finalize_model_grads_func`` or of the
#: ``forward_backward_func``) with the object that installed it.
OWNER_ATTRIBUTE = "__megatron_agg_hook__"


def finalize_owner(func: Any) -> Any:
    """The megatron_agg object whose wrapper ``func`` is (:func:`wrap_finalize`), else ``None``."""
    return getattr(func, OWNER_ATTRIBUTE, None)


def wrap_finalize(config: Any, before: Callable[[Any], None], owner: Any) -> Any:
    """Wrap Megatron's extension point ``config.finalize_model_grads_func`` (called once per step
    after the last backward pass, before the gradients are reduced and the optimizer can use
    them) so that ``before(model)`` runs first; the wrapper is marked with ``owner``
    (:func:`finalize_owner`) and keeps the original as ``__wrapped__``. Returns the original
    (``None``: there is no finalize to wrap, nothing is changed)."""
    original = getattr(config, "finalize_model_grads_func", None)
    if original is None:
        return None

    def finalize_model_grads_with_checks(*args: Any, **kwargs: Any) -> Any:
        before(args[0] if args else kwargs.get("model"))
        return original(*args, **kwargs)

    setattr(finalize_model_grads_with_checks, OWNER_ATTRIBUTE, owner)
    finalize_model_grads_with_checks.__wrapped__ = original  # type: ignore[attr-defined]
    config.finalize_model_grads_func = finalize_model_grads_with_checks
    return original


def unwrap_finalize(config: Any, owner: Any, original: Any) -> None:
    """Put ``original`` back if ``config.finalize_model_grads_func`` is still ``owner``'s wrapper."""
    if config is not None and finalize_owner(getattr(config, "finalize_model_grads_func", None)) is owner:
        config.finalize_model_grads_func = original


def _model_chunks(model: Any) -> List[Any]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _ddp_config(chunk: Any) -> Any:
    return getattr(chunk, "ddp_config", None)


#: Megatron's wrapper classes by where they are defined (the MRO is read by name, so that a
#: release without one of them needs no import): megatron-core 0.13 calls Megatron-FSDP
#: ``custom_fsdp``, 0.14 and later ``fsdp.mcore_fsdp_adapter``.
_WRAPPER_CLASSES = {
    "megatron.core.distributed.distributed_data_parallel.DistributedDataParallel": Wrapper.DDP,
    "megatron.core.distributed.torch_fully_sharded_data_parallel.TorchFullyShardedDataParallel": Wrapper.TORCH_FSDP2,
    "megatron.core.distributed.fsdp.mcore_fsdp_adapter.FullyShardedDataParallel": Wrapper.MEGATRON_FSDP,
    "megatron.core.distributed.custom_fsdp.fully_sharded_data_parallel.FullyShardedDataParallel": Wrapper.MEGATRON_FSDP,
    # 0.20 (Megatron-LM main): FullyShardedDataParallel is a factory building V1 (the default,
    # ddp_config.megatron_fsdp_version=1: the same implementation as 0.19's class) or V2.
    "megatron.core.distributed.fsdp.mcore_fsdp_adapter.FullyShardedDataParallelV1": Wrapper.MEGATRON_FSDP,
}
#: Wrappers megatron_agg recognises but has not measured: refused with their name and the way out.
_UNMEASURED_WRAPPERS = {
    "megatron.core.distributed.fsdp.mcore_fsdp_adapter.FullyShardedDataParallelV2":
        "Megatron-FSDP v2 (DistributedDataParallelConfig(megatron_fsdp_version=2), new in megatron-core 0.20), "
        "whose gradient reduction megatron_agg has not measured yet; use megatron_fsdp_version=1, "
        "TorchFullyShardedDataParallel or DistributedDataParallel",
}


def wrapper_of(chunk: Any) -> Optional[Wrapper]:
    """Which of Megatron's data-parallel wrappers holds a model chunk (``None``: not wrapped).

    Raises ``ValueError`` for a wrapper megatron_agg does not know (a class with a
    ``ddp_config`` that is none of Megatron's, nor a subclass of one): what it does to gradients is
    not in :data:`megatron_agg.megatron.averaging.WRAPPERS`, so the scaling could not be exact."""
    for cls in type(chunk).__mro__:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in _UNMEASURED_WRAPPERS:
            raise ValueError(f"megatron_agg cannot make this step exact under {_UNMEASURED_WRAPPERS[name]}.")
        kind = _WRAPPER_CLASSES.get(name)
        if kind is not None:
            return kind
    if _ddp_config(chunk) is None:
        return None
    raise ValueError(
        f"megatron_agg does not know the data-parallel wrapper {type(chunk).__module__}."
        f"{type(chunk).__qualname__} (it has a ddp_config but is none of Megatron's DistributedDataParallel, "
        "TorchFullyShardedDataParallel or Megatron-FSDP's FullyShardedDataParallel), so it cannot tell "
        "how the gradients are reduced. Wrap the chunks in one of those, or subclass one of them."
    )


def step_wrapper(model: Any) -> Optional[Wrapper]:
    """The wrapper every chunk of ``model`` is held by (:func:`wrapper_of`); ``ValueError`` if they differ."""
    kinds = {wrapper_of(c) for c in _model_chunks(model)}
    if len(kinds) > 1:
        names = ", ".join(sorted(k.value if k is not None else "unwrapped" for k in kinds))
        raise ValueError(f"The model chunks are held by different data-parallel wrappers ({names}); wrap every "
                         "chunk the same way, as Megatron-LM's get_model does.")
    return next(iter(kinds))


def step_averaging(
    model: Any,
    loss_return: LossReturn,
    num_microbatches: int,
    groups: ParallelGroups,
) -> MegatronAveraging:
    """What Megatron will do with this step's losses and gradients (see :mod:`.averaging`).

    Reads ``calculate_per_token_loss`` and ``finalize_model_grads_func`` from the model's
    ``TransformerConfig`` and the DDP wrapper's config. Raises ``ValueError`` for set-ups whose
    gradients Megatron would not combine as the rules table says.
    """
    chunks = _model_chunks(model)
    get_model_config = _import("megatron.core.utils", "get_model_config")
    config = get_model_config(chunks[0])
    refuse_unsupported_layouts(config, "megatron_agg")
    per_token = bool(getattr(config, "calculate_per_token_loss", False))
    ddp_configs = [_ddp_config(c) for c in chunks]
    wrapper = step_wrapper(chunks)
    finalize_divides = True
    if wrapper is None:
        if groups.dp_cp_size > 1:
            raise ValueError(
                "The model chunks are not wrapped in megatron.core.distributed."
                "DistributedDataParallel, so nothing averages their gradients over the "
                f"{groups.dp_cp_size} data×context-parallel ranks as megatron_agg's scaling "
                "assumes; wrap every chunk in Megatron's DDP."
            )
        # One dp_cp rank: no reduction happens, which is a mean and a sum at once.
        reduction = GradReduction.SUM if per_token else GradReduction.MEAN
        wrapper = Wrapper.DDP
    else:
        behaviour = wrapper_behaviour(wrapper, minor_release())
        reduction = behaviour.per_token_reduction if per_token else behaviour.reduction
        finalize_divides = behaviour.finalize_divides
        if (per_token and wrapper is not Wrapper.TORCH_FSDP2
                and any(getattr(c, "average_in_collective", False) for c in ddp_configs)):
            raise ValueError(
                "calculate_per_token_loss=True cannot be combined with "
                "DistributedDataParallelConfig(average_in_collective=True) (Megatron asserts the "
                "same); set average_in_collective=False."
            )
        refuse_wrapper_defects(wrapper, chunks, config)
    if per_token and loss_return is LossReturn.THREE_TUPLE and getattr(
        config, "finalize_model_grads_func", None
    ) is None:
        raise ValueError(
            "With calculate_per_token_loss=True, Megatron divides the gradients by the step's "
            "token count inside config.finalize_model_grads_func, which is not set; set "
            "config.finalize_model_grads_func = megatron.core.distributed.finalize_model_grads."
        )
    return MegatronAveraging(
        loss_return=loss_return,
        calculate_per_token_loss=per_token,
        num_microbatches=int(num_microbatches),
        cp_size=groups.cp_size,
        dp_cp_size=groups.dp_cp_size,
        grad_reduction=reduction,
        finalize_divides=finalize_divides,
        wrapper=wrapper,
    )


def wrapper_setup(chunks: Sequence[Any], config: Any) -> WrapperSetup:
    """The :class:`~megatron_agg.megatron.wrapper_defects.WrapperSetup` of a step: read from the first
    chunk's ``ddp_config`` and the model's ``TransformerConfig`` (``no_sync_func``,
    ``calculate_per_token_loss``, ``bf16``/``fp8``)."""
    ddp_config = _ddp_config(chunks[0]) if chunks else None
    low_precision = bool(getattr(config, "bf16", False) or getattr(config, "fp8", None))
    return WrapperSetup.of(
        getattr(ddp_config, "data_parallel_sharding_strategy", None),
        no_sync=getattr(config, "no_sync_func", None) is not None,
        overlap=bool(getattr(ddp_config, "overlap_grad_reduce", False)),
        per_token=bool(getattr(config, "calculate_per_token_loss", False)),
        average_in_collective=bool(getattr(ddp_config, "average_in_collective", False)),
        div_fusion=bool(getattr(ddp_config, "gradient_reduce_div_fusion", True)),
        low_precision_grads=low_precision and not getattr(ddp_config, "grad_reduce_in_fp32", False),
    )


def refuse_wrapper_defects(wrapper: Wrapper, chunks: Sequence[Any], config: Any) -> None:
    """Raise ``ValueError`` for a wrapper set-up with a known upstream defect
    (:data:`~megatron_agg.megatron.wrapper_defects.WRAPPER_DEFECTS`), naming the release, the defect and
    what to do instead. Reads only this rank's config: no collective."""
    setup = wrapper_setup(chunks, config)
    defect = find_wrapper_defect(wrapper, minor_release(), setup)
    if defect is None:
        return
    strategy = f" with data_parallel_sharding_strategy={setup.strategy!r}" if setup.strategy else ""
    raise ValueError(
        f"megatron_agg cannot make this step exact: {wrapper.value}{strategy} in megatron-core "
        f"{megatron_core_version()} {defect.what}. This is an upstream defect (a plain Megatron run is "
        f"wrong the same way, without an error); no loss scaling can repair it. Instead: {defect.instead}."
    )
