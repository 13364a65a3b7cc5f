"""The step engine behind every entry point: checks, totals, agreement, weights, end-of-step report.

Independent of Megatron and FSDP: it is handed the step's :class:`~megatron_agg.groups.ParallelGroups`
(which issue its collectives) and a :class:`~megatron_agg.scaling.Scaling` (what the framework does
to a returned loss). The front ends (:class:`~megatron_agg.LossHook`,
:class:`~megatron_agg.fsdp.FSDPLossHook`, :class:`~megatron_agg.StepShares`,
:class:`~megatron_agg.DeferredLossHook`) only adapt it to their call conventions.

A *prepared* step (:class:`PreparedStep`), on each rank of the last pipeline stage:

1. checks ``loss_masks``/``packed_seqs`` (shapes at once; mask values and packing boundaries as
   device-side counts), counts this rank's totals ``[T, N, N_nonempty]`` from whole sequences
   (:func:`megatron_agg.aggregation.local_totals`) and starts **one** all-reduce (SUM, float64)
   over the pure data-parallel group of ``[totals..., agreement triples...]``. On the first step
   of an entry point, and on any step whose set-up changed (:class:`AgreementTracker`), it waits
   for it at once and raises on every DP rank that disagrees, *before* the schedule runs (one host
   sync, at that step's start); otherwise the all-reduce is awaited at the first loss.
2. precomputes per micro-batch the per-token weights ``m·α`` of every term in this rank's
   context-parallel layout, ``num_tokens``, and (at the first loss) every ``F`` vectorized.
3. per micro-batch: ``S = Σ_k w_k · Σ where(mask, l_k, 0)·(m·α_k) / D_k`` and ``S·F`` — three
   tensor ops per term plus one for the end-of-step check, no host sync, no collective.
4. after the schedule: :class:`~megatron_agg.checks.StepChecks` (one host sync, spread over every
   rank of the step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import aggregation as agg
from .agreement import AGREEMENT_FIELDS, agreement_block, disagreements, fingerprints
from .averaging import LossReturn
from .checks import FrontEndNames, StepChecks
from .config import AggConfig
from .groups import ParallelGroups
from .layout import local_positions, to_cp_local
from .packing import PackedSequences
from .scaling import Scaling
from .terms import DEFAULT_TERM_NAME, LossTerm
from .validation import boundary_problems, mask_value_problems

__all__ = ["AgreementTracker", "PreparedStep", "StepSummary", "global_loss_of", "set_up_fingerprints"]


def set_up_fingerprints(terms: Optional[Dict[str, LossTerm]], scaling: Optional[Scaling]) -> List[Optional[float]]:
    """The fingerprints of :data:`~megatron_agg.agreement.AGREEMENT_FIELDS` for this rank."""
    loss_return, per_token = scaling.fingerprint() if scaling is not None else (None, None)
    return fingerprints(terms, loss_return, per_token)


class AgreementTracker:
    """Remembers the last set-up whose agreement over the DP ranks was checked synchronously, so
    that only the first step and steps whose set-up changed pay for the synchronous check."""

    def __init__(self, policy: str = "on-change") -> None:
        self.policy = policy
        self._verified: Dict[Any, Tuple] = {}

    def needs_sync(self, key: Any, prints: Sequence[Optional[float]]) -> bool:
        return self.policy == "every-step" or self._verified.get(key) != tuple(prints)

    def verified(self, key: Any, prints: Sequence[Optional[float]]) -> None:
        self._verified[key] = tuple(prints)


def raise_if_disagree(block: torch.Tensor, names: FrontEndNames, where: str) -> None:
    """Read a summed agreement block (one host sync) and raise ``ValueError`` naming the options."""
    differing = [f for f, d in zip(AGREEMENT_FIELDS, disagreements(block).tolist()) if d]
    if differing:
        raise ValueError(
            f"The data-parallel ranks of this step disagree on: {', '.join(differing)} ({where}). Every "
            f"rank must build the same {names.entry} (terms, modes, options, loss_return) and the same "
            "Megatron config; nothing was computed. Raised on every rank of the group."
        )


@dataclass
class StepSummary:
    """What an entry point saw in its last step (for logging and tests; tensors stay on the device)."""

    is_last_stage: bool
    num_microbatches: int
    scaling: Optional[Scaling]
    #: The all-reduced ``[tokens, sequences, nonempty_sequences]`` (last stage only).
    totals: Optional[torch.Tensor]
    #: This rank's share ``Σ_j S_j`` of each term's ``L_k`` (unweighted), and of the total.
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


def global_loss_of(summary: Optional[StepSummary], failed: Optional[str]) -> Optional[Dict[str, torch.Tensor]]:
    """``{"loss": L, <term>: L_k}`` of a completed step: one all-reduce (SUM) over data×context."""
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


@dataclass
class _MicroBatchPlan:
    """Per-token weights ``m·α`` of every term for one micro-batch, in this rank's layout."""

    shape: torch.Size  # the whole-sequence mask shape of loss_masks
    local_shape: torch.Size  # the shape the loss function must receive on this CP rank
    weights: Dict[str, torch.Tensor]
    valid: torch.Tensor  # valid tokens of a sequence, in this rank's layout (bool)
    member: Optional[torch.Tensor]  # tokens that belong to a sequence (None: all), this rank's layout


def _local_positions(mask: torch.Tensor, packed: Optional[PackedSequences], groups: ParallelGroups) -> Optional[torch.Tensor]:
    cu_padded = None if packed is None else packed.boundaries(mask.device)[1]
    positions = local_positions(groups.cp_layout, mask.shape[-1], groups.cp_size, groups.cp_rank, cu_padded,
                                device=mask.device)
    if positions is not None and cu_padded is not None:
        positions = positions.clamp(0, mask.shape[-1] - 1)  # bad boundaries are reported, never an index error
    return positions


def check_cp_lengths(loss_masks: Sequence[torch.Tensor], packed_seqs: Optional[Sequence[Optional[PackedSequences]]],
                     groups: ParallelGroups, masks_name: str = "loss_masks") -> None:
    """``ValueError`` (before the step) for a row whose length the CP layout cannot cut. Packed rows
    of the ``"load-balanced"`` layout are cut per document: their boundaries are checked with the
    step's other checks (:func:`~megatron_agg.validation.boundary_problems`)."""
    cp = groups.cp_size
    if cp == 1:
        return
    for j, mask in enumerate(loss_masks):
        packed = packed_seqs[j] if packed_seqs is not None else None
        length = mask.shape[-1]
        if groups.cp_layout == "contiguous" or (packed is not None and groups.cp_layout == "load-balanced"):
            if length % cp:
                raise ValueError(
                    f"{masks_name}[{j}] has padded length {length}, not divisible by the {cp} ranks that "
                    "share each sequence."
                )
        elif length % (2 * cp):
            what = ("packed row, cut as a whole (cp_layout='per-row')" if packed is not None
                    else "sequences")
            raise ValueError(
                f"{masks_name}[{j}] has padded length {length}, but context parallelism of size {cp} cuts "
                f"{what} into 2·cp = {2 * cp} chunks; pad the batch (and its masks) to a multiple of 2·cp."
            )


class PreparedStep:
    """One step whose masks are known up front (see the module docstring)."""

    def __init__(
        self,
        config: AggConfig,
        loss_masks: Sequence[torch.Tensor],
        groups: ParallelGroups,
        scaling: Scaling,
        packed_seqs: Optional[Sequence[Optional[PackedSequences]]] = None,
        *,
        names: FrontEndNames = FrontEndNames(),
        tracker: Optional[AgreementTracker] = None,
    ) -> None:
        self.config = config
        self.terms = config.terms
        self.groups = groups
        self.scaling = scaling
        self.names = names
        self.is_last_stage = groups.is_last_pipeline_stage
        self.num_microbatches = scaling.num_microbatches
        self.next_microbatch = 0
        self.collectives = 0
        self.wait_seconds = 0.0
        self.engine_seconds = 0.0  # added to by the front end around each loss evaluation
        self.engine_cpu_seconds = 0.0
        self.totals: Optional[torch.Tensor] = None
        self._work: Any = None
        self._reduced: Optional[torch.Tensor] = None
        self._scales: Optional[Dict[str, torch.Tensor]] = None
        self.plans: List[_MicroBatchPlan] = []
        self._device = loss_masks[0].device if len(loss_masks) else torch.device("cpu")
        prints = set_up_fingerprints(self.terms, scaling)
        self.checks = StepChecks(names, config.allow_nonfinite_masked, fingerprints=prints)
        self._reports: Dict[str, List[torch.Tensor]] = {}
        if not self.is_last_stage:
            return  # no loss is computed here: no totals, no collective (the end-of-step check spreads)
        check_cp_lengths(loss_masks, packed_seqs, groups, names.masks)
        packed_seqs = list(packed_seqs or [None] * len(loss_masks))
        device = self._device
        sizes = [mask.shape[0] for mask in loss_masks]
        # The common case, vectorized over the step: unpacked micro-batches of one padded length
        # are stacked into one [Σ b_j, s] mask; views, weights and the CP layout are computed once
        # and split back per micro-batch (views of one buffer, scaled in place at the first loss).
        batched = all(p is None for p in packed_seqs) and len({m.shape[-1] for m in loss_masks}) == 1 and (
            len({m.dtype for m in loss_masks}) == 1)
        self._batched = batched
        self._row_to_mb = None
        if batched:
            whole = torch.cat(list(loss_masks)) if len(loss_masks) > 1 else loss_masks[0]
            self._row_to_mb = torch.tensor([j for j, b in enumerate(sizes) for _ in range(b)], device=device)
            if whole.dtype != torch.bool:  # bool masks hold nothing but 0/1
                values = mask_value_problems(whole, per_row=True)
                per_mb = torch.zeros(len(sizes), dtype=torch.int64, device=device).index_add_(0, self._row_to_mb, values)
                self.checks.mask_values.append(([f"{names.masks}[{j}]" for j in range(len(sizes))], per_mb))
            views = [agg.sequence_view(whole)]
            groups_of_masks = [(whole, None, views[0], sizes)]
        else:
            for j, (mask, packed) in enumerate(zip(loss_masks, packed_seqs)):
                if mask.dtype != torch.bool:
                    self.checks.mask_values.append((f"{names.masks}[{j}]", mask_value_problems(mask)))
                if packed is not None:
                    problems = boundary_problems(packed, mask.shape[-1], groups.cp_size, device,
                                                per_document=groups.cp_layout == "load-balanced")
                    self.checks.boundaries.append((f"packed_seqs[{j}]", problems))
            views = [agg.sequence_view(mask, packed) for mask, packed in zip(loss_masks, packed_seqs)]
            groups_of_masks = [(m, p, v, [m.shape[0]]) for m, p, v in zip(loss_masks, packed_seqs, views)]
        totals = agg.local_totals(views, device=device)
        sync = tracker is not None and tracker.needs_sync(("dp", id(groups.dp)), prints)
        if groups.dp_size > 1:
            # One collective: the totals and the fingerprints of the set-up the ranks must share.
            self._reduced = torch.cat([totals, agreement_block(prints, device)])
            async_op = config.async_totals and not sync
            t0 = time.perf_counter()
            self._work = groups.sum_over_dp(self._reduced, async_op=async_op)
            if not async_op:  # a blocking all-reduce is a wait as well
                self.wait_seconds += time.perf_counter() - t0
            self.collectives += 1
            totals = self._reduced[: len(agg.TOTALS_FIELDS)]
            if sync:
                self._wait()
                raise_if_disagree(self._reduced[len(agg.TOTALS_FIELDS):], names, "checked before the step")
        if tracker is not None:
            tracker.verified(("dp", id(groups.dp)), prints)
        self.totals = totals
        cp_size, cp_rank = groups.cp_size, groups.cp_rank
        #: The buffers the per-token weights live in (scaled by 1/D_k in place at the first loss).
        self._weight_buffers: Dict[str, List[torch.Tensor]] = {name: [] for name in self.terms}
        self._valid_all: List[torch.Tensor] = []
        self._member_all: List[Optional[torch.Tensor]] = []
        for mask, packed, view, rows in groups_of_masks:
            positions = _local_positions(mask, packed, groups)
            weights = {}
            for name, term in self.terms.items():
                w = to_cp_local(agg.sequence_weights(term, view), cp_size, cp_rank, positions)
                if not w.is_contiguous():
                    w = w.contiguous()
                self._weight_buffers[name].append(w)
                weights[name] = w.split(rows) if len(rows) > 1 else (w,)
            valid = to_cp_local(view.valid, cp_size, cp_rank, positions)
            membership = view.membership()
            member = None if membership is None else to_cp_local(membership, cp_size, cp_rank, positions)
            self._valid_all.append(valid)
            self._member_all.append(member)
            valids = valid.split(rows) if len(rows) > 1 else (valid,)
            members = member.split(rows) if (member is not None and len(rows) > 1) else (member,) * len(rows)
            for i, b in enumerate(rows):
                shape = torch.Size((b, mask.shape[-1]))
                local_shape = torch.Size((b, mask.shape[-1] // cp_size))
                self.plans.append(_MicroBatchPlan(shape, local_shape, {n: weights[n][i] for n in self.terms},
                                                  valids[i], members[i]))
        # num_tokens of every micro-batch: this CP slice's valid tokens; clamped to >= 1 where only
        # the schedule's division uses it (megatron-core < 0.15 divides unclamped; F has the clamp).
        if batched:
            per_row = self._valid_all[0].sum(dim=-1, dtype=torch.int)
            num_tokens = torch.zeros(len(sizes), dtype=torch.int, device=device).index_add_(0, self._row_to_mb, per_row)
        else:
            num_tokens = torch.stack([plan.valid.sum(dtype=torch.int) for plan in self.plans])
        if not scaling.calculate_per_token_loss:
            num_tokens = torch.clamp(num_tokens, min=1)
        self._num_tokens_all = num_tokens
        self._num_tokens = num_tokens.unbind()
        self._multipliers: Sequence[torch.Tensor] = ()
        self._given: List[Optional[torch.Tensor]] = [None] * len(self.plans)
        self._reports: Dict[str, List[torch.Tensor]] = {n: [] for n in (DEFAULT_TERM_NAME, *self.terms)}
        self.report_count = torch.tensor(scaling.report_count(), dtype=torch.float32, device=device)

    def _wait(self) -> None:
        if self._work is not None:
            t0 = time.perf_counter()
            self._work.wait()
            self.wait_seconds += time.perf_counter() - t0
            self._work = None

    def scales(self) -> Dict[str, torch.Tensor]:
        """``1 / D_k`` of every term (waits for the totals' all-reduce the first time)."""
        if self._scales is None:
            self._wait()
            assert self.totals is not None
            self._scales = {
                name: agg.safe_reciprocal(agg.denominator(term, self.totals)).to(torch.float32)
                for name, term in self.terms.items()
            }
            for name, buffers in self._weight_buffers.items():  # 1/D_k folded into the weights, once
                for buffer in buffers:
                    buffer.mul_(self._scales[name])
            self._multipliers = self.scaling.multipliers(
                self._num_tokens_all, self.totals[agg.TOKENS]
            ).expand(self.num_microbatches).unbind()
        return self._scales

    def microbatch_loss(self, losses: Dict[str, torch.Tensor], loss_mask: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """``(S·F, num_tokens, report)`` for the next micro-batch (see the module docstring)."""
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
        if not isinstance(loss_mask, torch.Tensor):
            raise ValueError(
                f"{self.names.loss_call} needs a tensor mask; micro-batch {index} got {type(loss_mask).__name__}."
            )
        mask_shape = loss_mask.shape
        if mask_shape != plan.local_shape:
            cp_note = (
                f" (the CP-local slice, 1/{self.groups.cp_size} of the sequence, of the whole-sequence "
                f"mask {tuple(plan.shape)} in {self.names.masks})"
                if self.groups.cp_size > 1
                else f" (the shape of {self.names.masks}[{index}])"
            )
            raise ValueError(
                f"Loss evaluation {index + 1} of this step got a mask of shape {tuple(mask_shape)}, "
                f"expected {tuple(plan.local_shape)}{cp_note}. Either {self.names.masks} is not in "
                f"micro-batch order, or a loss function was skipped or evaluated twice: every "
                f"micro-batch's {self.names.loss_call} must be evaluated exactly once, in order."
            )
        if self.config.check_masks:
            self._given[index] = loss_mask  # compared with loss_masks after the step, vectorized
        self.scales()
        valid = plan.valid
        total = None
        shares: Dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            per_token_loss = losses[name]
            if not isinstance(per_token_loss, torch.Tensor) or per_token_loss.shape != mask_shape:
                shape = tuple(per_token_loss.shape) if isinstance(per_token_loss, torch.Tensor) else type(per_token_loss).__name__
                raise ValueError(
                    f"Micro-batch {index}: the per-token loss of term {name!r} has shape {shape} but its "
                    f"mask has shape {tuple(mask_shape)}; the loss function must return one loss per "
                    "token ([b, s])."
                )
            # S_k = Σ where(mask, l, 0) · (m·α/D_k): masked positions selected away, never multiplied.
            share = agg.weighted_share(per_token_loss, valid, plan.weights[name])
            shares[name] = share
            weighted = share * term.weight if term.weight != 1.0 else share
            total = weighted if total is None else total + weighted
        assert total is not None
        report: Dict[str, torch.Tensor] = {}
        with torch.no_grad():  # the step's checks and reports: outside autograd, one block
            for name, share in shares.items():
                self.checks.record_loss(index, name, share, losses[name], grad_mode=False)
                if len(shares) > 1:
                    self._report(name, share, report)
            self._report(DEFAULT_TERM_NAME, total, report)
        loss = total * self._multipliers[index]
        num_tokens = self._num_tokens[index] if self.scaling.loss_return is LossReturn.THREE_TUPLE else None
        return loss, num_tokens, report

    def _report(self, name: str, share: torch.Tensor, report: Dict[str, torch.Tensor]) -> None:
        pair = torch.stack([share, self.report_count])  # under the caller's no_grad
        self._reports[name].append(pair)
        report[name] = pair

    @property
    def local_losses(self) -> Dict[str, torch.Tensor]:
        """This rank's share of each term's ``L_k`` and of the total, summed over micro-batches."""
        with torch.no_grad():
            return {
                name: torch.stack(values)[:, 0].sum() if values else torch.zeros((), device=self._device)
                for name, values in self._reports.items()
            }

    def _mask_mismatches(self) -> None:
        """Tokens where the loss functions' masks differ from ``loss_masks``, per micro-batch
        (vectorized over the step where the micro-batches were batched)."""
        given = self._given
        if not self.config.check_masks or any(g is None for g in given) or not given:
            return
        with torch.no_grad():
            if self._batched and len({g.shape[-1] for g in given}) == 1:
                whole = torch.cat(given) if len(given) > 1 else given[0]
                per_row = (agg.valid_tokens(whole) != self._valid_all[0]).sum(dim=-1)
                counts = torch.zeros(len(given), dtype=per_row.dtype, device=per_row.device)
                counts = counts.index_add_(0, self._row_to_mb, per_row)
                self.checks.mismatch.append((list(range(len(given))), counts))  # one vector, labelled
                return
            for j, (g, plan) in enumerate(zip(given, self.plans)):
                tokens = agg.valid_tokens(g)
                if plan.member is not None:
                    tokens = tokens & plan.member
                self.checks.mismatch.append((j, (tokens != plan.valid).sum()))

    def finish(self, evaluated_all: bool = True) -> None:
        """After the step: every micro-batch's loss evaluated once (``evaluated_all=False`` for
        steps that compute no loss, e.g. forward-only with non-loss data), agreement, masks, values,
        boundaries and finiteness — one host sync, spread over every rank of the step."""
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
                raise_if_disagree(self._reduced[len(agg.TOTALS_FIELDS):], self.names, "checked after the step")
        self.collectives += self.checks.finish(self.groups, self.config.raise_on_every_rank, self._device)

    def state_bytes(self) -> int:
        tensors = [t for ts in self._weight_buffers.values() for t in ts] if self.is_last_stage else []
        tensors += [t for t in (*self._valid_all, *self._member_all) if t is not None] if self.is_last_stage else []
        if self.is_last_stage and self.totals is not None:
            tensors += [self.totals if self._reduced is None else self._reduced]
        return sum(t.numel() * t.element_size() for t in tensors)

    def summary(self, engine_seconds: float = 0.0, engine_cpu_seconds: float = 0.0) -> StepSummary:
        return StepSummary(
            is_last_stage=self.is_last_stage,
            num_microbatches=self.num_microbatches,
            scaling=self.scaling,
            totals=self.totals,
            local_losses=dict(self.local_losses),
            collectives=self.collectives,
            groups=self.groups,
            state_bytes=self.state_bytes(),
            engine_seconds=engine_seconds,
            engine_cpu_seconds=engine_cpu_seconds,
            wait_seconds=self.wait_seconds,
        )
