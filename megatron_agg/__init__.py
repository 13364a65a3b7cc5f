"""megatron_agg: exact global loss aggregation for Megatron-Core.

Megatron averages micro-batch losses as a *mean of local means*; megatron_agg rescales each
micro-batch loss so that Megatron's own averaging lands exactly on the global-batch loss of
the chosen mode, under any TP/PP/VPP/CP/DP layout.

Public API: the entry points :class:`LossHook` (masks known up front), :class:`DeferredLossHook`
(streamed data, Megatron's num_tokens channel), :class:`StepShares` (loss functions that reduce
themselves, e.g. verl's) and ``megatron_agg.fsdp.FSDPLossHook``, all thin front ends over one
engine (:mod:`megatron_agg.engine`) configured by one :class:`AggConfig`; :class:`LossTerm`,
:class:`AggMode` (``token-mean``, the ``seq-mean-*`` modes, ``token-sum``, ``prompt-mean``),
:class:`LossReturn`, :class:`ParallelGroups`, the :class:`Scaling` interface, :func:`reference_loss`.
Terms may name masks of their own (``LossTerm(mask=...)``), metrics are aggregated like terms
(``metrics=``), and ``prompt-mean`` takes per-sequence group ids (``group_ids=`` next to
``loss_masks``; ``num_groups``/``group_scope``, :data:`GROUP_SCOPES`).
"""

from .averaging import LossReturn
from .checks import NonFiniteLossError
from .config import AggConfig
from .deferred import DeferredLossHook
from .definition import reference_loss
from .engine import StepSummary
from .groups import ParallelGroups
from .hook import LossHook, PerTokenLossFn
from .scaling import MegatronScaling, Scaling, SumScaling
from .modes import AggMode
from .packing import PackedSequences
from .shares import StepShares
from .terms import DEFAULT_MASK_NAME, LossTerm
from .totals import GROUP_SCOPES

__version__ = "0.1.0"

__all__ = [
    "AggConfig",
    "AggMode",
    "DEFAULT_MASK_NAME",
    "DeferredLossHook",
    "GROUP_SCOPES",
    "LossHook",
    "LossReturn",
    "LossTerm",
    "NonFiniteLossError",
    "PackedSequences",
    "ParallelGroups",
    "MegatronScaling",
    "Scaling",
    "SumScaling",
    "PerTokenLossFn",
    "StepShares",
    "StepSummary",
    "reference_loss",
    "__version__",
]
