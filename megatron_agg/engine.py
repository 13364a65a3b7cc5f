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

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import aggregation as agg
from .agreement import AGREEMENT_FIELDS, agreement_block, disagreements, fingerprints
from .averaging import LossReturn
from .checks import FrontEndNames, StepChecks
from .config import AggConfig
from .groups import ParallelGroups
from .layout import thd_cp_local_positions, to_cp_local
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
    cp_size, cp_rank = groups.cp_size, groups.cp_rank
    if cp_size == 1:
        return None
    if groups.cp_layout == "contiguous":
        local = mask.shape[-1] // cp_size
        return torch.arange(cp_rank * local, (cp_rank + 1) * local, device=mask.device)
    if packed is not None:
        _, cu_padded = packed.boundaries(mask.device)
        positions = thd_cp_local_positions(cu_padded, mask.shape[-1], cp_size, cp_rank)
        return positions.clamp(0, mask.shape[-1] - 1)  # bad boundaries are reported, never an index error
    return None


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
        self.checks = StepChecks(list(self.terms), names, config.allow_nonfinite_masked, fingerprints=prints)
        self._local_parts: Dict[str, List[torch.Tensor]] = {}
        if not self.is_last_stage:
            return  # no loss is computed here: no totals, no collective (the end-of-step check spreads)
        if groups.cp_size > 1:
            for j, mask in enumerate(loss_masks):
                if packed_seqs is None or packed_seqs[j] is None:
                    if groups.cp_layout == "load-balanced" and mask.shape[-1] % (2 * groups.cp_size):
                        raise ValueError(
                            f"loss_masks[{j}] has padded length {mask.shape[-1]}, but context parallelism of "
                            f"size {groups.cp_size} cuts sequences into 2·cp = {2 * groups.cp_size} chunks; "
                            "pad the batch (and its masks) to a multiple of 2·cp."
                        )
                    if mask.shape[-1] % groups.cp_size:
                        raise ValueError(
                            f"loss_masks[{j}] has padded length {mask.shape[-1]}, not divisible by the "
                            f"{groups.cp_size} ranks that share each sequence."
                        )
        packed_seqs = packed_seqs or [None] * len(loss_masks)
        device = self._device
        for j, (mask, packed) in enumerate(zip(loss_masks, packed_seqs)):
            self.checks.mask_values.append((f"{names.masks}[{j}]", mask_value_problems(mask)))
            if packed is not None:
                problems = boundary_problems(packed, mask.shape[-1], groups.cp_size, device)
                self.checks.boundaries.append((f"packed_seqs[{j}]", problems))
        views = [agg.sequence_view(mask, packed) for mask, packed in zip(loss_masks, packed_seqs)]
        totals = agg.local_totals(views, device=device)
        sync = tracker is not None and tracker.needs_sync(("dp", id(groups.dp)), prints)
        if groups.dp_size > 1:
            # One collective: the totals and the fingerprints of the set-up the ranks must share.
            self._reduced = torch.cat([totals, agreement_block(prints, device)])
            self._work = groups.sum_over_dp(self._reduced, async_op=config.async_totals and not sync)
            self.collectives += 1
            totals = self._reduced[: len(agg.TOTALS_FIELDS)]
            if sync:
                self._wait()
                raise_if_disagree(self._reduced[len(agg.TOTALS_FIELDS):], names, "checked before the step")
        if tracker is not None:
            tracker.verified(("dp", id(groups.dp)), prints)
        self.totals = totals
        cp_size, cp_rank = groups.cp_size, groups.cp_rank
        for mask, packed, view in zip(loss_masks, packed_seqs, views):
            positions = _local_positions(mask, packed, groups)
            weights = {
                name: to_cp_local(agg.sequence_weights(term, view), cp_size, cp_rank, positions)
                for name, term in self.terms.items()
            }
            local_shape = torch.Size((*mask.shape[:-1], mask.shape[-1] // cp_size))
            valid = to_cp_local(view.valid, cp_size, cp_rank, positions)
            membership = view.membership()
            member = None if membership is None else to_cp_local(membership, cp_size, cp_rank, positions)
            self.plans.append(_MicroBatchPlan(mask.shape, local_shape, weights, valid, member))
        # num_tokens of every micro-batch: this CP slice's valid tokens; clamped to >= 1 where only
        # the schedule's division uses it (megatron-core < 0.15 divides unclamped; F has the clamp).
        num_tokens = torch.stack([plan.valid.sum(dtype=torch.int) for plan in self.plans])
        if not scaling.calculate_per_token_loss:
            num_tokens = torch.clamp(num_tokens, min=1)
        self._num_tokens_all = num_tokens
        self._num_tokens = num_tokens.unbind()
        self._multipliers: Sequence[torch.Tensor] = ()
        self._local_parts = {n: [] for n in (DEFAULT_TERM_NAME, *self.terms)}
        self.report_count = torch.tensor(scaling.report_count(), dtype=torch.float32, device=device)

    def _wait(self) -> None:
        if self._work is not None:
            import time

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
        if loss_mask.shape != plan.local_shape:
            cp_note = (
                f" (the CP-local slice, 1/{self.groups.cp_size} of the sequence, of the whole-sequence "
                f"mask {tuple(plan.shape)} in {self.names.masks})"
                if self.groups.cp_size > 1
                else f" (the shape of {self.names.masks}[{index}])"
            )
            raise ValueError(
                f"Loss evaluation {index + 1} of this step got a mask of shape {tuple(loss_mask.shape)}, "
                f"expected {tuple(plan.local_shape)}{cp_note}. Either {self.names.masks} is not in "
                f"micro-batch order, or a loss function was skipped or evaluated twice: every "
                f"micro-batch's {self.names.loss_call} must be evaluated exactly once, in order."
            )
        valid = plan.valid
        if self.config.check_masks:
            given = agg.valid_tokens(loss_mask)
            if plan.member is not None:
                given = given & plan.member
            self.checks.mismatch.append((index, (given != valid).sum()))
        scales = self.scales()
        total = None
        report: Dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            per_token_loss = losses[name]
            if not isinstance(per_token_loss, torch.Tensor) or per_token_loss.shape != loss_mask.shape:
                shape = tuple(per_token_loss.shape) if isinstance(per_token_loss, torch.Tensor) else type(per_token_loss).__name__
                raise ValueError(
                    f"Micro-batch {index}: the per-token loss of term {name!r} has shape {shape} but its "
                    f"mask has shape {tuple(loss_mask.shape)}; the loss function must return one loss per "
                    "token ([b, s])."
                )
            share = agg.masked_weighted_sum(per_token_loss, valid, plan.weights[name]) * scales[name]
            self.checks.record_loss(index, name, share, per_token_loss)
            weighted = share * term.weight if term.weight != 1.0 else share
            total = weighted if total is None else total + weighted
            if len(self.terms) > 1:
                self._accumulate(name, share, report)
        assert total is not None
        self._accumulate(DEFAULT_TERM_NAME, total, report)
        loss = total * self._multipliers[index]
        num_tokens = self._num_tokens[index] if self.scaling.loss_return is LossReturn.THREE_TUPLE else None
        return loss, num_tokens, report

    def _accumulate(self, name: str, share: torch.Tensor, report: Dict[str, torch.Tensor]) -> None:
        detached = share.detach()
        self._local_parts[name].append(detached)
        report[name] = torch.stack([detached, self.report_count])

    @property
    def local_losses(self) -> Dict[str, torch.Tensor]:
        """This rank's share of each term's ``L_k`` and of the total, summed over micro-batches."""
        return {
            name: torch.stack(values).sum() if values else torch.zeros((), device=self._device)
            for name, values in self._local_parts.items()
        }

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
        if self._reduced is not None:
            self._wait()
            if not self.config.raise_on_every_rank:  # the totals' block is the DP-wide agreement
                raise_if_disagree(self._reduced[len(agg.TOTALS_FIELDS):], self.names, "checked after the step")
        self.collectives += self.checks.finish(self.groups, self.config.raise_on_every_rank, self._device)

    def state_bytes(self) -> int:
        tensors = [t for p in self.plans for t in (*p.weights.values(), p.valid, p.member) if t is not None]
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
