"""``LossHook``: exact global loss aggregation for Megatron-Core's ``forward_backward_func``.

Usage::

    hook = LossHook("seq-mean-token-mean")
    forward_backward = hook.wrap(get_forward_backward_func())

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, hook.loss_func(batch["loss_mask"])

    losses = forward_backward(forward_step_func=forward_step, data_iterator=it, model=chunks,
                              num_microbatches=M, seq_length=S, micro_batch_size=B,
                              loss_masks=[mask_0, ..., mask_{M-1}])

What one step does, on each rank of the last pipeline stage:

1. ``wrap``'s function counts this rank's totals from ``loss_masks`` (valid tokens, sequences,
   non-empty sequences) and starts **one** asynchronous all-reduce (SUM) of them over the pure
   data-parallel group (none if that group has one rank). Other stages compute nothing.
2. The first loss evaluation waits for it and derives each term's ``1/D``.
3. For micro-batch ``j`` Megatron calls the function made by ``hook.loss_func(mask)`` with the
   model output. It computes this micro-batch's exact share of the global loss,
   ``S_j = Σ_k w_k · Σ_{i,t} m·α_{k,i}·l_k / D_k`` (:mod:`megatron_agg.aggregation`), and returns
   ``S_j · F`` where ``F`` cancels Megatron's own averaging (:mod:`megatron_agg.averaging`), so
   that the gradients after ``finalize_model_grads`` are exactly ``∂L``. No host sync and no
   collective happen per micro-batch.
4. After Megatron's schedule returns, one host sync reads the step's checks: the DP ranks agree
   on the set-up (fingerprints carried by the same all-reduce, :mod:`megatron_agg.agreement`),
   the loss functions saw ``loss_masks``, every term stayed finite. A failed check raises on the
   ranks of the last stage; the next step starts clean either way.

The all-reduced vector is ``[T, N, N_nonempty, f_0, f_0², ...]`` (15 float64 values); with
context parallelism every CP rank does its own (identical) all-reduce over its DP group, so
nothing is counted once per CP rank, and TP/PP replicas never add to the totals.

The loss the hook reports per micro-batch is a Megatron-LM style ``{name: [sum, count]}`` dict
whose sums over micro-batches and data×context-parallel ranks give ``L`` exactly
(``sum / count`` with counts adding up to 1); :meth:`LossHook.global_loss` returns ``L`` itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from . import aggregation as agg
from .agreement import AGREEMENT_FIELDS, agreement_block, disagreements, fingerprints
from .averaging import LossReturn, MegatronAveraging, loss_multiplier, report_count
from .integration import ParallelGroups, check_megatron_version, resolve_groups, step_averaging
from .layout import thd_cp_local_positions, to_cp_local
from .modes import AggModeLike
from .packing import PackedSequences
from .terms import DEFAULT_TERM_NAME, LossTerm, normalize_terms, split_term_losses

__all__ = ["LossHook", "PerTokenLossFn", "StepSummary", "NonFiniteLossError"]

#: Maps the model output of a micro-batch to its per-token loss ``[b, s]`` (one term), or to a
#: ``{term name: [b, s]}`` mapping (several terms).
PerTokenLossFn = Callable[[torch.Tensor], Union[torch.Tensor, Mapping[str, torch.Tensor]]]

_MISSING = object()


class NonFiniteLossError(FloatingPointError):
    """A loss term was NaN or Inf on a valid token (raised after the step, naming the term)."""


@dataclass
class StepSummary:
    """What the hook saw in its last step (for logging and tests; tensors stay on the device)."""

    is_last_stage: bool
    num_microbatches: int
    averaging: Optional[MegatronAveraging]
    #: The all-reduced ``[tokens, sequences, nonempty_sequences]`` (last stage only).
    totals: Optional[torch.Tensor]
    #: This rank's share ``Σ_j S_j`` of each term's ``L_k`` (unweighted), and of the total.
    local_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    #: Collectives the hook issued in the step (1, or 0 off the last stage / with one DP rank).
    collectives: int = 0
    dp_cp_group: Any = None
    #: Bytes of per-step state the hook held on the device (weights, masks, counters).
    state_bytes: int = 0


@dataclass
class _MicroBatchPlan:
    """Per-token weights ``m·α`` of every term for one micro-batch, in this rank's layout."""

    shape: torch.Size  # the whole-sequence mask shape given to wrap
    local_shape: torch.Size  # the shape the loss function must receive on this CP rank
    weights: Dict[str, torch.Tensor]
    valid: torch.Tensor  # valid tokens of a sequence, in this rank's layout (bool)
    member: Optional[torch.Tensor]  # tokens that belong to a sequence (None: all), this rank's layout


class _Step:
    """The state of one wrapped ``forward_backward`` call."""

    def __init__(
        self,
        hook: "LossHook",
        loss_masks: Sequence[torch.Tensor],
        groups: ParallelGroups,
        averaging: MegatronAveraging,
        packed_seqs: Optional[Sequence[Optional[PackedSequences]]] = None,
    ) -> None:
        self.hook = hook
        self.groups = groups
        self.averaging = averaging
        self.is_last_stage = groups.is_last_pipeline_stage
        self.num_microbatches = averaging.num_microbatches
        self.next_microbatch = 0
        self.collectives = 0
        self.totals: Optional[torch.Tensor] = None
        self._work: Any = None
        self._reduced: Optional[torch.Tensor] = None
        self._scales: Optional[Dict[str, torch.Tensor]] = None
        self.plans: List[_MicroBatchPlan] = []
        self._device = loss_masks[0].device if len(loss_masks) else torch.device("cpu")
        if not self.is_last_stage:
            return  # no loss is computed here: no totals, no collective
        packed_seqs = packed_seqs or [None] * len(loss_masks)
        device = loss_masks[0].device
        views = [agg.sequence_view(mask, packed) for mask, packed in zip(loss_masks, packed_seqs)]
        totals = agg.local_totals(views, device=device)
        if groups.dp_size > 1:
            # One collective: the totals and the fingerprints of the set-up the ranks must share.
            prints = fingerprints(hook.terms, averaging.loss_return.value, averaging.calculate_per_token_loss)
            self._reduced = torch.cat([totals, agreement_block(prints, device)])
            self._work = _start_totals_all_reduce(self._reduced, groups.dp, hook.async_totals)
            self.collectives += 1
            totals = self._reduced[: len(agg.TOTALS_FIELDS)]
        self.totals = totals
        cp_size, cp_rank = groups.cp_size, groups.cp_rank
        for mask, packed, view in zip(loss_masks, packed_seqs, views):
            positions = None
            if cp_size > 1 and groups.cp_layout == "contiguous":
                local = mask.shape[-1] // cp_size
                positions = torch.arange(cp_rank * local, (cp_rank + 1) * local, device=device)
            elif cp_size > 1 and packed is not None:
                _, cu_padded = packed.boundaries(device)
                positions = thd_cp_local_positions(cu_padded, mask.shape[-1], cp_size, cp_rank)
            weights = {
                name: _microbatch_weights(term, view, cp_size, cp_rank, positions)
                for name, term in hook.terms.items()
            }
            local_shape = torch.Size((*mask.shape[:-1], mask.shape[-1] // cp_size))
            valid = to_cp_local(view.valid, cp_size, cp_rank, positions)
            membership = view.membership()
            member = None if membership is None else to_cp_local(membership, cp_size, cp_rank, positions)
            self.plans.append(_MicroBatchPlan(mask.shape, local_shape, weights, valid, member))
        # num_tokens of every micro-batch: this CP slice's valid tokens; clamped to >= 1 where only
        # the schedule's division uses it (megatron-core < 0.15 divides unclamped; F has the clamp).
        num_tokens = torch.stack([plan.valid.sum(dtype=torch.int) for plan in self.plans])
        if not averaging.calculate_per_token_loss:
            num_tokens = torch.clamp(num_tokens, min=1)
        self._num_tokens_all = num_tokens
        self._num_tokens = num_tokens.unbind()
        self._multipliers: Sequence[torch.Tensor] = ()
        # Per micro-batch: tokens where the loss function's mask disagrees with loss_masks
        # (checked once, after the step: no host sync per micro-batch).
        self._mismatch_parts: List[torch.Tensor] = []
        # Per micro-batch and term, its share of the loss (checked for NaN/Inf after the step).
        self._finite_parts: List[torch.Tensor] = []
        self._local_parts: Dict[str, List[torch.Tensor]] = {n: [] for n in (DEFAULT_TERM_NAME, *hook.terms)}
        self.report_count = torch.tensor(report_count(averaging), dtype=torch.float32, device=device)

    def scales(self) -> Dict[str, torch.Tensor]:
        """``1 / D_k`` of every term (waits for the totals' all-reduce the first time)."""
        if self._scales is None:
            if self._work is not None:  # None as well when the all-reduce ran synchronously
                self._work.wait()
                self._work = None
            assert self.totals is not None
            self._scales = {
                name: agg.safe_reciprocal(agg.denominator(term, self.totals)).to(torch.float32)
                for name, term in self.hook.terms.items()
            }
            self._multipliers = loss_multiplier(
                self.averaging, self._num_tokens_all, self.totals[agg.TOKENS]
            ).expand(self.num_microbatches).unbind()
        return self._scales

    def microbatch_loss(self, per_token: Any, loss_mask: torch.Tensor) -> tuple:
        """Megatron's ``loss_func`` result for the next micro-batch (see the module docstring)."""
        index = self.next_microbatch
        if index >= self.num_microbatches:
            raise ValueError(
                f"Megatron evaluated the loss of micro-batch {index}, but the step was given "
                f"num_microbatches={self.num_microbatches} and as many loss_masks; the loss "
                "function must be evaluated once per micro-batch."
            )
        self.next_microbatch += 1
        assert self.is_last_stage, "Megatron computes losses on the last pipeline stage only"
        plan = self.plans[index]
        losses = split_term_losses(self.hook.terms, per_token, index)
        if not isinstance(loss_mask, torch.Tensor):
            raise ValueError(
                f"hook.loss_func(loss_mask) needs a tensor mask; micro-batch {index} got "
                f"{type(loss_mask).__name__}."
            )
        if loss_mask.shape != plan.local_shape:
            cp_note = (
                f" (the CP-local slice, 1/{self.averaging.cp_size} of the sequence, of the "
                f"whole-sequence mask {tuple(plan.shape)} given to wrap)"
                if self.averaging.cp_size > 1
                else " (the shape of the mask given to wrap in loss_masks)"
            )
            raise ValueError(
                f"Micro-batch {index}: hook.loss_func got a mask of shape {tuple(loss_mask.shape)}, "
                f"expected {tuple(plan.local_shape)}{cp_note}. loss_masks must list this rank's "
                "masks in micro-batch order."
            )
        valid = plan.valid
        if self.hook.check_masks:
            given = agg.valid_tokens(loss_mask)
            if plan.member is not None:
                given = given & plan.member
            self._mismatch_parts.append((given != valid).sum())
        scales = self.scales()
        total = None
        report: Dict[str, torch.Tensor] = {}
        for name, term in self.hook.terms.items():
            per_token_loss = losses[name]
            if per_token_loss.shape != loss_mask.shape:
                raise ValueError(
                    f"Micro-batch {index}: the per-token loss of term {name!r} has shape "
                    f"{tuple(per_token_loss.shape)} but its mask has shape {tuple(loss_mask.shape)}; "
                    "the loss function must return one loss per token ([b, s])."
                )
            share = agg.masked_weighted_sum(per_token_loss, valid, plan.weights[name]) * scales[name]
            self._finite_parts.append(share)
            weighted = share * term.weight if term.weight != 1.0 else share
            total = weighted if total is None else total + weighted
            if len(self.hook.terms) > 1:
                self._accumulate(name, share, report)
        assert total is not None
        self._accumulate(DEFAULT_TERM_NAME, total, report)
        loss = total * self._multipliers[index]
        if self.averaging.loss_return is LossReturn.TWO_TUPLE:
            return loss, report
        return loss, self._num_tokens[index], report

    def _accumulate(self, name: str, share: torch.Tensor, report: Dict[str, torch.Tensor]) -> None:
        detached = share.detach()
        self._local_parts[name].append(detached)
        report[name] = torch.stack([detached, self.report_count])

    @property
    def local_losses(self) -> Dict[str, torch.Tensor]:
        """This rank's share of each term's ``L_k`` and of the total, summed over micro-batches."""
        parts = getattr(self, "_local_parts", {})
        return {
            name: torch.stack(values).sum() if values else torch.zeros((), device=self._device)
            for name, values in parts.items()
        }

    def finish(self, forward_only: bool, collect_non_loss_data: bool) -> None:
        """After the step: check that Megatron evaluated the loss once per micro-batch, that the
        DP ranks agree on the set-up, that the loss functions saw ``loss_masks`` and that every
        term stayed finite. All device-side results are read with one host sync, here."""
        if not self.is_last_stage or collect_non_loss_data:
            return
        if self.next_microbatch != self.num_microbatches:
            raise ValueError(
                f"The step was given {self.num_microbatches} loss_masks but Megatron evaluated "
                f"hook.loss_func for {self.next_microbatch} micro-batches; every forward_step must "
                "return hook.loss_func(...) as its loss function."
            )
        nonfinite_flags = torch.isfinite(torch.stack(self._finite_parts)).logical_not().to(torch.int64)
        mismatch = (
            torch.stack(self._mismatch_parts).to(torch.int64)
            if self._mismatch_parts
            else nonfinite_flags.new_zeros(self.num_microbatches)
        )
        checks = [nonfinite_flags, mismatch]
        if self._reduced is not None:
            self.scales()  # waits for the all-reduce if no loss did
            block = self._reduced[len(agg.TOTALS_FIELDS) :]
            checks.append(disagreements(block, self.groups.dp_size))
        values = torch.cat(checks).tolist()
        terms = list(self.hook.terms)
        nonfinite, values = values[: nonfinite_flags.numel()], values[nonfinite_flags.numel() :]
        mismatches, differing = values[: self.num_microbatches], values[self.num_microbatches :]
        if any(differing):
            options = [f for f, d in zip(AGREEMENT_FIELDS, differing) if d]
            raise ValueError(
                f"The {self.groups.dp_size} data-parallel ranks of this step disagree on: "
                f"{', '.join(options)}. Every rank must build the same LossHook (terms, modes, "
                "options, loss_return) and the same Megatron config; the gradients of this step "
                "are not the loss of any one of them."
            )
        if self.hook.check_masks:
            bad = [(j, n) for j, n in enumerate(mismatches) if n]
            if bad:
                j, n = bad[0]
                raise ValueError(
                    f"Micro-batch {j}: the mask given to hook.loss_func differs from loss_masks[{j}] "
                    f"in {n} token(s) (micro-batches with differences: {[b for b, _ in bad]}). The "
                    "gradients of this step used loss_masks; pass the same masks, in micro-batch "
                    "order (CP-local slices of them under context parallelism), or set "
                    "LossHook(check_masks=False) if the loss function's mask is meant to differ."
                )
        bad_terms = {}
        for flat, count in enumerate(nonfinite):
            if count:
                bad_terms.setdefault(terms[flat % len(terms)], []).append(flat // len(terms))
        if bad_terms:
            detail = "; ".join(f"term {name!r} in micro-batch(es) {mbs}" for name, mbs in bad_terms.items())
            raise NonFiniteLossError(
                f"A valid token's loss was NaN or Inf: {detail}. The step's gradients are not "
                "finite; do not apply them (masked positions are never the cause: they are "
                "selected away)."
            )

    def state_bytes(self) -> int:
        tensors = [t for p in self.plans for t in (*p.weights.values(), p.valid, p.member) if t is not None]
        if self.is_last_stage:
            tensors += [self.totals if self._reduced is None else self._reduced]
        return sum(t.numel() * t.element_size() for t in tensors)

    def summary(self) -> StepSummary:
        return StepSummary(
            is_last_stage=self.is_last_stage,
            num_microbatches=self.num_microbatches,
            averaging=self.averaging,
            totals=self.totals,
            local_losses=dict(self.local_losses),
            collectives=self.collectives,
            dp_cp_group=self.groups.dp_cp,
            state_bytes=self.state_bytes(),
        )


class LossHook:
    """Exact global loss aggregation for Megatron-Core's ``forward_backward_func``.

    Args:
        mode: the aggregation mode of a single-term loss (``"token-mean"``,
            ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum-norm"``
            or an :class:`~megatron_agg.AggMode`). Leave ``None`` when ``terms`` is given.
        exclude_fully_masked_seqs: single-term option, see :class:`~megatron_agg.LossTerm`.
        loss_scale_factor: single-term option, see :class:`~megatron_agg.LossTerm`.
        terms: several named terms, ``{name: LossTerm(mode, weight=...)}``; the step's loss is
            ``Σ_k weight_k · L_k``, all from the same masks and the same single collective.
        loss_return: the ``loss_func`` convention to use, ``"3-tuple"`` (default; honours
            ``config.calculate_per_token_loss``) or ``"2-tuple"``. Both give the same gradients.
        pg_collection: Megatron's ``ProcessGroupCollection`` to take the groups from when the
            wrapped call is not given one; by default ``parallel_state``'s groups.
        check_masks: after each step, check that the masks given to ``hook.loss_func`` equal
            ``loss_masks`` (the gradients always follow ``loss_masks``). Costs one host sync per
            step, after the step; none per micro-batch.
        async_totals: start the step's all-reduce asynchronously when the step begins and wait
            for it at the first loss (on the last pipeline stage the pipeline's warm-up hides
            it); ``False`` waits at once (for measurements).

    The formulas of every mode are in :mod:`megatron_agg.modes` and :mod:`.aggregation`.
    """

    def __init__(
        self,
        mode: Optional[AggModeLike] = None,
        *,
        exclude_fully_masked_seqs: bool = False,
        loss_scale_factor: Optional[float] = None,
        terms: Optional[Mapping[str, LossTerm]] = None,
        loss_return: Union[LossReturn, str] = LossReturn.THREE_TUPLE,
        pg_collection: Any = None,
        check_masks: bool = True,
        async_totals: bool = True,
    ) -> None:
        self.terms: Dict[str, LossTerm] = normalize_terms(
            mode, exclude_fully_masked_seqs, loss_scale_factor, terms
        )
        self.loss_return = LossReturn.parse(loss_return)
        self._pg_collection = pg_collection
        self.check_masks = bool(check_masks)
        self.async_totals = bool(async_totals)
        self._step: Optional[_Step] = None
        self._last: Optional[StepSummary] = None

    def __repr__(self) -> str:
        return f"LossHook(terms={self.terms!r}, loss_return={self.loss_return.value!r})"

    # -- the step ----------------------------------------------------------------------------
    def wrap(self, forward_backward_func: Callable[..., Any]) -> Callable[..., Any]:
        """Return ``forward_backward_func`` with the hook around it (idempotent).

        The result takes Megatron's keyword arguments unchanged plus

        - ``loss_masks``: this rank's masks, one ``[b_j, s_j]`` tensor per micro-batch in order, of
          whole sequences (before any context-parallel split; the same on every CP rank);
        - ``packed_seqs`` (optional): per micro-batch ``None`` (one sequence per row) or the
          sequences packed into its one row, as :class:`~megatron_agg.PackedSequences` or
          Megatron's ``PackedSeqParams`` (THD), with whole-row (pre-CP-split) boundaries.

        The original function is ``result.__wrapped__``.
        """
        owner = getattr(forward_backward_func, "__megatron_agg_hook__", None)
        if owner is self:
            return forward_backward_func
        if owner is not None:
            raise ValueError(
                "This forward_backward function is already wrapped by another LossHook; wrap "
                "Megatron's original function (get_forward_backward_func()) instead."
            )
        check_megatron_version()

        @functools.wraps(forward_backward_func)
        def forward_backward(
            *args: Any, loss_masks: Any = _MISSING, packed_seqs: Any = None, **kwargs: Any
        ) -> Any:
            return self._run_step(forward_backward_func, args, kwargs, loss_masks, packed_seqs)

        forward_backward.__megatron_agg_hook__ = self  # type: ignore[attr-defined]
        return forward_backward

    def _run_step(
        self, func: Callable[..., Any], args: tuple, kwargs: dict, loss_masks: Any, packed_seqs: Any
    ) -> Any:
        if self._step is not None:
            raise ValueError(
                "A step of this LossHook is already running; nested or concurrent "
                "forward_backward calls need one LossHook each."
            )
        num_microbatches = kwargs.get("num_microbatches")
        masks = _check_loss_masks(loss_masks, num_microbatches)
        packed = _check_packed_seqs(packed_seqs, masks)
        groups = resolve_groups(
            kwargs.get("pg_collection", None) or self._pg_collection, kwargs.get("grad_finalize_pgs", None)
        )
        averaging = step_averaging(kwargs.get("model"), self.loss_return, num_microbatches, groups)
        step = _Step(self, masks, groups, averaging, packed)
        self._step = step
        try:
            result = func(*args, **kwargs)
            step.finish(bool(kwargs.get("forward_only", False)), bool(kwargs.get("collect_non_loss_data", False)))
        finally:
            self._step = None
        self._last = step.summary()
        return result

    def loss_func(
        self, loss_mask: torch.Tensor, per_token_loss_fn: Optional[PerTokenLossFn] = None
    ) -> Callable[..., tuple]:
        """The ``loss_func`` for ``forward_step`` to return with the model output.

        Args:
            loss_mask: this micro-batch's mask as the output tensor sees it (on a
                context-parallel rank, its slice of the sequence). Its shape is checked at once;
                its content is checked against ``loss_masks`` after the step (``check_masks``).
                The gradients always follow ``loss_masks``.
            per_token_loss_fn: maps the model output to the per-token loss ``[b, s]`` (or to
                ``{term name: [b, s]}`` with several terms), e.g. a policy-gradient loss from
                log-probs. By default the output *is* the per-token loss (``GPTModel`` called
                with ``labels``).

        Megatron calls the result on the last pipeline stage with the output tensor; it returns
        ``(loss, {name: [sum, count]})`` or ``(loss, num_tokens, {...})`` per ``loss_return``.
        Called with ``non_loss_data=True`` it returns the per-token loss(es), detached.
        """

        def megatron_agg_loss_func(output_tensor: torch.Tensor, non_loss_data: bool = False) -> Any:
            per_token = per_token_loss_fn(output_tensor) if per_token_loss_fn is not None else output_tensor
            if non_loss_data:
                if isinstance(per_token, Mapping):
                    return {k: v.detach() for k, v in per_token.items()}
                return per_token.detach()
            step = self._step
            if step is None:
                raise ValueError(
                    "hook.loss_func(...) was evaluated outside a step of this hook; call the "
                    "function returned by hook.wrap(get_forward_backward_func()) with loss_masks=..."
                )
            return step.microbatch_loss(per_token, loss_mask)

        return megatron_agg_loss_func

    # -- reporting ---------------------------------------------------------------------------
    @property
    def last_step(self) -> Optional[StepSummary]:
        """What the last completed step computed (``None`` before the first one)."""
        return self._last

    def global_loss(self) -> Optional[Dict[str, torch.Tensor]]:
        """The exact global loss of the last step: ``{"loss": L, <term>: L_k, ...}``.

        Issues one all-reduce (SUM) over the data×context-parallel group, on demand (for
        logging; not part of the step). Returns ``None`` on ranks off the last pipeline stage,
        which compute no loss. The values are 0-dim tensors on the masks' device (no host sync).
        """
        last = self._last
        if last is None:
            raise ValueError("global_loss() needs a completed step; run the wrapped forward_backward first.")
        if not last.is_last_stage:
            return None
        names = list(last.local_losses)
        values = torch.stack([last.local_losses[n] for n in names])
        group = last.dp_cp_group
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM, group=group)
        return {name: values[i] for i, name in enumerate(names)}


def _start_totals_all_reduce(totals: torch.Tensor, dp_group: Any, async_op: bool = True) -> Any:
    """The hook's one collective per step: SUM of the totals over the pure DP group."""
    return torch.distributed.all_reduce(
        totals, op=torch.distributed.ReduceOp.SUM, group=dp_group, async_op=async_op
    )


def _microbatch_weights(
    term: LossTerm, view: agg.SequenceView, cp_size: int, cp_rank: int, positions: Optional[torch.Tensor]
) -> torch.Tensor:
    """``m·α`` of ``term`` for one micro-batch, computed on whole sequences, then cut to this CP
    rank's layout (so that per-sequence quantities never come from a CP slice)."""
    return to_cp_local(agg.sequence_weights(term, view), cp_size, cp_rank, positions)


def _check_packed_seqs(packed_seqs: Any, masks: List[torch.Tensor]) -> Optional[List[Optional[PackedSequences]]]:
    if packed_seqs is None:
        return None
    if isinstance(packed_seqs, (torch.Tensor, PackedSequences)) or not isinstance(packed_seqs, Sequence):
        raise ValueError(
            "packed_seqs must be a list with one entry per micro-batch (None for an unpacked one), "
            f"got {type(packed_seqs).__name__}."
        )
    if len(packed_seqs) != len(masks):
        raise ValueError(
            f"Got {len(packed_seqs)} packed_seqs for {len(masks)} loss_masks; pass one entry per "
            "micro-batch (None where a micro-batch is not packed)."
        )
    out: List[Optional[PackedSequences]] = []
    for j, (entry, mask) in enumerate(zip(packed_seqs, masks)):
        packed = PackedSequences.coerce(entry, f"packed_seqs[{j}]")
        if packed is not None:
            packed.validate(f"packed_seqs[{j}]")
            if mask.shape[0] != 1:
                raise ValueError(
                    f"packed_seqs[{j}] packs sequences into one row (Megatron's THD layout), but "
                    f"loss_masks[{j}] has {mask.shape[0]} rows; give packed micro-batches as [1, t]."
                )
        out.append(packed)
    return out


def _check_loss_masks(loss_masks: Any, num_microbatches: Any) -> List[torch.Tensor]:
    if loss_masks is _MISSING or loss_masks is None:
        raise ValueError(
            "The wrapped forward_backward function needs loss_masks=[mask_0, ..., mask_{M-1}]: "
            "this rank's loss masks, one per micro-batch, so that megatron_agg can count the "
            "step's totals before the first loss."
        )
    if isinstance(loss_masks, torch.Tensor):
        raise ValueError(
            "loss_masks must be a list with one mask per micro-batch, got a single tensor; "
            "pass list(masks) if they are stacked."
        )
    if not isinstance(num_microbatches, int) or isinstance(num_microbatches, bool) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be a positive int, got {num_microbatches!r}.")
    masks = list(loss_masks)
    if len(masks) != num_microbatches:
        raise ValueError(
            f"Got {len(masks)} loss_masks for num_microbatches={num_microbatches}; pass exactly "
            "one mask per micro-batch, in order."
        )
    for j, mask in enumerate(masks):
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"loss_masks[{j}] must be a [batch, seq] tensor (bool, int or float 0/1), got {shape}."
            )
    return masks
