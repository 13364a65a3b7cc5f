"""The global loss by its definition: one process, the whole global batch, no parallelism.

This is the ground truth every parallel result is compared against (tests, the examples'
printed reference, ``megatron-agg compare``). It is written literally, sequence by sequence,
and shares no code with the hook's scaling on purpose.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

from .modes import AggMode, AggModeLike
from .terms import LossTerm

__all__ = ["reference_loss"]


def reference_loss(
    per_token_losses: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    term: Union[LossTerm, AggModeLike],
    group_ids: Optional[Sequence[Sequence[int]]] = None,
) -> torch.Tensor:
    """``L`` of ``term`` over the global batch given as micro-batches of whole sequences.

    Args:
        per_token_losses: ``[b_j, s_j]`` per-token losses of every micro-batch of every
            data-parallel rank (any order: ``L`` does not depend on it).
        masks: the matching 0/1 masks (bool, int or float), same shapes: the term's own mask
            (``term.mask`` names it at the entry points; here it is given).
        term: a :class:`LossTerm`, or a mode for a term with default options.
        group_ids: ``prompt-mean`` only: per micro-batch, the group (prompt) of each row, as
            global ids (a group may have rows in several micro-batches).

    Returns:
        ``weight · L`` as a 0-dim float64 tensor, differentiable w.r.t. the losses.
        ``L = 0`` when its denominator is 0.
    """
    if not isinstance(term, LossTerm):
        term = LossTerm(term)
    if len(per_token_losses) != len(masks):
        raise ValueError(
            f"reference_loss needs one mask per loss tensor, got {len(per_token_losses)} losses "
            f"and {len(masks)} masks."
        )
    seq_sums, seq_counts, seq_lengths = [], [], []
    for loss, mask in zip(per_token_losses, masks):
        if loss.shape != mask.shape or loss.dim() != 2:
            raise ValueError(
                f"reference_loss expects [b, s] losses with masks of the same shape, got "
                f"{tuple(loss.shape)} and {tuple(mask.shape)}."
            )
        for i in range(loss.shape[0]):
            valid = mask[i] != 0
            seq_sums.append(torch.where(valid, loss[i].double(), torch.zeros((), dtype=torch.float64)).sum())
            seq_counts.append(int(valid.sum()))
            seq_lengths.append(mask.shape[-1])

    zero = torch.zeros((), dtype=torch.float64)
    mode = term.agg_mode
    if mode is AggMode.TOKEN_SUM:
        return term.weight * (zero + sum(seq_sums))
    if mode is AggMode.PROMPT_MEAN:
        if group_ids is None or len(group_ids) != len(masks):
            raise ValueError("prompt-mean needs group_ids: one group id per row of every micro-batch.")
        groups = [int(g) for ids in group_ids for g in ids]
        if len(groups) != len(seq_sums):
            raise ValueError(f"reference_loss got {len(groups)} group ids for {len(seq_sums)} rows.")
        # Group by group: the sum of its rows' losses and its valid tokens M_g.
        group_sums: Dict[int, List[torch.Tensor]] = {}
        group_tokens: Dict[int, int] = {}
        for g, s, n in zip(groups, seq_sums, seq_counts):
            group_sums.setdefault(g, []).append(s)
            group_tokens[g] = group_tokens.get(g, 0) + n
        if term.exclude_fully_masked_seqs:
            num_groups = sum(1 for g in group_tokens if group_tokens[g] > 0)
        else:
            num_groups = len(group_tokens)  # the groups present in the step
        if num_groups == 0:
            return zero + sum(s * 0 for s in seq_sums)
        per_group = [sum(group_sums[g]) / group_tokens[g] if group_tokens[g] > 0 else sum(group_sums[g]) * 0
                     for g in group_sums]
        return term.weight * (sum(per_group) / num_groups)
    if mode is AggMode.TOKEN_MEAN:
        total_tokens = sum(seq_counts)
        if total_tokens == 0:
            return zero + sum(s * 0 for s in seq_sums)
        value = sum(seq_sums) / total_tokens
    else:
        if term.exclude_fully_masked_seqs:
            num_seqs = sum(1 for n in seq_counts if n > 0)
        else:
            num_seqs = len(seq_counts)
        if num_seqs == 0:
            return zero + sum(s * 0 for s in seq_sums)
        if mode is AggMode.SEQ_MEAN_TOKEN_SUM:
            per_seq = list(seq_sums)
        elif mode is AggMode.SEQ_MEAN_TOKEN_MEAN:
            per_seq = [s / n if n > 0 else s * 0 for s, n in zip(seq_sums, seq_counts)]
        else:  # SEQ_MEAN_TOKEN_SUM_NORM
            per_seq = [
                s / (term.loss_scale_factor if term.loss_scale_factor is not None else c)
                for s, c in zip(seq_sums, seq_lengths)
            ]
        value = sum(per_seq) / num_seqs
    return term.weight * value
