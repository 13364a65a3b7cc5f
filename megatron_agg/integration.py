"""Megatron-Core glue: the only module that imports Megatron (lazily) or reads its objects.

- :func:`check_megatron_version` — the supported releases, with a clear error outside them.
- :func:`resolve_groups` — the process groups of a step: from the caller's ``pg_collection``
  (a ``megatron.core.process_groups_config.ProcessGroupCollection``) where one is given,
  else from ``megatron.core.parallel_state``.
- :func:`step_averaging` — what Megatron will do to this step's losses and gradients, read
  from the model chunks' ``TransformerConfig`` and DDP config (see :mod:`megatron_agg.averaging`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch

from .averaging import GradReduction, LossReturn, MegatronAveraging

__all__ = [
    "SUPPORTED_MEGATRON_CORE",
    "MegatronSymbolError",
    "megatron_core_version",
    "check_megatron_version",
    "ParallelGroups",
    "resolve_groups",
    "step_averaging",
]

#: The megatron-core releases this version of megatron_agg is tested against (setup.py agrees).
SUPPORTED_MEGATRON_CORE = (">=0.16.0", "<0.17.0")
_SUPPORTED_MIN = (0, 16)
_SUPPORTED_MAX_EXCLUSIVE = (0, 17)


class MegatronSymbolError(ImportError):
    """A Megatron-Core symbol megatron_agg relies on is missing (moved or renamed upstream)."""


def _import(module: str, name: Optional[str] = None) -> Any:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise MegatronSymbolError(
            f"megatron_agg needs {module!r} from megatron-core "
            f"{' '.join(SUPPORTED_MEGATRON_CORE)} and could not import it ({exc}). "
            "Install a supported release: pip install 'megatron-core>=0.16,<0.17'."
        ) from exc
    if name is None:
        return mod
    try:
        return getattr(mod, name)
    except AttributeError as exc:
        raise MegatronSymbolError(
            f"megatron-core {megatron_core_version()} has no {module}.{name}, which megatron_agg "
            f"uses; supported releases are {' '.join(SUPPORTED_MEGATRON_CORE)}."
        ) from exc


def megatron_core_version() -> str:
    """The installed megatron-core version string (``'unknown'`` if it has none)."""
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # noqa: BLE001 - a source checkout has no distribution metadata
        mod = _import("megatron.core")
        return str(getattr(mod, "__version__", "unknown"))


def _release(version: str) -> tuple:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_megatron_version(version: Optional[str] = None) -> str:
    """Raise ``RuntimeError`` naming the supported range if ``version`` is outside it."""
    version = version or megatron_core_version()
    if version == "unknown":
        return version
    release = _release(version)
    if not (_SUPPORTED_MIN <= release < _SUPPORTED_MAX_EXCLUSIVE):
        raise RuntimeError(
            f"megatron_agg supports megatron-core {' '.join(SUPPORTED_MEGATRON_CORE)}, but "
            f"{version} is installed; install a supported release or upgrade megatron_agg."
        )
    return version


@dataclass(frozen=True)
class ParallelGroups:
    """The groups of one step and this rank's place in them.

    ``dp`` is the *pure* data-parallel group (one rank per data-parallel replica: the group the
    hook's totals are all-reduced over); ``dp_cp`` the data×context group DDP reduces gradients
    over; ``cp`` and ``pp`` the context- and pipeline-parallel groups.
    """

    dp: Any
    cp: Any
    dp_cp: Any
    pp: Any

    @staticmethod
    def _size(group: Any) -> int:
        return 1 if group is None else torch.distributed.get_world_size(group)

    @staticmethod
    def _rank(group: Any) -> int:
        return 0 if group is None else torch.distributed.get_rank(group)

    @property
    def dp_size(self) -> int:
        return self._size(self.dp)

    @property
    def cp_size(self) -> int:
        return self._size(self.cp)

    @property
    def cp_rank(self) -> int:
        return self._rank(self.cp)

    @property
    def dp_cp_size(self) -> int:
        return self._size(self.dp_cp)

    @property
    def is_last_pipeline_stage(self) -> bool:
        return self._rank(self.pp) == self._size(self.pp) - 1


def resolve_groups(pg_collection: Any = None) -> ParallelGroups:
    """The step's :class:`ParallelGroups`, from ``pg_collection`` or ``parallel_state``.

    A ``pg_collection`` must carry ``dp``, ``cp``, ``dp_cp`` and ``pp``
    (``ProcessGroupCollection.use_mpu_process_groups()`` sets them all).
    """
    if pg_collection is not None:
        missing = [n for n in ("dp", "cp", "dp_cp", "pp") if not hasattr(pg_collection, n)]
        if missing:
            raise ValueError(
                f"pg_collection has no {', '.join(missing)} group(s), which megatron_agg needs "
                "to count the step's totals over the pure data-parallel group; set them, e.g. "
                "pg_collection.dp = parallel_state.get_data_parallel_group()."
            )
        return ParallelGroups(
            dp=pg_collection.dp, cp=pg_collection.cp, dp_cp=pg_collection.dp_cp, pp=pg_collection.pp
        )
    ps = _import("megatron.core.parallel_state")
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
    )


def _model_chunks(model: Any) -> List[Any]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _ddp_config(chunk: Any) -> Any:
    return getattr(chunk, "ddp_config", None)


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
    per_token = bool(getattr(config, "calculate_per_token_loss", False))
    ddp_configs = [_ddp_config(c) for c in chunks]
    if any(cfg is None for cfg in ddp_configs):
        if groups.dp_cp_size > 1:
            raise ValueError(
                "The model chunks are not wrapped in megatron.core.distributed."
                "DistributedDataParallel, so nothing averages their gradients over the "
                f"{groups.dp_cp_size} data×context-parallel ranks as megatron_agg's scaling "
                "assumes; wrap every chunk in Megatron's DDP."
            )
        # One dp_cp rank: no reduction happens, which is a mean and a sum at once.
        reduction = GradReduction.SUM if per_token else GradReduction.MEAN
    else:
        reduction = GradReduction.SUM if per_token else GradReduction.MEAN
        if per_token and any(getattr(c, "average_in_collective", False) for c in ddp_configs):
            raise ValueError(
                "calculate_per_token_loss=True cannot be combined with "
                "DistributedDataParallelConfig(average_in_collective=True) (Megatron asserts the "
                "same); set average_in_collective=False."
            )
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
    )

