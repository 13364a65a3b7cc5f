"""The test GPT written out in plain PyTorch: the single-process reference model.

It computes exactly what Megatron-Core's ``GPTModel`` with the local layer spec computes for
:class:`~megatron_agg.compare.gpt.TinyGPT` (pre-LayerNorm blocks, fused QKV laid out per query
group, causal softmax attention scaled by ``1/sqrt(head_dim)``, GeLU MLP, learned absolute
positions, output layer tied to the word embeddings, per-token cross entropy), on one process,
from a dict of full (unsharded) weights named as Megatron names them. It depends on no Megatron
state, so it can be evaluated under any parallel layout; ``tests/test_reference_gpt.py`` checks
it against Megatron's own model.

With a mixture-of-experts spec (:class:`~megatron_agg.compare.gpt.TinyMoEGPT`: ``num_moe_experts``
set, ``add_bias_linear=False``) every layer's MLP is Megatron's local-spec MoE instead: a bias-free
router ``logits = h·Wᵣᵀ``, the top-k logits of each token, a softmax over those k, and the sum over
the k chosen experts of ``prob · (gelu(h·W₁ᵀ)·W₂ᵀ)``; attention has no linear biases. No auxiliary
loss and no token dropping (that is what the MoE tests configure).

Weights that include an ``output_layer.weight`` give the model an untied output layer (the
logits multiply by it instead of the word embeddings), as Megatron builds it with
``share_embeddings_and_output_weights=False`` (e.g. for its torch-FSDP2 wrapper).
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

__all__ = ["init_full_weights", "per_token_loss", "param_names", "TorchGPT", "moe_mlp"]


def _num_experts(spec) -> int:
    return int(getattr(spec, "num_moe_experts", None) or 0)


def _has_linear_bias(spec) -> bool:
    return bool(getattr(spec, "add_bias_linear", True))


def param_names(spec) -> Dict[str, tuple]:
    """Names and shapes of the full model's parameters (Megatron's names, TP = PP = EP = 1)."""
    if _num_experts(spec):
        return _moe_param_names(spec)
    h, f, v = spec.hidden_size, spec.ffn_hidden_size, spec.vocab_size
    shapes = {
        "embedding.word_embeddings.weight": (v, h),
        "embedding.position_embeddings.weight": (spec.max_sequence_length, h),
        "decoder.final_layernorm.weight": (h,),
        "decoder.final_layernorm.bias": (h,),
    }
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "input_layernorm.bias": (h,),
                p + "self_attention.linear_qkv.weight": (3 * h, h),
                p + "self_attention.linear_qkv.bias": (3 * h,),
                p + "self_attention.linear_proj.weight": (h, h),
                p + "self_attention.linear_proj.bias": (h,),
                p + "pre_mlp_layernorm.weight": (h,),
                p + "pre_mlp_layernorm.bias": (h,),
                p + "mlp.linear_fc1.weight": (f, h),
                p + "mlp.linear_fc1.bias": (f,),
                p + "mlp.linear_fc2.weight": (h, f),
                p + "mlp.linear_fc2.bias": (h,),
            }
        )
    return shapes


def _moe_param_names(spec) -> Dict[str, tuple]:
    """:func:`param_names` of the MoE model: no linear biases, a router and E experts per layer."""
    h, f, v = spec.hidden_size, spec.ffn_hidden_size, spec.vocab_size
    bias = _has_linear_bias(spec)
    assert not bias, "Megatron's local-spec MoE needs add_bias_linear=False"
    shapes = {
        "embedding.word_embeddings.weight": (v, h),
        "embedding.position_embeddings.weight": (spec.max_sequence_length, h),
        "decoder.final_layernorm.weight": (h,),
        "decoder.final_layernorm.bias": (h,),
    }
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "input_layernorm.bias": (h,),
                p + "self_attention.linear_qkv.weight": (3 * h, h),
                p + "self_attention.linear_proj.weight": (h, h),
                p + "pre_mlp_layernorm.weight": (h,),
                p + "pre_mlp_layernorm.bias": (h,),
                p + "mlp.router.weight": (spec.num_moe_experts, h),
            }
        )
        for e in range(spec.num_moe_experts):
            shapes[p + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = (f, h)
            shapes[p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = (h, f)
    return shapes


def init_full_weights(spec, seed: int = 1234) -> Dict[str, torch.Tensor]:
    """Random full weights: N(0, 0.02) matrices and biases, LayerNorms near (1, 0).

    A MoE router gets N(0, 0.5) weights: well separated logits, so that no token's top-k choice
    is a near tie that the rounding differences of a sharded run could flip.
    """
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in param_names(spec).items():
        noise = torch.randn(shape, generator=g)
        if "layernorm.weight" in name:
            weights[name] = 1.0 + 0.1 * noise
        elif "layernorm.bias" in name:
            weights[name] = 0.1 * noise
        elif name.endswith("mlp.router.weight"):
            weights[name] = 0.5 * noise
        else:
            weights[name] = 0.02 * noise
    return weights


def _layer_norm(x: torch.Tensor, w: Dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[prefix + ".weight"], w[prefix + ".bias"], eps=1e-5)


def _linear(x: torch.Tensor, w: Dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """``x·Wᵀ + b``; ``b`` only where the model has it (the MoE model has no linear biases)."""
    y = x @ w[prefix + ".weight"].T
    bias = w.get(prefix + ".bias")
    return y + bias if bias is not None else y


def moe_mlp(h: torch.Tensor, w: Dict[str, torch.Tensor], prefix: str, num_experts: int, topk: int) -> torch.Tensor:
    """Megatron's local-spec MoE MLP (``TopKRouter`` + ``SequentialMLP``) on ``h [..., hidden]``.

    Router logits ``h·Wᵣᵀ``; each token goes to the ``topk`` experts of largest logit with
    probabilities ``softmax`` over those logits (Megatron's default: score function softmax, no
    pre-softmax, no scaling); expert ``e`` computes ``gelu(h·W₁ᵀ)·W₂ᵀ`` (no bias) and its output is
    weighted by the token's probability; a token's output is the sum over its experts.
    """
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    logits = x @ w[prefix + "router.weight"].T
    top_logits, top_idx = torch.topk(logits, k=topk, dim=1)
    top_probs = torch.softmax(top_logits, dim=-1, dtype=torch.float32).type_as(logits)
    out = torch.zeros_like(x)
    for e in range(num_experts):
        chosen = top_idx == e  # [n, k]: at most one True per row
        rows = chosen.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        prob = (top_probs * chosen).sum(dim=1)[rows]
        expert = f"{prefix}experts.local_experts.{e}."
        act = F.gelu(x[rows] @ w[expert + "linear_fc1.weight"].T) * prob.unsqueeze(-1)
        out = out.index_add(0, rows, act @ w[expert + "linear_fc2.weight"].T)
    return out.view(shape)


def _output_weight(w: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The output layer's weight: an untied ``output_layer.weight`` if given, else the word embeddings."""
    out = w.get("output_layer.weight")
    return out if out is not None else w["embedding.word_embeddings.weight"]


def per_token_loss(
    w: Dict[str, torch.Tensor], spec, tokens: torch.Tensor, position_ids: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Per-token cross entropy ``[b, s]`` of whole (unpacked) sequences."""
    b, s = tokens.shape
    heads = spec.num_attention_heads
    head_dim = spec.hidden_size // heads
    x = w["embedding.word_embeddings.weight"][tokens] + w["embedding.position_embeddings.weight"][position_ids]
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    if _num_experts(spec):
        return _moe_per_token_loss(w, spec, x, labels, causal)
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}."
        h = _layer_norm(x, w, p + "input_layernorm")
        qkv = h @ w[p + "self_attention.linear_qkv.weight"].T + w[p + "self_attention.linear_qkv.bias"]
        qkv = qkv.view(b, s, heads, 3, head_dim)  # one query group per head: [q, k, v] each
        q, k, v = qkv.unbind(dim=3)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        ctx = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, heads * head_dim)
        x = x + ctx @ w[p + "self_attention.linear_proj.weight"].T + w[p + "self_attention.linear_proj.bias"]
        h = _layer_norm(x, w, p + "pre_mlp_layernorm")
        h = F.gelu(h @ w[p + "mlp.linear_fc1.weight"].T + w[p + "mlp.linear_fc1.bias"])
        x = x + h @ w[p + "mlp.linear_fc2.weight"].T + w[p + "mlp.linear_fc2.bias"]
    x = _layer_norm(x, w, "decoder.final_layernorm")
    logits = x @ _output_weight(w).T
    return F.cross_entropy(logits.reshape(b * s, -1).float(), labels.reshape(-1), reduction="none").view(b, s)


def _moe_per_token_loss(w: Dict[str, torch.Tensor], spec, x: torch.Tensor, labels: torch.Tensor,
                        causal: torch.Tensor) -> torch.Tensor:
    """:func:`per_token_loss` of the MoE model (from the embeddings ``x`` on)."""
    b, s, _ = x.shape
    heads = spec.num_attention_heads
    head_dim = spec.hidden_size // heads
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}."
        h = _layer_norm(x, w, p + "input_layernorm")
        qkv = _linear(h, w, p + "self_attention.linear_qkv").view(b, s, heads, 3, head_dim)
        q, k, v = qkv.unbind(dim=3)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        ctx = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, heads * head_dim)
        x = x + _linear(ctx, w, p + "self_attention.linear_proj")
        h = _layer_norm(x, w, p + "pre_mlp_layernorm")
        x = x + moe_mlp(h, w, p + "mlp.", spec.num_moe_experts, spec.moe_router_topk)
    x = _layer_norm(x, w, "decoder.final_layernorm")
    logits = x @ _output_weight(w).T
    return F.cross_entropy(logits.reshape(b * s, -1).float(), labels.reshape(-1), reduction="none").view(b, s)


class TorchGPT(torch.nn.Module):
    """:func:`per_token_loss` as an ``nn.Module`` (e.g. to shard with FSDP2).

    Parameters are kept flat under Megatron's names (``.`` written as ``__``);
    :meth:`named_full_grads` returns gradients under Megatron's names again.
    """

    def __init__(self, spec, weights: Dict[str, torch.Tensor]):
        super().__init__()
        self.spec = spec
        self.weights = torch.nn.ParameterDict(
            {name.replace(".", "__"): torch.nn.Parameter(t.detach().clone()) for name, t in weights.items()}
        )

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = {name.replace("__", "."): p for name, p in self.weights.items()}
        return per_token_loss(w, self.spec, tokens, position_ids, labels)

    def named_full_grads(self) -> Dict[str, torch.Tensor]:
        out = {}
        for name, p in self.weights.items():
            g = p.grad
            if g is not None and hasattr(g, "full_tensor"):
                g = g.full_tensor()  # a DTensor shard (FSDP2): all-gather it
            out[name.replace("__", ".")] = g.detach().clone() if g is not None else torch.zeros_like(p)
        return out
