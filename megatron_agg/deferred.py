"""The deferred mode: exact aggregation for data streamed inside ``forward_step``, with zero
collectives of the hook's own.

Megatron-LM's ``pretrain_gpt.py`` reads each micro-batch inside ``forward_step`` (TP rank 0
reads, then broadcasts), so the masks of a step are not known before ``forward_backward_func``
runs and :meth:`LossHook.wrap` cannot count the step's totals up front. For a loss with a single
denominator Megatron already carries one to the end of the step: with
``calculate_per_token_loss=True`` the 3-tuple's ``num_tokens`` are summed over micro-batches,
broadcast over PP, all-reduced over DP×CP inside ``finalize_model_grads``, and the gradients
(summed by DDP) are divided by that sum. :class:`DeferredLossHook` returns, per micro-batch,

- the loss ``Σ_k w_k Σ_{i,t} m·α_{k,i}·l_k`` (the numerator of every term: α as in
  :mod:`megatron_agg.step_math`), and
- ``num_tokens`` = this micro-batch's part of the denominator ``D``: its valid tokens on this CP
  slice (``token-mean``: Σ over DP×CP is ``T``), or its sequences (``seq-mean-*``: ``N``, or the
  non-empty ones with ``exclude_fully_masked_seqs``), counted on CP rank 0 only so that each
  sequence is counted once, not once per CP rank; for ``token-sum`` (``D = 1``) 1 on the first
  micro-batch of the step on data×context-parallel rank 0 and 0 everywhere else, so that
  ``Σ num_tokens = 1`` and Megatron divides by 1. (Were that first micro-batch missed — an
  evaluation step that never reached ``finalize_model_grads`` — the sum would be 0, which every
  supported release also leaves undivided: skipped up to 0.17, ``max(Σ, 1)`` from 0.18.)

so that Megatron's own division lands exactly on ``L = numerator / D``. Its reports
``{name: [numerator, num_tokens]}`` give ``L`` under Megatron-LM's sum/count logging, and so do
those of the metrics (``metrics={name: mode}``: ``{name: [Σ m·α·v, its denominator's part]}``, each
metric with a denominator of its own, exact over the step in Megatron-LM's logging reduction; no
collective of the hook's).

When a step needs the prepared mode instead — the constructor raises and says so:

- several terms with *different* denominators (e.g. a ``token-mean`` policy loss plus a
  ``seq-mean-token-mean`` KL term, or the same mode with and without
  ``exclude_fully_masked_seqs``): one ``num_tokens`` channel carries one denominator;
- ``prompt-mean`` (term or metric): its weights ``1/M_g`` need every group's valid tokens over the
  whole step *before* the first backward pass, which only a collective can give;
- terms or metrics on masks of their own (``LossTerm(mask=...)``): the ``loss_func`` of a
  micro-batch gets one mask, and a term over another mask would divide by another count.

Per-sequence token counts ``n_i`` (``seq-mean-token-mean``, ``exclude_fully_masked_seqs``) need
whole sequences: with context parallelism pass ``sequence_token_counts`` computed before the CP
split (:meth:`DeferredLossHook.sequence_token_counts`).

Dynamic (hybrid) context parallelism (``hybrid_context_parallel`` and its later names,
:data:`~megatron_agg.megatron.model_setup.DYNAMIC_CP_SWITCHES`): Megatron runs each sample on a partner group of
its own CP size, chosen by its schedule. ``token-mean`` and ``token-sum`` stay exact — a rank's
numerator and valid-token count cover the tokens it holds, whatever the cut — and are what the hook
does there (the packing and whole-sequence counts a caller passes are not read as a fixed-CP slice);
``seq-mean-*`` terms and metrics would need each sequence counted on one rank of its group, which
only the schedule knows: refused at :meth:`DeferredLossHook.install`.

Evaluation (Megatron-LM's ``evaluate()``: ``forward_only=True`` under ``torch.no_grad()``, no
finalize): a micro-batch whose loss is computed with gradients off is kept apart from the training
step — it does not advance the step's micro-batch count (``token-sum``'s 1 still rides on the next
training step's first micro-batch) and its findings are not the step's checks (no gradient comes
from it). Its ``[numerator, count]`` reports give the evaluation loss of the mode over the pass
(``token-sum``: the sum over the pass, the 1 on its first micro-batch).

Guarantees (the same engine checks as the other entry points, :mod:`megatron_agg.checks`):

- **before the first gradient**: :meth:`DeferredLossHook.install` (called by you, or by the first
  ``loss_func(..., model=model)``) refuses a Megatron config without
  ``calculate_per_token_loss=True`` or without ``finalize_model_grads_func`` — Megatron would
  divide each micro-batch by its own ``num_tokens`` and the result would be silently wrong — or
  a ``seq-mean-*`` term with a model that adds token-scaled losses of its own (MoE load-balancing
  loss or z-loss, MTP: :func:`~megatron_agg.megatron.model_setup.token_scaled_auxiliary_losses`; Megatron
  scales them for a division by tokens, this mode's ``num_tokens`` carries sequences) — and
  checks synchronously (one all-reduce over the data-parallel group, one host sync, once) that
  every DP rank built the same hook;
- **every step**: ``install`` wraps ``config.finalize_model_grads_func`` (Megatron's own extension
  point; :meth:`uninstall` puts it back) so that, before Megatron reduces and divides the
  gradients, the step's checks run — NaN/Inf at valid tokens and at masked positions, mask values
  other than 0/1, packing boundaries, ``sequence_token_counts`` that do not fit the micro-batch,
  and agreement of the set-up — summed over the data×context- and tensor-parallel ranks of the
  loss-computing stage (two small all-reduces, one host sync) and raised on all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from . import step_math as sm
from .agreement import agreement_block, set_up_fingerprints
from .checks import FrontEndNames, StepChecks
from .config import AggConfig
from .collective import raise_if_disagree
from .groups import group_rank
from .megatron import (LossReturn, check_megatron_version, checked_cp_layout, dynamic_cp_switches, finalize_owner,
                       model_config, resolve_groups, unwrap_finalize, wrap_finalize)
from .megatron import deferred_rules as rules
from .modes import AggMode, AggModeLike
from .packing import PackedSequences
from .scaling import Scaling
from .terms import (DEFAULT_TERM_NAME, LossTerm, PerTokenLossFn, detached_losses,
                    per_token_losses, split_term_losses)
from .validation import check_per_token_values, check_sequence_counts, coerce_packed

__all__ = ["DeferredLossHook"]

_NAMES = FrontEndNames(entry="DeferredLossHook", loss_call="hook.loss_func(...)", masks="loss_mask")


class _ChannelScaling(Scaling):
    """The deferred mode's scaling: the numerator as is, the denominator through Megatron's
    ``calculate_per_token_loss`` division (for the agreement fingerprints)."""

    def __init__(self, per_token: bool) -> None:
        self.loss_return = LossReturn.THREE_TUPLE
        self.calculate_per_token_loss = per_token


class DeferredLossHook:
    """Exact loss aggregation through Megatron's ``num_tokens`` channel (no collective per micro-batch).

    Args:
        mode, exclude_fully_masked_seqs, loss_scale_factor, terms, config and the check options:
            as for :class:`~megatron_agg.LossHook`; every term must share one denominator, and none
            may be ``prompt-mean`` or name a mask of its own.
        metrics: ``{name: LossTerm or mode}`` (not ``prompt-mean``, default mask only): reported as
            ``[sum, count]`` pairs whose sums over the step give each metric exactly.
        pg_collection: where to read the groups from (default ``parallel_state``).
        cp_layout: how the data loader cut each row over the context-parallel ranks:
            ``"load-balanced"`` (default; packed rows per document) or ``"per-row"`` (a packed
            row as a whole: Megatron-LM's ``--dataloader-inter-document-masking``); see
            :class:`~megatron_agg.LossHook`.

    Requires ``TransformerConfig(calculate_per_token_loss=True)`` with Megatron's DDP and
    ``config.finalize_model_grads_func`` set; :meth:`install` checks it before the first loss.
    """

    def __init__(
        self,
        mode: Optional[AggModeLike] = None,
        *,
        exclude_fully_masked_seqs: bool = False,
        loss_scale_factor: Optional[float] = None,
        terms: Optional[Mapping[str, LossTerm]] = None,
        metrics: Optional[Mapping[str, Any]] = None,
        allow_nonfinite_masked: Optional[bool] = None,
        raise_on_every_rank: Optional[bool] = None,
        config: Optional[AggConfig] = None,
        pg_collection: Any = None,
        cp_layout: Optional[str] = None,
    ) -> None:
        self._cp_layout = checked_cp_layout(cp_layout)
        if rules.uses_prompt_mean(mode, terms, metrics, config):  # before AggConfig asks for num_groups
            raise ValueError(rules.PROMPT_MEAN_REFUSAL)
        self.config = AggConfig.build(
            mode, exclude_fully_masked_seqs=exclude_fully_masked_seqs, loss_scale_factor=loss_scale_factor,
            terms=terms, config=config, allow_nonfinite_masked=allow_nonfinite_masked,
            raise_on_every_rank=raise_on_every_rank, metrics=metrics,
        )
        problem = rules.terms_problem(self.config)
        if problem:
            raise ValueError(problem)
        self.terms: Dict[str, LossTerm] = dict(self.config.terms)
        self.metrics: Dict[str, LossTerm] = dict(self.config.metrics or {})
        self._needs_whole_counts = any(  # n_i of whole sequences, which a CP slice does not show
            t.agg_mode is AggMode.SEQ_MEAN_TOKEN_MEAN or (t.exclude_fully_masked_seqs and t.agg_mode.is_sequence_mean)
            for t in self.config.channels.values())
        self._term = next(iter(self.terms.values()))
        self._pg_collection = pg_collection
        self._megatron_config: Any = None
        self._original_finalize: Any = None
        self._checks: Optional[StepChecks] = None
        self._index = 0
        self._eval_index = 0  # micro-batches of the evaluation pass under way (torch.no_grad())
        self._groups: Any = None
        self._device = torch.device("cpu")
        self._dynamic_cp = False  # set by install: Megatron's config has a dynamic-CP switch on
        check_megatron_version()

    # -- set-up ---------------------------------------------------------------------------------
    def check_config(self, config: Any) -> None:
        """Raise ``ValueError`` unless Megatron's config routes ``num_tokens`` as this hook needs
        (:mod:`megatron_agg.megatron.deferred_rules`: the per-token path, dynamic CP, auxiliary losses)."""
        problem = (rules.per_token_path_problem(config) or rules.dynamic_cp_problem(config, self.config.channels)
                   or self._auxiliary_loss_problem(config))
        if problem:
            raise ValueError(problem)

    def _auxiliary_loss_problem(self, config: Any) -> str:
        return rules.auxiliary_loss_problem(config, self._term)

    @staticmethod
    def check_wrapper(model: Any, num_microbatches: int = 1, config: Any = None) -> None:
        """Raise ``ValueError`` unless the chunks' data-parallel wrapper divides by ``Σ num_tokens`` in
        finalize and has no known defect (:func:`megatron_agg.megatron.deferred_rules.check_wrapper`)."""
        rules.check_wrapper(model, config)

    @property
    def installed(self) -> bool:
        return self._megatron_config is not None

    def install(self, model_or_config: Any) -> None:
        """Check Megatron's config and hook the step's checks into it (idempotent).

        ``model_or_config``: the model (chunks, DDP-wrapped or not) or its ``TransformerConfig``.
        Refuses a config that cannot make the deferred mode exact, checks synchronously that
        the data-parallel ranks built the same hook (one all-reduce, one host sync), and wraps
        ``config.finalize_model_grads_func`` so that every step's checks run before Megatron
        reduces the gradients. Call it on every rank that computes losses (the last pipeline
        stage), or let ``loss_func(..., model=model)`` call it. :meth:`uninstall` undoes it."""
        config = model_config(model_or_config)
        if self._megatron_config is config and finalize_owner(config.finalize_model_grads_func) is self:
            return
        if self._megatron_config is not None and self._megatron_config is not config:
            raise ValueError("This DeferredLossHook is installed on another model's config; build one hook per model.")
        self.check_config(config)
        self.check_wrapper(model_or_config, config=config)
        self._dynamic_cp = bool(dynamic_cp_switches(config))
        owner = finalize_owner(config.finalize_model_grads_func)
        if owner is not None and owner is not self:
            raise ValueError(f"config.finalize_model_grads_func is already wrapped by another {type(owner).__name__}; "
                             "build one DeferredLossHook per model config and install that one.")
        groups = resolve_groups(self._pg_collection, cp_layout=self._cp_layout)
        prints = set_up_fingerprints(self.terms, _ChannelScaling(True), self.metrics)
        self._device = _device_of(model_or_config)
        if groups.dp_size > 1:
            block = agreement_block(prints, self._device)
            groups.sum_over_dp(block, async_op=False)
            raise_if_disagree(block, _NAMES.entry, "checked at install")
        self._original_finalize = wrap_finalize(config, self._end_of_step, owner=self)
        self._megatron_config = config

    def uninstall(self) -> None:
        """Put back the ``finalize_model_grads_func`` that :meth:`install` wrapped."""
        unwrap_finalize(self._megatron_config, self, self._original_finalize)
        self._megatron_config = None
        self._original_finalize = None
        self._checks = None
        self._index = self._eval_index = 0

    @staticmethod
    def sequence_token_counts(
        full_loss_mask: torch.Tensor, packed_seqs: Union[PackedSequences, Any, None] = None
    ) -> torch.Tensor:
        """``n_i`` of every sequence of a micro-batch, from its whole-sequence (pre-CP-split)
        mask: ``[b]`` for unpacked rows, ``[K]`` for a packed row. No host sync."""
        packed = coerce_packed(packed_seqs, full_loss_mask, "packed_seqs")
        return sm.sequence_view(full_loss_mask, packed).counts

    # -- the loss function ----------------------------------------------------------------------
    def loss_func(
        self,
        loss_mask: torch.Tensor,
        per_token_loss_fn: Optional[PerTokenLossFn] = None,
        *,
        sequence_token_counts: Optional[torch.Tensor] = None,
        packed_seqs: Union[PackedSequences, Any, None] = None,
        model: Any = None,
    ) -> Callable[..., tuple]:
        """The ``loss_func`` for ``forward_step`` to return (a 3-tuple one).

        Args:
            loss_mask: the micro-batch's mask as the output sees it (CP-local under CP).
            per_token_loss_fn: as for :meth:`LossHook.loss_func`.
            sequence_token_counts: ``n_i`` of whole sequences (before the CP split), needed
                under context parallelism by ``seq-mean-token-mean`` and
                ``exclude_fully_masked_seqs``; from :meth:`sequence_token_counts`. One entry per
                sequence of the micro-batch (rows, or packed sequences).
            packed_seqs: the sequences packed into the row (whole-row boundaries), or ``None`` —
                :class:`~megatron_agg.PackedSequences` or Megatron's ``PackedSeqParams``, as at
                every entry point.
            model: the model chunk ``forward_step`` received; installs the hook on its config the
                first time (:meth:`install`). Not needed after an explicit ``install``.
        """
        if not isinstance(loss_mask, torch.Tensor) or loss_mask.dim() != 2:
            shape = tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else type(loss_mask).__name__
            raise ValueError(f"DeferredLossHook.loss_func needs the micro-batch's [batch, seq] mask, got {shape}.")
        packed = coerce_packed(packed_seqs, loss_mask, "packed_seqs")

        def deferred_loss_func(output_tensor: torch.Tensor, non_loss_data: bool = False) -> Any:
            per_token = per_token_losses(per_token_loss_fn, output_tensor)
            if non_loss_data:
                return detached_losses(per_token)
            if not self.installed:
                if model is None:
                    raise ValueError(
                        "DeferredLossHook must check Megatron's config before the first loss: call "
                        "hook.install(model) once before training, or pass hook.loss_func(..., "
                        "model=model) with the model chunk forward_step received."
                    )
                self.install(model)
            losses = split_term_losses(self.terms, per_token, self._index, self.metrics)
            return self._loss(losses, loss_mask, sequence_token_counts, packed)

        return deferred_loss_func

    # -- one micro-batch ------------------------------------------------------------------------
    def _step_checks(self) -> StepChecks:
        if self._checks is None:
            self._checks = StepChecks(_NAMES, self.config.allow_nonfinite_masked)
            self._index = 0
            self._groups = resolve_groups(self._pg_collection, cp_layout=self._cp_layout)
        return self._checks

    def _loss(self, losses: Dict[str, torch.Tensor], loss_mask: torch.Tensor,
              counts: Optional[torch.Tensor], packed: Optional[PackedSequences]) -> tuple:
        """One micro-batch: ``(numerator, num_tokens, {name: [numerator, its count]})`` (module docstring)."""
        if torch.is_grad_enabled():  # a training micro-batch: an evaluation pass before it has ended
            checks, index, self._eval_index = self._step_checks(), self._index, 0
            self._index += 1
        else:  # evaluation (Megatron-LM's evaluate(): forward_only under torch.no_grad(), no finalize)
            if self._groups is None:
                self._groups = resolve_groups(self._pg_collection, cp_layout=self._cp_layout)
            checks, index = StepChecks(_NAMES, self.config.allow_nonfinite_masked), self._eval_index
            self._eval_index += 1  # kept apart from the training step: not its checks, not its index
        check_per_token_values(losses, loss_mask.shape, f"Micro-batch {index}", self.metrics)
        view, cp_rank = self._microbatch_view(loss_mask, counts, packed, f"micro-batch {index}", checks)
        parts = {name: sm.numerator_part(losses[name], term, view) for name, term in self.terms.items()}
        for name, part in parts.items():
            checks.record_loss(index, name, part, losses[name])
        numerator = sm.weighted_total(self.terms, parts)
        first = index == 0 and group_rank(self._groups.dp_cp) == 0  # token-sum's D = 1 rides here
        num_tokens = sm.denominator_part(self._term, view, cp_rank, first)
        count = num_tokens.to(torch.float32)
        out = {DEFAULT_TERM_NAME: torch.stack([numerator.detach().to(torch.float32), count])}
        if len(self.terms) > 1:
            out.update({name: torch.stack([part.detach().to(torch.float32), count]) for name, part in parts.items()})
        with torch.no_grad():  # metrics: [Σ m·α·v, its own denominator's part], never backpropagated
            for name, metric in self.metrics.items():
                part = sm.numerator_part(losses[name].detach(), metric, view)
                metric_count = sm.denominator_part(metric, view, cp_rank, first).to(torch.float32)
                out[name] = torch.stack([part.to(torch.float32), metric_count])
        return numerator, num_tokens, out

    def _microbatch_view(self, loss_mask: torch.Tensor, counts: Optional[torch.Tensor],
                         packed: Optional[PackedSequences], where: str, checks: StepChecks) -> tuple:
        """The micro-batch's sequences as this rank holds them (:func:`~megatron_agg.step_math.cp_local_view`,
        whole-sequence ``counts`` in place of the slice's when given) and this rank's CP rank; records
        the inputs' device-side checks (mask values, packing boundaries, counts that do not fit),
        read at the step's end. Under dynamic CP (token modes only) the slice is a bag of tokens."""
        groups = self._groups
        cp_size, cp_rank = groups.cp_size, groups.cp_rank
        if self._dynamic_cp:  # the sample's own cut: packing and whole-sequence counts are not this slice's
            cp_size, cp_rank, packed, counts = 1, 0, None, None
        device = loss_mask.device
        checks.record_mask(f"loss_mask of {where}", loss_mask)
        if packed is not None:
            checks.record_packing(f"packed_seqs of {where}", packed, loss_mask.shape[-1] * cp_size, cp_size,
                                  groups.cp_layout, device)
        # This slice's sequences: valid tokens, sequence index, default C_i; counts of this slice only.
        view = sm.cp_local_view(loss_mask, packed, sm.CPRank(cp_size, cp_rank, groups.cp_layout))
        if counts is None:
            if self._needs_whole_counts and cp_size > 1:
                raise ValueError(
                    "Under context parallelism, seq-mean-token-mean and exclude_fully_masked_seqs need "
                    "each sequence's token count over the whole sequence; pass sequence_token_counts="
                    "DeferredLossHook.sequence_token_counts(full_loss_mask[, packed_seqs]) computed "
                    "before the CP split."
                )
            return view, cp_rank
        check_sequence_counts(counts, view.num_seqs, packed is not None, loss_mask.shape[0], where)
        counts = counts.to(device=device, dtype=torch.float64)
        # Whole-sequence counts hold at least this slice's tokens; without CP exactly them.
        wrong = (counts < view.counts) if cp_size > 1 else (counts != view.counts)
        checks.counts.append((where, "counts that do not match the mask's valid tokens per sequence", wrong.sum()))
        return dataclasses.replace(view, counts=counts), cp_rank

    # -- the end of a step ------------------------------------------------------------------------
    def _end_of_step(self, model: Any) -> None:
        """Run by the wrapped ``finalize_model_grads_func`` (``model``: its first argument): the
        step's checks, before Megatron reduces the gradients (one host sync; two small
        all-reduces over the loss stage)."""
        checks = self._step_checks()
        num_microbatches = max(self._index, 1)
        self._checks = None
        self._index = self._eval_index = 0
        config = self._megatron_config
        per_token = bool(getattr(config, "calculate_per_token_loss", False))
        checks.fingerprints = set_up_fingerprints(self.terms, _ChannelScaling(per_token), self.metrics)
        groups = self._groups
        device = checks.shares[0][2].device if checks.shares else self._device
        if not per_token:
            checks.evaluations = (
                "calculate_per_token_loss was switched off after DeferredLossHook.install; the deferred "
                "mode needs it on every step."
            )
        elif changed := rules.dynamic_cp_problem(config, self.config.channels) or self._auxiliary_loss_problem(config):
            checks.evaluations = "the config changed after DeferredLossHook.install: " + changed
        elif bool(dynamic_cp_switches(config)) != self._dynamic_cp:
            checks.evaluations = (
                "dynamic context parallelism was switched "
                + ("on" if not self._dynamic_cp else "off")
                + " after DeferredLossHook.install (this step's micro-batches were read "
                + ("as fixed-CP slices" if not self._dynamic_cp else "as dynamic-CP slices")
                + "); build the hook and install it after configuring Megatron."
            )
        else:
            try:  # an install from a config alone could not see the wrapper; the step's model can
                self.check_wrapper(model, num_microbatches, config=config)
            except ValueError as exc:
                checks.evaluations = str(exc)
        checks.finish(groups, self.config.raise_on_every_rank, device, stage_only=True)


def _device_of(model_or_config: Any) -> torch.device:
    """Where the install-time agreement block lives: the model's parameters' device (a config
    alone: the current CUDA device when the default backend is NCCL, else the CPU)."""
    chunks = model_or_config if isinstance(model_or_config, (list, tuple)) else [model_or_config]
    for chunk in chunks:
        if isinstance(chunk, torch.nn.Module):
            for p in chunk.parameters():
                return p.device
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
