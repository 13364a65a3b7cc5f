"""The arithmetic of exact loss aggregation: pure tensor math, no ``torch.distributed``.

Every mode (see :mod:`megatron_agg.modes`) has the form

    L = Σ_i Σ_t  m[i,t] · α_i · l[i,t]  /  D

with a per-sequence weight ``α_i`` that needs only sequence ``i`` itself and one global
denominator ``D`` that needs the whole step:

=========================== ================ ===================================
mode                        α_i              D
=========================== ================ ===================================
``token-mean``              1                T  (valid tokens in the step)
``seq-mean-token-sum``      1                N
``seq-mean-token-mean``     1 / n_i (0 if 0) N
``seq-mean-token-sum-norm`` 1 / C_i          N
=========================== ================ ===================================

``N`` counts all sequences of the step, or only those with ``n_i > 0`` when
``exclude_fully_masked_seqs``. ``T``, the number of sequences and the number of non-empty
sequences are the step *totals*: local sums (:func:`local_totals`) that the caller
all-reduces (SUM) once per step over the data-parallel group. ``1/D`` is taken as 0 when
``D = 0`` (:func:`safe_reciprocal`), so an all-masked step gives ``L = 0`` and zero
gradients, never NaN.

A sequence is a row of a ``[b, s]`` mask (packed rows with several sequences per row are
described by :class:`SequenceLayout` objects of :mod:`megatron_agg.layout`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .modes import AggMode
from .terms import LossTerm

__all__ = [
    "TOTALS_FIELDS",
    "TOKENS",
    "SEQUENCES",
    "NONEMPTY_SEQUENCES",
    "valid_tokens",
    "row_token_counts",
    "local_totals",
    "denominator",
    "safe_reciprocal",
    "sequence_weights",
    "masked_weighted_sum",
]

#: Fields of the totals vector, in order. All are sums over sequences (float64, exact to 2**53).
TOTALS_FIELDS = ("tokens", "sequences", "nonempty_sequences")
TOKENS, SEQUENCES, NONEMPTY_SEQUENCES = range(len(TOTALS_FIELDS))

_TOTALS_DTYPE = torch.float64
_WEIGHT_DTYPE = torch.float32


def valid_tokens(mask: torch.Tensor) -> torch.Tensor:
    """``mask != 0`` as a bool tensor (masks may be bool, integer or float 0/1)."""
    return mask if mask.dtype == torch.bool else mask != 0


def row_token_counts(mask: torch.Tensor) -> torch.Tensor:
    """``n_i = Σ_t m[i, t]`` for each row of a ``[b, s]`` mask, as float64 ``[b]``."""
    return valid_tokens(mask).sum(dim=-1, dtype=_TOTALS_DTYPE)


def local_totals(masks: Sequence[torch.Tensor], device: Optional[torch.device] = None) -> torch.Tensor:
    """This rank's contribution to the step totals, ``[tokens, sequences, nonempty_sequences]``.

    Formula: over the rows ``i`` of every mask, ``[Σ_i n_i, Σ_i 1, Σ_i [n_i > 0]]``.
    Reduction axes: the sequence and token axes of every micro-batch's mask. Collectives: none
    (the caller all-reduces the result over the data-parallel group). Host syncs: none.
    """
    if device is None:
        device = masks[0].device if masks else torch.device("cpu")
    totals = torch.zeros(len(TOTALS_FIELDS), dtype=_TOTALS_DTYPE, device=device)
    for mask in masks:
        counts = row_token_counts(mask).to(device)
        totals[TOKENS] += counts.sum()
        totals[SEQUENCES] += counts.numel()
        totals[NONEMPTY_SEQUENCES] += (counts > 0).sum(dtype=_TOTALS_DTYPE)
    return totals


def denominator(term: LossTerm, totals: torch.Tensor) -> torch.Tensor:
    """The global denominator ``D`` of ``term`` from the all-reduced totals (a 0-dim tensor)."""
    if term.agg_mode is AggMode.TOKEN_MEAN:
        return totals[TOKENS]
    return totals[NONEMPTY_SEQUENCES] if term.exclude_fully_masked_seqs else totals[SEQUENCES]


def safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` where ``x > 0``, else 0; no NaN or Inf in value or gradient."""
    positive = x > 0
    return torch.where(positive, 1.0 / torch.where(positive, x, torch.ones_like(x)), torch.zeros_like(x))


def sequence_weights(term: LossTerm, mask: torch.Tensor) -> torch.Tensor:
    """Per-token weights ``m[i,t] · α_i`` of ``term`` for a ``[b, s]`` mask of whole sequences.

    ``α_i`` is 1, ``1/n_i`` (0 where ``n_i = 0``) or ``1/C_i`` by mode, with ``C_i`` the
    term's ``loss_scale_factor`` or, by default, ``s`` (the mask's padded length). The term's
    ``weight`` and ``1/D`` are *not* included. Returns float32 ``[b, s]``; no host sync.
    """
    valid = valid_tokens(mask)
    mode = term.agg_mode
    if mode is AggMode.SEQ_MEAN_TOKEN_MEAN:
        alpha = safe_reciprocal(row_token_counts(mask)).to(_WEIGHT_DTYPE).unsqueeze(-1)
    elif mode is AggMode.SEQ_MEAN_TOKEN_SUM_NORM:
        scale = term.loss_scale_factor if term.loss_scale_factor is not None else mask.shape[-1]
        alpha = torch.full((1, 1), 1.0 / float(scale), dtype=_WEIGHT_DTYPE, device=mask.device)
    else:
        alpha = torch.ones((1, 1), dtype=_WEIGHT_DTYPE, device=mask.device)
    return valid.to(_WEIGHT_DTYPE) * alpha


def masked_weighted_sum(
    per_token: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``Σ_{i,t} weights[i,t] · l[i,t]`` over valid tokens, in at least float32.

    Masked positions are selected away (``torch.where``), not multiplied by 0, so a NaN or Inf
    in a padded position can neither reach the value nor the gradient.
    """
    dtype = torch.promote_types(per_token.dtype, _WEIGHT_DTYPE)
    values = torch.where(valid, per_token.to(dtype), torch.zeros((), dtype=dtype, device=per_token.device))
    return (values * weights.to(dtype)).sum()
