"""``AggConfig``: the one frozen configuration every entry point is built from.

:class:`~megatron_agg.LossHook`, :class:`~megatron_agg.DeferredLossHook`,
:class:`~megatron_agg.StepShares` and :class:`~megatron_agg.fsdp.FSDPLossHook` take either
``config=AggConfig(...)`` or the same options as keyword arguments (a convenience that builds the
config); the defaults are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

from .megatron import LossReturn
from .modes import AggModeLike
from .step_math import GROUP_SCOPES, TotalsLayout
from .terms import DEFAULT_MASK_NAME, LossTerm, normalize_metrics, normalize_terms
from .validation import as_bool, as_int

__all__ = ["AggConfig", "AGREEMENT_POLICIES", "totals_layout"]

#: When the data-parallel ranks' agreement on the set-up is checked *before* the step's gradients:
#: ``"on-change"`` (the first step of an entry point and every step whose set-up changed: one host
#: sync at that step's start; later steps check inside the end-of-step check), ``"every-step"``.
AGREEMENT_POLICIES = ("on-change", "every-step")


def totals_layout(masks: Sequence[str], group_masks: Iterable[str], num_groups: Optional[int],
                  group_scope: Optional[str], extra: int = 0) -> TotalsLayout:
    """The layout of a step's totals vector (:class:`~megatron_agg.step_math.TotalsLayout`), for
    every entry point: the step's ``masks`` in order (the first is the one Megatron's ``num_tokens``
    count); those of them in ``group_masks`` (the masks ``prompt-mean`` may use: a config's grouped
    terms and metrics, or every mask of a :class:`~megatron_agg.StepShares` with group ids) carry
    per-group counts, in the order of ``masks``; ``num_groups`` and ``group_scope`` as given
    (``None`` without groups); ``extra`` fields of the caller's own."""
    grouped = set(group_masks)
    return TotalsLayout(tuple(masks), tuple(m for m in masks if m in grouped), num_groups or 0, group_scope, extra)


@dataclass(frozen=True)
class AggConfig:
    """How a step's per-token losses become one loss, and what the engine checks.

    Args:
        terms: ``{name: LossTerm}``; build a single-term config with :meth:`from_mode`.
        loss_return: Megatron's ``loss_func`` convention, ``"3-tuple"`` (default; honours
            ``calculate_per_token_loss``) or ``"2-tuple"``. Not used by FSDP.
        check_masks: after each step, check that the masks the loss functions received equal
            the step's ``loss_masks`` (the gradients always follow ``loss_masks``).
        async_totals: start the step's one all-reduce asynchronously, awaited at the first loss.
        allow_nonfinite_masked: accept NaN/Inf in the per-token loss at *masked* positions. By
            default it is an error: such a value usually comes from an op upstream of the loss
            (``exp(logp − old_logp)`` on padding, ``log(0)``), whose backward turns the mask's 0
            into NaN gradients. Set it when the NaN is written into the per-token loss itself
            (e.g. ``torch.where(mask, loss, nan)``), which the engine selects away exactly.
        raise_on_every_rank: spread the end-of-step check over every rank of the step (one small
            synchronous all-reduce over the data×context-parallel group and one over the
            model-parallel group, after the step), so that an error found on one rank is raised on
            all of them; ``False`` raises only where it was found.
        agreement: one of :data:`AGREEMENT_POLICIES`.
        metrics: ``{name: LossTerm or mode}``: detached per-token quantities (entropy, clip
            fraction, KL, ratios) aggregated exactly like a term of that mode, options and mask over
            the global batch, reported next to the terms (``global_loss()``, the ``[sum, count]``
            reports) and never part of the loss.
        num_groups: ``prompt-mean`` only: the number ``G`` of group ids (ids are ``0 … G−1``); the
            same on every rank. With ``group_scope="global"`` it sizes the per-group counts that
            ride in the step's all-reduce (``G·(1+K_g)`` float64 values), so it is a constant of
            the hook (a capacity: ``P`` counts the groups actually present).
        group_scope: ``prompt-mean`` only, no default (say what your ids mean):
            ``"global"`` (an id names the same prompt on every data-parallel rank; a group may be
            split over micro-batches and ranks) or ``"per-rank"`` (ids are this data-parallel
            rank's own: the group is the pair (rank, id), ids of different ranks never collide).
    """

    terms: Mapping[str, LossTerm]
    loss_return: Union[LossReturn, str] = LossReturn.THREE_TUPLE
    check_masks: bool = True
    async_totals: bool = True
    allow_nonfinite_masked: bool = False
    raise_on_every_rank: bool = True
    agreement: str = "on-change"
    metrics: Optional[Mapping[str, Union[LossTerm, AggModeLike]]] = None
    num_groups: Optional[int] = None
    group_scope: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", normalize_terms(None, False, None, self.terms))
        object.__setattr__(self, "metrics", normalize_metrics(self.metrics, self.terms))
        object.__setattr__(self, "loss_return", LossReturn.parse(self.loss_return))
        for name in ("check_masks", "async_totals", "allow_nonfinite_masked", "raise_on_every_rank"):
            object.__setattr__(self, name, as_bool(getattr(self, name), name))
        if self.agreement not in AGREEMENT_POLICIES:
            raise ValueError(f"agreement must be one of {AGREEMENT_POLICIES}, got {self.agreement!r}.")
        grouped = sorted(n for n, t in self.channels.items() if t.agg_mode.needs_groups)
        if grouped:
            if self.num_groups is None or self.group_scope is None:
                raise ValueError(
                    f"prompt-mean ({grouped}) needs num_groups=G (group ids are 0 … G−1, the same G on every "
                    "rank) and group_scope='global' (an id names the same prompt on every data-parallel rank) "
                    "or 'per-rank' (ids are each rank's own); got "
                    f"num_groups={self.num_groups!r}, group_scope={self.group_scope!r}. Pass both, and the "
                    "step's group ids as group_ids=[...] next to loss_masks."
                )
            object.__setattr__(self, "num_groups", as_int(self.num_groups, "num_groups", minimum=1))
            if self.group_scope not in GROUP_SCOPES:
                raise ValueError(f"group_scope must be one of {GROUP_SCOPES}, got {self.group_scope!r}.")
        elif self.num_groups is not None or self.group_scope is not None:
            raise ValueError(
                f"num_groups={self.num_groups!r} / group_scope={self.group_scope!r} only apply to prompt-mean, "
                "and no term or metric uses it; drop them or use mode 'prompt-mean'."
            )

    # -- what the step counts -------------------------------------------------------------------
    @property
    def channels(self) -> Dict[str, LossTerm]:
        """The terms, then the metrics: everything the engine aggregates (names are disjoint)."""
        return {**self.terms, **(self.metrics or {})}

    @property
    def mask_names(self) -> Tuple[str, ...]:
        """The step's masks: ``"default"`` first when a term or metric uses it, then the others in
        order of first use. The first is the one Megatron's ``num_tokens`` count."""
        used = [t.mask for t in self.channels.values()]
        names = [DEFAULT_MASK_NAME] if DEFAULT_MASK_NAME in used else []
        for name in used:
            if name not in names:
                names.append(name)
        return tuple(names)

    @property
    def uses_groups(self) -> bool:
        return self.num_groups is not None

    def totals_layout(self, extra: int = 0) -> TotalsLayout:
        """The layout of the step's totals vector (:func:`totals_layout`): the masks a ``prompt-mean``
        term or metric uses carry per-group counts."""
        grouped = [t.mask for t in self.channels.values() if t.agg_mode.needs_groups]
        return totals_layout(self.mask_names, grouped, self.num_groups, self.group_scope, extra)

    @classmethod
    def build(
        cls,
        mode: Optional[AggModeLike] = None,
        *,
        exclude_fully_masked_seqs: bool = False,
        loss_scale_factor: Optional[float] = None,
        terms: Optional[Mapping[str, LossTerm]] = None,
        config: Optional["AggConfig"] = None,
        **options: Any,
    ) -> "AggConfig":
        """The config from the front ends' keyword arguments, or ``config`` itself (then no other
        option may be given)."""
        if config is not None:
            if not isinstance(config, AggConfig):
                raise ValueError(f"config must be a megatron_agg.AggConfig, got {type(config).__name__}.")
            given = [k for k, v in (("mode", mode), ("terms", terms), ("loss_scale_factor", loss_scale_factor))
                     if v is not None]
            given += ["exclude_fully_masked_seqs"] if exclude_fully_masked_seqs else []
            given += [k for k, v in options.items() if v is not None]
            if given:
                raise ValueError(
                    f"Give either config=AggConfig(...) or the options {given} as keyword arguments, "
                    "not both; use dataclasses.replace(config, ...) to change a config."
                )
            return config
        known = {f.name for f in fields(cls)} - {"terms"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown}; AggConfig has {sorted(known)}.")
        options = {k: v for k, v in options.items() if v is not None}
        return cls(normalize_terms(mode, as_bool(exclude_fully_masked_seqs, "exclude_fully_masked_seqs"),
                                   loss_scale_factor, terms), **options)

    def replace(self, **changes: Any) -> "AggConfig":
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return replace(self, **changes)
