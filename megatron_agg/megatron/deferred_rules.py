"""What the deferred mode (:class:`megatron_agg.DeferredLossHook`) needs of Megatron's set-up.

The deferred hook returns a micro-batch's numerator as the loss and its part of the denominator as
``num_tokens``, and leaves the division to Megatron: with ``calculate_per_token_loss=True`` the
schedule passes the loss through untouched, sums ``num_tokens``, and ``finalize_model_grads``
divides the DP×CP-summed gradients by their all-reduced sum. Each function here says, from the
config (or the model chunks) alone, why that would *not* land on the loss's definition — ``""``
when it does — so that the hook refuses before the first loss (at ``install``) or, for a config
changed afterwards, at the step's end before Megatron reduces the gradients:

- :func:`terms_problem` (and :func:`uses_prompt_mean`, asked before the config is built) — terms
  the one channel cannot carry: ``prompt-mean``, masks of their own, several kinds of denominator;
- :func:`per_token_path_problem` — the division is not there (``calculate_per_token_loss`` off, or
  no ``finalize_model_grads_func``);
- :func:`dynamic_cp_problem` — dynamic (hybrid) context parallelism with a sequence mean;
- :func:`auxiliary_loss_problem` — token-scaled losses of the model's own (MoE, MTP) riding on a
  denominator that is not the step's tokens;
- :func:`check_wrapper` — a data-parallel wrapper whose finalize does not divide, or a known defect.

No collective, no host sync.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..modes import AggMode
from ..terms import DEFAULT_MASK_NAME, LossTerm
from .averaging import wrapper_behaviour
from .model_setup import (dynamic_cp_switches, model_config, refuse_wrapper_defects, step_wrapper,
                          token_scaled_auxiliary_losses)
from .releases import minor_release

__all__ = ["PROMPT_MEAN_REFUSAL", "uses_prompt_mean", "terms_problem", "denominator_kind", "per_token_path_problem",
           "dynamic_cp_problem", "auxiliary_loss_problem", "check_wrapper"]


PROMPT_MEAN_REFUSAL = (
    "DeferredLossHook cannot make prompt-mean exact: its per-token weights 1/M_g need every group's "
    "valid tokens over the whole step (groups straddle micro-batches and ranks) before the first "
    "backward pass, and the deferred mode sees one micro-batch at a time with no collective of its own; "
    "Megatron's num_tokens carries one denominator, not one per group. Use the prepared mode: "
    "LossHook('prompt-mean', num_groups=G, group_scope=...).wrap(get_forward_backward_func()) called "
    "with loss_masks=[...] and group_ids=[...] (or FSDPLossHook / StepShares)."
)


def uses_prompt_mean(mode: Any, terms: Any, metrics: Any, config: Any) -> bool:
    """Whether the hook's arguments ask for ``prompt-mean`` (read before an ``AggConfig`` is built
    from them, which would ask for ``num_groups`` first)."""
    if config is not None:
        return any(t.agg_mode.needs_groups for t in config.channels.values())
    modes = [mode] if mode is not None else []
    for group in (terms, metrics):
        if isinstance(group, Mapping):
            modes += [t.mode if isinstance(t, LossTerm) else t for t in group.values()]
    return any(isinstance(m, (str, AggMode)) and m in (AggMode.PROMPT_MEAN, AggMode.PROMPT_MEAN.value) for m in modes)


def terms_problem(config: Any) -> str:
    """Why an :class:`~megatron_agg.AggConfig`'s terms and metrics do not fit the one channel of the
    deferred mode (a micro-batch's one mask, one denominator per step), ``""`` when they do."""
    if config.uses_groups:
        return PROMPT_MEAN_REFUSAL
    own_masks = {n: t.mask for n, t in config.channels.items() if t.mask != DEFAULT_MASK_NAME}
    if own_masks:
        return (
            f"DeferredLossHook takes one mask per micro-batch (its loss_func's), but {own_masks} name masks of "
            "their own (LossTerm(mask=...)): their tokens and denominators would need the step's other masks. "
            "Use the prepared LossHook(terms=...).wrap(get_forward_backward_func()) with "
            "loss_masks={name: [...]}, which counts every mask's denominator in its one all-reduce."
        )
    kinds = {name: denominator_kind(t) for name, t in config.terms.items()}
    if len(set(kinds.values())) > 1:
        detail = ", ".join(f"{n!r}: {k}" for n, k in kinds.items())
        return (
            f"The deferred mode carries one denominator per step (Megatron's num_tokens), but "
            f"these terms divide by different ones ({detail}). Use the prepared mode, "
            "LossHook(terms=...).wrap(get_forward_backward_func()) with loss_masks=..., which "
            "counts every denominator in its one all-reduce."
        )
    return ""


def denominator_kind(term: LossTerm) -> str:
    """What ``term`` divides by, in words (the deferred mode carries one kind per step)."""
    if term.agg_mode is AggMode.TOKEN_MEAN:
        return "valid tokens (T)"
    if term.agg_mode is AggMode.TOKEN_SUM:
        return "no denominator (token-sum: 1)"
    if term.agg_mode is AggMode.PROMPT_MEAN:
        return "groups (P)"
    return "non-empty sequences" if term.exclude_fully_masked_seqs else "sequences (N)"


def per_token_path_problem(config: Any) -> str:
    """Why Megatron would not divide the step by ``Σ num_tokens`` (``""``: it does)."""
    if not getattr(config, "calculate_per_token_loss", False):
        return (
            "DeferredLossHook needs TransformerConfig(calculate_per_token_loss=True) "
            "(Megatron-LM: --calculate-per-token-loss): its denominator travels in num_tokens; "
            "without it Megatron divides every micro-batch by its own num_tokens and the "
            "gradients would be silently wrong. Set it, or use the prepared LossHook."
        )
    if getattr(config, "finalize_model_grads_func", None) is None:
        return (
            "DeferredLossHook needs config.finalize_model_grads_func "
            "(megatron.core.distributed.finalize_model_grads): it divides by the step's total."
        )
    return ""


def dynamic_cp_problem(config: Any, channels: Mapping[str, LossTerm]) -> str:
    """Why the deferred hook with these terms and metrics cannot be exact under the config's dynamic
    context parallelism (``""``: it can, or there is none). Under any of
    :data:`~megatron_agg.megatron.model_setup.DYNAMIC_CP_SWITCHES` each sample runs on a
    context-parallel group of its own size, and where a sequence's tokens and its CP rank 0 are is
    known only to Megatron's schedule. ``token-mean`` and ``token-sum`` need neither: every rank
    returns ``Σ m·l`` over the tokens it holds and its valid-token count (token-sum: 1 once per
    step) — the pair Megatron's own loss returns — and Megatron's per-token finalize divides the
    gradients summed over DP×CP by ``Σ num_tokens = T``. A ``seq-mean-*`` term or metric must count
    each sequence once, on one rank of its partner group, which the hook cannot see: refused."""
    switched = dynamic_cp_switches(config)
    if not switched:
        return ""
    other = {n: t.agg_mode.value for n, t in channels.items()
             if t.agg_mode not in (AggMode.TOKEN_MEAN, AggMode.TOKEN_SUM)}
    if not other:
        return ""
    return (
        f"DeferredLossHook cannot make {other} exact under dynamic (hybrid) context parallelism "
        f"({', '.join(switched)}): each sample runs on a context-parallel group of its own size, chosen "
        "by Megatron's schedule, so the hook cannot count each sequence once (on one rank of the "
        "sample's group) and the sequence-mean denominators would be silently wrong. Under dynamic "
        "context parallelism use mode='token-mean' or 'token-sum' (terms and metrics), or fixed context "
        "parallelism (context_parallel_size) for the sequence means."
    )


def auxiliary_loss_problem(config: Any, term: LossTerm) -> str:
    """Why the model's token-scaled auxiliary losses cannot ride on ``term``'s denominator (``""``:
    they can). Megatron scales the MoE load-balancing loss, the router z-loss and the MTP loss for a
    division by the step's *valid tokens*; a ``seq-mean-*`` term sends the step's *sequence* count
    through ``num_tokens`` instead, so their weight would grow by tokens per sequence (``token-sum``
    sends a total of 1: by ``T``). Compensating would take ``T / N`` of the step before its backward
    passes, which the deferred mode (no collective) does not have."""
    if term.agg_mode is AggMode.TOKEN_MEAN:
        return ""
    active = token_scaled_auxiliary_losses(config)
    if not active:
        return ""
    return (
        f"DeferredLossHook with {term.agg_mode.value!r} sends "
        + ("a total of 1 (token-sum has no denominator)" if term.agg_mode is AggMode.TOKEN_SUM
           else f"the step's {denominator_kind(term)}")
        + f" through Megatron's num_tokens, but this model also adds {'; '.join(active)}, which Megatron "
        "scales for a division by the step's valid-token count (calculate_per_token_loss): their "
        "gradients would be multiplied by valid tokens per sequence, with no error. Use the prepared "
        "LossHook (LossHook(...).wrap(get_forward_backward_func()) with loss_masks=...), which returns "
        "Megatron's own token counts and keeps those losses' weight; or mode='token-mean'; or set "
        "their coefficients to 0."
    )


def check_wrapper(model: Any, config: Any = None) -> None:
    """Raise ``ValueError`` unless the model chunks' data-parallel wrapper applies
    ``finalize_model_grads``' division by ``Σ num_tokens`` (the deferred mode's denominator) and has
    no known defect for this step. Megatron's ``TorchFullyShardedDataParallel`` does not (its
    ``scale_gradients`` does nothing, in every release); the set-ups of
    :data:`~megatron_agg.megatron.wrapper_defects.WRAPPER_DEFECTS` are refused too. ``model``: the
    chunks (a config alone says nothing about the wrapper: nothing is checked); ``config``: their
    ``TransformerConfig`` (read from the chunks when omitted)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    if not chunks or not all(isinstance(c, torch.nn.Module) for c in chunks):
        return
    wrapper = step_wrapper(chunks)
    if wrapper is None:
        return
    if not wrapper_behaviour(wrapper, minor_release()).finalize_divides:
        raise ValueError(
            f"DeferredLossHook needs finalize_model_grads to divide the gradients by the step's "
            f"num_tokens, but the model chunks are wrapped in {type(chunks[0]).__name__} ({wrapper.value}), "
            "whose scale_gradients does nothing: the gradients would be off by the whole denominator, "
            "with no error. Use the prepared LossHook (it returns the exact share for this wrapper) or "
            "Megatron's DistributedDataParallel / Megatron-FSDP."
        )
    if config is None:
        try:
            config = model_config(chunks[0])
        except (RuntimeError, ValueError):  # a chunk without a TransformerConfig: nothing more to read
            return
    refuse_wrapper_defects(wrapper, chunks, config)
