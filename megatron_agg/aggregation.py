"""The arithmetic of exact loss aggregation: pure tensor math, no ``torch.distributed``.

Every mode (see :mod:`megatron_agg.modes`) has the form

    L = Σ_i Σ_t  m[i,t] · α_i · l[i,t]  /  D

with a per-sequence weight ``α_i`` that needs only sequence ``i`` itself and one global
denominator ``D`` that needs the whole step:

=========================== ==================== ===================================
mode                        α_i                  D
=========================== ==================== ===================================
``token-mean``              1                    T  (valid tokens in the step)
``seq-mean-token-sum``      1                    N
``seq-mean-token-mean``     1 / n_i (0 if 0)     N
``seq-mean-token-sum-norm`` 1 / C_i              N
``token-sum``               1                    1
``prompt-mean``             1 / M_g(i) (0 if 0)  P
=========================== ==================== ===================================

``N`` counts all sequences of the step, or only those with ``n_i > 0`` when
``exclude_fully_masked_seqs``; ``P`` the groups (prompts) present in the step, or only those
with ``M_g > 0``. ``T``, the number of sequences and the number of non-empty sequences are the
step *totals*: local sums (:func:`local_totals`; with several masks and groups
:mod:`megatron_agg.totals`) that the caller all-reduces (SUM) once per step over the
data-parallel group. ``prompt-mean`` is the one mode whose ``α_i`` needs the whole step too
(``M_g`` sums over every sequence of group ``g`` on every rank): its per-token weights are ``m``
here and get ``1/M_g`` from the all-reduced group counts (:func:`group_index`,
:meth:`megatron_agg.totals.StepTotals.group_reciprocals`). ``1/D`` is taken as 0 when ``D = 0``
(:func:`safe_reciprocal`), so an all-masked step gives ``L = 0`` and zero gradients, never NaN.

A sequence is a row of a ``[b, s]`` mask, or one of the sequences packed into a ``[1, t]`` row
(:class:`~megatron_agg.packing.PackedSequences`); :func:`sequence_view` maps both to the same
per-token sequence index, so every formula below is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .modes import AggMode
from .packing import PackedSequences
from .terms import LossTerm

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

#: Fields of the totals vector, in order. All are sums over sequences (float64, exact to 2**53).
TOTALS_FIELDS = ("tokens", "sequences", "nonempty_sequences")
TOKENS, SEQUENCES, NONEMPTY_SEQUENCES = range(len(TOTALS_FIELDS))

_TOTALS_DTYPE = torch.float64
_WEIGHT_DTYPE = torch.float32


def valid_tokens(mask: torch.Tensor) -> torch.Tensor:
    """``mask != 0`` as a bool tensor (masks may be bool, integer or float 0/1)."""
    return mask if mask.dtype == torch.bool else mask != 0


@dataclass(frozen=True)
class SequenceView:
    """A micro-batch's mask seen as sequences.

    ``valid[b, s]``: valid tokens that belong to a sequence; ``seq_index[b, s]``: the token's
    sequence in ``[0, num_seqs)``, or ``num_seqs`` for tokens of no sequence (``None`` when every
    row is one sequence); ``counts``: ``n_i`` of every sequence (float64 ``[num_seqs]``);
    ``padded_lengths``: the default ``C_i`` of every sequence (float64 ``[num_seqs]``).
    """

    valid: torch.Tensor
    seq_index: Optional[torch.Tensor]
    num_seqs: int
    counts: torch.Tensor
    padded_lengths: torch.Tensor

    def token_counts(self) -> torch.Tensor:
        """``n_i`` of every sequence, float64 ``[num_seqs]``."""
        return self.counts

    def per_token(self, per_sequence: torch.Tensor, outside: float = 0.0) -> torch.Tensor:
        """Spread a ``[num_seqs]`` quantity over the tokens (``outside`` for tokens of no sequence)."""
        if self.seq_index is None:
            return per_sequence.unsqueeze(-1)  # broadcasts over the row
        extended = torch.cat([per_sequence, per_sequence.new_full((1,), outside)])
        return extended[self.seq_index]

    def membership(self) -> Optional[torch.Tensor]:
        """Tokens that belong to a sequence (``None``: all of them)."""
        return None if self.seq_index is None else self.seq_index < self.num_seqs


def sequence_view(mask: torch.Tensor, packed: Optional[PackedSequences] = None) -> SequenceView:
    """The sequences of a ``[b, s]`` mask: one per row, or those packed into its one row."""
    valid = valid_tokens(mask)
    b, s = mask.shape
    device = mask.device
    if packed is None:
        counts = valid.sum(dim=-1, dtype=_TOTALS_DTYPE)
        lengths = torch.full((b,), float(s), dtype=_TOTALS_DTYPE, device=device)
        return SequenceView(valid, None, b, counts, lengths)
    assert b == 1, "packed micro-batches hold one row (checked by the caller)"
    cu, cu_padded = packed.boundaries(device)
    k = packed.num_sequences
    positions = torch.arange(s, device=device)
    seq = torch.searchsorted(cu_padded[1:], positions, right=True)  # k for positions after the last
    inside = seq < k
    seq_c = seq.clamp(max=max(k - 1, 0))
    if k > 0:
        real_end = cu_padded[seq_c] + (cu[seq_c + 1] - cu[seq_c])
        inside = inside & (positions >= cu_padded[seq_c]) & (positions < real_end)
    seq_index = torch.where(inside, seq, torch.full_like(seq, k)).unsqueeze(0)
    valid = valid & inside.unsqueeze(0)
    counts = torch.zeros(k + 1, dtype=_TOTALS_DTYPE, device=device)
    counts.index_add_(0, seq_index.reshape(-1), valid.reshape(-1).to(_TOTALS_DTYPE))
    if packed.padded_length is not None:
        lengths = torch.full((k,), float(packed.padded_length), dtype=_TOTALS_DTYPE, device=device)
    else:
        lengths = (cu_padded[1:] - cu_padded[:-1]).to(_TOTALS_DTYPE)
    return SequenceView(valid, seq_index, k, counts[:k], lengths)


def local_totals(views: Sequence[SequenceView], device: Optional[torch.device] = None) -> torch.Tensor:
    """This rank's contribution to the step totals, ``[tokens, sequences, nonempty_sequences]``.

    Formula: over the sequences ``i`` of every micro-batch, ``[Σ_i n_i, Σ_i 1, Σ_i [n_i > 0]]``.
    Reduction axes: the sequence and token axes of every micro-batch. Collectives: none (the
    caller all-reduces the result over the data-parallel group). Host syncs: none.
    """
    if device is None:
        device = views[0].valid.device if views else torch.device("cpu")
    if not views:
        return torch.zeros(len(TOTALS_FIELDS), dtype=_TOTALS_DTYPE, device=device)
    counts = torch.cat([view.counts.to(device) for view in views])
    num_seqs = torch.tensor(float(sum(view.num_seqs for view in views)), dtype=_TOTALS_DTYPE, device=device)
    return torch.stack([counts.sum(), num_seqs, (counts > 0).sum(dtype=_TOTALS_DTYPE)])


def denominator(term: LossTerm, totals: torch.Tensor) -> torch.Tensor:
    """The global denominator ``D`` of ``term`` from the all-reduced ``[T, N, N_nonempty]`` of
    :func:`local_totals` (a 0-dim tensor). ``prompt-mean`` needs the per-group counts of
    :class:`megatron_agg.totals.StepTotals`."""
    if term.agg_mode is AggMode.TOKEN_MEAN:
        return totals[TOKENS]
    if term.agg_mode is AggMode.TOKEN_SUM:
        return torch.ones_like(totals[TOKENS])
    if term.agg_mode is AggMode.PROMPT_MEAN:
        raise ValueError("prompt-mean's denominator needs per-group counts: use megatron_agg.totals.StepTotals.")
    return totals[NONEMPTY_SEQUENCES] if term.exclude_fully_masked_seqs else totals[SEQUENCES]


def safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` where ``x > 0``, else 0; no NaN or Inf in value or gradient."""
    positive = x > 0
    return torch.where(positive, 1.0 / torch.where(positive, x, torch.ones_like(x)), torch.zeros_like(x))


def sequence_weights(term: LossTerm, view: SequenceView) -> torch.Tensor:
    """Per-token weights ``m[i,t] · α_i`` of ``term`` for the whole sequences of ``view``.

    ``α_i`` is 1, ``1/n_i`` (0 where ``n_i = 0``) or ``1/C_i`` by mode, with ``C_i`` the term's
    ``loss_scale_factor`` or, by default, the sequence's padded length (the mask's last dimension
    for unpacked rows). The term's ``weight`` and ``1/D`` are *not* included, nor ``prompt-mean``'s
    ``1/M_g`` (global: applied once the step's group counts are known). Tokens of no sequence get
    0. Returns float32 ``[b, s]``; no host sync.
    """
    mode = term.agg_mode
    if mode is AggMode.SEQ_MEAN_TOKEN_MEAN:
        alpha = safe_reciprocal(view.counts)
    elif mode is AggMode.SEQ_MEAN_TOKEN_SUM_NORM:
        if term.loss_scale_factor is not None:
            alpha = torch.full_like(view.padded_lengths, 1.0 / float(term.loss_scale_factor))
        else:
            alpha = safe_reciprocal(view.padded_lengths)
    else:
        return view.valid.to(_WEIGHT_DTYPE)
    return view.valid.to(_WEIGHT_DTYPE) * view.per_token(alpha.to(_WEIGHT_DTYPE))


def group_index(view: SequenceView, group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per token, the group of its sequence: ``[b, s]`` int64 from ``group_ids`` (one checked id per
    sequence of ``view``, :func:`megatron_agg.totals.checked_group_ids`), ``num_groups`` (the "no
    group" slot) for tokens of no sequence. No host sync."""
    ids = group_ids.to(device=view.valid.device, dtype=torch.int64)
    if view.seq_index is None:
        return ids.unsqueeze(-1).expand(view.valid.shape)
    extended = torch.cat([ids, ids.new_full((1,), num_groups)])
    return extended[view.seq_index]


def masked_weighted_sum(
    per_token: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``Σ_{i,t} weights[i,t] · l[i,t]`` over valid tokens, in at least float32.

    Masked positions are selected away (``torch.where``), not multiplied by 0, so a NaN or Inf
    in a padded position can neither reach the value nor the gradient.
    """
    dtype = torch.promote_types(per_token.dtype, _WEIGHT_DTYPE)
    if per_token.dtype != dtype:
        per_token = per_token.to(dtype)
    if weights.dtype != dtype:
        weights = weights.to(dtype)
    return (torch.where(valid, per_token, 0.0) * weights).sum()


def weighted_share(per_token: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_{i,t} weights[i,t] · l[i,t]`` over valid tokens in two tensor ops (``where``, then one
    contraction), in the weights' dtype (float32) or wider; the per-micro-batch path of the engine,
    whose weights already carry ``1/D``. NaN/Inf at masked positions is selected away, as in
    :func:`masked_weighted_sum`."""
    selected = torch.where(valid, per_token, 0.0)
    if selected.dtype != weights.dtype:
        dtype = torch.promote_types(selected.dtype, weights.dtype)
        selected, weights = selected.to(dtype), weights.to(dtype)
    return torch.tensordot(selected, weights, dims=selected.dim())
