"""Sequence parallelism for compare's tiny GPT on the CPU.

- :class:`SequenceParallelLayerNorm`: a LayerNorm that marks its weights ``sequence_parallel`` as
  Apex's and Transformer Engine's norms do (Megatron's local spec has none that does), and
  :func:`sequence_parallel_layer_spec` / :func:`with_norm`, the local GPT spec built with it;
- :func:`cpu_backward`: lets the backward functions of sequence parallelism allocate on "the
  current CUDA device" on the CPU.

``megatron-agg compare --sequence-parallel`` uses them; the test harness's features suite too.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import replace
from typing import Any, Optional

import torch

from .gpt import TinyGPT

__all__ = ["SequenceParallelLayerNorm", "sequence_parallel_layer_spec", "with_norm", "cpu_backward"]


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` built as Megatron builds its norms, marking its weight and bias
    ``sequence_parallel`` when the config says so, as Apex's ``FusedLayerNorm`` and TE's norms do.

    Under sequence parallelism each TP rank normalizes its slice of the sequence, so its weight
    gradients are partial sums over its tokens; ``finalize_model_grads``
    (``_allreduce_non_tensor_model_parallel_grads``) sums the marked ones over TP. Megatron's
    local-spec norm (``WrappedTorchNorm``) refuses ``sequence_parallel`` instead.
    """

    #: Whether to mark the weights (the control :class:`UnmarkedLayerNorm` does not).
    mark = True

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "LayerNorm") -> None:
        assert normalization == "LayerNorm" and not zero_centered_gamma
        super().__init__(hidden_size, eps=eps)
        for param in (self.weight, self.bias):
            setattr(param, "sequence_parallel", bool(config.sequence_parallel) and self.mark)




def sequence_parallel_layer_spec(num_layers: int, num_experts: Optional[int] = None,
                                 norm: type = SequenceParallelLayerNorm):
    """Megatron's local GPT spec (dense or MoE) with ``norm`` for every LayerNorm, the final one
    included, as a ``TransformerBlock`` spec of ``num_layers`` layers (PP = 1)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    if num_experts:
        layer = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False)
    else:
        layer = get_gpt_layer_local_spec()
    layer.submodules.input_layernorm = norm
    layer.submodules.pre_mlp_layernorm = norm
    return ModuleSpec(module=TransformerBlock,
                      submodules=TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm))


def with_norm(model: TinyGPT, norm: type) -> TinyGPT:
    """``model`` built with the sequence-parallel capable spec (same weights, same reference)."""
    experts = getattr(model, "num_moe_experts", None)
    return replace(model, layer_spec=functools.partial(sequence_parallel_layer_spec, model.num_layers, experts, norm))


@contextlib.contextmanager
def cpu_backward() -> Any:
    """Let Megatron allocate on "the current CUDA device" inside the backward pass, on the CPU.

    :func:`.cpu.cpu_shim` rewrites CUDA device arguments with a ``TorchFunctionMode``; the mode is
    not active while it handles a call, and Megatron's schedule calls ``torch.autograd.backward``
    through it, so the whole backward pass runs without it. Sequence parallelism's and the MoE
    dispatchers' backward functions allocate with ``device=torch.cuda.current_device()``
    (``LinearWithGradAccumulationAndAsyncCommunication``, ``_reduce_scatter_along_first_dim``...):
    during the backward pass that device is the CPU.
    """
    original = torch.autograd.backward

    def backward(*args: Any, **kwargs: Any) -> Any:
        current = torch.cuda.current_device
        torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.current_device = current  # type: ignore[assignment]

    torch.autograd.backward = backward  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.autograd.backward = original  # type: ignore[assignment]
