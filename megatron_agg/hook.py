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
   ``S_j = Σ_k w_k · Σ_{i,t} m·α_{k,i}·l_k / D_k`` (:mod:`megatron_agg.step_math`), and returns
   ``S_j · F`` where ``F`` cancels Megatron's own averaging (:mod:`megatron_agg.megatron.averaging`), so
   that the gradients after ``finalize_model_grads`` are exactly ``∂L``. No host sync and no
   collective happen per micro-batch.
4. After Megatron's schedule returns, one host sync reads the step's checks
   (:mod:`megatron_agg.checks`): the ranks agree on the set-up (fingerprints,
   :mod:`megatron_agg.agreement`), the loss functions saw ``loss_masks``, masks are 0/1, packing
   boundaries describe the rows, every term stayed finite at valid tokens and at masked
   positions. The check is summed over every rank of the step first, so a failure raises on
   every rank; the next step starts clean either way.

The all-reduced vector is ``[T, N, N_nonempty, (p, p·f, p·f²) × 11]`` (36 float64 values: nine set-up
fingerprints and two flags, :func:`megatron_agg.agreement.step_block`) for one
mask; each further mask adds ``T_k, N⁺_k`` (2 values), ``prompt-mean`` with ``group_scope="global"``
adds the per-group counts ``S_g`` and ``M_{k,g}`` (``G·(1+K_g)`` values: 2,048 = 16 KiB at
``G = 1,024`` and one mask) and with ``"per-rank"`` only ``P, P⁺_k`` (:mod:`megatron_agg.step_math`);
metrics add nothing. With context parallelism every CP rank does its own (identical) all-reduce
over its DP group, so nothing is counted once per CP rank, and TP/PP replicas never add to the
totals. The first time a process uses a vector length over a DP group, the ranks' agreement on the
set-up (which fixes the length) is checked in a small all-reduce of its own before the totals; a
step whose set-up changed awaits the totals at once; a disagreement then raises on every DP rank
before the schedule starts, or — when some rank's set-up did not change and it runs the schedule
unread — on every rank at the step's end (:func:`megatron_agg.collective.start_totals`). The engine
itself is :mod:`megatron_agg.engine`.

The loss the hook reports per micro-batch is a Megatron-LM style ``{name: [sum, count]}`` dict
whose sums over micro-batches and data×context-parallel ranks give ``L`` exactly
(``sum / count`` with counts adding up to 1); :meth:`LossHook.global_loss` returns ``L`` itself.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from .checks import FrontEndNames, NonFiniteLossError
from .config import AggConfig
from .collective import AgreementTracker
from .engine import PreparedStep, StepSummary, StepTimer, global_loss_of
from .groups import ParallelGroups
from .megatron import OWNER_ATTRIBUTE, LossReturn, check_megatron_version, checked_cp_layout, resolve_groups
from .modes import AggModeLike
from .scaling import MegatronScaling
from .terms import LossTerm, PerTokenLossFn, detached_losses, per_token_losses, split_term_losses
from .validation import checked_inputs

__all__ = ["LossHook", "PerTokenLossFn", "StepSummary", "NonFiniteLossError"]

_MISSING = object()
_NAMES = FrontEndNames()
_MISSING_MASKS = (
    "The wrapped forward_backward function needs loss_masks=[mask_0, ..., mask_{M-1}]: "
    "this rank's loss masks, one per micro-batch, so that megatron_agg can count the "
    "step's totals before the first loss."
)


def _refuse_factory(func: Any) -> None:
    """``ValueError`` for what cannot be a ``forward_backward_func``: not callable, Megatron's
    ``get_forward_backward_func`` itself, or any callable that takes no arguments (a factory)."""
    if not callable(func):
        raise ValueError(f"hook.wrap needs Megatron's forward_backward function, got {type(func).__name__}.")
    try:
        takes_nothing = not inspect.signature(func).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): nothing to refuse on
        takes_nothing = False
    if takes_nothing or getattr(func, "__name__", "") == "get_forward_backward_func":
        raise ValueError(
            f"hook.wrap got {getattr(func, '__qualname__', func)!r}, which takes no arguments: a factory, not "
            "the forward_backward function. Call it first: hook.wrap(get_forward_backward_func())."
        )


class LossHook:
    """Exact global loss aggregation for Megatron-Core's ``forward_backward_func``.

    Args:
        mode: the aggregation mode of a single-term loss (``"token-mean"``,
            ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum-norm"``,
            ``"token-sum"``, ``"prompt-mean"`` or an :class:`~megatron_agg.AggMode`). Leave ``None``
            when ``terms`` is given.
        exclude_fully_masked_seqs: single-term option, see :class:`~megatron_agg.LossTerm`.
        loss_scale_factor: single-term option, see :class:`~megatron_agg.LossTerm`.
        terms: several named terms, ``{name: LossTerm(mode, weight=..., mask=...)}``; the step's
            loss is ``Σ_k weight_k · L_k``, each term over its own mask, all in the same single
            collective.
        metrics: ``{name: LossTerm or mode}``, detached per-token quantities aggregated exactly
            (see :class:`~megatron_agg.AggConfig`); reported by :meth:`global_loss` and in the
            ``[sum, count]`` reports, never part of the loss.
        num_groups, group_scope: for ``prompt-mean`` (see :class:`~megatron_agg.AggConfig`).
        loss_return, check_masks, async_totals, allow_nonfinite_masked, raise_on_every_rank,
            agreement: see :class:`~megatron_agg.AggConfig` (the defaults are its defaults).
        config: an :class:`~megatron_agg.AggConfig` instead of the options above.
        pg_collection: Megatron's ``ProcessGroupCollection`` to take the groups from when the
            wrapped call is not given one; by default ``parallel_state``'s groups.
        groups: a :class:`~megatron_agg.groups.ParallelGroups` to use instead of Megatron's (it
            issues the step's collectives).
        cp_layout: how the data loader cut each row over the context-parallel ranks, one of
            :data:`megatron_agg.layout.CP_LAYOUTS`: ``"load-balanced"`` (default, Megatron's
            ``get_batch_on_this_cp_rank``: packed rows cut per document) or ``"per-row"`` (a packed
            row cut as a whole: Megatron-LM's ``--dataloader-inter-document-masking``). Matters
            only for packed rows under context parallelism; a wrong value is a wrong
            ``seq-mean-*`` gradient, so it is told, never guessed.
        scaling: the :class:`~megatron_agg.scaling.Scaling` class whose ``for_step`` reads what
            Megatron does to the losses (default :class:`~megatron_agg.scaling.MegatronScaling`).

    The formulas of every mode are in :mod:`megatron_agg.step_math` (its table) and :mod:`megatron_agg.modes`.
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
        loss_return: Union[LossReturn, str, None] = None,
        check_masks: Optional[bool] = None,
        async_totals: Optional[bool] = None,
        allow_nonfinite_masked: Optional[bool] = None,
        raise_on_every_rank: Optional[bool] = None,
        agreement: Optional[str] = None,
        config: Optional[AggConfig] = None,
        pg_collection: Any = None,
        groups: Optional[ParallelGroups] = None,
        scaling: Any = MegatronScaling,
        cp_layout: Optional[str] = None,
    ) -> None:
        self.config = AggConfig.build(
            mode, exclude_fully_masked_seqs=exclude_fully_masked_seqs, loss_scale_factor=loss_scale_factor,
            terms=terms, config=config, loss_return=loss_return, check_masks=check_masks,
            async_totals=async_totals, allow_nonfinite_masked=allow_nonfinite_masked,
            raise_on_every_rank=raise_on_every_rank, agreement=agreement, metrics=metrics,
            num_groups=num_groups, group_scope=group_scope,
        )
        if groups is not None and not isinstance(groups, ParallelGroups):
            raise ValueError(f"groups must be a megatron_agg.groups.ParallelGroups, got {type(groups).__name__}.")
        self._cp_layout = checked_cp_layout(cp_layout, groups)
        if not hasattr(scaling, "for_step"):
            raise ValueError(f"scaling must be a Scaling class with for_step(...), got {scaling!r}.")
        self._pg_collection = pg_collection
        self._groups = groups
        self._scaling = scaling
        self._tracker = AgreementTracker(self.config.agreement)
        self._step: Optional[PreparedStep] = None
        self._last: Optional[StepSummary] = None
        self._failed: Optional[str] = None

    @property
    def terms(self) -> Dict[str, LossTerm]:
        return dict(self.config.terms)

    @property
    def loss_return(self) -> LossReturn:
        return LossReturn.parse(self.config.loss_return)

    def __repr__(self) -> str:
        return f"LossHook({self.config!r})"

    # -- the step ----------------------------------------------------------------------------
    def wrap(self, forward_backward_func: Callable[..., Any]) -> Callable[..., Any]:
        """Return ``forward_backward_func`` with the hook around it (idempotent).

        The result takes Megatron's keyword arguments unchanged plus

        - ``loss_masks``: this rank's masks, one ``[b_j, s_j]`` tensor per micro-batch in order, of
          whole sequences (before any context-parallel split; the same on every CP rank); with
          terms or metrics that name their own masks, ``{name: [mask_0, ...]}`` with one list per
          name, the masks of a micro-batch all of one shape;
        - ``packed_seqs`` (optional): per micro-batch ``None`` (one sequence per row) or the
          sequences packed into its one row, as :class:`~megatron_agg.PackedSequences` or
          Megatron's ``PackedSeqParams`` (THD), with whole-row (pre-CP-split) boundaries;
        - ``group_ids`` (``prompt-mean`` only): per micro-batch a 1-D integer tensor with the group
          of each sequence (one id per row, or per packed sequence), numbered as ``group_scope``
          says, in ``[0, num_groups)``.

        The original function is ``result.__wrapped__``.
        """
        _refuse_factory(forward_backward_func)
        owner = getattr(forward_backward_func, OWNER_ATTRIBUTE, None)
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
            *args: Any, loss_masks: Any = _MISSING, packed_seqs: Any = None, group_ids: Any = None, **kwargs: Any
        ) -> Any:
            return self._run_step(forward_backward_func, args, kwargs, loss_masks, packed_seqs, group_ids)

        setattr(forward_backward, OWNER_ATTRIBUTE, self)
        return forward_backward

    def _run_step(
        self, func: Callable[..., Any], args: tuple, kwargs: dict, loss_masks: Any, packed_seqs: Any,
        group_ids: Any = None,
    ) -> Any:
        if self._step is not None:
            raise ValueError(
                "A step of this LossHook is already running; nested or concurrent "
                "forward_backward calls need one LossHook each."
            )
        self._last, self._failed = None, "the step did not finish"
        with StepTimer() as timer:  # the step's set-up
            named, packed, ids, refused = checked_inputs(
                self.config.mask_names, self.config.uses_groups, None if loss_masks is _MISSING else loss_masks,
                kwargs.get("num_microbatches"), packed_seqs, group_ids, _MISSING_MASKS)
            masks = next(iter(named.values()))
            groups = self._groups or resolve_groups(
                kwargs.get("pg_collection", None) or self._pg_collection, kwargs.get("grad_finalize_pgs", None),
                cp_layout=self._cp_layout,
            )
            scaling = self._scaling.for_step(kwargs.get("model"), self.loss_return, len(masks), groups)
            step = PreparedStep(self.config, named, groups, scaling, packed, names=_NAMES, tracker=self._tracker,
                                group_ids=ids, refused=refused, timer=timer)
        self._step = step
        try:
            result = func(*args, **kwargs)
            with timer:
                step.finish(evaluated_all=not bool(kwargs.get("collect_non_loss_data", False)))
        except BaseException as exc:
            self._failed = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._step = None
        self._failed = None
        self._last = step.summary()
        return result

    def loss_func(
        self, loss_mask: Union[torch.Tensor, Mapping[str, torch.Tensor], None] = None,
        per_token_loss_fn: Optional[PerTokenLossFn] = None
    ) -> Callable[..., tuple]:
        """The ``loss_func`` for ``forward_step`` to return with the model output.

        Args:
            loss_mask: this micro-batch's mask as the output tensor sees it (on a
                context-parallel rank, its slice of the sequence); ``{name: mask}`` with every
                mask name when the terms or metrics name their own. Its shape is checked at once;
                its content is checked against ``loss_masks`` after the step (``check_masks``).
                The gradients always follow ``loss_masks``, so it is optional: left out
                (``hook.loss_func()``), nothing is checked against it. A per-token loss of
                another shape than the micro-batch's (CP-local) mask is still an error.
            per_token_loss_fn: maps the model output to the per-token loss ``[b, s]`` (or to
                ``{name: [b, s]}`` for several terms and for metrics: one entry per term and per
                metric), e.g. a policy-gradient loss from log-probs. By default the output *is*
                the per-token loss (``GPTModel`` called with ``labels``).

        Megatron calls the result on the last pipeline stage with the output tensor; it returns
        ``(loss, {name: [sum, count]})`` or ``(loss, num_tokens, {...})`` per ``loss_return``.
        Called with ``non_loss_data=True`` it returns the per-token loss(es), detached.
        """

        def megatron_agg_loss_func(output_tensor: torch.Tensor, non_loss_data: bool = False) -> Any:
            per_token = per_token_losses(per_token_loss_fn, output_tensor)
            if non_loss_data:
                return detached_losses(per_token)
            step = self._step
            if step is None:
                raise ValueError(
                    "hook.loss_func(...) was evaluated outside a step of this hook; call the "
                    "function returned by hook.wrap(get_forward_backward_func()) with loss_masks=..."
                )
            with step.timer:
                losses = split_term_losses(self.config.terms, per_token, step.next_microbatch, self.config.metrics)
                loss, num_tokens, report = step.microbatch_loss(losses, loss_mask)
            if num_tokens is None:
                return loss, report
            return loss, num_tokens, report

        return megatron_agg_loss_func

    # -- reporting ---------------------------------------------------------------------------
    @property
    def last_step(self) -> Optional[StepSummary]:
        """What the last completed step computed (``None`` before the first one, or after a step
        that raised)."""
        return self._last

    def global_loss(self) -> Optional[Dict[str, torch.Tensor]]:
        """The exact global loss of the last step: ``{"loss": L, <term>: L_k, ..., <metric>: value}``.

        Issues one all-reduce (SUM) over the data×context-parallel group, on demand (for
        logging; not part of the step); the metrics ride in it. Returns ``None`` on ranks off the last pipeline stage,
        which compute no loss. The values are 0-dim tensors on the masks' device (no host sync).
        Raises ``ValueError`` before the first step and after a step that raised.
        """
        return global_loss_of(self._last, self._failed)
