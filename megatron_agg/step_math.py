"""The arithmetic of one step, top to bottom: plain functions and frozen dataclasses.

Every mode (see :mod:`megatron_agg.modes`) has the form

    L = Σ_i Σ_t  m[i,t] · α_i · l[i,t]  /  D

with a per-sequence weight ``α_i`` that needs only sequence ``i`` itself and one global
denominator ``D`` that needs the whole step:

=========================== ==================== ============================================
mode                        α_i                  D
=========================== ==================== ============================================
``token-mean``              1                    T  (valid tokens in the step)
``seq-mean-token-sum``      1                    N  (or N⁺ with exclude_fully_masked_seqs)
``seq-mean-token-mean``     1 / n_i (0 if 0)     N  (or N⁺)
``seq-mean-token-sum-norm`` 1 / C_i              N  (or N⁺)
``token-sum``               1                    1
``prompt-mean``             1 / M_g(i) (0 if 0)  P  (or P⁺: groups with a valid token)
=========================== ==================== ============================================

``n_i`` is the valid tokens of sequence ``i`` (under the term's mask), ``C_i`` the term's
``loss_scale_factor`` or the sequence's padded length, ``M_g`` the valid tokens of group ``g``
over the whole step, ``N⁺`` the sequences with ``n_i > 0``. ``1/D`` is 0 when ``D = 0``
(:func:`safe_reciprocal`): an all-masked step gives ``L = 0`` and zero gradients, never NaN.
A term ``k`` has a weight ``w_k`` and the step's loss is ``Σ_k w_k·L_k``; a metric is a term
without weight, never backpropagated.

A step, in the order of this module:

1. **sequences** (:func:`sequence_view`): a sequence is a row of a ``[b, s]`` mask or one of the
   sequences packed into a ``[1, t]`` row (:class:`~megatron_agg.packing.PackedSequences`); both
   map to one per-token sequence index, so every formula is written once.
2. **the plan** (:func:`stack_microbatches`, :func:`plan_step`): per micro-batch the per-token
   weights ``m·α`` of every term and metric (2a, :func:`sequence_weights`; ``prompt-mean``'s
   ``1/M_g`` comes in 3), sliced to this rank's context-parallel positions (:class:`CPRank`, from
   :mod:`megatron_agg.layout`), and this rank's **local totals vector** (2b,
   :func:`local_totals_vector`, layout :class:`TotalsLayout`).
3. **the denominators** (:func:`denominators`) from the totals vector once the caller summed it
   over the data-parallel ranks: ``1/D_k`` of every term and metric and ``1/M_g`` of every group;
   :func:`scale_weights` folds them into the plan's weights, once per step.
4. **a micro-batch's share** ``S = Σ m·α·l / D`` (:func:`microbatch_share`,
   :func:`weighted_total`), so that the shares of every micro-batch on every rank add up to ``L``.
   Front ends that see one micro-batch at a time use :func:`share_of_view` (modes chosen per call)
   or :func:`numerator_part` with :func:`denominator_part` (Megatron's ``num_tokens`` channel).

Layout of the totals vector, for the step's masks ``k = 0 … K−1`` (the first is the mask whose
valid tokens Megatron's ``num_tokens`` count) and, with ``prompt-mean``, ``G`` groups and the
``K_g`` masks whose per-group counts a ``prompt-mean`` term or metric needs:

============================================== ======================= ===========================
entries                                        size                    what
============================================== ======================= ===========================
``T_0, N, N⁺_0``                               3                       valid tokens of the first
                                                                       mask; sequences; sequences
                                                                       with a valid token
``T_k, N⁺_k`` per further mask                 2·(K−1)                 the same for mask ``k``
``P, P⁺_k`` per group mask (scope per-rank)    1 + K_g                 groups present; groups with
                                                                       a valid token
caller's extra fields                          ``extra``               (StepShares: Σ num_tokens)
``S_g`` then ``M_{k,g}`` (scope global)        G·(1 + K_g)             sequences and valid tokens
                                                                       of each group
============================================== ======================= ===========================

Group ids come in two scopes (:data:`GROUP_SCOPES`): ``"global"`` (an id names the same prompt on
every data-parallel rank; the per-group counts ride densely in the all-reduce, ``G·(1+K_g)``
float64 values) and ``"per-rank"`` (the group is the pair (DP rank, id); its counts never leave
the rank, only ``P`` and ``P⁺_k`` are summed). Every count is a sum of small integers in float64
(exact up to 2**53); weights are float32.

What this module does NOT do: no collective and no ``torch.distributed`` (the caller all-reduces
the totals vector: :mod:`megatron_agg.groups`, :func:`megatron_agg.collective.start_totals`), no
Megatron import and no factor ``F`` that cancels Megatron's averaging (:mod:`megatron_agg.megatron.averaging`),
no check of user input and no error reporting (:mod:`megatron_agg.validation`,
:mod:`megatron_agg.checks`), no state kept between calls. No function here reads a tensor on the
host: nothing syncs with the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .layout import local_positions, to_cp_local
from .modes import GROUP_SCOPES, AggMode
from .packing import PackedSequences
from .terms import LossTerm

__all__ = [
    "GROUP_SCOPES", "valid_tokens", "SequenceView", "sequence_view", "cp_local_view", "cp_integer_part",
    "safe_reciprocal",
    "sequence_weights", "group_index", "TotalsLayout", "checked_group_ids", "LocalTotals", "local_totals_vector",
    "count_totals", "CPRank", "Block", "stack_microbatches", "MicroBatchPlan", "StepPlan", "plan_step", "StepTotals", "Denominators",
    "reciprocal_denominator", "denominators", "scale_weights", "masked_weighted_sum",
    "microbatch_share", "weighted_total", "share_of_view", "numerator_part", "denominator_part",
]

#: How group ids are numbered (see the module docstring).

_TOTALS_DTYPE = torch.float64
_WEIGHT_DTYPE = torch.float32


# -- 1. sequences ---------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class CPRank:
    """This rank's place in the context-parallel group: ``size`` ranks share each sequence, cut as
    ``layout`` says (:data:`megatron_agg.layout.CP_LAYOUTS`); this rank is ``rank``."""

    size: int = 1
    rank: int = 0
    layout: str = "load-balanced"

    def positions(self, total: int, packed: Optional[PackedSequences], device: torch.device) -> Optional[torch.Tensor]:
        """Positions of a row of ``total`` positions held by this rank (``None``: the whole row).
        Packed positions are clamped into the row: bad boundaries are reported, never an index error."""
        cu_padded = None if packed is None else packed.boundaries(device)[1]
        positions = local_positions(self.layout, total, self.size, self.rank, cu_padded, device=device)
        if positions is not None and cu_padded is not None:
            positions = positions.clamp(0, total - 1)
        return positions

    def local(self, tensor: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
        """The slice of a whole-sequence ``[..., s]`` tensor this rank holds."""
        return to_cp_local(tensor, self.size, self.rank, positions)


def cp_local_view(loss_mask: torch.Tensor, packed: Optional[PackedSequences], cp: CPRank) -> SequenceView:
    """The sequences of a mask as this CP rank sees it (``[b, s/cp]``, its slice of whole sequences,
    packed or not): ``counts`` are the valid tokens of each sequence *on this slice* (whole-sequence
    ones, when a caller has them, replace them: ``dataclasses.replace(view, counts=...)``), the
    padded lengths those of the whole sequences."""
    device = loss_mask.device
    local_len = loss_mask.shape[-1]
    valid = valid_tokens(loss_mask)
    if packed is None:
        num_seqs = loss_mask.shape[0]
        lengths = torch.full((num_seqs,), float(local_len * cp.size), dtype=_TOTALS_DTYPE, device=device)
        return SequenceView(valid, None, num_seqs, valid.sum(dim=-1, dtype=_TOTALS_DTYPE), lengths)
    total = local_len * cp.size
    whole = sequence_view(torch.ones(1, total, dtype=torch.bool, device=device), packed)
    num_seqs, seq_index = whole.num_seqs, whole.seq_index
    assert seq_index is not None
    if cp.size > 1:
        _, cu_padded = packed.boundaries(device)
        positions = local_positions(cp.layout, total, cp.size, cp.rank, cu_padded)
        seq_index = seq_index.index_select(-1, positions.clamp(0, total - 1))
    valid = valid & (seq_index < num_seqs)
    counts = torch.zeros(num_seqs + 1, dtype=_TOTALS_DTYPE, device=device)
    counts = counts.index_add_(0, seq_index.reshape(-1), valid.reshape(-1).to(_TOTALS_DTYPE))[:num_seqs]
    return SequenceView(valid, seq_index, num_seqs, counts, whole.padded_lengths)


# -- 2a. α: the per-sequence weights --------------------------------------------------------------
def cp_integer_part(counts: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This CP rank's exact integer part of each count ``n`` (rounded):
    ``⌊n·(r+1)/cp⌋ − ⌊n·r/cp⌋``, so that the parts add up to ``n`` over the CP group (int64)."""
    n = counts.round().to(torch.int64)
    return n * (cp_rank + 1) // cp_size - n * cp_rank // cp_size


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
    sequence of ``view``, :func:`checked_group_ids`), ``num_groups`` (the "no group" slot) for
    tokens of no sequence. No host sync."""
    ids = group_ids.to(device=view.valid.device, dtype=torch.int64)
    if view.seq_index is None:
        return ids.unsqueeze(-1).expand(view.valid.shape)
    extended = torch.cat([ids, ids.new_full((1,), num_groups)])
    return extended[view.seq_index]


# -- 2b. the totals vector ------------------------------------------------------------------------
@dataclass(frozen=True)
class TotalsLayout:
    """Where each count sits in the step's totals vector (see the module docstring)."""

    masks: Tuple[str, ...]
    group_masks: Tuple[str, ...] = ()
    num_groups: int = 0
    group_scope: Optional[str] = None
    extra: int = 0

    def __post_init__(self) -> None:
        assert self.masks and set(self.group_masks) <= set(self.masks), (self.masks, self.group_masks)
        assert not self.group_masks or (self.num_groups >= 1 and self.group_scope in GROUP_SCOPES)

    @property
    def uses_groups(self) -> bool:
        return bool(self.group_masks)

    @property
    def dense_groups(self) -> bool:
        """Whether per-group counts ride in the all-reduce (scope ``"global"``): the vector's
        length then depends on ``num_groups``, which every rank must share."""
        return self.uses_groups and self.group_scope == "global"

    def _mask(self, mask: str) -> int:
        return self.masks.index(mask)

    def _group_mask(self, mask: str) -> int:
        return self.group_masks.index(mask)

    # -- offsets (with one mask the header is [T, N, N⁺]) --
    SEQUENCES = 1

    def tokens_index(self, mask: str) -> int:
        k = self._mask(mask)
        return 0 if k == 0 else 1 + 2 * k

    def nonempty_index(self, mask: str) -> int:
        return 2 + 2 * self._mask(mask)

    @property
    def _rank_groups_start(self) -> int:
        return 1 + 2 * len(self.masks)

    @property
    def _rank_groups_size(self) -> int:
        return 1 + len(self.group_masks) if (self.uses_groups and not self.dense_groups) else 0

    @property
    def extra_start(self) -> int:
        return self._rank_groups_start + self._rank_groups_size

    @property
    def header_size(self) -> int:
        """Entries before the dense group block (independent of ``num_groups``)."""
        return self.extra_start + self.extra

    @property
    def size(self) -> int:
        dense = self.num_groups * (1 + len(self.group_masks)) if self.dense_groups else 0
        return self.header_size + dense

    def group_slice(self, block: int) -> slice:
        """Block 0: ``S_g`` (sequences per group); block ``1 + k``: ``M_{k,g}`` of group mask ``k``."""
        start = self.header_size + block * self.num_groups
        return slice(start, start + self.num_groups)

    def nbytes(self) -> int:
        return self.size * torch.finfo(_TOTALS_DTYPE).bits // 8


def checked_group_ids(ids: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids as int64 with every id outside [0, num_groups) replaced by num_groups, number of such
    ids)``: a bad id is reported by the end-of-step check and never indexes out of bounds (slot
    ``num_groups`` is the "no group" slot, weight 0). No host sync."""
    ids = ids.to(torch.int64)
    bad = (ids < 0) | (ids >= num_groups)
    return torch.where(bad, torch.full_like(ids, num_groups), ids), bad.sum()


@dataclass(frozen=True)
class LocalTotals:
    """This rank's part of the totals vector, and what of it stays local."""

    vector: torch.Tensor
    #: Per group mask, this rank's ``M_g`` (scope ``"per-rank"``: the only ones there are).
    group_tokens: Dict[str, torch.Tensor]


def local_totals_vector(layout: TotalsLayout, counts: Mapping[str, torch.Tensor], num_seqs: int,
                        group_ids: Optional[torch.Tensor], device: torch.device,
                        extra: Sequence[torch.Tensor] = ()) -> LocalTotals:
    """This rank's contribution to the step's totals.

    Formula: over the sequences ``i`` of every micro-batch of this rank, with ``n_{k,i}`` the valid
    tokens of sequence ``i`` under mask ``k`` (``counts[k]``, float64 ``[num_seqs]``, every mask in
    the same sequence order) and ``g(i)`` its group (``group_ids``, checked, ``num_groups`` for a bad
    one): ``N = Σ_i 1``, ``T_k = Σ_i n_{k,i}``, ``N⁺_k = Σ_i [n_{k,i} > 0]``, ``S_g = Σ_{i∈g} 1``,
    ``M_{k,g} = Σ_{i∈g} n_{k,i}``, and with scope ``"per-rank"`` ``P = Σ_g [S_g > 0]``,
    ``P⁺_k = Σ_g [M_{k,g} > 0]``. Reduction axes: sequences and tokens of this rank. Collectives:
    none (the caller all-reduces the vector over the data-parallel group). Host syncs: none.
    """
    parts = []
    for k, mask in enumerate(layout.masks):
        n = counts[mask].to(device=device, dtype=_TOTALS_DTYPE)
        if k == 0:
            seqs = torch.tensor(float(num_seqs), dtype=_TOTALS_DTYPE, device=device)
            parts.append(torch.stack([n.sum(), seqs, (n > 0).sum(dtype=_TOTALS_DTYPE)]))
        else:
            parts.append(torch.stack([n.sum(), (n > 0).sum(dtype=_TOTALS_DTYPE)]))
    group_tokens: Dict[str, torch.Tensor] = {}
    dense: list = []
    if layout.uses_groups:
        assert group_ids is not None and group_ids.numel() == num_seqs
        g = layout.num_groups
        present = torch.zeros(g + 1, dtype=_TOTALS_DTYPE, device=device).index_add_(
            0, group_ids, torch.ones(num_seqs, dtype=_TOTALS_DTYPE, device=device))[:g]
        dense.append(present)
        for mask in layout.group_masks:
            tokens = torch.zeros(g + 1, dtype=_TOTALS_DTYPE, device=device).index_add_(
                0, group_ids, counts[mask].to(device=device, dtype=_TOTALS_DTYPE))[:g]
            group_tokens[mask] = tokens
            dense.append(tokens)
        if not layout.dense_groups:  # per-rank groups: only how many there are leaves the rank
            parts.append(torch.stack([(present > 0).sum(dtype=_TOTALS_DTYPE)]
                                     + [(group_tokens[m] > 0).sum(dtype=_TOTALS_DTYPE) for m in layout.group_masks]))
            dense = []
    assert len(extra) == layout.extra
    parts += [e.to(device=device, dtype=_TOTALS_DTYPE).reshape(1) for e in extra]
    vector = torch.cat(parts + dense)
    assert vector.numel() == layout.size
    return LocalTotals(vector, group_tokens)


def count_totals(layout: TotalsLayout, views: Mapping[str, Sequence[SequenceView]], group_ids: Optional[torch.Tensor],
                 device: torch.device, extra: Sequence[torch.Tensor] = ()) -> LocalTotals:
    """:func:`local_totals_vector` of the sequences of ``views`` (per mask name, every micro-batch of
    this rank in one order; the first mask of ``layout`` counts the sequences)."""
    counts = {k: (torch.cat([v.counts.to(device) for v in vs]) if vs
                  else torch.zeros(0, dtype=_TOTALS_DTYPE, device=device)) for k, vs in views.items()}
    num_seqs = sum(v.num_seqs for v in views[layout.masks[0]])
    return local_totals_vector(layout, counts, num_seqs, group_ids, device, extra)


# -- 2c. the plan of a step -----------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """Micro-batches whose plan is computed together: the whole step when every micro-batch is
    unpacked with one padded length and one dtype per mask (stacked into one ``[Σ b_j, s]`` mask
    per name), else one each."""

    masks: Dict[str, torch.Tensor]  # whole-sequence masks by name
    packed: Optional[PackedSequences]
    views: Dict[str, SequenceView]
    rows: List[int]  # rows of each micro-batch of the block


@dataclass(frozen=True)
class MicroBatchPlan:
    """Per-token weights ``m_k·α`` of every term and metric for one micro-batch, in this rank's
    layout (views of the step's weight buffers: :func:`scale_weights` adds ``1/M_g`` and ``1/D``)."""

    shape: torch.Size  # the whole-sequence mask shape
    local_shape: torch.Size  # the shape the loss function receives on this CP rank
    weights: Dict[str, torch.Tensor]  # per term and metric
    valid: Dict[str, torch.Tensor]  # per mask: valid tokens of a sequence, in this rank's layout (bool)
    member: Optional[torch.Tensor]  # tokens that belong to a sequence (None: all), this rank's layout


@dataclass(frozen=True)
class StepPlan:
    """The plan of one step on this rank (:func:`plan_step`)."""

    channels: Mapping[str, LossTerm]  # the terms and metrics, by name
    layout: TotalsLayout
    #: The micro-batch of every row when the step is one stacked block (``None``: one block each).
    row_to_mb: Optional[torch.Tensor]
    microbatches: List[MicroBatchPlan]
    local: LocalTotals  # this rank's totals vector (to all-reduce) and its local group counts
    #: Number of group ids outside ``[0, num_groups)`` (``None``: no groups).
    bad_group_ids: Optional[torch.Tensor]
    #: Per block: the weight buffers of every channel, the group of every token (prompt-mean), the
    #: valid tokens of every mask and the tokens of a sequence, in this rank's layout.
    weight_buffers: Dict[str, List[torch.Tensor]]
    group_index: List[torch.Tensor]
    valid: Dict[str, List[torch.Tensor]]
    member: List[Optional[torch.Tensor]]
    #: Per micro-batch: the valid tokens of the first mask on this CP slice (int32 ``[M]``; unclamped).
    num_tokens: torch.Tensor

    @property
    def batched(self) -> bool:
        return self.row_to_mb is not None


def stack_microbatches(masks: Mapping[str, Sequence[torch.Tensor]], names: Sequence[str],
                       packed: Sequence[Optional[PackedSequences]],
                       device: torch.device) -> Tuple[List[Block], Optional[torch.Tensor]]:
    """The step's micro-batches as blocks (``masks``: every mask of ``names`` by name, one
    whole-sequence mask per micro-batch) and, when the step is one stacked block, the micro-batch
    of every row (else ``None``)."""
    first = masks[names[0]]
    sizes = [mask.shape[0] for mask in first]
    batched = all(p is None for p in packed) and len({m.shape[-1] for m in first}) == 1 and all(
        len({m.dtype for m in masks[k]}) == 1 for k in names)
    if not batched:
        blocks = []
        for j, p in enumerate(packed):
            block_masks = {k: masks[k][j] for k in names}
            views = {k: sequence_view(m, p) for k, m in block_masks.items()}
            blocks.append(Block(block_masks, p, views, [first[j].shape[0]]))
        return blocks, None
    row_to_mb = torch.tensor([j for j, b in enumerate(sizes) for _ in range(b)], device=device)
    wholes = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in masks.items()}
    return [Block(wholes, None, {k: sequence_view(m) for k, m in wholes.items()}, sizes)], row_to_mb


def _split(tensor: torch.Tensor, rows: List[int]) -> Sequence[torch.Tensor]:
    return tensor.split(rows) if len(rows) > 1 else (tensor,)


def plan_step(channels: Mapping[str, LossTerm], layout: TotalsLayout, blocks: List[Block],
              row_to_mb: Optional[torch.Tensor], group_ids: Optional[Sequence[torch.Tensor]], cp: CPRank,
              device: torch.device) -> StepPlan:
    """The plan of this rank's micro-batches, from :func:`stack_microbatches` (whole-sequence masks,
    shapes checked by the caller) and ``group_ids`` (per micro-batch one id per sequence;
    prompt-mean): per-token weights ``m·α`` (:func:`sequence_weights`) of every channel, cut to
    this rank's CP positions, and the local totals (:func:`count_totals`). A stacked block is
    computed once and split back per micro-batch (views of one buffer per channel). No collective,
    no host sync."""
    names = layout.masks
    num_mbs = sum(len(b.rows) for b in blocks)
    ids_all, bad, block_ids = None, None, [None] * len(blocks)
    if layout.uses_groups:
        assert group_ids is not None and len(group_ids) == num_mbs
        ids_all, bad = checked_group_ids(torch.cat([g.to(device) for g in group_ids]), layout.num_groups)
        block_ids = list(ids_all.split([b.views[names[0]].num_seqs for b in blocks]))
    local = count_totals(layout, {k: [b.views[k] for b in blocks] for k in names}, ids_all, device)
    weight_buffers: Dict[str, List[torch.Tensor]] = {name: [] for name in channels}
    group_indices: List[torch.Tensor] = []
    valid_all: Dict[str, List[torch.Tensor]] = {k: [] for k in names}
    member_all: List[Optional[torch.Tensor]] = []
    plans: List[MicroBatchPlan] = []
    for block, ids in zip(blocks, block_ids):
        mask0 = block.masks[names[0]]
        positions = cp.positions(mask0.shape[-1], block.packed, mask0.device)
        rows = block.rows
        weights = {}
        for name, term in channels.items():
            w = cp.local(sequence_weights(term, block.views[term.mask]), positions)
            if not w.is_contiguous():
                w = w.contiguous()
            weight_buffers[name].append(w)
            weights[name] = _split(w, rows)
        if ids is not None:
            index = group_index(block.views[names[0]], ids, layout.num_groups)
            group_indices.append(cp.local(index, positions).contiguous())
        valids = {}
        for k in names:
            valid = cp.local(block.views[k].valid, positions)
            valid_all[k].append(valid)
            valids[k] = _split(valid, rows)
        membership = block.views[names[0]].membership()
        member = None if membership is None else cp.local(membership, positions)
        member_all.append(member)
        members = _split(member, rows) if member is not None else (None,) * len(rows)
        for i, b in enumerate(rows):
            plans.append(MicroBatchPlan(torch.Size((b, mask0.shape[-1])), torch.Size((b, mask0.shape[-1] // cp.size)),
                                        {n: weights[n][i] for n in channels}, {k: valids[k][i] for k in names},
                                        members[i]))
    if row_to_mb is not None:
        per_row = valid_all[names[0]][0].sum(dim=-1, dtype=torch.int)
        num_tokens = torch.zeros(num_mbs, dtype=torch.int, device=device).index_add_(0, row_to_mb, per_row)
    else:
        num_tokens = torch.stack([plan.valid[names[0]].sum(dtype=torch.int) for plan in plans])
    return StepPlan(channels, layout, row_to_mb, plans, local, bad, weight_buffers, group_indices, valid_all,
                    member_all, num_tokens)


# -- 3. the denominators --------------------------------------------------------------------------
class StepTotals:
    """The all-reduced totals of a step and the denominators of its terms and metrics.

    ``vector``: the summed :class:`TotalsLayout` vector (a view into the all-reduced buffer);
    ``local_group_tokens``: this rank's ``M_{k,g}`` (used with scope ``"per-rank"``).
    """

    def __init__(self, layout: TotalsLayout, vector: torch.Tensor,
                 local_group_tokens: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        self.layout = layout
        self.vector = vector
        self._local = dict(local_group_tokens or {})

    def sequences(self) -> torch.Tensor:
        return self.vector[TotalsLayout.SEQUENCES]

    def tokens(self, mask: str) -> torch.Tensor:
        return self.vector[self.layout.tokens_index(mask)]

    def nonempty_sequences(self, mask: str) -> torch.Tensor:
        return self.vector[self.layout.nonempty_index(mask)]

    def extra(self, i: int) -> torch.Tensor:
        return self.vector[self.layout.extra_start + i]

    def group_tokens(self, mask: str) -> torch.Tensor:
        """``M_g`` of every group under ``mask`` (float64 ``[G]``): summed over the step (scope
        ``"global"``) or this rank's own groups (``"per-rank"``)."""
        layout = self.layout
        if layout.dense_groups:
            return self.vector[layout.group_slice(1 + layout._group_mask(mask))]
        return self._local[mask]

    def groups(self, mask: str, exclude_empty: bool) -> torch.Tensor:
        """``P``: the groups present in the step (with at least one sequence), or with
        ``exclude_empty`` those with a valid token under ``mask``."""
        layout = self.layout
        if layout.dense_groups:
            counts = self.group_tokens(mask) if exclude_empty else self.vector[layout.group_slice(0)]
            return (counts > 0).sum(dtype=_TOTALS_DTYPE)
        start = layout._rank_groups_start
        return self.vector[start + 1 + layout._group_mask(mask)] if exclude_empty else self.vector[start]

    def denominator(self, term: LossTerm) -> torch.Tensor:
        """The global denominator ``D`` of ``term`` (a 0-dim float64 tensor): ``T`` (token-mean),
        1 (token-sum), ``N`` or ``N⁺`` (seq-mean-*), ``P`` or ``P⁺`` (prompt-mean), counted from the
        term's own mask."""
        mode = term.agg_mode
        if mode is AggMode.TOKEN_MEAN:
            return self.tokens(term.mask)
        if mode is AggMode.TOKEN_SUM:
            return torch.ones((), dtype=self.vector.dtype, device=self.vector.device)
        if mode is AggMode.PROMPT_MEAN:
            return self.groups(term.mask, term.exclude_fully_masked_seqs)
        return self.nonempty_sequences(term.mask) if term.exclude_fully_masked_seqs else self.sequences()

    def group_reciprocals(self, mask: str) -> torch.Tensor:
        """``1/M_g`` of every group under ``mask`` (0 where ``M_g = 0``), plus a 0 for the "no
        group" slot ``G``: float32 ``[G + 1]``, to be gathered per token."""
        m = self.group_tokens(mask)
        inv = torch.where(m > 0, 1.0 / torch.where(m > 0, m, torch.ones_like(m)), torch.zeros_like(m))
        return torch.cat([inv, inv.new_zeros(1)]).to(torch.float32)


@dataclass(frozen=True)
class Denominators:
    """What the all-reduced totals give every micro-batch: ``1/D`` of every channel (float32,
    0-dim) and ``1/M_g`` of every group mask (float32 ``[G + 1]``, the last slot "no group")."""

    totals: StepTotals
    scales: Dict[str, torch.Tensor]
    group_reciprocals: Dict[str, torch.Tensor]


def reciprocal_denominator(totals: StepTotals, term: LossTerm) -> torch.Tensor:
    """``1/D`` of ``term`` (0 when ``D = 0``), float32 0-dim."""
    return safe_reciprocal(totals.denominator(term)).to(torch.float32)


def denominators(channels: Mapping[str, LossTerm], layout: TotalsLayout, reduced: torch.Tensor,
                 local_group_tokens: Optional[Mapping[str, torch.Tensor]] = None) -> Denominators:
    """The denominators of ``channels`` from ``reduced``, the totals vector summed over the
    data-parallel ranks (``local_group_tokens``: :attr:`LocalTotals.group_tokens`, the counts of
    ``"per-rank"`` groups, which are never summed)."""
    totals = StepTotals(layout, reduced, local_group_tokens)
    scales = {name: reciprocal_denominator(totals, term) for name, term in channels.items()}
    return Denominators(totals, scales, {m: totals.group_reciprocals(m) for m in layout.group_masks})


def scale_weights(plan: StepPlan, dens: Denominators) -> None:
    """Fold ``1/M_g`` (prompt-mean, gathered per token) and ``1/D`` into the plan's weight buffers,
    **in place, once per step**: afterwards every micro-batch's weights are ``m·α/D``."""
    for name, buffers in plan.weight_buffers.items():
        term = plan.channels[name]
        for i, buffer in enumerate(buffers):
            if term.agg_mode.needs_groups:
                buffer.mul_(torch.take(dens.group_reciprocals[term.mask], plan.group_index[i]))
            buffer.mul_(dens.scales[name])


# -- 4. a micro-batch's share ---------------------------------------------------------------------
def masked_weighted_sum(per_token: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
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


def microbatch_share(mb: MicroBatchPlan, name: str, term: LossTerm, per_token: torch.Tensor) -> torch.Tensor:
    """``S = Σ where(m, l, 0) · (m·α/D)`` of channel ``name`` for one planned micro-batch (its
    weights scaled by :func:`scale_weights`): masked positions selected away, never multiplied."""
    return masked_weighted_sum(per_token, mb.valid[term.mask], mb.weights[name])


def weighted_total(terms: Mapping[str, LossTerm], shares: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``Σ_k w_k · S_k`` over the terms, in the terms' order (a weight of 1 multiplies nothing)."""
    total: Optional[torch.Tensor] = None
    for name, term in terms.items():
        share = shares[name]
        weighted = share * term.weight if term.weight != 1.0 else share
        total = weighted if total is None else total + weighted
    assert total is not None
    return total


def share_of_view(values: torch.Tensor, term: LossTerm, view: SequenceView, dens: Denominators,
                  group_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Σ m·α·l / D`` of ``term`` over the sequences of ``view`` (weights made on the fly, for a
    mode chosen at call time; ``group_ids``: the checked ids of the view's sequences, prompt-mean)."""
    weights = sequence_weights(term, view)
    if term.agg_mode.needs_groups:
        assert group_ids is not None
        index = group_index(view, group_ids, dens.totals.layout.num_groups)
        weights = weights * torch.take(dens.group_reciprocals[term.mask].to(weights.device), index)
    return masked_weighted_sum(values, view.valid, weights) * reciprocal_denominator(dens.totals, term)


def numerator_part(values: torch.Tensor, term: LossTerm, view: SequenceView) -> torch.Tensor:
    """``Σ m·α·l`` of ``term`` over the sequences of ``view``: a share's numerator, for a caller
    whose denominator travels elsewhere (the deferred mode: Megatron's ``num_tokens``)."""
    return masked_weighted_sum(values, view.valid, sequence_weights(term, view))


def denominator_part(term: LossTerm, view: SequenceView, cp_rank: int, first_of_step: bool) -> torch.Tensor:
    """This micro-batch's part of ``term``'s denominator ``D`` on this rank (int32, 0-dim), such that
    the parts of every micro-batch and data×context-parallel rank add up to ``D``: valid tokens of
    this CP slice (``token-mean``); sequences, or those with a valid token (``view.counts`` of whole
    sequences), on CP rank 0 only (``seq-mean-*``); 1 on the step's first micro-batch of DP×CP rank 0
    (``first_of_step``), else 0 (``token-sum``)."""
    device = view.valid.device
    zero = torch.zeros((), dtype=torch.int, device=device)
    if term.agg_mode is AggMode.TOKEN_MEAN:
        return view.valid.sum(dtype=torch.int)
    if term.agg_mode is AggMode.TOKEN_SUM:
        return torch.ones((), dtype=torch.int, device=device) if first_of_step else zero
    if cp_rank != 0:
        return zero
    if term.exclude_fully_masked_seqs:
        return (view.counts > 0).sum(dtype=torch.int)
    return torch.tensor(view.num_seqs, dtype=torch.int, device=device)
