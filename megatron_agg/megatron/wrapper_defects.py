"""Set-ups in which a Megatron data-parallel wrapper gets the gradients wrong by itself.

No loss scaling can repair these: the wrapper reduces a gradient twice, adds a reduced shard to
an unreduced one, never reduces, or scales the wrong tensor, and what comes out depends on the
values (or is a factor only a full reduction could undo). A plain Megatron run without
megatron_agg is wrong the same way. megatron_agg refuses such a step before any gradient is
touched (:func:`megatron_agg.megatron.model_setup.refuse_wrapper_defects`, on every rank: the
set-up is read from each rank's own config), naming the release, the defect and the way out.

Read from the released wheels' Megatron-FSDP packages (``megatron/core/distributed/custom_fsdp``
in 0.13, ``megatron/core/distributed/fsdp/src/megatron_fsdp`` from 0.14) and measured on the CPU
with gloo for every release of the version matrix (0.13.1, 0.14.0, 0.15.3, 0.16.1, 0.18.0, 0.19.2;
``tests/support/wrapper_probe.py``: the same factor with and without the hook; the reductions of
the ``optim`` strategy traced in ``tests/support/mfsdp_optim_trace.py``, which checks each one
against the sum of the gathered buffers, so it is the wrapper's arithmetic and not gloo). 0.17 is
read, not measured. Set-ups in which Megatron itself raises (Megatron-FSDP with
``average_in_collective=True`` on a dense model in 0.14, 0.15 and 0.18+; ``no_shard`` in 0.13;
``optim`` without ``no_sync_func`` in 0.13) are left to Megatron's error. See docs/RELEASES.md.

Pure data and arithmetic: no ``torch.distributed``, no Megatron import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from .averaging import Wrapper

__all__ = ["WrapperSetup", "WrapperDefect", "WRAPPER_DEFECTS", "find_wrapper_defect"]


@dataclass(frozen=True)
class WrapperSetup:
    """How a step's data-parallel wrapper is configured, as far as its known defects go.

    Attributes:
        strategy: Megatron-FSDP's ``data_parallel_sharding_strategy`` (``None`` for other wrappers).
        no_sync: ``config.no_sync_func`` is set (Megatron-LM sets it exactly when
            ``--overlap-grad-reduce`` is on; the schedule enters and leaves it even for one
            micro-batch, which is what tells Megatron-FSDP the last micro-batch).
        overlap: ``ddp_config.overlap_grad_reduce``.
        summed: the wrapper sums the replicas' gradients (``calculate_per_token_loss=True``).
        prescaled_unfused: the wrapper multiplies its gradient buffer by ``1/dp`` itself before a
            SUM reduction, instead of fusing the factor into it (NCCL ``PREMUL_SUM``): neither
            per-token loss nor ``average_in_collective``, and ``gradient_reduce_div_fusion=False``
            or bf16/fp8 gradients (Megatron-FSDP never fuses for a bf16 buffer).
    """

    strategy: Optional[str] = None
    no_sync: bool = False
    overlap: bool = False
    summed: bool = False
    prescaled_unfused: bool = False

    @classmethod
    def of(cls, strategy: Optional[str], *, no_sync: bool, overlap: bool, per_token: bool,
           average_in_collective: bool, div_fusion: bool, low_precision_grads: bool) -> "WrapperSetup":
        """From the config fields: the wrapper pre-scales by ``1/dp`` itself on the mean paths
        (neither per-token loss nor ``average_in_collective``) and fuses that factor into the
        reduction only with ``gradient_reduce_div_fusion`` and fp32 gradients."""
        prescaled = not per_token and not average_in_collective
        return cls(strategy, no_sync, overlap, per_token, prescaled and (not div_fusion or low_precision_grads))


@dataclass(frozen=True)
class WrapperDefect:
    """One upstream defect: the releases and the set-up it needs, what goes wrong, what to do.

    A field left ``None`` matches any value. ``first``/``last``: minor releases (``"0.16"``);
    ``last=None``: still in the newest release read (and assumed in later ones until read).
    """

    wrapper: Wrapper
    first: str
    last: Optional[str]
    strategies: Tuple[str, ...]
    what: str
    instead: str
    no_sync: Optional[bool] = None
    overlap: Optional[bool] = None
    summed: Optional[bool] = None
    prescaled_unfused: Optional[bool] = None

    def covers(self, release: str) -> bool:
        """Whether the minor release ``release`` (``"0.16"``) has this defect."""
        r = _minor(release)
        return _minor(self.first) <= r and (self.last is None or r <= _minor(self.last))

    def matches(self, wrapper: Wrapper, release: str, setup: WrapperSetup) -> bool:
        if wrapper is not self.wrapper or not self.covers(release) or setup.strategy not in self.strategies:
            return False
        wanted = (self.no_sync, self.overlap, self.summed, self.prescaled_unfused)
        have = (setup.no_sync, setup.overlap, setup.summed, setup.prescaled_unfused)
        return all(w is None or w == h for w, h in zip(wanted, have))


def _minor(release: str) -> Tuple[int, int]:
    parts = [int(p) for p in release.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


_MFSDP = Wrapper.MEGATRON_FSDP
_NO_OVERLAP = ("set overlap_grad_reduce=True together with config.no_sync_func = model.no_sync (Megatron-LM: "
               "--overlap-grad-reduce), or use the 'optim_grads' strategy")

#: 0.13 and 0.16 (0.14-0.15 all-reduce instead; 0.17 replaces the shard).
_ADDS_TO_LOCAL_SUM = (
    "adds the reduce-scattered shard to the rank's own unreduced gradient ('local_grad += reduced_grad' in "
    "_bucket_group_gradient_reduce: the 'optim' buffer is not sharded, its shard still holds the local sum) and, "
    "without overlap_grad_reduce, reduces again in finish_grad_sync: the gradients come out x2, x(1+1/dp) or not "
    "a scaling at all"
)

#: Every known defect (the rows of docs/RELEASES.md's wrapper table that say "refused").
WRAPPER_DEFECTS: Tuple[WrapperDefect, ...] = (
    WrapperDefect(
        _MFSDP, "0.14", "0.17", ("no_shard",), no_sync=False,
        what="never reduces the gradients when config.no_sync_func is unset (Megatron-LM without "
             "--overlap-grad-reduce): FullyShardedDataParallel's all_reduce_gradients skips every buffer "
             "that exists ('if gbuf is not None: continue', megatron_fsdp/param_and_grad_buffer.py), so each "
             "rank steps with its own gradient",
        instead=_NO_OVERLAP,
    ),
    WrapperDefect(
        _MFSDP, "0.18", "0.19", ("no_shard",), no_sync=True, overlap=False, summed=True,
        what="all-reduces the gradients twice when config.no_sync_func is set without overlap_grad_reduce "
             "(in the last micro-batch's backward hook and again in finish_grad_sync): a mean survives that, "
             "the per-token sum (calculate_per_token_loss) grows by the data-parallel size",
        instead="leave config.no_sync_func unset without overlap_grad_reduce (as Megatron-LM does), or set both, "
                "or megatron-core 0.20+ (its finish_grad_sync only waits for the hooks' reduction)",
    ),
    WrapperDefect(
        _MFSDP, "0.14", "0.15", ("optim",), no_sync=False,
        what="never reduces the gradients when config.no_sync_func is unset (Megatron-LM without "
             "--overlap-grad-reduce): FullyShardedDataParallel's reduce_scatter_gradients skips every buffer "
             "that exists ('if gbuf is not None: continue', megatron_fsdp/param_and_grad_buffer.py), so each "
             "rank steps with its own shard of its own gradient",
        instead=_NO_OVERLAP.replace("'optim_grads' strategy", "'optim_grads' strategy, or megatron-core 0.16+"),
    ),
    WrapperDefect(
        _MFSDP, "0.13", "0.13", ("optim",), no_sync=True, what=_ADDS_TO_LOCAL_SUM,
        instead="use the 'optim_grads' strategy, or megatron-core 0.17+ with overlap_grad_reduce",
    ),
    WrapperDefect(
        _MFSDP, "0.16", "0.16", ("optim",), no_sync=True,
        what=_ADDS_TO_LOCAL_SUM + " (Megatron-LM with --overlap-grad-reduce)",
        instead="leave overlap_grad_reduce off and config.no_sync_func unset (Megatron-LM without "
                "--overlap-grad-reduce), or use the 'optim_grads' strategy, or megatron-core 0.17+",
    ),
    WrapperDefect(
        _MFSDP, "0.17", "0.19", ("optim",), no_sync=True, overlap=False,
        what="reduces the gradients in the last micro-batch's backward hook and again in finish_grad_sync "
             "when config.no_sync_func is set without overlap_grad_reduce: not a scaling",
        instead="leave config.no_sync_func unset without overlap_grad_reduce (as Megatron-LM does), or set both, "
                "or megatron-core 0.20+ (its finish_grad_sync only waits for the hooks' reduction)",
    ),
    WrapperDefect(
        _MFSDP, "0.13", "0.15", ("optim_grads", "optim_grads_params"), prescaled_unfused=True,
        what="multiplies the rank's accumulated gradient shard by 1/dp instead of the bucket it is about to "
             "reduce when the factor is not fused into the reduction (gradient_reduce_div_fusion=False, or "
             "bf16/fp8 gradients): x dp for one micro-batch, not a scaling for several",
        instead="set gradient_reduce_div_fusion=True with grad_reduce_in_fp32=True, or "
                "calculate_per_token_loss=True, or megatron-core 0.16+",
    ),
)


def find_wrapper_defect(wrapper: Wrapper, release: str, setup: WrapperSetup) -> Optional[WrapperDefect]:
    """The first entry of :data:`WRAPPER_DEFECTS` that ``setup`` of ``wrapper`` in the minor
    ``release`` (``"0.16"``) matches, or ``None``."""
    for defect in WRAPPER_DEFECTS:
        if defect.matches(wrapper, release, setup):
            return defect
    return None
