"""Megatron-Bridge: exact loss aggregation inside Bridge's own ``pretrain`` / ``finetune``.

Megatron-Bridge builds Megatron's ``forward_backward_func`` itself and reads each micro-batch inside
``forward_step``, so a step's masks are not known before it runs: the seam is the deferred mode
(:class:`~megatron_agg.DeferredLossHook`). :class:`BridgeForwardStep` is a ``forward_step_func``::

    from megatron.bridge.training.pretrain import pretrain
    from megatron_agg.bridge import BridgeForwardStep

    forward_step = BridgeForwardStep("seq-mean-token-mean")
    forward_step.configure(cfg)            # cfg.model.calculate_per_token_loss = True
    pretrain(cfg, forward_step)            # or finetune(cfg, forward_step)

Per micro-batch it runs Bridge's own GPT step (``gpt_step._forward_step_common``: batch reading, the
context-parallel split, ``PackedSeqParams``, the model call) and returns the hook's ``loss_func``:
the loss ``Σ_i Σ_t m·α_i·l`` and ``num_tokens`` = this micro-batch's part of ``D`` (valid tokens
``T``, sequences ``N`` or non-empty sequences; for ``token-sum`` 1 on the step's first micro-batch of
data×context-parallel rank 0). Megatron sums ``num_tokens`` over micro-batches, all-reduces it over
DP×CP in ``finalize_model_grads`` and divides the (DDP-summed) gradients by it, so the step's
gradient is that of ``L = Σ m·α·l / D``. The report is Bridge's ``{"lm loss": [numerator,
num_tokens]}``, whose sum / count over the step is ``L``. Collectives: none per micro-batch; one
all-reduce over DP at install; the hook's end-of-step checks (two small all-reduces over the loss
stage, one host sync) inside ``finalize_model_grads_func``.

Installation. ``calculate_per_token_loss`` is a field of Bridge's model provider (Bridge never sets
it for GPT): :meth:`BridgeForwardStep.configure` sets it. ``finalize_model_grads_func`` is set by
Bridge's ``training/setup.py`` (``_update_model_config_funcs``) after the model is built, replacing
anything set before, so the hook is installed from ``forward_step`` itself: its first call on every
rank (every pipeline stage, before the first forward) runs :meth:`DeferredLossHook.install`, which
refuses what it cannot make exact and wraps the finalize Bridge set; later calls return at once.
(A callback's ``on_train_start`` would see the same model, but forgetting to register it would leave
the hook uninstalled; ``forward_step`` cannot be forgotten.)

Context parallelism: Bridge cuts packed rows per document (Megatron-Core's THD partition) and
unpacked rows as a whole into ``2·cp`` chunks, i.e. ``cp_layout="load-balanced"``; each sequence's
``n_i`` (``seq-mean-token-mean``, ``exclude_fully_masked_seqs``) is counted from the micro-batch as
read, before Bridge's split.

Refused with ``ValueError`` on every rank before any gradient: ``calculate_per_token_loss`` off
(:meth:`BridgeForwardStep.configure` not called), everything else ``DeferredLossHook`` refuses
(``prompt-mean``, terms with different denominators or masks of their own, hybrid CP, ``seq-mean-*``
with MoE auxiliary / MTP losses, wrappers whose finalize does not divide), ``return_schedule_plan`` (the MoE overlap schedule; untested), a ModelOpt
distillation model (its loss function reduces the per-token losses itself), and packing with a CP
partition mode other than ``zigzag``.

The prepared mode (:class:`~megatron_agg.LossHook`: the step's masks known before
``forward_backward_func``) is not offered: it needs ``LossHook.wrap(forward_backward_func)`` called
with ``loss_masks=[...]``, and Bridge's ``train_step`` calls ``get_forward_backward_func()`` itself
with fixed arguments, while no callback sees the step's data (``CallbackContext`` has no iterator).
Without patching Bridge there is no seam for it.
"""

from __future__ import annotations

from typing import Any, Optional

from .deferred import DeferredLossHook
from .megatron import model_config
from .modes import AggModeLike
from .terms import DEFAULT_TERM_NAME

__all__ = ["BridgeForwardStep"]


def _bridge():
    try:
        from megatron.bridge.training import gpt_step
        from megatron.bridge.training.utils.packed_seq_utils import get_packed_seq_params
    except ImportError as exc:
        raise ImportError(f"megatron_agg.bridge needs Megatron-Bridge (pip install megatron-bridge): {exc}") from exc
    if not hasattr(gpt_step, "_forward_step_common") or not hasattr(gpt_step, "get_batch"):
        raise ImportError("megatron_agg.bridge needs megatron.bridge.training.gpt_step._forward_step_common and "
                          "get_batch (Megatron-Bridge 0.6); this Megatron-Bridge has neither.")
    return gpt_step, get_packed_seq_params


class _Reading:
    """The data iterator, remembering the micro-batch Bridge reads (before its CP split)."""

    def __init__(self, iterator: Any) -> None:
        self.iterator, self.batch = iterator, None

    def __iter__(self) -> "_Reading":
        return self

    def __next__(self) -> Any:
        self.batch = next(self.iterator)
        return self.batch


def _no_loss(*_: Any, **__: Any) -> Any:
    raise ValueError("BridgeForwardStep: Bridge read no loss_mask on this pipeline stage, so it has no loss.")


class BridgeForwardStep:
    """A Megatron-Bridge ``forward_step_func`` whose loss is exact for ``mode`` over the global batch.

    Args:
        mode, **options: as for :class:`~megatron_agg.DeferredLossHook` (``exclude_fully_masked_seqs``,
            ``loss_scale_factor``, ``terms``, ``metrics``, ...); ``cp_layout`` is Bridge's own
            (``"load-balanced"``) and may not be given.

    Attributes:
        hook: the :class:`~megatron_agg.DeferredLossHook` (``hook.uninstall()`` undoes the install).
    """

    def __init__(self, mode: Optional[AggModeLike] = None, **options: Any) -> None:
        if "cp_layout" in options:
            raise ValueError("BridgeForwardStep fixes cp_layout: Bridge's GPT step cuts packed rows per document "
                             "and unpacked rows as a whole ('load-balanced').")
        self.hook = DeferredLossHook(mode, cp_layout="load-balanced", **options)

    def configure(self, cfg: Any) -> Any:
        """Set ``calculate_per_token_loss=True`` on Bridge's model config (``cfg.model``, or
        ``cfg.model.transformer``) before ``pretrain``/``finetune``; returns ``cfg``."""
        model = getattr(cfg, "model", None)
        transformer = getattr(model, "transformer", model)
        if not hasattr(transformer, "calculate_per_token_loss"):
            raise ValueError(f"BridgeForwardStep.configure needs a Bridge ConfigContainer whose model is a GPT "
                             f"provider or config with calculate_per_token_loss, got {type(model).__name__}.")
        transformer.calculate_per_token_loss = True
        return cfg

    def __call__(self, state: Any, data_iterator: Any, model: Any, return_schedule_plan: bool = False) -> tuple:
        if return_schedule_plan:
            raise ValueError("BridgeForwardStep does not support return_schedule_plan (the MoE overlap schedule).")
        if not self.hook.installed:
            self._refuse_distillation(model)
            if not getattr(model_config(model), "calculate_per_token_loss", False):
                raise ValueError(
                    "BridgeForwardStep needs calculate_per_token_loss=True on Bridge's model config: call "
                    "forward_step.configure(cfg) before pretrain/finetune. Bridge's GPT default (False) divides "
                    "every micro-batch by its own num_tokens: the gradients would be silently wrong.")
        self.hook.install(model)  # the first call on every rank: checks and wraps finalize; later: returns
        gpt_step, get_packed_seq_params = _bridge()
        read: dict = {}

        def get_batch(iterator: Any, cfg: Any, use_mtp: bool = False, **kwargs: Any) -> tuple:
            reading = _Reading(iterator)
            batch = gpt_step.get_batch(reading, cfg, use_mtp, **kwargs)
            read.update(batch=reading.batch, packed=batch[5])
            return batch

        output, loss_mask = gpt_step._forward_step_common(state, data_iterator, model, _get_batch_fn=get_batch)
        if loss_mask is None:  # not the last pipeline stage: Megatron never calls its loss function
            return output, _no_loss
        packed = get_packed_seq_params(read["packed"]) if read.get("packed") else None
        if packed is not None and getattr(packed, "cp_partition_mode", "zigzag") not in (None, "zigzag"):
            raise ValueError(f"BridgeForwardStep: packed CP partition mode {packed.cp_partition_mode!r}; megatron_agg "
                             "knows Bridge's per-document 'zigzag' split only.")
        counts = None
        whole = (read.get("batch") or {}).get("loss_mask")
        if whole is not None and whole.shape[-1] != loss_mask.shape[-1]:  # CP: n_i before the split
            counts = DeferredLossHook.sequence_token_counts(whole.to(loss_mask.device, non_blocking=True), packed)
        inner = self.hook.loss_func(loss_mask, sequence_token_counts=counts, packed_seqs=packed, model=model)

        def loss_func(output_tensor: Any, non_loss_data: bool = False) -> Any:
            out = inner(output_tensor, non_loss_data=non_loss_data)
            if non_loss_data:
                return out
            loss, num_tokens, report = out
            report = dict(report)
            report["lm loss"] = report.pop(DEFAULT_TERM_NAME)  # Bridge's name for the logged loss
            return loss, num_tokens, report

        return output, loss_func

    @staticmethod
    def _refuse_distillation(model: Any) -> None:
        inner = model
        while hasattr(inner, "module"):
            inner = inner.module
        if any(cls.__name__ == "DistillationModel" for cls in type(inner).__mro__):
            raise ValueError("BridgeForwardStep cannot make a ModelOpt distillation model exact: its loss function "
                             "reduces the per-token losses itself. Train without distillation, or use Bridge's "
                             "forward_step_modelopt.")
