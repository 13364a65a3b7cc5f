"""A loss term: one per-token loss with its own aggregation mode, options and weight."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .modes import AggMode, AggModeLike

__all__ = ["LossTerm", "DEFAULT_TERM_NAME"]

#: Name of the term when a :class:`~megatron_agg.LossHook` is built from a single mode.
DEFAULT_TERM_NAME = "loss"


@dataclass(frozen=True)
class LossTerm:
    """One term ``weight · L_mode`` of the step's loss.

    Args:
        mode: the aggregation mode (an :class:`AggMode` or its string value).
        weight: the term's coefficient in the total loss ``Σ_k weight_k · L_k``.
        exclude_fully_masked_seqs: count only sequences with at least one valid token in ``N``.
        loss_scale_factor: the constant ``C`` of ``seq-mean-token-sum-norm``; ``None`` means the
            padded length of each sequence's mask row (the mask's last dimension). Only valid
            with ``seq-mean-token-sum-norm``.
    """

    mode: AggModeLike
    weight: float = 1.0
    exclude_fully_masked_seqs: bool = False
    loss_scale_factor: Optional[float] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", AggMode.parse(self.mode))
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(
                f"LossTerm weight must be a finite number, got {self.weight!r}; pass e.g. weight=0.1."
            )
        if not isinstance(self.exclude_fully_masked_seqs, bool):
            raise ValueError(
                "exclude_fully_masked_seqs must be True or False, got "
                f"{self.exclude_fully_masked_seqs!r}."
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
                or not isinstance(self.loss_scale_factor, (int, float))
                or not math.isfinite(self.loss_scale_factor)
                or self.loss_scale_factor <= 0
            ):
                raise ValueError(
                    "loss_scale_factor must be a positive finite number (or None for the padded "
                    f"sequence length), got {self.loss_scale_factor!r}."
                )

    @property
    def agg_mode(self) -> AggMode:
        """The mode as an :class:`AggMode` (``mode`` is normalized to one at construction)."""
        assert isinstance(self.mode, AggMode)
        return self.mode
