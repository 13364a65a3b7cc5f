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
    shares.finish()         # the step's checks (already run inside Megatron's finalize_model_grads)

    # in the loss function of micro-batch j (any number of calls, any modes):
    S_j = shares.share(loss_mat, loss_mask, "seq-mean-token-mean") + ...
    return shares.megatron_return(S_j, output)                           # (S_j·F, [nt_j,] output)

Formula (:mod:`megatron_agg.step_math`): ``share(l, m, mode) = Σ_{i,t} m·α_i·l / D`` with
``α_i`` from the sequence itself (``1``, ``1/n_i``, ``1/C_i``) or, for ``prompt-mean``, from its
group's valid tokens over the step (``1/M_g``), and ``D`` from the step totals (``T``, ``N`` or
the non-empty ``N``, 1 for ``token-sum``, ``P`` for ``prompt-mean``), so that the shares of all
micro-batches on all data-parallel ranks add up to the global-batch loss ``L``. Several masks
(``loss_masks={"default": [...], "correct": [...]}``) each get their own totals, chosen per call
with ``share(..., mask_name="correct")``; ``metric(...)`` aggregates a detached per-token metric the
same way and :meth:`StepShares.global_metrics` reports it (one all-reduce, on demand). ``megatron_return`` multiplies by
the factor ``F`` of :func:`megatron_agg.megatron.averaging.loss_multiplier`, which cancels Megatron's
averaging; after ``finalize_model_grads`` the gradients are exactly ``∂L``.

Collectives: one all-reduce (SUM, float64) over the pure data-parallel group per step, of
``[T, N, N_nonempty, (T_k, N⁺_k per further mask), Σ num_tokens, (group counts), agreement
triples...]`` (:mod:`megatron_agg.step_math`), on the last pipeline stage only (started at
construction, awaited by the first ``share``; awaited at once, with one host sync, the first time
a set-up is seen over the data-parallel group (the memory lives with the group:
:meth:`AgreementTracker.of_group <megatron_agg.collective.AgreementTracker.of_group>`), so that disagreeing DP ranks raise before any gradient; the first
time a totals layout — masks, ``num_groups`` — is seen, the ranks' agreement on it is checked in a
small all-reduce of its own first, once); every CP rank does its own identical one, so nothing is
counted once per CP rank.
:meth:`finish` runs the end-of-step check of :mod:`megatron_agg.checks` (NaN/Inf at valid tokens
and at masked positions, mask values, the masks' counts, agreement on the modes used), summed over
every rank of the step so that a failure raises on all of them. It runs by itself inside
Megatron's ``config.finalize_model_grads_func`` of the step (wrapped once per ``StepShares``, on
every rank that builds one), before the gradients are reduced and the optimizer can use them;
an explicit :meth:`finish` afterwards does nothing, and is the check of steps that never reach
finalize (forward-only). Host syncs: none per micro-batch; one in :meth:`finish`. Build a
``StepShares`` on every rank of the step, also off the last stage.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from . import step_math as sm
from .agreement import set_up_fingerprints
from .checks import FrontEndNames, StepChecks, group_ids_expected
from .config import AggConfig, totals_layout
from .collective import AgreementTracker, start_totals
from .groups import ParallelGroups
from .megatron import (LossReturn, check_megatron_version, finalize_owner, model_config, resolve_groups,
                       unwrap_finalize, wrap_finalize)
from .modes import AggMode, AggModeLike
from .scaling import MegatronScaling
from .terms import DEFAULT_MASK_NAME, LossTerm
from .step_math import checked_group_ids
from .validation import (as_bool, as_int, check_share_call, checked_group_options, checked_inputs, checked_num_tokens,
                         mask_names_of)

__all__ = ["StepShares", "TOKEN_SUM"]

#: verl's ``token-sum`` mode (``Σ m·l``, no denominator): now :attr:`AggMode.TOKEN_SUM`, kept as a name.
TOKEN_SUM = AggMode.TOKEN_SUM.value
_NAMES = FrontEndNames(entry="StepShares", loss_call="StepShares.share(...)", masks="loss_masks",
                       mismatch_fix=("build StepShares from the masks the loss function reduces with (e.g. "
                                     "verl's response masks), in micro-batch order: the denominators "
                                     "(valid-token counts) come from them"))
_MISSING_MASKS = "StepShares(loss_masks=[...]) needs this rank's loss masks, one per micro-batch."
def _dense(loss_masks: Any) -> Any:
    """Nested (jagged, one row per sequence) masks as padded ``[b, s]`` ones; the rest unchanged."""
    if isinstance(loss_masks, Mapping):
        return {k: _dense(v) for k, v in loss_masks.items()}
    if isinstance(loss_masks, torch.Tensor) or not isinstance(loss_masks, Sequence):
        return loss_masks  # refused by check_loss_masks
    return [m.to_padded_tensor(0) if getattr(m, "is_nested", False) else m for m in loss_masks]


class StepShares:
    """The step's exact denominators and Megatron factor for self-reducing loss functions.

    Args:
        loss_masks: this rank's masks, one per micro-batch in Megatron's order, each ``[b_j, s_j]``
            (or a nested tensor with one row per sequence), of whole sequences. They define
            the step totals ``T``, ``N`` and ``N_nonempty``. Several masks over the same sequences:
            ``{name: [...]}`` (``share(..., mask_name=name)`` picks one; a list is ``"default"``).
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
            :class:`~megatron_agg.AggConfig` (the same defaults).
        config: an :class:`~megatron_agg.AggConfig` instead of those four options (giving both is an
            error), e.g. the one of the run's ``LossHook``. Its terms do not apply — ``share()``
            names each mode — and a config with ``metrics``, ``num_groups`` or ``group_scope`` is
            refused: pass ``metric()`` calls and ``group_ids``/``num_groups``/``group_scope`` here.
        group_ids, num_groups, group_scope: for ``share(..., "prompt-mean")``: per micro-batch one
            id per sequence (row), numbered as ``group_scope`` says (``"global"`` or ``"per-rank"``,
            see :class:`~megatron_agg.AggConfig`), in ``[0, num_groups)``; ``num_groups`` the same on
            every rank and, with ``"global"``, a constant of the run (it sizes the all-reduce).
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
        async_totals: Optional[bool] = None,
        allow_nonfinite_masked: Optional[bool] = None,
        raise_on_every_rank: Optional[bool] = None,
        agreement: Optional[str] = None,
        group_ids: Optional[Sequence[Any]] = None,
        num_groups: Optional[int] = None,
        group_scope: Optional[str] = None,
        config: Optional[AggConfig] = None,
    ) -> None:
        check_megatron_version()
        # The options every entry point shares (terms are chosen per call here: none fixed).
        self.config = AggConfig.build(
            None if config is not None else "token-mean", config=config, async_totals=async_totals,
            allow_nonfinite_masked=allow_nonfinite_masked, raise_on_every_rank=raise_on_every_rank,
            agreement=agreement)
        if config is not None and (config.metrics or config.num_groups is not None or config.group_scope is not None):
            raise ValueError(
                "StepShares(config=...) takes the config's check and collective options only; this config has "
                f"metrics={dict(config.metrics or {})!r}, num_groups={config.num_groups!r}, "
                f"group_scope={config.group_scope!r}. Report metrics with StepShares.metric(...) and pass "
                "group_ids=, num_groups= and group_scope= to StepShares.")
        loss_masks = _dense(loss_masks)
        mask_names = mask_names_of(loss_masks, _MISSING_MASKS)  # every mask given is counted
        first_input = loss_masks[mask_names[0]] if isinstance(loss_masks, Mapping) else loss_masks
        m = as_int(num_microbatches, "num_microbatches", minimum=1) if num_microbatches is not None else (
            len(first_input) if isinstance(first_input, Sequence) and not isinstance(first_input, torch.Tensor) else 0)
        grouped, num_groups = checked_group_options(group_ids, num_groups, group_scope)
        # Shapes at once; a rank's bad masks of one name or bad group ids are replaced by stand-ins and
        # raised on every rank (collective.start_totals), never on this rank alone.
        named, _, ids, refused = checked_inputs(mask_names, grouped, loss_masks, m, None, group_ids, _MISSING_MASKS)
        masks = named[mask_names[0]]
        self.exclude_fully_masked_seqs = as_bool(exclude_fully_masked_seqs, "exclude_fully_masked_seqs")
        self.groups: ParallelGroups = groups if groups is not None else resolve_groups(pg_collection)
        convention = LossReturn.TWO_TUPLE if loss_return is None else LossReturn.parse(loss_return)
        self.scaling = MegatronScaling.for_step(model, convention, m, self.groups)
        if loss_return is None and self.scaling.calculate_per_token_loss:  # the default follows the config
            self.scaling = MegatronScaling.for_step(model, LossReturn.THREE_TUPLE, m, self.groups)
        self.averaging = self.scaling.averaging
        self._finished = False
        self._finalize: Any = None  # (config, original) while the wrapper is installed
        self.num_microbatches = m
        self.is_last_stage = self.groups.is_last_pipeline_stage
        self.collectives = 0
        self._next = 0
        self._work: Any = None
        self._ready = False
        self._view: Any = None  # (micro-batch, mask, SequenceView) of the last share() call
        self._used: Dict[str, LossTerm] = {}  # the modes share() was called with (agreement check)
        self._metrics: Dict[str, List[torch.Tensor]] = {}  # detached metric shares, by name
        self.mask_names = tuple(mask_names)
        self._prompt_groups = (num_groups, group_scope) if grouped else None
        # Modes are chosen per call: with group ids every mask may carry prompt-mean. Extra: Σ num_tokens.
        self.layout = totals_layout(self.mask_names, self.mask_names if grouped else (), num_groups, group_scope,
                                    extra=1)
        device = masks[0].device
        self._device = device
        self.checks = StepChecks(_NAMES, self.config.allow_nonfinite_masked)
        views_by_mask = {k: [sm.sequence_view(mask) for mask in named[k]] for k in self.mask_names}
        views = views_by_mask[self.mask_names[0]]
        self._counts = {k: [view.counts for view in v] for k, v in views_by_mask.items()}
        self._group_ids: Optional[List[torch.Tensor]] = None
        self._dens: Optional[sm.Denominators] = None
        nt = torch.stack([view.counts.sum() for view in views]) if num_tokens is None else checked_num_tokens(
            num_tokens, m, device)
        self._num_tokens = sm.cp_integer_part(nt, self.groups.cp_size, self.groups.cp_rank).to(torch.int)
        if not self.scaling.calculate_per_token_loss:
            self._num_tokens = torch.clamp(self._num_tokens, min=1)
        self._num_tokens_list = self._num_tokens.unbind()
        if not self.is_last_stage:
            self.totals = None
            self.checks.inputs = None if refused is None else str(refused)  # raised at the step's end
            self._install_finalize(model)
            return  # no loss is computed here: no totals, no collective (finish() still checks)
        for name in self.mask_names:
            for j, mask in enumerate(named[name]):
                label = f"loss_masks[{j}]" if len(self.mask_names) == 1 else f"loss_masks[{name!r}][{j}]"
                self.checks.record_mask(label, mask)
        ids_all = None
        if grouped:
            assert ids is not None
            ids_all, bad = checked_group_ids(torch.cat(ids), num_groups)
            self.checks.group_ids.append(("group_ids", bad))
            self.checks.group_ids_expected = group_ids_expected(num_groups, group_scope)
            self._group_ids = list(ids_all.split([mask.shape[0] for mask in masks]))
        prints = set_up_fingerprints(None, self.scaling, prompt_groups=self._prompt_groups, masks=self.mask_names)
        local = sm.count_totals(self.layout, views_by_mask, ids_all, device, extra=[nt.sum()])
        self._local_group_tokens = local.group_tokens
        start = start_totals(self.groups, self.layout, local.vector, prints, _NAMES.entry,
                             tracker=AgreementTracker.of_group(self.groups.dp, self.config.agreement),
                             key=("dp", id(self.groups.dp)), async_ok=self.config.async_totals, refused=refused,
                             where="checked when the step's StepShares was built")
        self.collectives += start.collectives
        self._work = start.work
        self.totals = start.reduced if start.reduced is not None else local.vector
        if start.deferred is not None:
            self.checks.inputs = start.deferred
        self._install_finalize(model)  # last: a StepShares that raised while built leaves no wrapper

    # -- per micro-batch ---------------------------------------------------------------------
    def _wait(self) -> None:
        if not self._ready:
            if self._work is not None:  # None as well when the all-reduce ran synchronously
                self._work.wait()
            self._work = None
            self._ready = True
            assert self.totals is not None
            self._dens = sm.denominators({}, self.layout, self.totals[: self.layout.size], self._local_group_tokens)
            self._multiplier = self.scaling.multipliers(self._num_tokens, self._dens.totals.extra(0))

    def share(
        self,
        loss_mat: torch.Tensor,
        loss_mask: torch.Tensor,
        mode: Union[AggModeLike, str],
        *,
        loss_scale_factor: Optional[float] = None,
        exclude_fully_masked_seqs: Optional[bool] = None,
        mask_name: str = DEFAULT_MASK_NAME,
    ) -> torch.Tensor:
        """This micro-batch's exact share of the global-batch loss of ``mode``.

        ``Σ_{i,t} m·α_i·l / D`` over the whole sequences of ``loss_mat``/``loss_mask`` (``[b, s]``,
        one row per sequence, in the order of this micro-batch's ``loss_masks`` entry), a 0-dim
        tensor. ``mode`` is an :class:`AggMode` value (``"token-sum"``: ``D = 1``; ``"prompt-mean"``
        needs ``group_ids``). ``mask_name`` names the mask of ``loss_masks`` whose totals apply
        (``loss_mask`` is this micro-batch's mask of that name). The token-level modes also take a
        flattened ``[1, t]`` view. The rows' valid-token counts are checked against ``loss_masks`` in
        :meth:`finish` (no host sync here), and so is the finiteness of ``loss_mat`` (at valid
        tokens, and at masked positions unless ``allow_nonfinite_masked``).
        """
        term, key, index, view = self._prepare(loss_mat, loss_mask, mode, loss_scale_factor,
                                               exclude_fully_masked_seqs, mask_name, "share")
        self._used.setdefault(key, term)
        result = self._weighted_share(loss_mat, term, view, index)
        self.checks.record_loss(index, key, result, loss_mat)
        return result

    def metric(self, name: str, values: torch.Tensor, loss_mask: torch.Tensor, mode: Union[AggModeLike, str],
               *, loss_scale_factor: Optional[float] = None, exclude_fully_masked_seqs: Optional[bool] = None,
               mask_name: str = DEFAULT_MASK_NAME) -> torch.Tensor:
        """Aggregate a detached per-token metric (entropy, clip fraction, KL, ...) of this micro-batch
        exactly like :meth:`share` would a loss of ``mode``; returns its share (detached). The
        shares of every call with ``name`` add up over micro-batches and ranks to the metric of the
        global batch, read by :meth:`global_metrics` after the step. No collective, no host sync."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric() needs a name (a non-empty str), got {name!r}.")
        with torch.no_grad():
            term, key, index, view = self._prepare(values, loss_mask, mode, loss_scale_factor,
                                                   exclude_fully_masked_seqs, mask_name, "metric")
            result = self._weighted_share(values.detach(), term, view, index)
        self._metrics.setdefault(name, []).append(result)
        return result

    def global_metrics(self) -> Dict[str, torch.Tensor]:
        """``{name: value}`` of every :meth:`metric` of the step, exact over the global batch: one
        all-reduce (SUM) over the data×context-parallel group, on demand (for logging; call it on
        every rank of the last pipeline stage, after the step). 0-dim tensors, no host sync."""
        names = sorted(self._metrics)
        if not names:
            return {}
        values = torch.stack([torch.stack(self._metrics[n]).sum() for n in names]).to(torch.float64)
        self.groups.sum_over_dp_cp(values)
        return {n: values[i] for i, n in enumerate(names)}

    def _prepare(self, loss_mat: Any, loss_mask: Any, mode: Any, loss_scale_factor: Optional[float],
                 exclude_fully_masked_seqs: Optional[bool], mask_name: str, call: str) -> tuple:
        """Checks shared by :meth:`share` and :meth:`metric`: ``(term, key, micro-batch, view)``."""
        if not self.is_last_stage:
            raise ValueError(f"StepShares.{call} is for the last pipeline stage, where Megatron computes losses.")
        index = self._next
        if index >= self.num_microbatches:
            raise ValueError(
                f"StepShares.{call} was called for micro-batch {index}, but the step has "
                f"{self.num_microbatches}; call megatron_return once per micro-batch."
            )
        check_share_call(call, loss_mat, loss_mask, self._device, mask_name, self.mask_names)
        agg_mode = AggMode.parse(mode)
        if agg_mode.needs_groups and self._group_ids is None:
            raise ValueError(
                f"{call}(..., 'prompt-mean') needs StepShares(..., group_ids=[...], num_groups=G, group_scope=...): "
                "each sequence's group, counted over the step before the first share."
            )
        exclude = self.exclude_fully_masked_seqs if exclude_fully_masked_seqs is None else as_bool(
            exclude_fully_masked_seqs, "exclude_fully_masked_seqs")
        norm = agg_mode is AggMode.SEQ_MEAN_TOKEN_SUM_NORM
        term = LossTerm(agg_mode, exclude_fully_masked_seqs=exclude,
                        loss_scale_factor=loss_scale_factor if norm else None, mask=mask_name)
        if agg_mode is AggMode.TOKEN_SUM:
            key = TOKEN_SUM if mask_name == DEFAULT_MASK_NAME else f"{TOKEN_SUM}|{mask_name}"
        else:
            key = f"{agg_mode.value}|{term.exclude_fully_masked_seqs}|{term.loss_scale_factor}"
            key += "" if mask_name == DEFAULT_MASK_NAME else f"|{mask_name}"
        expected = self._counts[mask_name][index]
        cached = self._view
        if cached is not None and cached[:3] == (index, mask_name, id(loss_mask)) and cached[3] is loss_mask:
            view = cached[4]  # the same mask again (verl: policy loss, entropy, KL): viewed and checked once
        else:
            view = sm.sequence_view(loss_mask)
            if view.num_seqs == expected.numel():
                self.checks.mismatch.append((index, (view.counts != expected.to(view.counts.device)).sum()))
            else:  # a flattened view: only the token total can be compared
                self.checks.mismatch.append((index, (view.counts.sum() != expected.sum()).to(torch.int64)))
            self._view = (index, mask_name, id(loss_mask), loss_mask, view)
        token_level = agg_mode in (AggMode.TOKEN_MEAN, AggMode.TOKEN_SUM)
        if not token_level and view.num_seqs != expected.numel():
            raise ValueError(
                f"Micro-batch {index}: mode {agg_mode.value!r} needs one row per sequence "
                f"({expected.numel()} rows, as in loss_masks), got {view.num_seqs}."
            )
        return term, key, index, view

    def _weighted_share(self, values: torch.Tensor, term: LossTerm, view: sm.SequenceView, index: int) -> torch.Tensor:
        self._wait()
        assert self._dens is not None
        group_ids = self._group_ids[index] if self._group_ids is not None else None
        return sm.share_of_view(values, term, view, self._dens, group_ids)

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
    def _install_finalize(self, model: Any) -> None:
        """Run :meth:`finish` inside Megatron's ``config.finalize_model_grads_func`` of this step
        (once, then the original is put back), before Megatron reduces the gradients, so that the
        step's checks never depend on the caller calling :meth:`finish` (which puts the original
        back too). A wrapper left by an earlier ``StepShares`` whose step never reached finalize
        (forward-only, or raised) is dropped. Without a ``finalize_model_grads_func`` (then nothing
        reduces the gradients either), :meth:`finish` is the check."""
        try:
            config = model_config(model)
        except (ValueError, RuntimeError, AttributeError, TypeError):
            return  # not Megatron chunks: finish() is the check
        while isinstance(finalize_owner(getattr(config, "finalize_model_grads_func", None)), StepShares):
            config.finalize_model_grads_func = config.finalize_model_grads_func.__wrapped__  # a stale one-shot wrapper
        original = wrap_finalize(config, lambda model: self.finish(), owner=self)
        self._finalize = None if original is None else (config, original)

    def finish(self) -> None:
        """Check the step (one host sync, on every rank of the step): every micro-batch returned
        once, the masks given to :meth:`share` had the valid-token counts of ``loss_masks``, mask
        values are 0/1, every share is finite (and every ``loss_mat`` at masked positions), and the
        ranks used the same modes. Raises ``ValueError`` / ``NonFiniteLossError`` on every rank.

        Runs by itself inside Megatron's ``finalize_model_grads_func`` (see
        :meth:`_install_finalize`); calling it again afterwards does nothing."""
        if self._finished:
            return
        self._finished = True
        if self._finalize is not None:  # checked here: finalize need not check again
            unwrap_finalize(self._finalize[0], self, self._finalize[1])
        if self.is_last_stage:
            if self._next != self.num_microbatches:
                self.checks.evaluations = (
                    f"megatron_return was called for {self._next} of {self.num_microbatches} micro-batches."
                )
            self.checks.fingerprints = set_up_fingerprints(self._used, self.scaling, prompt_groups=self._prompt_groups,
                                                           masks=self.mask_names)
            if self._work is not None or not self._ready:
                self._wait()
        else:  # no say: this stage computes no loss
            self.checks.fingerprints = set_up_fingerprints(None, self.scaling)
        self.collectives += self.checks.finish(self.groups, self.config.raise_on_every_rank, self._device)
