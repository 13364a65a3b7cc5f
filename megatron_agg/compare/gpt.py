"""A small ``GPTModel`` (local spec) built for any layout from one set of full weights, its
single-process reference gradients, and the comparison of a sharded run against them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .parallel import Layout

__all__ = [
    "TinyGPT",
    "TinyMoEGPT",
    "build_chunks",
    "full_state_dict",
    "full_name",
    "load_full_weights",
    "wrap_ddp",
    "reference_grads",
    "grad_error",
]


@dataclass(frozen=True)
class TinyGPT:
    """Sizes of the test model (fp32, no dropout, tied embeddings, learned positions)."""

    vocab_size: int = 64
    hidden_size: int = 32
    num_attention_heads: int = 4
    ffn_hidden_size: int = 64
    num_layers: int = 4
    max_sequence_length: int = 32
    seed: int = 1234
    layer_spec: Optional[Callable[[], Any]] = field(default=None, compare=False)

    def transformer_config(self, layout: Layout, **overrides: Any):
        from megatron.core.transformer import TransformerConfig

        kwargs: Dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            ffn_hidden_size=self.ffn_hidden_size,
            use_cpu_initialization=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
            context_parallel_size=layout.cp,
            pipeline_dtype=torch.float32,
            params_dtype=torch.float32,
            # Micro-batches of different sizes need PP's shape exchange (variable_seq_lengths),
            # which Megatron only accepts with the alltoall MoE dispatcher (unused here).
            variable_seq_lengths=layout.pp > 1,
            moe_token_dispatcher_type="alltoall",
            batch_p2p_comm=False,  # gloo + interleaving + batched p2p silently swaps tensors
        )
        if layout.ep > 1:  # expert parallelism (MoE models); dense layouts pass nothing new
            kwargs["expert_model_parallel_size"] = layout.ep
        if layout.etp is not None:
            kwargs["expert_tensor_parallel_size"] = layout.etp
        kwargs.update(self.extra_config())
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)

    def extra_config(self) -> Dict[str, Any]:
        """Config options a subclass adds (none for the dense model)."""
        return {}


@dataclass(frozen=True)
class TinyMoEGPT(TinyGPT):
    """:class:`TinyGPT` with a mixture-of-experts MLP in every layer (Megatron's local spec:
    ``TopKRouter`` with softmax over the top-k logits, ``SequentialMLP`` experts of GeLU MLPs,
    no bias: Megatron's MoE without Transformer-Engine needs ``add_bias_linear=False``).

    No auxiliary loss, no z-loss and no capacity factor by default (no token dropping), so the
    model is a deterministic function of its weights that
    :func:`~megatron_agg.compare.reference_gpt.per_token_loss` reproduces.
    """

    num_layers: int = 2
    num_moe_experts: int = 4
    moe_router_topk: int = 2
    add_bias_linear: bool = False

    def extra_config(self) -> Dict[str, Any]:
        return dict(
            num_moe_experts=self.num_moe_experts,
            moe_router_topk=self.moe_router_topk,
            add_bias_linear=self.add_bias_linear,
            moe_aux_loss_coeff=0.0,
            moe_z_loss_coeff=None,
            moe_expert_capacity_factor=None,
        )


def _layer_spec(spec: TinyGPT):
    if spec.layer_spec is not None:
        return spec.layer_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    num_experts = getattr(spec, "num_moe_experts", None)
    if num_experts:
        return get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False)
    return get_gpt_layer_local_spec()


def build_chunks(spec: TinyGPT, layout: Layout, *, tie_embeddings: bool = True,
                 **config_overrides: Any) -> List[torch.nn.Module]:
    """The model chunks of this rank (``vpp`` of them with virtual pipelining, else one).
    ``tie_embeddings=False``: an output layer of its own (``share_embeddings_and_output_weights``).

    Model parallel state must be initialized for ``layout``. Weights are Megatron's own random
    init; call :func:`load_full_weights` to make them equal to a reference.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = spec.transformer_config(layout, **config_overrides)
    chunks = []
    for vp_stage in range(layout.vpp or 1):
        vp = vp_stage if layout.vpp else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=_layer_spec(spec),
                vocab_size=spec.vocab_size,
                max_sequence_length=spec.max_sequence_length,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                share_embeddings_and_output_weights=tie_embeddings,
                position_embedding_type="learned_absolute",
                vp_stage=vp,
            )
        )
    return chunks


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def full_name(chunk: torch.nn.Module, local_name: str) -> str:
    """The reference (TP=PP=EP=1) name of a parameter of a sharded chunk."""
    model = _unwrap(chunk)
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        layer = model.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
        if parts[3:6] == ["mlp", "experts", "local_experts"]:
            # Expert parallelism: local expert j of EP rank r is global expert r·(E/ep) + j.
            from megatron.core import parallel_state as ps

            local = len(layer.mlp.experts.local_experts)
            parts[6] = str(ps.get_expert_model_parallel_rank() * local + int(parts[6]))
    name = ".".join(parts)
    if name == "output_layer.weight" and getattr(model, "share_embeddings_and_output_weights", False):
        return "embedding.word_embeddings.weight"
    return name


def _shard(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    from megatron.core import parallel_state as ps

    assert getattr(param, "partition_stride", 1) == 1, "strided TP partitions are not supported"
    dim = param.partition_dim
    if tuple(param.shape) == tuple(full.shape):  # not split (e.g. an expert weight under expert TP 1)
        return full
    if not getattr(param, "allreduce", True):  # an expert weight (EP > 1): sharded over expert TP
        etp, rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
        return full.chunk(etp, dim=dim)[rank]
    tp = ps.get_tensor_model_parallel_world_size()
    return full.chunk(tp, dim=dim)[ps.get_tensor_model_parallel_rank()]


def full_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters of an unsharded model, cloned."""
    return {name: p.detach().clone() for name, p in _unwrap(model).named_parameters()}


def load_full_weights(chunks: Sequence[torch.nn.Module], full: Dict[str, torch.Tensor]) -> None:
    """Copy the matching shard of every full weight into the chunks' parameters."""
    with torch.no_grad():
        for chunk in chunks:
            for name, param in _unwrap(chunk).named_parameters():
                shard = _shard(full[full_name(chunk, name)], param)
                assert shard.shape == param.shape, (name, shard.shape, param.shape)
                param.copy_(shard)


def wrap_ddp(chunks: Sequence[torch.nn.Module], average_in_collective: bool = False,
             use_distributed_optimizer: bool = False, **ddp_options: Any) -> List[torch.nn.Module]:
    """Wrap every chunk in Megatron's DDP and set the config hooks Megatron-LM sets.

    ``ddp_options`` are further ``DistributedDataParallelConfig`` fields (``overlap_grad_reduce``,
    ``bucket_size``, ...)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        average_in_collective=average_in_collective,
        use_distributed_optimizer=use_distributed_optimizer,
        **ddp_options,
    )
    wrapped = [
        DistributedDataParallel(c.config, ddp_config, c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    config = wrapped[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    for m in wrapped:
        m.zero_grad_buffer()
    return wrapped


def reference_grads(
    full: Dict[str, torch.Tensor], loss_fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """Gradients of ``loss_fn(weights)`` w.r.t. full weights (one process, plain autograd)."""
    weights = {name: t.detach().clone().requires_grad_(True) for name, t in full.items()}
    loss = loss_fn(weights)
    grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    return {
        name: (g.detach() if g is not None else torch.zeros_like(full[name]))
        for name, g in zip(weights, grads)
    }


def grad_error(chunks: Sequence[torch.nn.Module], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Max relative error ``max|g − g_ref| / max|g_ref|`` of each of this rank's parameters.

    ``g`` is the parameter's ``main_grad`` (Megatron DDP) or ``grad``; ``g_ref`` the matching
    shard of the reference gradient.
    """
    errors: Dict[str, float] = {}
    for chunk in chunks:
        model = _unwrap(chunk)
        for name, param in model.named_parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
            target = _shard(ref[full_name(chunk, name)], param)
            scale = float(target.abs().max())
            diff = float((grad.float() - target.float()).abs().max())
            errors[full_name(chunk, name)] = diff / scale if scale > 0 else diff
    return errors
