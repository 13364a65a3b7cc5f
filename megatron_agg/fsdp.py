"""The same exact aggregation for models sharded with PyTorch FSDP2 (``fully_shard``).

FSDP2 *averages* gradients over its mesh by default. :meth:`FSDPLossHook.prepare` sets the
gradient divide factor of every FSDP module to 1 (sum), remembering the previous factors so that
:meth:`FSDPLossHook.restore` undoes it. Each micro-batch's loss is then its exact share ``S`` of
the global loss (:mod:`megatron_agg.step_math`), and ``backward()`` on the shares of every
micro-batch (gradient accumulation) sums to exactly ``∂L`` on every rank::

    hook = FSDPLossHook("seq-mean-token-mean", dp_group=mesh["dp"].get_group())
    hook.prepare(model)                                   # FSDP sums instead of averaging
    with hook.step(loss_masks=[m.loss_mask for m in micro_batches]) as step:   # one all-reduce
        for mb in micro_batches:
            step.loss(model(mb.inputs), mb.loss_mask).backward()
    optimizer.step()
    hook.global_loss()["loss"]                            # the exact L (for logging)

Totals are counted over ``dp_group`` only. With an optional sequence-parallel (Ulysses) group
``sp_group`` — ranks that hold slices of the *same* sequences — each rank passes the masks of
its whole sequences to :meth:`step` and its slice's mask to :meth:`_FSDPStep.loss` (``sp_layout``
``"contiguous"``: rank ``r`` holds tokens ``[r·s/sp, (r+1)·s/sp)``, or ``"load-balanced"``:
Megatron's CP chunks); sequences and tokens are counted once, not once per SP rank, and
per-sequence means use the whole sequence. The FSDP mesh then reduces over data × sequence
parallel ranks (``grad_group``). Micro-batches may differ in size and mask between ranks; their
*number* must be the same on every rank (FSDP all-gathers parameters once per forward on every
rank), as for any FSDP training loop. One collective per step (async, awaited at the first loss), no
host sync per micro-batch, the same checks after the step as the Megatron hook.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch

from .checks import FrontEndNames
from .config import AggConfig
from .collective import AgreementTracker
from .engine import PreparedStep, StepSummary, StepTimer, global_loss_of
from .groups import ParallelGroups
from .modes import AggModeLike
from .scaling import SumScaling
from .terms import LossTerm, PerTokenLossFn, per_token_losses, split_term_losses
from .validation import as_int, checked_inputs

__all__ = ["FSDPLossHook"]

_NAMES = FrontEndNames(entry="FSDPLossHook", loss_call="step.loss(output, loss_mask)",
                       masks="loss_masks",
                       mismatch_fix=("pass step.loss the masks of loss_masks, in micro-batch order (this "
                                     "rank's slice under sequence parallelism), or set "
                                     "FSDPLossHook(check_masks=False) if the loss function's mask is meant to differ"))
_MISSING_MASKS = ("FSDPLossHook.step(loss_masks=[...]) needs this rank's loss masks, one per micro-batch, so "
                  "that the step's totals are counted before the first loss.")


def _fsdp_modules(model: torch.nn.Module) -> List[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class _FSDPStep:
    """One step: the shares of its micro-batches (see :class:`FSDPLossHook`)."""

    def __init__(self, step: PreparedStep) -> None:
        self._step = step

    def loss(
        self, output: Any, loss_mask: Any, per_token_loss_fn: Optional[PerTokenLossFn] = None
    ) -> torch.Tensor:
        """The next micro-batch's exact share of the global loss; call ``.backward()`` on it.
        ``loss_mask``: this micro-batch's mask (this rank's slice under SP), or ``{name: mask}``
        when terms or metrics name their own masks; ``per_token_loss_fn`` returns one entry per
        term and metric, as for :meth:`~megatron_agg.LossHook.loss_func`."""
        step = self._step
        with step.timer:
            per_token = per_token_losses(per_token_loss_fn, output)
            losses = split_term_losses(step.terms, per_token, step.next_microbatch, step.metrics)
            return step.microbatch_loss(losses, loss_mask)[0]

    @property
    def num_microbatches(self) -> int:
        return self._step.num_microbatches


class FSDPLossHook:
    """Exact loss aggregation for FSDP2 models (see the module docstring).

    Args:
        mode, exclude_fully_masked_seqs, loss_scale_factor, terms, metrics, num_groups,
            group_scope, config and the check options: as for :class:`~megatron_agg.LossHook`
            (:class:`~megatron_agg.AggConfig`; ``loss_return`` does not apply).
        dp_group: the data-parallel group the totals are summed over (default: WORLD).
        sp_group: an optional sequence-parallel group (ranks holding slices of the same
            sequences); ``None`` for none.
        grad_group: the group FSDP reduces gradients over (default ``dp_group`` without SP; with
            SP it must be given: the data × sequence-parallel group of the FSDP mesh). Used for
            :meth:`global_loss`, the report counts and the end-of-step check.
        sp_layout: ``"contiguous"`` (Ulysses) or ``"load-balanced"`` (Megatron CP chunks).
    """

    def __init__(
        self,
        mode: Optional[AggModeLike] = None,
        *,
        exclude_fully_masked_seqs: bool = False,
        loss_scale_factor: Optional[float] = None,
        terms: Optional[Mapping[str, LossTerm]] = None,
        metrics: Optional[Mapping[str, Any]] = None,
        num_groups: Optional[int] = None,
        group_scope: Optional[str] = None,
        dp_group: Any = None,
        sp_group: Any = None,
        grad_group: Any = None,
        sp_layout: str = "contiguous",
        check_masks: Optional[bool] = None,
        async_totals: Optional[bool] = None,
        allow_nonfinite_masked: Optional[bool] = None,
        raise_on_every_rank: Optional[bool] = None,
        agreement: Optional[str] = None,
        config: Optional[AggConfig] = None,
    ) -> None:
        if sp_layout not in ("contiguous", "load-balanced"):
            raise ValueError(f"sp_layout must be 'contiguous' or 'load-balanced', got {sp_layout!r}.")
        if sp_group is not None and grad_group is None:
            raise ValueError(
                "With a sequence-parallel group, pass grad_group= (the data × sequence-parallel group "
                "FSDP reduces gradients over) as well."
            )
        self.config = AggConfig.build(
            mode, exclude_fully_masked_seqs=exclude_fully_masked_seqs, loss_scale_factor=loss_scale_factor,
            terms=terms, config=config, check_masks=check_masks, async_totals=async_totals,
            allow_nonfinite_masked=allow_nonfinite_masked, raise_on_every_rank=raise_on_every_rank,
            agreement=agreement, metrics=metrics, num_groups=num_groups, group_scope=group_scope,
        )
        self.terms: Dict[str, LossTerm] = dict(self.config.terms)
        self._dp_group = dp_group if dp_group is not None else torch.distributed.group.WORLD
        self._sp_group = sp_group
        self._grad_group = grad_group if grad_group is not None else self._dp_group
        self._sp_layout = sp_layout
        self._saved: List[tuple] = []
        self._tracker = AgreementTracker(self.config.agreement)
        self._last: Optional[StepSummary] = None
        self._failed: Optional[str] = None

    # -- the model --------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module) -> None:
        """Make FSDP *sum* gradients (divide factor 1, plain SUM collectives) on every
        ``fully_shard`` module of ``model``; idempotent; :meth:`restore` undoes it."""
        modules = _fsdp_modules(model)
        if not modules:
            raise ValueError(
                "FSDPLossHook.prepare found no FSDP2 module in the model; shard it with "
                "torch.distributed.fsdp.fully_shard first."
            )
        for module in modules:
            state = module._get_fsdp_state()
            for group in state._fsdp_param_groups:
                if not any(g is group for g, _, _ in self._saved):
                    self._saved.append(
                        (group, group.gradient_divide_factor, getattr(group, "force_sum_reduction_for_comms", None))
                    )
            module.set_gradient_divide_factor(1.0)
            # A plain SUM collective (no pre-multiplied sum, which gloo lacks; with a factor of 1
            # there is nothing to scale).
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)

    def restore(self) -> None:
        """Put back the gradient divide factors :meth:`prepare` changed."""
        for group, factor, force_sum in reversed(self._saved):
            group.gradient_divide_factor = factor
            if force_sum is not None:
                group.force_sum_reduction_for_comms = force_sum
        self._saved.clear()

    # -- the step ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, loss_masks: Any, packed_seqs: Optional[Sequence[Any]] = None,
             group_ids: Optional[Sequence[Any]] = None) -> Iterator[_FSDPStep]:
        """A step over ``loss_masks`` (this rank's whole-sequence masks, one per micro-batch, or
        ``{name: [...]}`` when terms or metrics name their own masks), with ``group_ids`` for
        ``prompt-mean`` (per micro-batch one id per sequence).

        Starts the step's one all-reduce; on leaving the block, checks that every micro-batch's
        loss was taken (and the checks of :class:`~megatron_agg.LossHook`), on every rank of
        ``grad_group``."""
        if self._saved == []:
            raise ValueError(
                "Call FSDPLossHook.prepare(model) before the first step: FSDP averages gradients "
                "over its mesh unless told to sum them."
            )
        self._last, self._failed = None, "the step did not finish"
        with StepTimer() as timer:  # the step's set-up
            some = next(iter(loss_masks.values()), None) if isinstance(loss_masks, Mapping) else loss_masks
            count = len(some) if isinstance(some, (list, tuple)) else 0
            named, packed, ids, refused = checked_inputs(self.config.mask_names, self.config.uses_groups, loss_masks,
                                                         as_int(max(count, 1), "len(loss_masks)"),
                                                         packed_seqs, group_ids, _MISSING_MASKS)
            masks = next(iter(named.values()))
            groups = ParallelGroups(dp=self._dp_group, cp=self._sp_group, dp_cp=self._grad_group, pp=None,
                                    cp_layout=self._sp_layout)
            scaling = SumScaling(len(masks), groups.dp_cp_size)
            if groups.cp_size > 1 and any(m.shape[-1] % groups.cp_size for m in masks):
                raise ValueError(
                    f"Sequence parallelism over {groups.cp_size} ranks needs padded lengths divisible by "
                    f"{groups.cp_size}; got {[m.shape[-1] for m in masks]}."
                )
            step = PreparedStep(self.config, named, groups, scaling, packed, names=_NAMES, tracker=self._tracker,
                                group_ids=ids, refused=refused, timer=timer)
        try:
            yield _FSDPStep(step)
            with timer:
                step.finish()
        except BaseException as exc:
            self._failed = f"{type(exc).__name__}: {exc}"
            raise
        self._failed = None
        self._last = step.summary()

    @property
    def last_step(self) -> Optional[StepSummary]:
        return self._last

    def global_loss(self) -> Optional[Dict[str, torch.Tensor]]:
        """The exact global loss of the last step, each term's and each metric's value (one
        all-reduce over ``grad_group``)."""
        return global_loss_of(self._last, self._failed)
