"""The step engine behind every entry point: checks, totals, agreement, weights, end-of-step report.

Independent of Megatron and FSDP: it is handed the step's :class:`~megatron_agg.groups.ParallelGroups`
(which issue its collectives) and a :class:`~megatron_agg.scaling.Scaling` (what the framework does
to a returned loss). The front ends (:class:`~megatron_agg.LossHook`,
:class:`~megatron_agg.fsdp.FSDPLossHook`, :class:`~megatron_agg.StepShares`,
:class:`~megatron_agg.DeferredLossHook`) only adapt it to their call conventions.

A *prepared* step (:class:`PreparedStep`), on each rank of the last pipeline stage:

1. checks the step's masks (one list per mask name), ``packed_seqs`` and ``group_ids`` (shapes at
   once; mask values, packing boundaries and group-id ranges as device-side counts), counts this
   rank's totals from whole sequences (:func:`megatron_agg.step_math.plan_step`: ``N``,
   ``T_k`` and ``N⁺_k`` per mask, and for ``prompt-mean`` the per-group counts) and starts **one**
   all-reduce (SUM, float64) over the pure data-parallel group of ``[totals..., agreement
   triples..., two flags]`` (:func:`~megatron_agg.collective.start_totals`). The first time a process uses a vector length
   over a DP group, the ranks' agreement on the set-up (which fixes the length) is checked first
   in a small all-reduce of its own; on any step whose set-up changed
   (:class:`~megatron_agg.collective.AgreementTracker`)
   or whose inputs this rank refused, the totals are awaited at once and a disagreement raises on
   every DP rank, *before* the schedule runs (one host sync, at that step's start) — or, when some
   rank runs its schedule unread, at the step's end on every rank; otherwise the all-reduce is
   awaited at the first loss.
2. precomputes per micro-batch the per-token weights ``m_k·α`` of every term and metric in this
   rank's context-parallel layout (the same :func:`~megatron_agg.step_math.plan_step`),
   ``num_tokens``, and (at the first loss) every ``F`` vectorized; the weights then get ``1/D_k``
   and, for ``prompt-mean``, ``1/M_g`` gathered per token from the all-reduced group counts
   (:func:`~megatron_agg.step_math.denominators`, :func:`~megatron_agg.step_math.scale_weights`).
3. per micro-batch: ``S = Σ_k w_k · Σ where(m_k, l_k, 0)·(m_k·α_k) / D_k`` and ``S·F`` — three
   tensor ops per term plus one for the end-of-step check, and per metric the same share,
   detached (two ops, reported, never backpropagated) — no host sync, no collective.
4. after the schedule: :class:`~megatron_agg.checks.StepChecks` (one host sync, spread over every
   rank of the step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import step_math as sm
from .checks import FrontEndNames, StepChecks, group_ids_expected
from .agreement import config_fingerprints
from .collective import AgreementTracker, raise_if_disagree, start_totals
from .config import AggConfig
from .groups import ParallelGroups
from .megatron import LossReturn
from .packing import PackedSequences
from .scaling import Scaling
from .terms import DEFAULT_MASK_NAME, DEFAULT_TERM_NAME, LossTerm
from .step_math import StepTotals
from .validation import check_cp_lengths, check_per_token_values, mask_value_problems

__all__ = ["PreparedStep", "StepSummary", "StepTimer", "global_loss_of"]


@dataclass
class StepSummary:
    """What an entry point saw in its last step (for logging and tests; tensors stay on the device)."""

    is_last_stage: bool
    num_microbatches: int
    scaling: Optional[Scaling]
    #: The all-reduced totals vector (:class:`~megatron_agg.step_math.TotalsLayout`; with one mask and
    #: no groups ``[tokens, sequences, nonempty_sequences]``; last stage only).
    totals: Optional[torch.Tensor]
    #: This rank's share ``Σ_j S_j`` of each term's ``L_k`` (unweighted), of the total, and of
    #: each metric.
    local_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    #: Collectives issued in the step: the totals all-reduce and the end-of-step check's.
    collectives: int = 0
    groups: Optional[ParallelGroups] = None
    #: Bytes of per-step state held on the device (weights, masks, counters).
    state_bytes: int = 0
    #: Wall-clock and CPU seconds spent in the engine's own code in the step (step set-up, loss
    #: evaluations, end-of-step check; waits included in the wall clock).
    engine_seconds: float = 0.0
    engine_cpu_seconds: float = 0.0
    #: Seconds spent waiting for the totals all-reduce.
    wait_seconds: float = 0.0

    @property
    def averaging(self) -> Any:
        return getattr(self.scaling, "averaging", None)


class StepTimer:
    """Wall-clock and CPU seconds a front end spends in megatron_agg's own code during one step
    (:attr:`StepSummary.engine_seconds`, :attr:`StepSummary.engine_cpu_seconds`): ``with
    step.timer:`` around the step's set-up, each loss evaluation and the end-of-step check, so
    that timing stays out of the arithmetic. Host clocks only: no device sync."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def __enter__(self) -> "StepTimer":
        self._start = (time.perf_counter(), time.thread_time())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds += time.perf_counter() - self._start[0]
        self.cpu_seconds += time.thread_time() - self._start[1]


def global_loss_of(summary: Optional[StepSummary], failed: Optional[str]) -> Optional[Dict[str, torch.Tensor]]:
    """``{"loss": L, <term>: L_k, <metric>: value}`` of a completed step: one all-reduce (SUM) over
    data×context of every rank's shares (the metrics ride in it: no collective of their own)."""
    if failed is not None:
        raise ValueError(f"global_loss(): the last step raised ({failed}); it has no global loss.")
    if summary is None:
        raise ValueError("global_loss() needs a completed step; run a step first.")
    if not summary.is_last_stage:
        return None
    names = list(summary.local_losses)
    values = torch.stack([summary.local_losses[n] for n in names])
    if summary.groups is not None:
        summary.groups.sum_over_dp_cp(values)
    return {name: values[i] for i, name in enumerate(names)}


class PreparedStep:
    """One step whose masks are known up front (see the module docstring).

    ``loss_masks``: this rank's whole-sequence masks, one per micro-batch: a list (the
    ``"default"`` mask) or ``{mask name: list}`` with every mask the config's terms and metrics
    name (validated by the front end: :func:`~megatron_agg.validation.check_named_masks`).
    ``group_ids``: per micro-batch one id per sequence, when a term or metric is ``prompt-mean``
    (:func:`~megatron_agg.validation.check_group_ids`). ``refused``: the error of inputs this rank
    refused, ``loss_masks``/``group_ids`` being stand-ins; raised on every rank (:func:`~megatron_agg.collective.start_totals`).

    The constructor is the step's set-up, in order: check the shapes
    (:func:`~megatron_agg.validation.check_cp_lengths`), stack
    the micro-batches (:func:`~megatron_agg.step_math.stack_microbatches`) and record the device-side
    input checks (:meth:`_record_input_checks`), plan them (:func:`~megatron_agg.step_math.plan_step`),
    start the totals' all-reduce (:meth:`_start_totals`).
    The arithmetic is :mod:`megatron_agg.step_math`'s; this class orchestrates it.
    """

    def __init__(
        self,
        config: AggConfig,
        loss_masks: Any,
        groups: ParallelGroups,
        scaling: Scaling,
        packed_seqs: Optional[Sequence[Optional[PackedSequences]]] = None,
        *,
        names: FrontEndNames = FrontEndNames(),
        tracker: Optional[AgreementTracker] = None,
        group_ids: Optional[Sequence[torch.Tensor]] = None,
        refused: Optional[Exception] = None,
        timer: Optional[StepTimer] = None,
    ) -> None:
        self.config = config
        self.terms = config.terms
        self.metrics: Dict[str, LossTerm] = dict(config.metrics or {})
        self.channels: Dict[str, LossTerm] = config.channels
        self.layout = config.totals_layout()
        self.groups = groups
        self.scaling = scaling
        self.names = names
        self.is_last_stage = groups.is_last_pipeline_stage
        self.num_microbatches = scaling.num_microbatches
        self.next_microbatch = 0
        self.collectives = 0
        self.wait_seconds = 0.0
        self.timer = timer if timer is not None else StepTimer()  # the front end's, around its calls
        self.totals: Optional[torch.Tensor] = None
        self.plan: Optional[sm.StepPlan] = None
        self.plans: List[sm.MicroBatchPlan] = []
        self._denominators: Optional[sm.Denominators] = None
        self._work: Any = None
        self._reduced: Optional[torch.Tensor] = None
        masks: Dict[str, List[torch.Tensor]] = (
            {k: list(v) for k, v in loss_masks.items()} if isinstance(loss_masks, Mapping)
            else {DEFAULT_MASK_NAME: list(loss_masks)})
        assert set(masks) == set(self.layout.masks), (sorted(masks), self.layout.masks)
        first = masks[self.layout.masks[0]]
        self._device = first[0].device if len(first) else torch.device("cpu")
        prints = config_fingerprints(config, scaling)
        self.checks = StepChecks(names, config.allow_nonfinite_masked, fingerprints=prints)
        if config.uses_groups:
            self.checks.group_ids_expected = group_ids_expected(config.num_groups, config.group_scope)
        self._reports: Dict[str, List[torch.Tensor]] = {}
        if not self.is_last_stage:
            self.checks.inputs = None if refused is None else str(refused)  # raised at the step's end
            return  # no loss is computed here: no totals, no collective (the end-of-step check spreads)
        check_cp_lengths(first, packed_seqs, groups, names.masks)
        packed = list(packed_seqs or [None] * len(first))
        blocks, row_to_mb = sm.stack_microbatches(masks, self.layout.masks, packed, self._device)
        self._record_input_checks(blocks, row_to_mb, masks, packed)
        cp = sm.CPRank(groups.cp_size, groups.cp_rank, groups.cp_layout)
        self.plan = plan = sm.plan_step(self.channels, self.layout, blocks, row_to_mb, group_ids, cp, self._device)
        self.plans = plan.microbatches
        if plan.bad_group_ids is not None:
            self.checks.group_ids.append(("group_ids", plan.bad_group_ids))
        self._start_totals(plan, prints, tracker or AgreementTracker(), refused)
        # num_tokens of every micro-batch: this CP slice's valid tokens of the first mask; clamped to
        # >= 1 where only the schedule's division uses it (megatron-core < 0.15 divides unclamped; F
        # has the clamp).
        num_tokens = plan.num_tokens
        if not scaling.calculate_per_token_loss:
            num_tokens = torch.clamp(num_tokens, min=1)
        self._num_tokens_all = num_tokens
        self._num_tokens = num_tokens.unbind()
        self._multipliers: Sequence[torch.Tensor] = ()
        self._given: List[Optional[Dict[str, torch.Tensor]]] = [None] * len(self.plans)
        self._reports = {n: [] for n in (DEFAULT_TERM_NAME, *self.terms, *self.metrics)}
        self.report_count = torch.tensor(scaling.report_count(), dtype=torch.float32, device=self._device)

    def _record_input_checks(self, blocks: List[sm.Block], row_to_mb: Optional[torch.Tensor],
                             masks: Mapping[str, List[torch.Tensor]], packed: List[Optional[PackedSequences]]) -> None:
        """Device-side counts of bad inputs, read by the end-of-step check: mask values other than
        0/1 (vectorized over a stacked block) and packing boundaries (group ids: :func:`plan_step
        <megatron_agg.step_math.plan_step>` counts those out of range)."""
        mask_names, label_of = self.layout.masks, self.names.masks
        labels = {k: (label_of if k == DEFAULT_MASK_NAME and len(mask_names) == 1 else f"{label_of}[{k!r}]")
                  for k in mask_names}
        num_mbs = len(masks[mask_names[0]])
        if row_to_mb is not None:
            wholes = blocks[0].masks
            for k in mask_names:
                if wholes[k].dtype != torch.bool:  # bool masks hold nothing but 0/1
                    values = mask_value_problems(wholes[k], per_row=True)
                    per_mb = torch.zeros(num_mbs, dtype=torch.int64, device=self._device).index_add_(
                        0, row_to_mb, values)
                    self.checks.mask_values.append(([f"{labels[k]}[{j}]" for j in range(num_mbs)], per_mb))
        else:
            for j in range(num_mbs):
                for k in mask_names:
                    self.checks.record_mask(f"{labels[k]}[{j}]", masks[k][j])
        for j, p in enumerate(packed):
            if p is not None:
                self.checks.record_packing(f"packed_seqs[{j}]", p, masks[mask_names[0]][j].shape[-1],
                                           self.groups.cp_size, self.groups.cp_layout, self._device)

    def _start_totals(self, plan: sm.StepPlan, prints: Sequence[Optional[float]], tracker: AgreementTracker,
                      refused: Optional[Exception]) -> None:
        """Start the step's one all-reduce of the local totals (:func:`~megatron_agg.collective.start_totals`)."""
        start = start_totals(self.groups, self.layout, plan.local.vector, prints, self.names.entry, tracker=tracker,
                             key=("dp", id(self.groups.dp)), async_ok=self.config.async_totals, refused=refused)
        self.collectives += start.collectives
        self.wait_seconds += start.wait_seconds
        self._reduced, self._work = start.reduced, start.work
        self.totals = plan.local.vector if start.reduced is None else start.reduced[: self.layout.size]
        if start.deferred is not None:
            self.checks.inputs = start.deferred

    def _wait(self) -> None:
        if self._work is not None:
            t0 = time.perf_counter()
            self._work.wait()
            self.wait_seconds += time.perf_counter() - t0
            self._work = None

    @property
    def step_totals(self) -> StepTotals:
        """The all-reduced totals, read by name (waits for the all-reduce)."""
        return self.denominators().totals

    def denominators(self) -> sm.Denominators:
        """``1/D_k`` of every term and metric and ``1/M_g`` of every group, from the all-reduced
        totals (waits for the all-reduce the first time; then folds them into the plan's weights,
        once, and computes every ``F``)."""
        if self._denominators is None:
            self._wait()
            assert self.plan is not None and self.totals is not None
            dens = sm.denominators(self.channels, self.layout, self.totals, self.plan.local.group_tokens)
            sm.scale_weights(self.plan, dens)
            # F from Σ num_tokens (valid tokens of the first mask). When that is 0 while other masks
            # hold tokens, Megatron's finalize divides by nothing (or by max(0, 1)): F takes 1.
            total = torch.clamp(dens.totals.tokens(self.layout.masks[0]), min=1)
            self._multipliers = self.scaling.multipliers(self._num_tokens_all, total).expand(
                self.num_microbatches).unbind()
            self._denominators = dens
        return self._denominators

    def scales(self) -> Dict[str, torch.Tensor]:
        """``1 / D_k`` of every term and metric (waits for the totals' all-reduce the first time)."""
        return self.denominators().scales

    def _given_masks(self, loss_mask: Any, index: int, plan: sm.MicroBatchPlan) -> Dict[str, torch.Tensor]:
        """The loss function's mask(s) by name, shapes checked: a tensor when the step has one mask,
        else a mapping with every mask name."""
        mask_names = self.layout.masks
        if isinstance(loss_mask, Mapping):
            if set(loss_mask) != set(mask_names):
                # Recorded, not raised: another rank may be evaluating its losses (and reach Megatron's
                # gradient all-reduce) meanwhile; the step's end raises on every rank. The gradients
                # follow loss_masks: the loss function's masks only feed the check.
                self.checks.inputs = self.checks.inputs or (
                    f"{self.names.loss_call} got masks {sorted(loss_mask)} for micro-batch {index}, but the step "
                    f"has the masks {list(mask_names)}; pass this micro-batch's mask of every name."
                )
                return dict(plan.valid)
            given = dict(loss_mask)
        elif len(mask_names) == 1:
            given = {mask_names[0]: loss_mask}
        else:
            raise ValueError(
                f"{self.names.loss_call} needs this micro-batch's mask of every name the terms and metrics "
                f"use, {{{', '.join(repr(n) for n in mask_names)}}}; micro-batch {index} got "
                f"{type(loss_mask).__name__}."
            )
        for name, mask in given.items():
            if not isinstance(mask, torch.Tensor):
                raise ValueError(
                    f"{self.names.loss_call} needs a tensor mask; micro-batch {index} got {type(mask).__name__}."
                )
            if mask.device != self._device:
                raise ValueError(
                    f"Micro-batch {index}: the mask given to {self.names.loss_call} is on device {mask.device}, "
                    f"but {self.names.masks} are on {self._device}; pass both on the device of the model's output."
                )
            if mask.shape != plan.local_shape:
                label = self.names.masks if len(mask_names) == 1 else f"{self.names.masks}[{name!r}]"
                cp_note = (
                    f" (the CP-local slice, 1/{self.groups.cp_size} of the sequence, of the whole-sequence "
                    f"mask {tuple(plan.shape)} in {label})"
                    if self.groups.cp_size > 1
                    else f" (the shape of {label}[{index}])"
                )
                raise ValueError(
                    f"Loss evaluation {index + 1} of this step got a mask of shape {tuple(mask.shape)}, "
                    f"expected {tuple(plan.local_shape)}{cp_note}. Either {self.names.masks} is not in "
                    f"micro-batch order, or a loss function was skipped or evaluated twice: every "
                    f"micro-batch's {self.names.loss_call} must be evaluated exactly once, in order."
                )
        return given

    def microbatch_loss(self, losses: Dict[str, torch.Tensor], loss_mask: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """``(S·F, num_tokens, report)`` for the next micro-batch (see the module docstring).
        ``losses`` holds the per-token loss of every term and the per-token value of every metric."""
        index = self.next_microbatch
        if index >= self.num_microbatches:
            raise ValueError(
                f"The loss of micro-batch {index} was evaluated, but the step was given "
                f"{self.num_microbatches} micro-batches (and as many {self.names.masks}); "
                f"{self.names.loss_call} must be evaluated once per micro-batch."
            )
        self.next_microbatch += 1
        assert self.is_last_stage, "losses are computed on the last pipeline stage only"
        plan = self.plans[index]
        # No mask from the loss function: nothing to compare (the gradients follow loss_masks anyway).
        given = None if loss_mask is None else self._given_masks(loss_mask, index, plan)
        mask_shape = plan.local_shape
        if self.config.check_masks:
            self._given[index] = given  # compared with loss_masks after the step, vectorized
        self.denominators()
        check_per_token_values(losses, mask_shape, f"Micro-batch {index}", self.metrics, self._device, self.names.masks)
        # S_k = Σ where(m_k, l, 0) · (m_k·α/D_k), and Σ_k w_k·S_k (step_math).
        shares = {name: sm.microbatch_share(plan, name, term, losses[name]) for name, term in self.terms.items()}
        total = sm.weighted_total(self.terms, shares)
        report: Dict[str, torch.Tensor] = {}
        with torch.no_grad():  # the step's checks, reports and metrics: outside autograd, one block
            for name, share in shares.items():
                self.checks.record_loss(index, name, share, losses[name], grad_mode=False)
                if len(shares) > 1:
                    self._report(name, share, report)
            self._report(DEFAULT_TERM_NAME, total, report)
            for name, metric in self.metrics.items():
                value = sm.microbatch_share(plan, name, metric, losses[name].detach())
                self._report(name, value, report)
        loss = total * self._multipliers[index]
        num_tokens = self._num_tokens[index] if self.scaling.loss_return is LossReturn.THREE_TUPLE else None
        return loss, num_tokens, report

    def _report(self, name: str, share: torch.Tensor, report: Dict[str, torch.Tensor]) -> None:
        pair = torch.stack([share, self.report_count])  # under the caller's no_grad
        self._reports[name].append(pair)
        report[name] = pair

    @property
    def local_losses(self) -> Dict[str, torch.Tensor]:
        """This rank's share of each term's ``L_k``, of the total and of each metric, summed over
        micro-batches."""
        with torch.no_grad():
            return {
                name: torch.stack(values)[:, 0].sum() if values else torch.zeros((), device=self._device)
                for name, values in self._reports.items()
            }

    def _mask_mismatches(self) -> None:
        """Tokens where the loss functions' masks differ from ``loss_masks``, per micro-batch and
        mask (vectorized over the step where the micro-batches were batched)."""
        given = self._given
        if not self.config.check_masks or any(g is None for g in given) or not given:
            return
        named = len(self.layout.masks) > 1  # label the micro-batches with the mask's name
        step = self.plan
        assert step is not None
        with torch.no_grad():
            for k in self.layout.masks:
                masks = [g[k] for g in given]
                labels = [(k, j) if named else j for j in range(len(masks))]
                if step.batched and len({g.shape[-1] for g in masks}) == 1:
                    whole = torch.cat(masks) if len(masks) > 1 else masks[0]
                    per_row = (sm.valid_tokens(whole) != step.valid[k][0]).sum(dim=-1)
                    counts = torch.zeros(len(masks), dtype=per_row.dtype, device=per_row.device)
                    counts = counts.index_add_(0, step.row_to_mb, per_row)
                    self.checks.mismatch.append((labels, counts))  # one vector, labelled
                    continue
                for j, (g, plan) in enumerate(zip(masks, self.plans)):
                    tokens = sm.valid_tokens(g)
                    if plan.member is not None:
                        tokens = tokens & plan.member
                    self.checks.mismatch.append((labels[j], (tokens != plan.valid[k]).sum()))

    def finish(self, evaluated_all: bool = True) -> None:
        """After the step: every micro-batch's loss evaluated once (``evaluated_all=False`` for
        steps that compute no loss, e.g. forward-only with non-loss data), agreement, masks, values,
        boundaries, group ids and finiteness — one host sync, spread over every rank of the step."""
        if self.is_last_stage and evaluated_all and self.next_microbatch != self.num_microbatches:
            self.checks.evaluations = (
                f"The step was given {self.num_microbatches} {self.names.masks} but "
                f"{self.names.loss_call} was evaluated for {self.next_microbatch} micro-batches; every "
                f"micro-batch's loss must come from {self.names.loss_call}, evaluated once."
            )
        if self.is_last_stage:
            self._mask_mismatches()
        if self._reduced is not None:
            self._wait()
            if not self.config.raise_on_every_rank:  # the totals' block is the DP-wide agreement
                raise_if_disagree(self._reduced[self.layout.size:], self.names.entry, "checked after the step")
        self.collectives += self.checks.finish(self.groups, self.config.raise_on_every_rank, self._device)

    def state_bytes(self) -> int:
        tensors: List[torch.Tensor] = []
        if self.is_last_stage and self.plan is not None:
            plan = self.plan
            tensors += [t for ts in plan.weight_buffers.values() for t in ts]
            tensors += [t for ts in plan.valid.values() for t in ts] + plan.group_index
            tensors += [t for t in plan.member if t is not None]
            tensors += list(plan.local.group_tokens.values())
            if self.totals is not None:
                tensors += [self.totals if self._reduced is None else self._reduced]
        return sum(t.numel() * t.element_size() for t in tensors)

    def summary(self) -> StepSummary:
        return StepSummary(
            is_last_stage=self.is_last_stage,
            num_microbatches=self.num_microbatches,
            scaling=self.scaling,
            totals=self.totals,
            local_losses=dict(self.local_losses),
            collectives=self.collectives,
            groups=self.groups,
            state_bytes=self.state_bytes(),
            engine_seconds=self.timer.seconds,
            engine_cpu_seconds=self.timer.cpu_seconds,
            wait_seconds=self.wait_seconds,
        )
