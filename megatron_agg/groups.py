"""The process groups of one step, as one neutral object (no Megatron, no FSDP import).

:class:`ParallelGroups` says which ranks share what: ``dp`` (the *pure* data-parallel group, one
rank per data-parallel replica, the group the step's totals are summed over), ``cp`` (ranks that
hold slices of the same sequences: Megatron's context parallelism, or Ulysses-style sequence
parallelism under FSDP), ``dp_cp`` (the group gradients are reduced over), ``pp`` (the pipeline)
and ``mp`` (the model-parallel group, tensor × pipeline). It issues the engine's collectives, so
that a different reduction (e.g. a deliberately broken one in a negative control) is injected
through this object, the same one a user passes, and never by patching a function.

Integration code builds it: :func:`megatron_agg.megatron.model_setup.resolve_groups` from Megatron's
``pg_collection`` / ``parallel_state``, :class:`megatron_agg.fsdp.FSDPLossHook` from its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from .layout import CP_LAYOUTS

__all__ = ["ParallelGroups", "CP_LAYOUTS"]


def group_size(group: Any) -> int:
    """The size of ``group`` (1 for ``None``: a group of this rank alone)."""
    return 1 if group is None else torch.distributed.get_world_size(group)


def group_rank(group: Any) -> int:
    """This rank's rank in ``group`` (0 for ``None``)."""
    return 0 if group is None else torch.distributed.get_rank(group)


@dataclass(frozen=True)
class ParallelGroups:
    """The groups of one step and this rank's place in them (see the module docstring).

    ``None`` stands for a group of this rank alone. ``mp`` may be ``None`` when the model is not
    split (FSDP) or unknown; the end-of-step check then spreads over ``dp_cp`` and ``pp``.
    """

    dp: Any
    cp: Any
    dp_cp: Any
    pp: Any
    mp: Any = None
    cp_layout: str = "load-balanced"
    #: The tensor-parallel group (ranks of one pipeline stage holding shards of the same model).
    tp: Any = None

    def __post_init__(self) -> None:
        if self.cp_layout not in CP_LAYOUTS:
            raise ValueError(f"cp_layout must be one of {CP_LAYOUTS}, got {self.cp_layout!r}.")

    @property
    def dp_size(self) -> int:
        return group_size(self.dp)

    @property
    def cp_size(self) -> int:
        return group_size(self.cp)

    @property
    def cp_rank(self) -> int:
        return group_rank(self.cp)

    @property
    def dp_cp_size(self) -> int:
        return group_size(self.dp_cp)

    @property
    def is_last_pipeline_stage(self) -> bool:
        return group_rank(self.pp) == group_size(self.pp) - 1

    # -- the collectives the engine issues ---------------------------------------------------------
    def sum_over_dp(self, tensor: torch.Tensor, async_op: bool = True) -> Optional[Any]:
        """The step's totals: SUM of ``tensor`` in place over ``dp`` (one all-reduce; none for one
        rank). Returns the work handle when ``async_op``, else ``None``."""
        if self.dp_size == 1:
            return None
        work = torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=self.dp,
                                            async_op=async_op)
        return work if async_op else None

    def step_groups(self) -> List[Any]:
        """Groups whose consecutive SUMs add a value over every rank of the step: ``dp_cp`` then
        ``mp`` (tensor × pipeline), or ``dp_cp`` then ``pp`` when ``mp`` is not known. Groups of one
        rank are left out."""
        second = self.mp if self.mp is not None else self.pp
        return [g for g in (self.dp_cp, second) if group_size(g) > 1]

    def loss_groups(self) -> List[Any]:
        """Groups whose consecutive SUMs add a value over every rank of this pipeline stage:
        ``dp_cp`` then ``tp`` (for checks that only the loss-computing stage runs)."""
        return [g for g in (self.dp_cp, self.tp) if group_size(g) > 1]

    def sum_over_step(self, tensor: torch.Tensor, stage_only: bool = False) -> int:
        """SUM of ``tensor`` in place over every rank of the step, or of this pipeline stage with
        ``stage_only`` (synchronous); returns the number of collectives issued (0 to 2)."""
        groups = self.loss_groups() if stage_only else self.step_groups()
        for group in groups:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=group)
        return len(groups)

    def sum_over_dp_cp(self, tensor: torch.Tensor) -> int:
        """SUM of ``tensor`` in place over ``dp_cp`` (for :meth:`global_loss`-style logging)."""
        if group_size(self.dp_cp) == 1:
            return 0
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=self.dp_cp)
        return 1
