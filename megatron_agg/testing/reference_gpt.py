"""The test GPT written out in plain PyTorch: the single-process reference model.

It computes exactly what Megatron-Core's ``GPTModel`` with the local layer spec computes for
:class:`~megatron_agg.testing.gpt.TinyGPT` (pre-LayerNorm blocks, fused QKV laid out per query
group, causal softmax attention scaled by ``1/sqrt(head_dim)``, GeLU MLP, learned absolute
positions, output layer tied to the word embeddings, per-token cross entropy), on one process,
from a dict of full (unsharded) weights named as Megatron names them. It depends on no Megatron
state, so it can be evaluated under any parallel layout; ``tests/test_reference_gpt.py`` checks
it against Megatron's own model.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

__all__ = ["init_full_weights", "per_token_loss", "param_names", "TorchGPT"]


def param_names(spec) -> Dict[str, tuple]:
    """Names and shapes of the full model's parameters (Megatron's names, TP = PP = 1)."""
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


def init_full_weights(spec, seed: int = 1234) -> Dict[str, torch.Tensor]:
    """Random full weights: N(0, 0.02) matrices and biases, LayerNorms near (1, 0)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in param_names(spec).items():
        noise = torch.randn(shape, generator=g)
        if "layernorm.weight" in name:
            weights[name] = 1.0 + 0.1 * noise
        elif "layernorm.bias" in name:
            weights[name] = 0.1 * noise
        else:
            weights[name] = 0.02 * noise
    return weights


def _layer_norm(x: torch.Tensor, w: Dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[prefix + ".weight"], w[prefix + ".bias"], eps=1e-5)


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
    logits = x @ w["embedding.word_embeddings.weight"].T
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
