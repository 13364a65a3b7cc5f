"""``StepShares``: exact scaling for loss functions that reduce per-token losses themselves.

:class:`~megatron_agg.LossHook` owns the reduction: the loss function hands it per-token losses
and the terms are fixed when the hook is built. Some trainers reduce inside their own loss
functions instead, choosing the mode at call time (verl's ``core_algos.agg_loss``: a policy
loss, an entropy bonus and a KL penalty, each reduced by its own call), and see *whole*
sequences on every rank (under context parallelism they gather the model's outputs over the CP
group first, the gather's backward keeping this rank's slice, as verl's
``postprocess_packed_seqs`` does). ``StepShares`` gives such a loss function the step's global
denominators and turns its result into what Megatron's ``loss_func`` must return::

    shares = StepShares(loss_masks, model=model, num_microbatches=M)     # one all-reduce (async)
    losses = forward_backward_func(..., forward_step_func=forward_step, ...)
    shares.finish()                                                      # the step's checks

    # in the loss function of micro-batch j (any number of calls, any modes):
    S_j = shares.share(loss_mat, loss_mask, "seq-mean-token-mean") + ...
    return shares.megatron_return(S_j, output)                           # (S_j·F, [nt_j,] output)

Formula (:mod:`megatron_agg.aggregation`): ``share(l, m, mode) = Σ_{i,t} m·α_i·l / D`` with
``α_i`` from the sequence itself (``1``, ``1/n_i``, ``1/C_i``) and ``D`` from the step totals
(``T``, ``N`` or the non-empty ``N``), so that the shares of all micro-batches on all
data-parallel ranks add up to the global-batch loss ``L``. ``megatron_return`` multiplies by
the factor ``F`` of :func:`megatron_agg.averaging.loss_multiplier`, which cancels Megatron's
averaging; after ``finalize_model_grads`` the gradients are exactly ``∂L``.

Collectives: one all-reduce (SUM, float64) over the pure data-parallel group per step, of
``[T, N, N_nonempty, Σ num_tokens, agreement triples...]``, on the last pipeline stage only
(started at construction, awaited by the first ``share``; awaited at once, with one host sync, the
first time a set-up is seen in the process, so that disagreeing DP ranks raise before any
gradient); every CP rank does its own identical one, so nothing is counted once per CP rank.
:meth:`finish` runs the end-of-step check of :mod:`megatron_agg.checks` (NaN/Inf at valid tokens
and at masked positions, mask values, the masks' counts, agreement on the modes used), summed over
every rank of the step so that a failure raises on all of them. Host syncs: none per
micro-batch; one in :meth:`finish`. Call :meth:`finish` on every rank, also off the last stage.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch

from . import aggregation as agg
from .averaging import LossReturn
from .checks import FrontEndNames, StepChecks
from .config import AggConfig
from .engine import AgreementTracker, raise_if_disagree, set_up_fingerprints
from .agreement import agreement_block
from .groups import ParallelGroups
from .integration import check_megatron_version, resolve_groups
from .modes import AggMode, AggModeLike
from .scaling import MegatronScaling
from .terms import LossTerm
from .validation import as_bool, as_int, check_loss_masks, mask_value_problems

__all__ = ["StepShares", "TOKEN_SUM"]

#: verl's ``token-sum`` mode (``Σ m·l``, no denominator), accepted by :meth:`StepShares.share`
#: besides the :class:`~megatron_agg.AggMode` values.
TOKEN_SUM = "token-sum"
_NAMES = FrontEndNames(entry="StepShares", loss_call="StepShares.share(...)", masks="loss_masks",
                       mismatch_fix=("build StepShares from the masks the loss function reduces with (e.g. "
                                     "verl's response masks), in micro-batch order: the denominators "
                                     "(valid-token counts) come from them"))
_MISSING_MASKS = "StepShares(loss_masks=[...]) needs this rank's loss masks, one per micro-batch."
#: Set-ups whose DP agreement was checked synchronously in this process (first step / changes).
_TRACKER = AgreementTracker()


def _dense(loss_masks: Any) -> Any:
    """Nested (jagged, one row per sequence) masks as padded ``[b, s]`` ones; the rest unchanged."""
    if isinstance(loss_masks, torch.Tensor) or not isinstance(loss_masks, Sequence):
        return loss_masks  # refused by check_loss_masks
    return [m.to_padded_tensor(0) if getattr(m, "is_nested", False) else m for m in loss_masks]


class StepShares:
    """The step's exact denominators and Megatron factor for self-reducing loss functions.

    Args:
        loss_masks: this rank's masks, one per micro-batch in Megatron's order, each ``[b_j, s_j]``
            (or a nested tensor with one row per sequence), of whole sequences. They define
            the step totals ``T``, ``N`` and ``N_nonempty``.
        model: the model chunks handed to ``forward_backward_func`` (Megatron's DDP-wrapped
            modules); read for ``calculate_per_token_loss`` and the DDP settings.
        num_microbatches: ``M``, this rank's number of micro-batches (default ``len(loss_masks)``).
        loss_return: ``"2-tuple"`` or ``"3-tuple"``, the ``loss_func`` convention the caller
            returns with (``megatron_return`` builds it). Default: ``"3-tuple"`` when the model
            config has ``calculate_per_token_loss``, else ``"2-tuple"``.
        num_tokens: per micro-batch, the token count that Megatron's ``calculate_per_token_loss``
            path divides the summed gradients by (``Σ`` over micro-batches and DP×CP ranks). By
            default the micro-batch's valid tokens; verl passes the tokens fed to the MoE router,
            whose auxiliary loss Megatron pre-multiplies by that count. Each CP rank returns an
            exact integer part of it, so that the parts add up over the CP group.
        exclude_fully_masked_seqs: the default of :meth:`share` (``N`` counts only sequences with
            a valid token). Default ``False``, as at every entry point.
        pg_collection: Megatron's ``ProcessGroupCollection`` to take the groups from (default:
            ``parallel_state``).
        groups: a :class:`~megatron_agg.groups.ParallelGroups` instead of Megatron's.
        async_totals, allow_nonfinite_masked, raise_on_every_rank, agreement: as for
            :class:`~megatron_agg.AggConfig`.
    """

    def __init__(
        self,
        loss_masks: Sequence[torch.Tensor],
        *,
        model: Any,
        num_microbatches: Optional[int] = None,
        loss_return: Optional[Union[LossReturn, str]] = None,
        num_tokens: Optional[Sequence[Any]] = None,
        exclude_fully_masked_seqs: bool = False,
        pg_collection: Any = None,
        groups: Optional[ParallelGroups] = None,
        async_totals: bool = True,
        allow_nonfinite_masked: bool = False,
        raise_on_every_rank: bool = True,
        agreement: str = "on-change",
    ) -> None:
        check_megatron_version()
        loss_masks = _dense(loss_masks)
        m = as_int(num_microbatches, "num_microbatches", minimum=1) if num_microbatches is not None else (
            len(loss_masks) if isinstance(loss_masks, Sequence) else 0)
        masks = check_loss_masks(loss_masks, m, missing_hint=_MISSING_MASKS)
        self.exclude_fully_masked_seqs = as_bool(exclude_fully_masked_seqs, "exclude_fully_masked_seqs")
        # The options every entry point shares (terms are chosen per call here: none fixed).
        self.config = AggConfig({"loss": LossTerm("token-mean")}, async_totals=async_totals,
                                allow_nonfinite_masked=allow_nonfinite_masked,
                                raise_on_every_rank=raise_on_every_rank, agreement=agreement)
        self.groups: ParallelGroups = groups if groups is not None else resolve_groups(pg_collection)
        convention = LossReturn.TWO_TUPLE if loss_return is None else LossReturn.parse(loss_return)
        self.scaling = MegatronScaling.for_step(model, convention, m, self.groups)
        if loss_return is None and self.scaling.calculate_per_token_loss:  # the default follows the config
            self.scaling = MegatronScaling.for_step(model, LossReturn.THREE_TUPLE, m, self.groups)
        self.averaging = self.scaling.averaging
        self.num_microbatches = m
        self.is_last_stage = self.groups.is_last_pipeline_stage
        self.collectives = 0
        self._next = 0
        self._work: Any = None
        self._ready = False
        self._view: Any = None  # (micro-batch, mask, SequenceView) of the last share() call
        self._used: Dict[str, LossTerm] = {}  # the modes share() was called with (agreement check)
        device = masks[0].device
        self._device = device
        self.checks = StepChecks(_NAMES, self.config.allow_nonfinite_masked)
        views = [agg.sequence_view(mask) for mask in masks]
        self._counts = [view.counts for view in views]
        if num_tokens is None:
            nt = torch.stack([view.counts.sum() for view in views])
        else:
            if isinstance(num_tokens, torch.Tensor) and num_tokens.dim() != 1 or len(num_tokens) != m:
                raise ValueError(f"Got {len(num_tokens)} num_tokens for {m} micro-batches; pass one per micro-batch.")
            nt = torch.stack([torch.as_tensor(n, device=device).to(torch.float64).reshape(()) for n in num_tokens])
        # This CP rank's exact integer part of each micro-batch's num_tokens (parts add up over CP).
        cp, r = self.groups.cp_size, self.groups.cp_rank
        nt_int = nt.round().to(torch.int64)
        self._num_tokens = (nt_int * (r + 1) // cp - nt_int * r // cp).to(torch.int)
        if not self.scaling.calculate_per_token_loss:
            self._num_tokens = torch.clamp(self._num_tokens, min=1)
        self._num_tokens_list = self._num_tokens.unbind()
        if not self.is_last_stage:
            self.totals = None
            return  # no loss is computed here: no totals, no collective (finish() still checks)
        for j, mask in enumerate(masks):
            self.checks.mask_values.append((f"loss_masks[{j}]", mask_value_problems(mask)))
        prints = set_up_fingerprints(None, self.scaling)
        totals = torch.cat([agg.local_totals(views, device), nt.sum().reshape(1)])
        self.totals = torch.cat([totals, agreement_block(prints, device)])
        sync = _TRACKER.needs_sync(("dp", id(self.groups.dp)), prints)
        if self.groups.dp_size > 1:
            self._work = self.groups.sum_over_dp(self.totals, async_op=async_totals and not sync)
            self.collectives += 1
            if sync:
                self._wait()
                raise_if_disagree(self.totals[len(agg.TOTALS_FIELDS) + 1:], _NAMES,
                                  "checked when the step's StepShares was built")
        _TRACKER.verified(("dp", id(self.groups.dp)), prints)

    # -- per micro-batch ---------------------------------------------------------------------
    def _wait(self) -> None:
        if not self._ready:
            if self._work is not None:  # None as well when the all-reduce ran synchronously
                self._work.wait()
            self._work = None
            self._ready = True
            assert self.totals is not None
            self._multiplier = self.scaling.multipliers(self._num_tokens, self.totals[3])

    def share(
        self,
        loss_mat: torch.Tensor,
        loss_mask: torch.Tensor,
        mode: Union[AggModeLike, str],
        *,
        loss_scale_factor: Optional[float] = None,
        exclude_fully_masked_seqs: Optional[bool] = None,
    ) -> torch.Tensor:
        """This micro-batch's exact share of the global-batch loss of ``mode``.

        ``Σ_{i,t} m·α_i·l / D`` over the whole sequences of ``loss_mat``/``loss_mask`` (``[b, s]``,
        one row per sequence, in the order of this micro-batch's ``loss_masks`` entry), a 0-dim
        tensor. ``mode`` is an :class:`AggMode` value or ``"token-sum"`` (``D = 1``). The token-level
        modes also take a flattened ``[1, t]`` view. The rows' valid-token counts are checked
        against ``loss_masks`` in :meth:`finish` (no host sync here), and so is the finiteness of
        ``loss_mat`` (at valid tokens, and at masked positions unless ``allow_nonfinite_masked``).
        """
        if not self.is_last_stage:
            raise ValueError("StepShares.share is for the last pipeline stage, where Megatron computes losses.")
        index = self._next
        if index >= self.num_microbatches:
            raise ValueError(
                f"StepShares.share was called for micro-batch {index}, but the step has "
                f"{self.num_microbatches}; call megatron_return once per micro-batch."
            )
        if not isinstance(loss_mat, torch.Tensor) or not isinstance(loss_mask, torch.Tensor):
            raise ValueError("share() needs tensors: share(loss_mat, loss_mask, mode).")
        if loss_mat.shape != loss_mask.shape:
            raise ValueError(
                f"share() needs one loss per token: loss_mat has shape {tuple(loss_mat.shape)}, "
                f"loss_mask {tuple(loss_mask.shape)}."
            )
        if loss_mask.dim() != 2:
            raise ValueError(f"share() needs [batch, seq] tensors, got shape {tuple(loss_mask.shape)}.")
        token_sum = isinstance(mode, str) and mode == TOKEN_SUM
        term = None
        if not token_sum:
            try:
                agg_mode = AggMode.parse(mode)
            except ValueError as err:
                raise ValueError(f"{err} StepShares.share also accepts {TOKEN_SUM!r}.") from None
            exclude = self.exclude_fully_masked_seqs if exclude_fully_masked_seqs is None else as_bool(
                exclude_fully_masked_seqs, "exclude_fully_masked_seqs")
            norm = agg_mode is AggMode.SEQ_MEAN_TOKEN_SUM_NORM
            term = LossTerm(agg_mode, exclude_fully_masked_seqs=exclude,
                            loss_scale_factor=loss_scale_factor if norm else None)
        key = TOKEN_SUM if term is None else f"{term.agg_mode.value}|{term.exclude_fully_masked_seqs}|{term.loss_scale_factor}"
        self._used.setdefault(key, term if term is not None else LossTerm("token-mean", weight=0.0))
        expected = self._counts[index]
        cached = self._view
        if cached is not None and cached[0] == index and cached[1] is loss_mask:
            view = cached[2]  # the same mask again (verl: policy loss, entropy, KL): viewed and checked once
        else:
            view = agg.sequence_view(loss_mask)
            if view.num_seqs == expected.numel():
                self.checks.mismatch.append((index, (view.counts != expected.to(view.counts.device)).sum()))
            else:  # a flattened view: only the token total can be compared
                self.checks.mismatch.append((index, (view.counts.sum() != expected.sum()).to(torch.int64)))
            self._view = (index, loss_mask, view)
        if term is not None and term.agg_mode is not AggMode.TOKEN_MEAN and view.num_seqs != expected.numel():
            raise ValueError(
                f"Micro-batch {index}: mode {term.agg_mode.value!r} needs one row per sequence "
                f"({expected.numel()} rows, as in loss_masks), got {view.num_seqs}."
            )
        self._wait()
        if token_sum:
            result = agg.masked_weighted_sum(loss_mat, view.valid, view.valid.to(torch.float32))
        else:
            assert term is not None and self.totals is not None
            weights = agg.sequence_weights(term, view)
            scale = agg.safe_reciprocal(agg.denominator(term, self.totals)).to(torch.float32)
            result = agg.masked_weighted_sum(loss_mat, view.valid, weights) * scale
        self.checks.record_loss(index, key, result, loss_mat)
        return result

    def megatron_return(self, share: torch.Tensor, *extra: Any) -> tuple:
        """What ``loss_func`` returns for the next micro-batch: ``(share·F, *extra)`` for the 2-tuple
        convention, ``(share·F, num_tokens, *extra)`` for the 3-tuple one."""
        index = self._next
        if index >= self.num_microbatches:
            raise ValueError(
                f"megatron_return was called {index + 1} times in a step of {self.num_microbatches} "
                "micro-batches; it must be called once per micro-batch."
            )
        self._next += 1
        self._wait()
        loss = share * self._multiplier[index] if self._multiplier.dim() else share * self._multiplier
        if self.averaging.loss_return is LossReturn.TWO_TUPLE:
            return (loss, *extra)
        return (loss, self._num_tokens_list[index], *extra)

    # -- after the step ----------------------------------------------------------------------
    def finish(self) -> None:
        """Check the step (one host sync, on every rank of the step): every micro-batch returned
        once, the masks given to :meth:`share` had the valid-token counts of ``loss_masks``, mask
        values are 0/1, every share is finite (and every ``loss_mat`` at masked positions), and the
        ranks used the same modes. Raises ``ValueError`` / ``NonFiniteLossError`` on every rank."""
        if self.is_last_stage:
            if self._next != self.num_microbatches:
                self.checks.evaluations = (
                    f"megatron_return was called for {self._next} of {self.num_microbatches} micro-batches."
                )
            self.checks.fingerprints = set_up_fingerprints(self._used, self.scaling)
            if self._work is not None or not self._ready:
                self._wait()
        else:
            self.checks.fingerprints = set_up_fingerprints(None, self.scaling)
        self.collectives += self.checks.finish(self.groups, self.config.raise_on_every_rank, self._device)
