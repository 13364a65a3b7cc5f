"""``AggConfig``: the one frozen configuration every entry point is built from.

:class:`~megatron_agg.LossHook`, :class:`~megatron_agg.DeferredLossHook`,
:class:`~megatron_agg.StepShares` and :class:`~megatron_agg.fsdp.FSDPLossHook` take either
``config=AggConfig(...)`` or the same options as keyword arguments (a convenience that builds the
config); the defaults are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Optional, Union

from .averaging import LossReturn
from .modes import AggModeLike
from .terms import LossTerm, normalize_terms
from .validation import as_bool

__all__ = ["AggConfig", "AGREEMENT_POLICIES"]

#: When the data-parallel ranks' agreement on the set-up is checked *before* the step's gradients:
#: ``"on-change"`` (the first step of an entry point and every step whose set-up changed: one host
#: sync at that step's start; later steps check inside the end-of-step check), ``"every-step"``.
AGREEMENT_POLICIES = ("on-change", "every-step")


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
    """

    terms: Mapping[str, LossTerm]
    loss_return: Union[LossReturn, str] = LossReturn.THREE_TUPLE
    check_masks: bool = True
    async_totals: bool = True
    allow_nonfinite_masked: bool = False
    raise_on_every_rank: bool = True
    agreement: str = "on-change"

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", normalize_terms(None, False, None, self.terms))
        object.__setattr__(self, "loss_return", LossReturn.parse(self.loss_return))
        for name in ("check_masks", "async_totals", "allow_nonfinite_masked", "raise_on_every_rank"):
            object.__setattr__(self, name, as_bool(getattr(self, name), name))
        if self.agreement not in AGREEMENT_POLICIES:
            raise ValueError(f"agreement must be one of {AGREEMENT_POLICIES}, got {self.agreement!r}.")

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
