"""megatron_agg's extension points: what a front end, a framework or a test plugs in.

Most users need none of these (``megatron_agg`` exports what they need). They are for code that
extends megatron_agg or looks inside a step:

- :class:`Scaling`: what the framework does to a returned loss, and the factor that cancels it
  (``LossHook(scaling=...)``); :class:`MegatronScaling` (Megatron's schedule, per release and
  loss path) and :class:`SumScaling` (plain PyTorch / FSDP2: the loss is used as returned);
- :class:`ParallelGroups`: the process groups of a step and the collectives issued over them
  (``LossHook(groups=...)``);
- :class:`StepSummary`: what a step did (totals, denominators, timings; ``hook.last_step``);
- :data:`PerTokenLossFn`: the per-token loss function type ``hook.loss_func`` wraps;
- :data:`GROUP_SCOPES`: the values of ``group_scope`` (``prompt-mean``'s group ids);
- :data:`DEFAULT_MASK_NAME`: the name of the default mask in ``loss_masks`` dicts.

``from megatron_agg import Scaling`` (and the others) still works, with a ``DeprecationWarning``
naming ``megatron_agg.extend``.
"""

from .engine import StepSummary
from .groups import ParallelGroups
from .hook import PerTokenLossFn
from .scaling import MegatronScaling, Scaling, SumScaling
from .modes import DEFAULT_MASK_NAME, GROUP_SCOPES

__all__ = [
    "DEFAULT_MASK_NAME",
    "GROUP_SCOPES",
    "MegatronScaling",
    "ParallelGroups",
    "PerTokenLossFn",
    "Scaling",
    "StepSummary",
    "SumScaling",
]
