"""What Megatron-Core does to a returned loss and to the gradients, and how the hook undoes it.

This is the one place in megatron_agg that records Megatron's averaging rules. Everything here
is plain arithmetic on sizes and 0-dim tensors (no ``torch.distributed``, no Megatron import).

The rules below hold for every supported release, 0.13 through 0.20 (Megatron-LM ``main``; read
from the released wheels and the source; :data:`RELEASES` lists what does differ between them). Read first from megatron-core
0.16.1 (``pipeline_parallel/schedules.py::forward_step_calc_loss``,
``distributed/distributed_data_parallel.py::DistributedDataParallel.__init__``,
``distributed/param_and_grad_buffer.py::_ParamAndGradBucketGroup.start_grad_sync``,
``distributed/finalize_model_grads.py::finalize_model_grads``). With ``M`` the *local* number
of micro-batches, ``cp`` the context-parallel size, ``dp_cp`` the size of the data×context
parallel group DDP reduces over, and ``nt`` the ``num_tokens`` a 3-tuple returns:

============================ =============================== ============================== ==========================================
``loss_func`` returns        schedule applies to the loss    DDP applies to the gradients   ``finalize_model_grads``
============================ =============================== ============================== ==========================================
2-tuple ``(loss, rep)``      ``× cp / M``                    sum over dp_cp × 1/dp_cp [1]_  nothing (its num_tokens total is 0) [2]_
3-tuple, ``calculate_per_    ``÷ clamp(nt, 1) / M``          sum over dp_cp × 1/dp_cp [1]_  nothing
token_loss=False``
3-tuple, ``calculate_per_    nothing                         sum over dp_cp                 ``÷ Σ nt`` (broadcast from the last PP
token_loss=True``                                                                           stage, all-reduced over dp_cp; skipped
                                                                                            when Σ nt = 0)
============================ =============================== ============================== ==========================================

.. [1] ``average_in_collective=False``: the buffer is pre-scaled by ``1/dp_cp`` and reduced
   with SUM; ``True``: no pre-scale and a reduction with AVG over dp_cp. Both are a mean over
   dp_cp for dense parameters. With ``calculate_per_token_loss=True`` DDP uses a factor 1 and
   SUM (and asserts ``average_in_collective=False``).
.. [2] A 2-tuple under ``calculate_per_token_loss=True`` contributes no tokens, so finalize
   divides by nothing and DDP sums: the gradient is ``Σ_{dp_cp} cp/M · ∂loss``.

Tensor- and pipeline-parallel ranks hold replicas of the loss: Megatron does not average over
them, and neither does the hook.

The hook returns ``loss = S · F`` where ``S`` is this micro-batch's exact share of ``L``
(``Σ_ranks Σ_micro-batches S = L``) and ``F`` the reciprocal of the product of the three
columns (:func:`loss_multiplier`), so that the final gradient is exactly ``∂L``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Union

import torch

__all__ = [
    "ReleaseBehaviour",
    "RELEASES",
    "LossReturn",
    "GradReduction",
    "Wrapper",
    "WrapperBehaviour",
    "WRAPPERS",
    "wrapper_behaviour",
    "MegatronAveraging",
    "loss_multiplier",
    "schedule_factor",
    "report_count",
]


@dataclass(frozen=True)
class ReleaseBehaviour:
    """What differs between megatron-core releases, as far as exact loss scaling is concerned.

    None of it changes the factor ``F`` the hook returns (:func:`loss_multiplier`): the hook
    returns ``num_tokens ≥ 1`` on the path that divides by it, and a zero loss where the step
    has no valid token, so clamped and unclamped divisions agree. It decides where the step's
    process groups come from and documents the rest (docs/RELEASES.md is generated from it).
    """

    release: str
    #: The 3-tuple path without per-token loss divides by ``clamp(num_tokens, 1)`` (else by
    #: ``num_tokens`` itself: a micro-batch without valid tokens would give inf/NaN).
    schedule_clamps_num_tokens: bool
    #: ``finalize_model_grads`` divides by ``clamp(Σ num_tokens, 1)`` (else skips when 0).
    finalize_clamps_num_tokens: bool
    #: Where the schedule takes its groups from: ``"parallel_state"``, ``"grad_finalize_pgs"``
    #: (a ``GradFinalizeProcessGroups``) or ``"pg_collection"`` (a ``ProcessGroupCollection``).
    schedule_groups: str
    #: The MoE auxiliary-loss scale carries ``× cp`` on the non-per-token path.
    moe_aux_loss_cp_factor: bool
    #: GTP weight rematerialization: ``get_data_parallel_group()`` is the *full* data group,
    #: DDP reduces over the *replicate* group and finalize averages over the gtp axis.
    gtp_remat: bool = False


#: Per minor release (checked against the installed one by tests/test_releases.py).
RELEASES = {
    "0.13": ReleaseBehaviour("0.13", False, False, "parallel_state", False),
    "0.14": ReleaseBehaviour("0.14", False, False, "grad_finalize_pgs", False),
    "0.15": ReleaseBehaviour("0.15", True, False, "pg_collection", False),
    "0.16": ReleaseBehaviour("0.16", True, False, "pg_collection", True),
    "0.17": ReleaseBehaviour("0.17", True, False, "pg_collection", True),
    "0.18": ReleaseBehaviour("0.18", True, True, "pg_collection", True),
    "0.19": ReleaseBehaviour("0.19", True, True, "pg_collection", True, gtp_remat=True),
    "0.20": ReleaseBehaviour("0.20", True, True, "pg_collection", True, gtp_remat=True),  # Megatron-LM main
}


class LossReturn(str, Enum):
    """Which of Megatron's ``loss_func`` return conventions the hook uses."""

    TWO_TUPLE = "2-tuple"
    THREE_TUPLE = "3-tuple"

    @classmethod
    def parse(cls, value: Union["LossReturn", str]) -> "LossReturn":
        if isinstance(value, cls):
            return value
        for item in cls:
            if item.value == value:
                return item
        choices = ", ".join(repr(i.value) for i in cls)
        raise ValueError(f"Unknown loss_return {value!r}. Expected one of: {choices}.")


class GradReduction(str, Enum):
    """How the gradients of the dp_cp replicas are combined after the backward passes."""

    MEAN = "mean"  # Megatron DDP without calculate_per_token_loss (either average_in_collective)
    SUM = "sum"  # Megatron DDP with calculate_per_token_loss=True


class Wrapper(str, Enum):
    """Megatron's data-parallel wrappers of a model chunk (Megatron-LM's flags in brackets)."""

    DDP = "ddp"  # megatron.core.distributed.DistributedDataParallel (the default)
    TORCH_FSDP2 = "torch-fsdp2"  # TorchFullyShardedDataParallel (--use-torch-fsdp2)
    MEGATRON_FSDP = "megatron-fsdp"  # Megatron-FSDP's FullyShardedDataParallel (--use-megatron-fsdp)


@dataclass(frozen=True)
class WrapperBehaviour:
    """What a wrapper does to the gradients of the dp_cp replicas, as far as exact scaling is
    concerned (the columns "DDP" and "finalize" of the module table, per wrapper).

    Attributes:
        reduction: how the replicas' gradients are combined without ``calculate_per_token_loss``.
        per_token_reduction: the same with ``calculate_per_token_loss=True``.
        finalize_divides: ``finalize_model_grads``' division by ``Σ num_tokens`` reaches the
            gradients (the wrapper implements ``scale_gradients``).
        note: where it was read and what was measured (docs/RELEASES.md).
    """

    reduction: GradReduction
    per_token_reduction: GradReduction
    finalize_divides: bool
    note: str = ""


#: Per wrapper: the same in every supported release unless a release key overrides it
#: (``(wrapper, "0.13")``). Read from the released wheels' ``distributed/`` packages and measured
#: on CPU with gloo (tests/support/wrapper_probe.py); see docs/RELEASES.md. The set-ups in which a
#: wrapper is wrong by itself, whatever the loss, are in :mod:`megatron_agg.megatron.wrapper_defects`.
WRAPPERS = {
    Wrapper.DDP: WrapperBehaviour(
        GradReduction.MEAN, GradReduction.SUM, True,
        note="pre-scale 1/dp_cp and SUM (or AVG with average_in_collective); factor 1 and SUM with "
             "calculate_per_token_loss; scale_gradients multiplies the grad buffers",
    ),
    Wrapper.TORCH_FSDP2: WrapperBehaviour(
        GradReduction.MEAN, GradReduction.MEAN, False,
        note="torch's fully_shard over the dp_cp mesh: reduce-scatter with FSDP2's default divide "
             "factor (a mean) on every path; scale_gradients is _BaseDataParallel's no-op, so "
             "finalize_model_grads never divides by the token count (upstream defect in every release)",
    ),
    Wrapper.MEGATRON_FSDP: WrapperBehaviour(
        GradReduction.MEAN, GradReduction.SUM, True,
        note="gradient_scaling_factor 1/dp (or 1 and AVG with average_in_collective), none with "
             "calculate_per_token_loss; scale_gradients multiplies the grad buffers",
    ),
}


def wrapper_behaviour(wrapper: Union["Wrapper", str], release: str = "") -> WrapperBehaviour:
    """The :class:`WrapperBehaviour` of ``wrapper`` in ``release`` (``"0.16"``; ``""``: any)."""
    wrapper = Wrapper(wrapper)
    return WRAPPERS.get((wrapper, release), WRAPPERS[wrapper])  # type: ignore[call-overload]


@dataclass(frozen=True)
class MegatronAveraging:
    """The facts of one step that decide Megatron's averaging (see the module docstring).

    ``finalize_divides``: ``finalize_model_grads``' division by ``Σ num_tokens`` reaches the
    gradients (``False`` under Megatron's ``TorchFullyShardedDataParallel``, whose
    ``scale_gradients`` does nothing); ``wrapper`` names the data-parallel wrapper.
    """

    loss_return: LossReturn
    calculate_per_token_loss: bool
    num_microbatches: int
    cp_size: int
    dp_cp_size: int
    grad_reduction: GradReduction
    finalize_divides: bool = True
    wrapper: Wrapper = Wrapper.DDP

    def __post_init__(self) -> None:
        assert self.num_microbatches >= 1 and self.cp_size >= 1 and self.dp_cp_size >= 1
        assert self.dp_cp_size % self.cp_size == 0, (self.dp_cp_size, self.cp_size)


def schedule_factor(loss_return: LossReturn, calculate_per_token_loss: bool, cp_size: int,
                    num_microbatches: int, num_tokens: int, clamps_num_tokens: bool = True) -> float:
    """The schedule column of the module table: what ``forward_step_calc_loss`` multiplies a
    returned loss by (``× cp / M``; ``÷ clamp(nt, 1) / M``; ``1``). The version policy
    (:func:`megatron_agg.megatron.releases.check_megatron_version`) holds the installed schedule
    to it.
    A release that does not clamp (:attr:`ReleaseBehaviour.schedule_clamps_num_tokens` false,
    0.13–0.14) divides by ``nt`` itself: ``inf`` at ``nt = 0`` (the hook never returns 0 there)."""
    if loss_return is LossReturn.TWO_TUPLE:
        return cp_size / num_microbatches
    if calculate_per_token_loss:
        return 1.0
    if num_tokens == 0 and not clamps_num_tokens:
        return math.inf
    return 1.0 / (max(num_tokens, 1) * num_microbatches)


def loss_multiplier(
    avg: MegatronAveraging,
    local_num_tokens: torch.Tensor,
    global_num_tokens: torch.Tensor,
) -> torch.Tensor:
    """The factor ``F`` the hook multiplies its exact share ``S`` by before returning it.

    ``F = 1 / (schedule · ddp · finalize)`` with the factors of the module table:

    - schedule: 2-tuple ``cp / M``; 3-tuple without per-token loss ``1 / (clamp(nt, 1) · M)``;
      3-tuple with per-token loss ``1``.
    - ddp: ``1 / dp_cp`` for :attr:`GradReduction.MEAN`, ``1`` for :attr:`GradReduction.SUM`.
    - finalize: ``1 / Σ nt`` on the 3-tuple per-token path, where the hook returns
      ``nt = local_num_tokens`` on every rank so that ``Σ nt = global_num_tokens``; when that
      is 0, Megatron skips (<= 0.17) or clamps (>= 0.18) its division, so ``F`` uses
      ``max(Σ nt, 1)`` (passed by the engine). ``1`` where the wrapper drops that division
      (``finalize_divides=False``).

    Args:
        local_num_tokens: the ``nt`` returned with each micro-batch (integer tensor, 0-dim or ``[M]``).
        global_num_tokens: the step's total valid tokens ``T`` (0-dim tensor). The engine passes
            ``max(T, 1)``: with per-term masks the default mask may be empty while other terms
            are not, and Megatron then divides by nothing (<= 0.17) or by ``max(0, 1)`` (>= 0.18).
    """
    ddp = 1.0 / avg.dp_cp_size if avg.grad_reduction is GradReduction.MEAN else 1.0
    if avg.loss_return is LossReturn.TWO_TUPLE:
        return torch.as_tensor(avg.num_microbatches / (avg.cp_size * ddp), dtype=torch.float32,
                               device=global_num_tokens.device)
    if not avg.calculate_per_token_loss:
        nt = torch.clamp(local_num_tokens, min=1).to(torch.float32)
        return nt * (avg.num_microbatches / ddp)
    if not avg.finalize_divides:  # the wrapper's scale_gradients ignores finalize's ÷ Σ nt
        return torch.as_tensor(1.0 / ddp, dtype=torch.float32, device=global_num_tokens.device)
    # calculate_per_token_loss=True: finalize divides the summed gradients by Σ nt = T.
    return global_num_tokens.to(torch.float32) / ddp


def report_count(avg: MegatronAveraging) -> float:
    """The ``count`` of the ``[sum, count]`` pairs the hook reports per micro-batch.

    Megatron-LM's training loop sums the pairs over micro-batches, all-reduces them over dp_cp
    and logs ``sum / count``. With ``count = 1 / (M · dp_cp)`` the counts of a step add up to
    exactly 1 (each dp_cp rank reports ``M`` pairs), and the sums add up to ``L``.
    """
    return 1.0 / (avg.num_microbatches * avg.dp_cp_size)
