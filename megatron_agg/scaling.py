"""The scaling interface: how an exact share of the global loss becomes what a trainer backpropagates.

The engine (:mod:`megatron_agg.engine`) computes, per micro-batch, the exact share ``S`` of the
global-batch loss ``L`` (``Σ`` over micro-batches and data-parallel ranks of ``S`` is ``L``). What
the training framework then does to a returned loss and to the gradients differs:

- Megatron-Core averages (÷ num_microbatches, ×cp, a mean over DP×CP, or the
  ``calculate_per_token_loss`` division): :class:`MegatronScaling` returns ``S · F`` with the ``F``
  of :func:`megatron_agg.megatron.averaging.loss_multiplier` that cancels it, plus Megatron's ``num_tokens``.
- FSDP2 told to sum (gradient divide factor 1): :class:`SumScaling` returns ``S`` itself.

A :class:`Scaling` is built per step by a factory the front end is given (``scaling=`` of
:class:`~megatron_agg.LossHook`): the class itself, whose :meth:`Scaling.for_step` reads the
step's facts. A subclass is also how a negative control injects a broken scaling, through the same
argument a user would pass.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .groups import ParallelGroups
from .megatron import LossReturn, MegatronAveraging, loss_multiplier, report_count

__all__ = ["Scaling", "MegatronScaling", "SumScaling"]


class Scaling:
    """What one step's framework does to a returned loss, and the factor that cancels it.

    Subclasses implement :meth:`multipliers` and say which ``loss_func`` convention they return
    (:attr:`loss_return`; ``None``: the loss alone, for frameworks that backpropagate it directly).
    """

    #: ``"2-tuple"``/``"3-tuple"`` Megatron conventions, or ``None`` (the bare loss).
    loss_return: Optional[LossReturn] = None
    #: Megatron's ``calculate_per_token_loss`` (whether ``num_tokens`` is a divisor of the step).
    calculate_per_token_loss: bool = False
    num_microbatches: int = 1

    def multipliers(self, num_tokens: torch.Tensor, total_tokens: torch.Tensor) -> torch.Tensor:
        """``F`` per micro-batch (float32, ``[M]`` or a broadcastable 0-dim tensor) given the
        ``num_tokens`` returned per micro-batch and the step's total of them."""
        raise NotImplementedError

    def report_count(self) -> float:
        """The ``count`` of the ``[sum, count]`` pairs reported per micro-batch (counts of a step
        add up to 1 over micro-batches and the data×context-parallel ranks)."""
        raise NotImplementedError

    def fingerprint(self) -> tuple:
        """What ranks of one step must agree on (checked by the engine)."""
        return (getattr(self.loss_return, "value", None), bool(self.calculate_per_token_loss))


class MegatronScaling(Scaling):
    """Megatron-Core's averaging of a step (the rules table of :mod:`megatron_agg.megatron.averaging`)."""

    def __init__(self, averaging: MegatronAveraging) -> None:
        self.averaging = averaging
        self.loss_return = averaging.loss_return
        self.calculate_per_token_loss = averaging.calculate_per_token_loss
        self.num_microbatches = averaging.num_microbatches

    @classmethod
    def for_step(cls, model: Any, loss_return: LossReturn, num_microbatches: int,
                 groups: ParallelGroups) -> "MegatronScaling":
        """Read the step's facts from the model chunks' configs (Megatron glue in
        :func:`megatron_agg.megatron.model_setup.step_averaging`)."""
        from .megatron import step_averaging

        return cls(step_averaging(model, loss_return, num_microbatches, groups))

    def multipliers(self, num_tokens: torch.Tensor, total_tokens: torch.Tensor) -> torch.Tensor:
        return loss_multiplier(self.averaging, num_tokens, total_tokens)

    def report_count(self) -> float:
        return report_count(self.averaging)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.averaging})"


class SumScaling(Scaling):
    """A framework that backpropagates the returned loss as is and *sums* gradients over the
    data(×sequence)-parallel group (FSDP2 with a gradient divide factor of 1): ``F = 1``."""

    def __init__(self, num_microbatches: int, reduce_size: int) -> None:
        self.num_microbatches = int(num_microbatches)
        self.reduce_size = int(reduce_size)

    def multipliers(self, num_tokens: torch.Tensor, total_tokens: torch.Tensor) -> torch.Tensor:
        return torch.ones((), dtype=torch.float32, device=total_tokens.device)

    def report_count(self) -> float:
        return 1.0 / (self.num_microbatches * self.reduce_size)

    def __repr__(self) -> str:
        return f"SumScaling(num_microbatches={self.num_microbatches}, reduce_size={self.reduce_size})"
