"""A loss term: one per-token loss with its own aggregation mode, options, mask and weight; and the
metrics (detached per-token quantities aggregated like a term, for logging)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from .modes import DEFAULT_MASK_NAME, AggMode, AggModeLike
from .validation import as_bool

__all__ = ["LossTerm", "DEFAULT_TERM_NAME", "DEFAULT_MASK_NAME", "PerTokenLossFn", "normalize_terms",
           "normalize_metrics", "split_term_losses", "per_token_losses", "detached_losses"]

#: Maps the model output of a micro-batch to its per-token loss ``[b, s]`` (one term), or to a
#: ``{term name: [b, s]}`` mapping (several terms).
PerTokenLossFn = Callable[[torch.Tensor], Union[torch.Tensor, Mapping[str, torch.Tensor]]]

#: Name of the term when a :class:`~megatron_agg.LossHook` is built from a single mode.
DEFAULT_TERM_NAME = "loss"


@dataclass(frozen=True)
class LossTerm:
    """One term ``weight · L_mode`` of the step's loss.

    Args:
        mode: the aggregation mode (an :class:`AggMode` or its string value).
        weight: the term's coefficient in the total loss ``Σ_k weight_k · L_k``.
        exclude_fully_masked_seqs: count only sequences with at least one valid token in ``N``.
        exclude_fully_masked_seqs: count only sequences with at least one valid token in ``N``
            (``seq-mean-*``), only groups with at least one valid token in ``P``
            (``prompt-mean``); no effect on ``token-mean`` and ``token-sum``.
        loss_scale_factor: the constant ``C`` of ``seq-mean-token-sum-norm``; ``None`` means the
            padded length of each sequence's mask row (the mask's last dimension). Only valid
            with ``seq-mean-token-sum-norm``.
        mask: the name of the step's mask this term selects its tokens with and counts its
            denominator from (``loss_masks={"default": [...], "correct": [...]}``); default
            ``"default"``, the mask of a plain ``loss_masks=[...]`` list.
    """

    mode: AggModeLike
    weight: float = 1.0
    exclude_fully_masked_seqs: bool = False
    loss_scale_factor: Optional[float] = None
    mask: str = DEFAULT_MASK_NAME

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", AggMode.parse(self.mode))
        if (isinstance(self.weight, bool) or not isinstance(self.weight, numbers.Real)
                or not math.isfinite(float(self.weight))):
            raise ValueError(
                f"LossTerm weight must be a finite number, got {self.weight!r}; pass e.g. weight=0.1."
            )
        object.__setattr__(self, "weight", float(self.weight))  # 16 and 16.0 (or numpy's) are one weight
        object.__setattr__(self, "exclude_fully_masked_seqs",
                           as_bool(self.exclude_fully_masked_seqs, "exclude_fully_masked_seqs"))
        if not isinstance(self.mask, str) or not self.mask:
            raise ValueError(
                f"LossTerm mask must be the name (a non-empty str) of one of the step's loss_masks, got "
                f"{self.mask!r}; e.g. mask='correct' with loss_masks={{'default': [...], 'correct': [...]}}."
            )
        if self.loss_scale_factor is not None:
            if self.mode is not AggMode.SEQ_MEAN_TOKEN_SUM_NORM:
                raise ValueError(
                    f"loss_scale_factor={self.loss_scale_factor!r} only applies to mode "
                    f"'seq-mean-token-sum-norm', but the mode is {self.mode.value!r}; "
                    "drop loss_scale_factor or change the mode."
                )
            if (
                isinstance(self.loss_scale_factor, bool)
                or not isinstance(self.loss_scale_factor, numbers.Real)
                or not math.isfinite(float(self.loss_scale_factor))
                or self.loss_scale_factor <= 0
            ):
                raise ValueError(
                    "loss_scale_factor must be a positive finite number (or None for the padded "
                    f"sequence length), got {self.loss_scale_factor!r}."
                )
            factor = float(self.loss_scale_factor)
            if not math.isfinite(float(torch.tensor(1.0 / factor, dtype=torch.float32))):
                raise ValueError(
                    f"loss_scale_factor={factor!r} is so small that 1/C overflows float32 (the per-token "
                    "weights are float32); use a factor of at least 1e-38, typically the padded "
                    "sequence length."
                )
            object.__setattr__(self, "loss_scale_factor", factor)  # 16 and 16.0 are one factor

    @property
    def agg_mode(self) -> AggMode:
        """The mode as an :class:`AggMode` (``mode`` is normalized to one at construction)."""
        assert isinstance(self.mode, AggMode)
        return self.mode


def normalize_terms(
    mode: Optional[AggModeLike],
    exclude_fully_masked_seqs: bool,
    loss_scale_factor: Optional[float],
    terms: Optional[Mapping[str, LossTerm]],
) -> Dict[str, LossTerm]:
    """``{name: LossTerm}`` from either a single mode with its options or named terms."""
    if terms is None:
        return {
            DEFAULT_TERM_NAME: LossTerm(
                mode if mode is not None else "token-mean",
                exclude_fully_masked_seqs=exclude_fully_masked_seqs,
                loss_scale_factor=loss_scale_factor,
            )
        }
    if mode is not None or exclude_fully_masked_seqs or loss_scale_factor is not None:
        raise ValueError(
            "Give either a single mode (with exclude_fully_masked_seqs / loss_scale_factor) or "
            "terms={name: LossTerm(...)}, not both; put the options into each LossTerm."
        )
    if not isinstance(terms, Mapping) or not terms:
        raise ValueError(f"terms must be a non-empty mapping {{name: LossTerm}}, got {terms!r}.")
    for name, term in terms.items():
        if not isinstance(name, str) or not isinstance(term, LossTerm):
            raise ValueError(f"terms must map names (str) to LossTerm objects; got {name!r}: {term!r}.")
    if len(terms) > 1 and DEFAULT_TERM_NAME in terms:
        raise ValueError(
            f"The term name {DEFAULT_TERM_NAME!r} is reserved for the total of several terms; "
            "rename that term."
        )
    return dict(terms)


def normalize_metrics(metrics: Optional[Mapping[str, Union[LossTerm, AggModeLike]]],
                      terms: Mapping[str, LossTerm]) -> Dict[str, LossTerm]:
    """``{name: LossTerm}`` of the metrics: detached per-token quantities aggregated exactly like a
    term (mode, options, mask) but not part of the loss. A metric may be given as a mode string;
    its ``weight`` must stay 1 (a metric has none); names must differ from the terms' and from
    ``"loss"`` (the total)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a mapping {{name: LossTerm or mode}}, got {type(metrics).__name__}.")
    out: Dict[str, LossTerm] = {}
    for name, metric in metrics.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric names must be non-empty strings, got {name!r}.")
        if name in terms or name == DEFAULT_TERM_NAME:
            raise ValueError(
                f"The metric name {name!r} is already a loss term's name (or {DEFAULT_TERM_NAME!r}, the total); "
                "give metrics names of their own: they are reported next to the terms."
            )
        if not isinstance(metric, LossTerm):
            if not isinstance(metric, (str, AggMode)):
                raise ValueError(f"metrics must map names to LossTerm objects or modes; got {name!r}: {metric!r}.")
            metric = LossTerm(metric)
        if metric.weight != 1.0:
            raise ValueError(
                f"Metric {name!r} has weight {metric.weight}; a metric is reported, not added to the loss: "
                "leave its weight at 1 and scale it when you log it."
            )
        out[name] = metric
    return out


def split_term_losses(terms: Mapping[str, LossTerm], per_token: Any, index: int,
                      metrics: Optional[Mapping[str, LossTerm]] = None) -> Dict[str, torch.Tensor]:
    """The per-token loss of every term (and the per-token value of every metric) from what the
    per-token loss function returned: a tensor for a single term without metrics, else a mapping
    with exactly the names of the terms and metrics."""
    names = list(terms) + list(metrics or ())
    if isinstance(per_token, torch.Tensor):
        if len(names) != 1:
            what = "terms and metrics" if metrics else "terms"
            raise ValueError(
                f"Micro-batch {index}: the hook has {what} {names} but the per-token loss "
                "function returned a single tensor; return {name: per-token value} for each of them."
            )
        return {names[0]: per_token}
    if isinstance(per_token, Mapping):
        if set(per_token) != set(names):
            what = " (the terms and the metrics)" if metrics else ""
            raise ValueError(
                f"Micro-batch {index}: the per-token loss function returned terms "
                f"{sorted(per_token)}, expected exactly {sorted(names)}{what}."
            )
        return dict(per_token)
    raise ValueError(
        f"Micro-batch {index}: expected a per-token loss tensor or a mapping of them, got "
        f"{type(per_token).__name__}."
    )


def per_token_losses(per_token_loss_fn: Optional[PerTokenLossFn], output: Any) -> Any:
    """What the loss function gets from the model output: ``per_token_loss_fn(output)``, or the
    output itself (``GPTModel`` called with ``labels`` returns the per-token loss)."""
    return per_token_loss_fn(output) if per_token_loss_fn is not None else output


def detached_losses(per_token: Any) -> Any:
    """The per-token loss(es), detached: what ``loss_func(output, non_loss_data=True)`` returns."""
    if isinstance(per_token, Mapping):
        return {k: v.detach() for k, v in per_token.items()}
    return per_token.detach()
