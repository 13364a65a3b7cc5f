"""megatron_agg: exact global loss aggregation for Megatron-Core.

Megatron averages micro-batch losses as a *mean of local means*; megatron_agg rescales each
micro-batch loss so that Megatron's own averaging lands exactly on the global-batch loss of
the chosen mode, under any TP/PP/VPP/CP/DP layout.

Public API: :class:`LossHook`, :class:`LossTerm`, :class:`AggMode`, :class:`LossReturn`,
:class:`StepShares` (for loss functions that reduce
themselves, e.g. verl's), :func:`reference_loss`.
"""

from .averaging import LossReturn
from .deferred import DeferredLossHook
from .definition import reference_loss
from .hook import LossHook, NonFiniteLossError, PerTokenLossFn, StepSummary
from .modes import AggMode
from .packing import PackedSequences
from .shares import StepShares
from .terms import LossTerm

__version__ = "0.1.0"

__all__ = [
    "AggMode",
    "DeferredLossHook",
    "LossHook",
    "LossReturn",
    "LossTerm",
    "NonFiniteLossError",
    "PackedSequences",
    "PerTokenLossFn",
    "StepShares",
    "StepSummary",
    "reference_loss",
    "__version__",
]
