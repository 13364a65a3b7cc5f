"""The per-sequence arithmetic under its earlier import path: it lives in :mod:`megatron_agg.step_math`
(the formula table is there). Kept for code that imports it from here; the single-mask
``[T, N, N⁺]`` helpers below are :func:`~megatron_agg.step_math.local_totals_vector` and
:meth:`~megatron_agg.step_math.StepTotals.denominator` of a one-mask layout.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .modes import AggMode
from .step_math import (SequenceView, StepTotals, TotalsLayout, count_totals, group_index, masked_weighted_sum,
                        safe_reciprocal, sequence_view, sequence_weights, valid_tokens, weighted_share)
from .terms import DEFAULT_MASK_NAME, LossTerm

__all__ = [
    "TOTALS_FIELDS",
    "TOKENS",
    "SEQUENCES",
    "NONEMPTY_SEQUENCES",
    "valid_tokens",
    "SequenceView",
    "sequence_view",
    "local_totals",
    "denominator",
    "safe_reciprocal",
    "sequence_weights",
    "group_index",
    "masked_weighted_sum",
    "weighted_share",
]

#: Fields of the one-mask totals vector, in order. All are sums over sequences (float64, exact to 2**53).
TOTALS_FIELDS = ("tokens", "sequences", "nonempty_sequences")
TOKENS, SEQUENCES, NONEMPTY_SEQUENCES = range(len(TOTALS_FIELDS))


def local_totals(views: Sequence[SequenceView], device: Optional[torch.device] = None) -> torch.Tensor:
    """This rank's ``[tokens, sequences, nonempty_sequences]`` over the sequences of ``views``:
    ``[Σ_i n_i, Σ_i 1, Σ_i [n_i > 0]]``. No collective, no host sync."""
    if device is None:
        device = views[0].valid.device if views else torch.device("cpu")
    return count_totals(TotalsLayout((DEFAULT_MASK_NAME,)), {DEFAULT_MASK_NAME: list(views)}, None, device).vector


def denominator(term: LossTerm, totals: torch.Tensor) -> torch.Tensor:
    """The global denominator ``D`` of ``term`` from the all-reduced ``[T, N, N⁺]`` of
    :func:`local_totals` (a 0-dim tensor). ``prompt-mean`` needs the per-group counts of
    :class:`megatron_agg.step_math.StepTotals`."""
    if term.agg_mode is AggMode.PROMPT_MEAN:
        raise ValueError("prompt-mean's denominator needs per-group counts: use megatron_agg.totals.StepTotals.")
    return StepTotals(TotalsLayout((term.mask,)), totals).denominator(term)
