"""A small core attention for the tests: causal softmax attention over whole sequences under
context parallelism and packed (THD) sequences, which Megatron's local-spec attention refuses.

It plugs into ``GPTModel``'s local layer spec in place of ``DotProductAttention``
(:func:`layer_spec`). On a context-parallel rank the query holds this rank's tokens in
Megatron's load-balanced order (``2·cp`` chunks, rank ``r`` holding chunks ``r`` and
``2·cp − 1 − r``; for packed rows, of every sequence separately, or of the whole row when the
``PackedSeqParams`` carry ``cp_layout="per-row"``, see :data:`megatron_agg.layout.CP_LAYOUTS`); keys and values are
all-gathered over the CP group with autograd (:class:`_AllGather`, whose backward all-reduces
the gradient and keeps this rank's part: ``torch.distributed.nn``'s all-gather breaks on gloo
subgroups that do not start at rank 0) and put back in sequence order. Every query attends to
keys at or before its position in the same packed sequence (block-diagonal causal mask).

Test-only: it materializes the full score matrix. Numerically it equals Megatron's local
``DotProductAttention`` (scale ``1/sqrt(head_dim)``, softmax in fp32, no dropout).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_agg.layout import cp_local_positions, local_positions


class _AllGather(torch.autograd.Function):
    """``[n, ...] -> [cp·n, ...]`` (rank order) over ``group``, differentiable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


class ContextParallelPackedAttention(torch.nn.Module):
    """Drop-in ``core_attention`` (the constructor and forward of ``DotProductAttention``)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, model_comm_pgs=None, **_):
        super().__init__()
        self.config = config
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        groups = pg_collection if pg_collection is not None else model_comm_pgs  # 0.15+ / 0.14
        if groups is not None and getattr(groups, "cp", None) is not None:
            self.cp_group = groups.cp
        else:
            from megatron.core import parallel_state

            self.cp_group = parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        thd = packed_seq_params is not None
        if thd:  # [t, np, hn] -> [t, 1, np, hn]
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        # Dynamic (hybrid) CP: the sample's own partner group rides on its PackedSeqParams
        # (``cp_group``; ``local_cp_size == 1`` without one: the sample is whole on this rank).
        group = getattr(packed_seq_params, "cp_group", None) if thd else None
        if group is None and thd and getattr(packed_seq_params, "local_cp_size", None) == 1:
            cp, rank = 1, 0
        else:
            group = group if group is not None else self.cp_group
            cp, rank = dist.get_world_size(group), dist.get_rank(group)
        local = query.shape[0]
        total = local * cp
        device = query.device
        if thd:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            cu = cu.to(device=device, dtype=torch.int64)
            layout = getattr(packed_seq_params, "cp_layout", "load-balanced")
            positions = [local_positions(layout, total, cp, r, cu) for r in range(cp)] if cp > 1 else [
                torch.arange(total, device=device)]
            segment = torch.searchsorted(cu[1:], torch.arange(total, device=device), right=True)
        else:
            positions = [cp_local_positions(total, cp, r, device=device) for r in range(cp)]
            segment = torch.zeros(total, dtype=torch.int64, device=device)
        if cp > 1:
            order = torch.argsort(torch.cat(positions))  # gathered (rank-major) -> sequence order
            key = _AllGather.apply(key, group).index_select(0, order)
            value = _AllGather.apply(value, group).index_select(0, order)
        q_pos = positions[rank]
        k_pos = torch.arange(total, device=device)
        allowed = (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)) & (segment[k_pos].unsqueeze(0) == segment[q_pos].unsqueeze(1))
        scores = torch.einsum("qbhd,kbhd->bhqk", query.float(), key.float()) * self.scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        context = torch.einsum("bhqk,kbhd->qbhd", probs, value)
        sq, b, heads, head_dim = context.shape
        if thd:
            return context.reshape(sq, heads * head_dim)
        return context.reshape(sq, b, heads * head_dim)


def layer_spec():
    """Megatron's GPT local layer spec with :class:`ContextParallelPackedAttention`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = ContextParallelPackedAttention
    return spec
