"""The step's totals: what the step's one all-reduce carries, and every denominator read from it.

Pure tensor math, no ``torch.distributed``: the engine counts this rank's part
(:func:`local_totals_vector`), all-reduces it (SUM, float64) over the pure data-parallel group in
the step's one collective, and reads the denominators of every term and metric from the result
(:class:`StepTotals`).

Layout of the vector (:class:`TotalsLayout`), for the step's masks ``k = 0 … K−1`` (the first is the
mask whose valid tokens Megatron's ``num_tokens`` count) and, with ``prompt-mean``, ``G`` groups and
the ``K_g`` masks whose per-group counts a ``prompt-mean`` term or metric needs:

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

Group ids come in two scopes (:data:`GROUP_SCOPES`):

- ``"global"``: an id names the same prompt on every data-parallel rank, so a group may be split
  over micro-batches *and* ranks. The per-group counts are summed densely: ``G·(1+K_g)`` float64
  values ride in the all-reduce (at ``G = 1,024`` groups and one mask: 2,048 values, 16 KiB).
- ``"per-rank"``: an id names a group of *this* data-parallel rank only; the group is the pair
  (DP rank, id), so ids of different ranks can never collide. Its counts never leave the rank;
  only ``P`` and ``P⁺_k`` are summed (``1 + K_g`` values, whatever ``G``).

Every count is a sum of small integers in float64 (exact up to 2**53).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from .modes import AggMode
from .terms import LossTerm

__all__ = ["GROUP_SCOPES", "TotalsLayout", "LocalTotals", "StepTotals", "checked_group_ids", "local_totals_vector"]

#: How group ids are numbered (see the module docstring).
GROUP_SCOPES = ("global", "per-rank")

_DTYPE = torch.float64


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

    # -- offsets (with one mask the header is [T, N, N⁺], as agg.local_totals counts it) --------
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
        return self.size * torch.finfo(_DTYPE).bits // 8


def checked_group_ids(ids: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids as int64 with every id outside [0, num_groups) replaced by num_groups, number of such
    ids)``: a bad id is reported by the end-of-step check and never indexes out of bounds (slot
    ``num_groups`` is the "no group" slot, weight 0). No host sync."""
    ids = ids.to(torch.int64)
    bad = (ids < 0) | (ids >= num_groups)
    return torch.where(bad, torch.full_like(ids, num_groups), ids), bad.sum()


@dataclass
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
        n = counts[mask].to(device=device, dtype=_DTYPE)
        if k == 0:
            seqs = torch.tensor(float(num_seqs), dtype=_DTYPE, device=device)
            parts.append(torch.stack([n.sum(), seqs, (n > 0).sum(dtype=_DTYPE)]))
        else:
            parts.append(torch.stack([n.sum(), (n > 0).sum(dtype=_DTYPE)]))
    group_tokens: Dict[str, torch.Tensor] = {}
    dense: list = []
    if layout.uses_groups:
        assert group_ids is not None and group_ids.numel() == num_seqs
        g = layout.num_groups
        present = torch.zeros(g + 1, dtype=_DTYPE, device=device).index_add_(
            0, group_ids, torch.ones(num_seqs, dtype=_DTYPE, device=device))[:g]
        dense.append(present)
        for mask in layout.group_masks:
            tokens = torch.zeros(g + 1, dtype=_DTYPE, device=device).index_add_(
                0, group_ids, counts[mask].to(device=device, dtype=_DTYPE))[:g]
            group_tokens[mask] = tokens
            dense.append(tokens)
        if not layout.dense_groups:  # per-rank groups: only how many there are leaves the rank
            parts.append(torch.stack([(present > 0).sum(dtype=_DTYPE)]
                                     + [(group_tokens[m] > 0).sum(dtype=_DTYPE) for m in layout.group_masks]))
            dense = []
    assert len(extra) == layout.extra
    parts += [e.to(device=device, dtype=_DTYPE).reshape(1) for e in extra]
    vector = torch.cat(parts + dense)
    assert vector.numel() == layout.size
    return LocalTotals(vector, group_tokens)


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
            return (counts > 0).sum(dtype=_DTYPE)
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
