"""Compare's plain Megatron path, its injected bug and its batch split.

- :func:`plain_masked_mean`: Megatron's classic per-micro-batch loss (the ``megatron-plain`` path,
  and a negative control of the test harness);
- :class:`LocalTimesDpGroups` and :func:`groups_like`: groups whose step totals are the local
  totals × dp (``--inject-bug local-denominator``);
- :func:`microbatch_plans`: split the global batch by other micro-batch plans while active.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields as dataclass_fields
from typing import Any, Dict, List, Optional

import torch

from ..groups import ParallelGroups
from ..megatron import LossReturn
from . import data as data_mod

__all__ = ["plain_masked_mean", "LocalTimesDpGroups", "groups_like", "microbatch_plans"]


def plain_masked_mean(loss_return: LossReturn, token_sum: bool = False):
    """Megatron's classic per-micro-batch loss: the local masked mean (or sum + count); with
    ``token_sum`` the local masked sum as the loss (verl's ``token-sum`` returned to Megatron as is)."""

    def make(mask: torch.Tensor):
        def loss_func(output: torch.Tensor):
            valid = mask != 0
            total = torch.where(valid, output, torch.zeros_like(output)).sum()
            count = valid.sum(dtype=torch.int)
            if token_sum:
                return total, {"loss": total.detach().clone()}
            if loss_return is LossReturn.TWO_TUPLE:
                mean = total / torch.clamp(count, min=1)
                return mean, {"loss": mean.detach().clone()}  # the schedule rescales `mean` in place
            return total, count, {"loss": torch.stack([total.detach(), count.float()])}

        return loss_func

    return make


class LocalTimesDpGroups(ParallelGroups):
    """A broken set of groups, injected as a user would pass groups: the step's totals are this
    rank's local totals × dp instead of their all-reduced sum (verl's old shortcut)."""

    def sum_over_dp(self, tensor: torch.Tensor, async_op: bool = True) -> None:
        tensor.mul_(self.dp_size)
        return None


def groups_like(groups: ParallelGroups, cls: type = ParallelGroups, **changes: Any) -> ParallelGroups:
    values = {f.name: getattr(groups, f.name) for f in dataclass_fields(groups)}
    values.update(changes)
    return cls(**values)


@contextlib.contextmanager
def microbatch_plans(plans: Optional[Dict[int, List[List[int]]]]) -> Any:
    """Split the global batch by ``plans`` (:func:`.data.split_for_rank` reads
    ``data.MICROBATCH_PLANS``) while active; ``None``: the default ragged plans."""
    if plans is None:
        yield
        return
    original = data_mod.MICROBATCH_PLANS
    data_mod.MICROBATCH_PLANS = {**original, **plans}
    try:
        yield
    finally:
        data_mod.MICROBATCH_PLANS = original
