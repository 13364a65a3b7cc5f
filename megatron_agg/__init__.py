"""megatron_agg: exact global loss aggregation for Megatron-Core.

Megatron averages micro-batch losses as a *mean of local means*; megatron_agg rescales each
micro-batch loss so that Megatron's own averaging lands exactly on the global-batch loss of
the chosen mode, under any TP/PP/VPP/CP/DP layout.

Public API: the entry points :class:`LossHook` (masks known up front), :class:`DeferredLossHook`
(streamed data, Megatron's num_tokens channel), :class:`StepShares` (loss functions that reduce
themselves, e.g. verl's) and ``megatron_agg.fsdp.FSDPLossHook``, all thin front ends over one
engine (:mod:`megatron_agg.engine`) configured by one :class:`AggConfig`; :class:`LossTerm`,
:class:`AggMode` (``token-mean``, the ``seq-mean-*`` modes, ``token-sum``, ``prompt-mean``),
:class:`LossReturn`, :class:`PackedSequences`, :class:`NonFiniteLossError`, :func:`reference_loss`.
Terms may name masks of their own (``LossTerm(mask=...)``), metrics are aggregated like terms
(``metrics=``), and ``prompt-mean`` takes per-sequence group ids (``group_ids=`` next to
``loss_masks``; ``num_groups``/``group_scope``).

The extension points (``Scaling``, ``MegatronScaling``, ``SumScaling``, ``ParallelGroups``,
``StepSummary``, ``PerTokenLossFn``, ``GROUP_SCOPES``, ``DEFAULT_MASK_NAME``) live in
:mod:`megatron_agg.extend`; importing them from here still works, with a ``DeprecationWarning``.
"""

from .checks import NonFiniteLossError
from .config import AggConfig
from .deferred import DeferredLossHook
from .definition import reference_loss
from .hook import LossHook
from .megatron import LossReturn
from .modes import AggMode
from .packing import PackedSequences
from .shares import StepShares
from .terms import LossTerm

__version__ = "0.1.0"

__all__ = [
    "AggConfig",
    "AggMode",
    "DeferredLossHook",
    "LossHook",
    "LossReturn",
    "LossTerm",
    "NonFiniteLossError",
    "PackedSequences",
    "StepShares",
    "reference_loss",
    "__version__",
]

#: Names that moved to :mod:`megatron_agg.extend` (the extension points); still importable from
#: here, with a DeprecationWarning naming the new place.
_MOVED_TO_EXTEND = frozenset({"DEFAULT_MASK_NAME", "GROUP_SCOPES", "MegatronScaling", "ParallelGroups",
                              "PerTokenLossFn", "Scaling", "StepSummary", "SumScaling"})


def __getattr__(name: str):
    if name in _MOVED_TO_EXTEND:
        import warnings

        from . import extend

        warnings.warn(f"megatron_agg.{name} is deprecated: import it from megatron_agg.extend "
                      f"(from megatron_agg.extend import {name})", DeprecationWarning, stacklevel=2)
        return getattr(extend, name)
    raise AttributeError(f"module 'megatron_agg' has no attribute {name!r}")
