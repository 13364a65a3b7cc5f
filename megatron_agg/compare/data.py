"""A ragged global batch and its split over data-parallel ranks and micro-batches.

The batch is what breaks a mean of local means: masked prompts of varying length, responses of
varying length, fully masked sequences, micro-batches of different sizes, data-parallel ranks
with different numbers of sequences and micro-batches, and (with four ranks) one rank whose
tokens are all masked. Masks alternate bool / int64 / float32 dtypes between micro-batches.

For the options of issue 13 every sequence also has a group (the prompt it answers:
:data:`GROUP_IDS`, groups that straddle micro-batches and data-parallel ranks, one group of fully
masked sequences only, one id of no sequence; :data:`ALIGNED_GROUP_IDS`, groups that never
straddle a data-parallel rank, for ``group_scope="per-rank"``) and a second mask, ``"correct"``
(:func:`correct_mask`: the responses of the "correct" sequences, plus a few tokens of a
sequence the default mask leaves out entirely).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from dataclasses import field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..packing import PackedSequences

__all__ = [
    "GlobalBatch",
    "make_global_batch",
    "MICROBATCH_PLANS",
    "split_for_rank",
    "split_for_rank_packed",
    "rows_for_rank",
    "MicroBatch",
    "GROUP_IDS",
    "ALIGNED_GROUP_IDS",
    "NUM_GROUPS",
    "correct_mask",
]

#: Micro-batch sizes of each data-parallel rank, for each data-parallel size; 24 sequences in
#: all. Every rank has an even number of micro-batches (interleaved PP with pp=2 needs it).
#: With dp=4, rank 2 holds sequences 15 and 16, which are fully masked.
MICROBATCH_PLANS: Dict[int, List[List[int]]] = {
    1: [[5, 3, 7, 1, 4, 4]],
    2: [[4, 1, 6, 2], [3, 5, 1, 2]],
    4: [[2, 3], [4, 2, 1, 3], [1, 1], [3, 4]],
}
#: The same sizes, but every rank with the same *number* of micro-batches: what FSDP needs (its
#: all-gathers run once per forward on every rank). Still ragged, still rank 2 of 4 all masked.
EQUAL_COUNT_PLANS: Dict[int, List[List[int]]] = {
    1: [[5, 3, 7, 1, 4, 4]],
    2: [[4, 1, 6, 2], [3, 5, 1, 2]],
    4: [[2, 3], [4, 6], [1, 1], [3, 4]],
}
NUM_SEQUENCES = 24
FULLY_MASKED = (7, 15, 16)
_MASK_DTYPES = (torch.bool, torch.int64, torch.float32)
#: The group (prompt) of every sequence, global ids: groups straddle the micro-batches and the
#: data-parallel ranks of every plan (e.g. group 0 = rows 0, 3, 8, 23); group 8 holds the fully
#: masked rows 15 and 16 only (M_8 = 0); id 9 names no sequence (not counted in P).
GROUP_IDS = (0, 1, 2, 0, 3, 1, 2, 4, 0, 5, 3, 6, 1, 4, 7, 8, 8, 5, 2, 6, 7, 3, 4, 0)
NUM_GROUPS = 10
#: Groups that never straddle a data-parallel rank of any plan (rank boundaries at rows 5, 13, 15,
#: 17) but do straddle micro-batches; group 6 = rows 15 and 16 (fully masked). For
#: ``group_scope="per-rank"``: each rank's ids are its own, and these groups are the same groups.
ALIGNED_GROUP_IDS = (0, 1, 0, 1, 0, 2, 3, 4, 2, 3, 4, 2, 3, 5, 5, 6, 6, 7, 8, 9, 7, 8, 9, 7)
#: Rows whose response is "correct" (the ``"correct"`` mask keeps their valid tokens).
_CORRECT_ROWS = tuple(i for i in range(NUM_SEQUENCES) if i % 3 != 2)


@dataclass
class GlobalBatch:
    tokens: torch.Tensor  # [G, S] int64
    labels: torch.Tensor  # [G, S] int64
    loss_mask: torch.Tensor  # [G, S] float32 0/1
    lengths: List[int]  # real length of each sequence (masked prompt + response); the rest is padding

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        """The batch's masks by name: ``"default"`` (``loss_mask``) and ``"correct"``."""
        return {"default": self.loss_mask, "correct": correct_mask(self)}


def correct_mask(batch: GlobalBatch) -> torch.Tensor:
    """The ``"correct"`` mask: the default mask's tokens of the rows in ``_CORRECT_ROWS`` (every
    third row is "incorrect": none of its tokens), plus the first two tokens of row 7, which the
    default mask leaves out entirely (a mask of its own, not a subset)."""
    mask = torch.zeros_like(batch.loss_mask)
    rows = list(_CORRECT_ROWS)
    mask[rows] = batch.loss_mask[rows]
    mask[7, :2] = 1.0
    return mask


@dataclass
class MicroBatch:
    tokens: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor  # as the loss function sees it (CP-local where CP > 1)
    full_loss_mask: torch.Tensor  # whole sequences, for LossHook.wrap(loss_masks=...)
    packed: Optional[PackedSequences] = None  # for LossHook.wrap(packed_seqs=...)
    packed_seq_params: Any = None  # Megatron's PackedSeqParams, for the model
    #: Every mask of the batch by name, as the loss function sees it / of whole sequences.
    masks: Dict[str, torch.Tensor] = field(default_factory=dict)
    full_masks: Dict[str, torch.Tensor] = field(default_factory=dict)
    #: The global-batch row of each sequence (row, or packed sequence in packing order).
    rows: List[int] = field(default_factory=list)


def make_global_batch(vocab_size: int, seq_length: int = 16, seed: int = 0) -> GlobalBatch:
    """24 sequences of padded length ``seq_length``: masked prompt, valid response, padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (NUM_SEQUENCES, seq_length), generator=g)
    labels = (3 * tokens + 1) % vocab_size  # a learnable map, so that training lowers the loss
    mask = torch.zeros(NUM_SEQUENCES, seq_length)
    lengths = []
    for i in range(NUM_SEQUENCES):
        if i in FULLY_MASKED:  # a prompt with no (valid) response
            lengths.append(int(torch.randint(1, seq_length + 1, (1,), generator=g)))
            continue
        prompt = int(torch.randint(0, seq_length // 2, (1,), generator=g))
        response = int(torch.randint(1, seq_length - prompt + 1, (1,), generator=g))
        mask[i, prompt : prompt + response] = 1.0
        lengths.append(prompt + response)
    return GlobalBatch(tokens, labels, mask, lengths)


def rows_for_rank(dp_size: int, dp_rank: int, plans: Optional[Dict[int, List[List[int]]]] = None) -> List[slice]:
    """The global-batch rows of each micro-batch of a data-parallel rank (per :data:`MICROBATCH_PLANS`)."""
    plan = (plans or MICROBATCH_PLANS)[dp_size]
    start = sum(sum(sizes) for sizes in plan[:dp_rank])
    out = []
    for size in plan[dp_rank]:
        out.append(slice(start, start + size))
        start += size
    return out


def split_for_rank(batch: GlobalBatch, dp_size: int, dp_rank: int, cp_size: int = 1,
                   cp_rank: int = 0) -> List[MicroBatch]:
    """This data-parallel rank's micro-batches, per :data:`MICROBATCH_PLANS`."""
    from ..layout import to_cp_local

    plan = MICROBATCH_PLANS[dp_size]
    start = sum(sum(sizes) for sizes in plan[:dp_rank])
    out = []
    for j, size in enumerate(plan[dp_rank]):
        rows = slice(start, start + size)
        start += size
        dtype = _MASK_DTYPES[j % len(_MASK_DTYPES)]
        full_mask = batch.loss_mask[rows].to(dtype)
        s = batch.seq_length
        position_ids = torch.arange(s).unsqueeze(0).expand(size, s).contiguous()
        local = lambda t: to_cp_local(t, cp_size, cp_rank).contiguous()  # noqa: E731
        full_masks = {name: m[rows].to(dtype) for name, m in batch.masks.items()}
        full_masks["default"] = full_mask
        out.append(
            MicroBatch(
                tokens=local(batch.tokens[rows]),
                labels=local(batch.labels[rows]),
                position_ids=local(position_ids),
                loss_mask=local(full_mask),
                full_loss_mask=full_mask,
                masks={name: local(m) for name, m in full_masks.items()},
                full_masks=full_masks,
                rows=list(range(rows.start, rows.stop)),
            )
        )
    return out


def split_for_rank_packed(batch: GlobalBatch, dp_size: int, dp_rank: int, cp_size: int = 1,
                          cp_rank: int = 0, cp_layout: str = "load-balanced",
                          pad_documents: Optional[bool] = None) -> List[MicroBatch]:
    """Like :func:`split_for_rank`, but each micro-batch packs its sequences into one row.

    Every sequence keeps only its real tokens. ``cp_layout="load-balanced"`` (Megatron's per-document
    cut): each sequence is padded to a multiple of ``2·cp`` (and at least ``2·cp``).
    ``cp_layout="per-row"`` (Megatron-LM's ``--dataloader-inter-document-masking``: the row is cut
    as a whole): sequences keep their own lengths (``pad_documents=True`` pads them as above, a row
    both layouts can cut) and only the row is padded to a multiple of ``2·cp``. Every other pack
    also ends with ``2·cp`` tokens of padding after its last sequence. Position ids restart at 0 for
    each sequence. The ``PackedSeqParams`` carry the layout as ``cp_layout`` (read by the tests'
    attention). The loss masks carry ``padded_length = S`` so that ``seq-mean-token-sum-norm``'s
    default ``C`` is the unpacked one.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    from ..layout import local_positions, to_cp_local

    if pad_documents is None:
        pad_documents = cp_layout == "load-balanced"
    plan = MICROBATCH_PLANS[dp_size]
    start = sum(sum(sizes) for sizes in plan[:dp_rank])
    multiple = 2 * cp_size
    out = []
    for j, size in enumerate(plan[dp_rank]):
        rows = list(range(start, start + size))
        start += size
        lengths = [batch.lengths[i] for i in rows]
        padded = [max(multiple, -(-n // multiple) * multiple) for n in lengths] if pad_documents else list(lengths)
        cu = [0, *itertools.accumulate(lengths)]
        cu_padded = [0, *itertools.accumulate(padded)]
        total = -(-cu_padded[-1] // multiple) * multiple + (multiple if j % 2 else 0)
        tokens = torch.zeros(1, total, dtype=torch.int64)
        labels = torch.zeros(1, total, dtype=torch.int64)
        position_ids = torch.zeros(1, total, dtype=torch.int64)
        named = {name: torch.zeros(1, total) for name in batch.masks}
        for i, n, a, p in zip(rows, lengths, cu_padded, padded):
            tokens[0, a : a + n] = batch.tokens[i, :n]
            labels[0, a : a + n] = batch.labels[i, :n]
            for name, m in batch.masks.items():
                named[name][0, a : a + n] = m[i, :n]
            position_ids[0, a : a + p] = torch.arange(p)
        dtype = _MASK_DTYPES[j % len(_MASK_DTYPES)]
        full_masks = {name: m.to(dtype) for name, m in named.items()}
        full_mask = full_masks["default"]
        cu_t = torch.tensor(cu, dtype=torch.int32)
        cu_padded_t = torch.tensor(cu_padded, dtype=torch.int32)
        positions = local_positions(cp_layout, total, cp_size, cp_rank, cu_padded_t)
        local = lambda t: to_cp_local(t, cp_size, cp_rank, positions).contiguous()  # noqa: E731
        params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_t,
            cu_seqlens_kv=cu_t,
            cu_seqlens_q_padded=cu_padded_t,
            cu_seqlens_kv_padded=cu_padded_t,
            max_seqlen_q=max(padded),
            max_seqlen_kv=max(padded),
        )
        params.cp_layout = cp_layout  # for the tests' attention (tests/support/cp_attention.py)
        out.append(
            MicroBatch(
                tokens=local(tokens),
                labels=local(labels),
                position_ids=local(position_ids),
                loss_mask=local(full_mask),
                full_loss_mask=full_mask,
                packed=PackedSequences(cu_t, cu_padded_t, padded_length=batch.seq_length),
                packed_seq_params=params,
                masks={name: local(m) for name, m in full_masks.items()},
                full_masks=full_masks,
                rows=list(rows),
            )
        )
    return out


def all_rows(plan: Sequence[Sequence[int]]) -> int:
    return sum(sum(s) for s in plan)


assert all(all_rows(p) == NUM_SEQUENCES for p in (*MICROBATCH_PLANS.values(), *EQUAL_COUNT_PLANS.values()))
