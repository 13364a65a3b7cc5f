"""Run under torchrun with 4 ranks: what each Megatron data-parallel wrapper does to the gradients.

For every wrapper (DDP, Megatron's TorchFullyShardedDataParallel, Megatron-FSDP × each
``data_parallel_sharding_strategy``) × Megatron path (2-tuple / 3-tuple × ``calculate_per_token_loss``
× ``average_in_collective``) × number of micro-batches (1, 3; the same on every rank, as FSDP needs,
ragged sizes and masks, one rank with almost no valid token) × loss (megatron_agg's ``LossHook``
in token-mean mode, or Megatron's plain per-micro-batch loss) × layout (DP4, TP2×DP2), one step of
TinyGPT is run and each rank's gradient (after ``finalize_model_grads``; the shard it owns where the
wrapper shards gradients) is compared with the single-process reference: one scalar is fitted,
``factor = <g, g_ref> / <g_ref, g_ref>``, and the residual after removing it is printed (factor 1
and residual ~1e-7: exact; a clean other factor: a pure scaling error; a large residual: not a
scaling). The reference of the hook is the token-mean of the global batch; that of the plain loss
is what Megatron's DDP makes of it (the mean over DP×micro-batches of per-micro-batch means, or
with per-token loss on the 3-tuple the token-mean; a 2-tuple with per-token loss is summed over
DP). ``exp`` is the factor predicted from the wrapper's code (see ``expected_factor``).

    torchrun --nproc-per-node 4 tests/support/wrapper_probe.py [--wrappers ...] [--json out.json]

``--overlap`` adds ``overlap_grad_reduce=True`` runs (DDP, Megatron-FSDP), where Megatron-LM also
sets ``config.no_sync_func`` (see :func:`megatron_agg.compare.wrappers.wrap_model`);
``--no-sync always`` sets it everywhere (what ``megatron_agg.compare.gpt.wrap_ddp`` does).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_agg import LossHook
from megatron_agg.megatron.averaging import LossReturn
from megatron_agg.compare import data as data_mod
from megatron_agg.compare.cpu import cpu_shim
from megatron_agg.compare.gpt import TinyGPT, reference_grads
from harness.matrix import TOKEN_MEAN, VARIANTS, Variant, schedule_group_kwargs
from megatron_agg.compare.controls import plain_masked_mean
from megatron_agg.compare.parallel import Layout, model_parallel
from megatron_agg.compare.reference_gpt import init_full_weights, per_token_loss
from megatron_agg.compare.wrappers import (
    STRATEGIES,
    build_chunks_for,
    check_coverage,
    fit_factor,
    gather_main_grads,
    wrap_model,
)

SPEC = TinyGPT()
#: Rows per micro-batch of each DP rank, by (dp, micro-batches): equal counts (FSDP), ragged sizes.
PLANS: Dict[Tuple[int, int], List[List[int]]] = {
    (4, 1): [[5], [9], [2], [8]],
    (4, 3): [[2, 3, 1], [4, 2, 3], [1, 1, 1], [3, 2, 1]],
    (2, 1): [[11], [13]],
    (2, 3): [[4, 1, 6], [3, 5, 5]],
}
PATHS: List[Variant] = [v for v in VARIANTS if not v.deferred]  # the matrix's six Megatron paths
LAYOUTS = {"dp4": Layout(), "tp2dp2": Layout(tp=2)}
#: What LossHook says when it refuses a step as an upstream wrapper defect.
REFUSED = "megatron_agg cannot make this step exact"
_MASK_DTYPES = (torch.bool, torch.int64, torch.float32)


def wrapper_names(selected: Optional[str]) -> List[str]:
    names = ["ddp", "torch-fsdp2"] + [f"megatron-fsdp/{s}" for s in STRATEGIES]
    if selected:
        wanted = selected.split(",")
        names = [n for n in names if n in wanted or n.split("/")[0] in wanted]
    return names


def microbatches(batch: data_mod.GlobalBatch, plan: List[int], start: int) -> List[data_mod.MicroBatch]:
    out = []
    s = batch.seq_length
    for j, size in enumerate(plan):
        rows = slice(start, start + size)
        start += size
        mask = batch.loss_mask[rows].to(_MASK_DTYPES[j % len(_MASK_DTYPES)])
        out.append(data_mod.MicroBatch(
            tokens=batch.tokens[rows].contiguous(), labels=batch.labels[rows].contiguous(),
            position_ids=torch.arange(s).unsqueeze(0).expand(size, s).contiguous(),
            loss_mask=mask, full_loss_mask=mask))
    return out


class References:
    """Single-process reference gradients (every rank computes them, plain autograd)."""

    def __init__(self, batch: data_mod.GlobalBatch) -> None:
        self.batch = batch
        self.full = init_full_weights(SPEC, SPEC.seed)
        self.positions = torch.arange(batch.seq_length).unsqueeze(0).expand_as(batch.tokens)
        self.cache: Dict[Any, Dict[str, torch.Tensor]] = {}
        self.total_tokens = int(batch.loss_mask.sum())

    def _ce(self, w: Dict[str, torch.Tensor]) -> torch.Tensor:
        return per_token_loss(w, SPEC, self.batch.tokens, self.positions, self.batch.labels)

    def hook(self) -> Dict[str, torch.Tensor]:
        """The token-mean over the global batch (what the hook must give with every wrapper)."""
        if "hook" not in self.cache:
            self.cache["hook"] = reference_grads(
                self.full, lambda w: TOKEN_MEAN.reference(self._ce(w), self.batch.loss_mask))
        return self.cache["hook"]

    def plain(self, dp: int, m: int, path: Variant) -> Dict[str, torch.Tensor]:
        """What Megatron's DDP makes of the plain per-micro-batch loss on this path."""
        kind = "token-mean" if (path.loss_return is LossReturn.THREE_TUPLE and path.per_token) else (
            "sum-over-dp" if path.per_token else "mean-over-dp")
        key = ("plain", dp, m, kind)
        if key not in self.cache:
            weights = torch.zeros_like(self.batch.loss_mask)
            start = 0
            for plan in PLANS[(dp, m)]:
                for size in plan:
                    rows = slice(start, start + size)
                    start += size
                    n = max(float(self.batch.loss_mask[rows].sum()), 1.0)
                    scale = {"mean-over-dp": 1.0 / (dp * m * n), "sum-over-dp": 1.0 / (m * n),
                             "token-mean": 1.0 / self.total_tokens}[kind]
                    weights[rows] = self.batch.loss_mask[rows] * scale
            self.cache[key] = reference_grads(self.full, lambda w: (self._ce(w) * weights).sum())
        return self.cache[key]


#: ``expected_factor`` value meaning "this set-up raises" (the release crashes on it).
CRASH = math.inf


def expected_factor(release: str, wrapper: str, path: Variant, dp: int, m: int, no_sync_used: bool, overlap: bool,
                    div_fusion: bool, total_tokens: int) -> float:
    """The factor of the step's gradient against what DDP gives for the same loss, as the wrapper's
    code in ``release`` predicts (NaN: not a scaling; :data:`CRASH`: the step raises). From the
    released wheels (file:line in the report of this probe):

    - ``ddp``: 1.
    - ``torch-fsdp2``: FSDP2 means over dp_cp on every path; ``scale_gradients`` is
      ``_BaseDataParallel``'s no-op. Where DDP sums (``calculate_per_token_loss``) ×1/dp; the
      per-token 3-tuple also misses finalize's ÷Σnt: ×T/dp. (0.16-0.18 raise in
      ``finalize_model_grads`` without the backported fix, which :func:`wrap_model` applies.)
    - ``megatron-fsdp`` with ``average_in_collective``: 0.14-0.15 and 0.18+ raise in the constructor
      for a dense model (no expert data-parallel group; 0.18+: Megatron-LM #3831 builds the expert
      mesh only for MoE models).
    - ``megatron-fsdp/no_shard``: 0.13 raises in the first forward; 0.14-0.17 never reduce without
      ``no_sync`` (``all_reduce_gradients`` skips every buffer); 0.18-0.19 reduce in
      ``finish_grad_sync`` too, so with ``no_sync`` and no overlap twice: idempotent for means,
      ×dp for the per-token sum; 0.20 reduces once (exact).
    - ``megatron-fsdp/optim``: 0.13 raises without ``no_sync`` (``is_last_microbatch`` unset);
      0.14-0.15 never reduce without ``no_sync`` (``reduce_scatter_gradients`` skips every buffer),
      all-reduce once with it; 0.13 and 0.16 with ``no_sync``: the hooks reduce-scatter and *add*
      the result to the rank's virtual shard that still holds its local sum, and without overlap
      ``finish_grad_sync`` reduces again: ×2 (per-token), ×(1+1/dp) (average in collective, or
      the 1/dp fused into the reduction: ``gradient_reduce_div_fusion``, the default), ×2/dp (unfused);
      with overlap: not a scaling. 0.17-0.19: the hooks' result replaces the shard (exact with
      overlap), the second reduction without overlap remains: not a scaling. 0.20 (Megatron-LM
      main; ``FullyShardedDataParallelV1``): ``finish_grad_sync`` only waits, exact (measured).
    - ``megatron-fsdp/optim_grads*``: 0.13-0.15 pre-scale the rank's accumulated shard instead of
      the bucket being reduced when the ``1/dp`` is not fused into the reduction
      (``gradient_reduce_div_fusion=False``, or bf16 gradients): ×dp for one micro-batch, not a
      scaling for several (paths with a ``1/dp``: no per-token loss, no average in collective).
    """
    minor = tuple(int(x) for x in release.split(".")[:2])
    per_token_sum = path.per_token
    if wrapper == "torch-fsdp2":
        if path.per_token and path.loss_return is LossReturn.THREE_TUPLE:
            return total_tokens / dp
        return 1.0 / dp if path.per_token else 1.0
    if wrapper.startswith("megatron-fsdp") and path.average_in_collective and (
            (0, 14) <= minor <= (0, 15) or minor >= (0, 18)):
        return CRASH  # the expert scaling factor reads get_dp_group(is_expert_parallel=True): None (dense model)
    if wrapper == "megatron-fsdp/no_shard":
        if minor <= (0, 13):
            return CRASH
        if not no_sync_used:
            return math.nan if minor < (0, 18) else 1.0
        if (0, 18) <= minor <= (0, 19) and not overlap and per_token_sum:
            return float(dp)
        return 1.0
    if wrapper == "megatron-fsdp/optim":
        if not no_sync_used:
            return CRASH if minor <= (0, 13) else (math.nan if minor < (0, 16) else 1.0)
        if (0, 14) <= minor <= (0, 15):
            return 1.0
        if minor >= (0, 20):  # finish_grad_sync only waits for the hooks' reduction
            return 1.0
        if minor >= (0, 17):
            return 1.0 if overlap else math.nan
        if overlap:
            return math.nan
        if per_token_sum:
            return 2.0
        # The 1/dp pre-scaling: fused into the reduction (PREMUL_SUM) it leaves the buffer's local
        # sum unscaled (like average in collective); unfused it scales the buffer in place.
        return 1.0 + 1.0 / dp if (path.average_in_collective or div_fusion) else 2.0 / dp
    if wrapper.startswith("megatron-fsdp/optim_grads"):
        prescaled = not path.per_token and not path.average_in_collective
        if minor <= (0, 15) and prescaled and not div_fusion:
            return float(dp) if m == 1 else math.nan
    return 1.0


def compensated_factor(wrapper: str, path: Variant, dp: int, total_tokens: int) -> float:
    """The part of :func:`expected_factor` that megatron_agg's scaling already cancels for this
    wrapper (its table ``megatron_agg.megatron.averaging.WRAPPERS``): the hook's expected factor is
    ``expected / compensated``."""
    from megatron_agg.megatron.averaging import GradReduction, wrapper_behaviour
    from megatron_agg.megatron.releases import minor_release

    behaviour = wrapper_behaviour(wrapper.split("/")[0], minor_release())
    reduction = behaviour.per_token_reduction if path.per_token else behaviour.reduction
    ddp = GradReduction.SUM if path.per_token else GradReduction.MEAN
    factor = 1.0
    if reduction is not ddp:
        factor *= 1.0 / dp if reduction is GradReduction.MEAN else float(dp)
    if path.per_token and path.loss_return is LossReturn.THREE_TUPLE and not behaviour.finalize_divides:
        factor *= total_tokens
    return factor


@dataclass
class Row:
    release: str
    layout: str
    wrapper: str
    overlap: bool
    no_sync: bool
    div_fusion: bool
    path: str
    microbatches: int
    loss: str
    factor: float
    residual: float
    max_residual: float
    raw_error: float
    rank_factor_min: float
    rank_factor_max: float
    coverage_ok: bool
    expected: float
    seconds: float
    error: Optional[str] = None


def run_one(refs: References, layout_name: str, wrapper: str, path: Variant, m: int, loss: str, overlap: bool,
            no_sync: str, div_fusion: bool, release: str) -> Row:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    t0 = time.perf_counter()
    layout = LAYOUTS[layout_name]
    kind, _, strategy = wrapper.partition("/")
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    chunks = build_chunks_for(SPEC, layout, kind, calculate_per_token_loss=path.per_token)
    model = wrap_model(chunks, kind, full_weights=refs.full, strategy=strategy or None,
                       average_in_collective=path.average_in_collective, overlap_grad_reduce=overlap,
                       no_sync=no_sync, gradient_reduce_div_fusion=None if div_fusion else False)
    config = model[0].config
    no_sync_used = config.no_sync_func is not None
    assert no_sync_used == uses_no_sync(wrapper, overlap, no_sync), (wrapper, overlap, no_sync)
    plan = PLANS[(dp, m)]
    mbs = microbatches(refs.batch, plan[dp_rank], sum(sum(p) for p in plan[:dp_rank]))
    hook = LossHook(terms=TOKEN_MEAN.terms, loss_return=path.loss_return) if loss == "hook" else None
    plain = plain_masked_mean(path.loss_return) if loss == "plain" else None

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        output = chunk(mb.tokens, mb.position_ids, None, labels=mb.labels)
        return output, (plain(mb.loss_mask) if plain is not None else hook.loss_func(mb.loss_mask))

    kwargs: Dict[str, Any] = dict(forward_step_func=forward_step, data_iterator=iter(mbs), model=model,
                                  num_microbatches=len(mbs), seq_length=refs.batch.seq_length,
                                  micro_batch_size=mbs[0].tokens.shape[0], forward_only=False)
    if path.loss_return is LossReturn.THREE_TUPLE:
        kwargs.update(schedule_group_kwargs(layout, config))
    fb = get_forward_backward_func()
    if hook is not None:
        hook.wrap(fb)(loss_masks=[mb.full_loss_mask for mb in mbs], **kwargs)
    else:
        fb(**kwargs)
    expected = expected_factor(release, wrapper, path, dp, m, no_sync_used, overlap, div_fusion, refs.total_tokens)
    if loss == "hook" and math.isfinite(expected):
        expected /= compensated_factor(wrapper, path, dp, refs.total_tokens)
    shards = gather_main_grads(model)
    coverage_ok = not check_coverage(shards)
    ref = refs.hook() if loss == "hook" else refs.plain(dp, m, path)
    fit = fit_factor(shards, ref)
    return Row(release, layout_name, wrapper, overlap, no_sync_used, div_fusion, path.name, m, loss, fit.factor,
               fit.residual,
               fit.max_residual, fit.raw_error, fit.rank_factor_min, fit.rank_factor_max, coverage_ok,
               expected, 
               time.perf_counter() - t0)


def uses_no_sync(wrapper: str, overlap: bool, mode: str) -> bool:
    """Whether :func:`wrap_model` sets ``config.no_sync_func`` (see its ``no_sync``)."""
    return mode == "always" or (mode == "megatron-lm" and overlap and wrapper != "torch-fsdp2")


def settings(wrappers: List[str], overlap: str, no_sync: str, div_fusion: str) -> List[Tuple[str, bool, str, bool]]:
    """(wrapper, overlap_grad_reduce, no_sync mode, gradient_reduce_div_fusion) to run.

    ``always`` (no_sync everywhere, as :func:`megatron_agg.compare.gpt.wrap_ddp` sets it) only where
    it changes anything when several modes are asked for: Megatron-FSDP ``no_shard``/``optim``
    without overlap (DDP's no_sync only matters with overlap, FSDP2 ignores it, the grads-sharding
    strategies reduce on every backward). ``gradient_reduce_div_fusion=False`` only for
    Megatron-FSDP (the others have no such option); with ``both``, only for the gradient-sharding
    strategies (the others scale their whole, unsharded buffer either way) without overlap and with
    the first no_sync mode.
    """
    out = []
    for wrapper in wrappers:
        for ovl in {"off": [False], "on": [True], "both": [False, True]}[overlap]:
            if ovl and wrapper == "torch-fsdp2":
                continue  # FSDP2 overlaps by itself; Megatron-LM sets no no_sync_func for it
            for mode in no_sync.split(","):
                if mode == "always" and not (wrapper in ("megatron-fsdp/no_shard", "megatron-fsdp/optim")
                                             and not ovl) and "," in no_sync:
                    continue
                for fusion in {"on": [True], "off": [False], "both": [True, False]}[div_fusion]:
                    if not fusion and (not wrapper.startswith("megatron-fsdp") or
                                       (div_fusion == "both" and (ovl or mode != no_sync.split(",")[0] or
                                                                  not wrapper.startswith("megatron-fsdp/optim_grads")))):
                        continue
                    out.append((wrapper, ovl, mode, fusion))
    return out


def hook_refused(row: "Row") -> bool:
    """A hook row that megatron_agg refused as an upstream wrapper defect."""
    return row.loss == "hook" and row.error is not None and REFUSED in row.error


def agrees(row: "Row") -> bool:
    """The row is what ``exp`` predicts: that factor and a pure scaling, or (NaN) not a scaling. A
    hook row that megatron_agg refused as an upstream defect agrees where the factor is not 1 (the
    hook cannot repair it) and disagrees where it is (a needless refusal)."""
    if hook_refused(row):
        return row.expected != 1.0 and row.expected != CRASH
    if row.error is not None or row.expected == CRASH:
        return row.error is not None and row.expected == CRASH
    if math.isnan(row.expected):
        return row.residual > 1e-3
    return abs(row.factor - row.expected) <= 1e-4 * max(1.0, abs(row.expected)) and row.residual <= 1e-5


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wrappers", default=None, help="comma-separated: ddp, torch-fsdp2, megatron-fsdp, "
                                                         "megatron-fsdp/<strategy> (default: all)")
    parser.add_argument("--layouts", default="dp4,tp2dp2")
    parser.add_argument("--microbatches", default="1,3")
    parser.add_argument("--losses", default="hook,plain")
    parser.add_argument("--plain", default="all", choices=["all", "refused"],
                        help="the plain-loss rows: every configuration, or only where the hook refused it (there "
                             "they show the defect is Megatron's; where the hook is exact its own row is the proof; "
                             "--losses must list hook before plain)")
    parser.add_argument("--paths", default=None, help="comma-separated path names (default: all)")
    parser.add_argument("--overlap", default="both", choices=["off", "on", "both"],
                        help="overlap_grad_reduce runs (DDP, Megatron-FSDP)")
    parser.add_argument("--no-sync", default="megatron-lm,always",
                        help="comma-separated no_sync modes of wrap_model: megatron-lm, always, never "
                             "(default: megatron-lm, plus always where it changes anything)")
    parser.add_argument("--div-fusion", default="both", choices=["on", "off", "both"],
                        help="Megatron-FSDP's gradient_reduce_div_fusion (on: Megatron's default; both: "
                             "also off, without overlap)")
    parser.add_argument("--json", default=None, help="write the rows here (rank 0)")
    parser.add_argument("--traceback", action="store_true", help="print the traceback of failing configurations")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 if a configuration differs from the prediction, or a hook row is neither exact "
                             "nor refused (the version matrix runs it so)")
    args = parser.parse_args(argv)

    from megatron_agg.megatron.releases import megatron_core_version

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # Megatron-FSDP warns on every rank that it runs on "cpu" instead of "cuda:<current>".
    logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.ERROR)
    release = megatron_core_version()
    batch = data_mod.make_global_batch(SPEC.vocab_size, 16)
    refs = References(batch)
    paths = [p for p in PATHS if not args.paths or p.name in args.paths.split(",")]
    runs = settings(wrapper_names(args.wrappers), args.overlap, args.no_sync, args.div_fusion)
    rows: List[Row] = []
    t0 = time.perf_counter()
    if rank == 0:
        print(f"megatron-core {release}, torch {torch.__version__}, world {dist.get_world_size()}, "
              f"T={refs.total_tokens} valid tokens", flush=True)
        print(f"{'layout':<7} {'wrapper':<31} {'ovl':<3} {'nosync':<6} {'path':<25} {'M':>1} {'loss':<5} "
              f"{'factor':>10} {'exp':>8} {'resid':>8} {'rank min..max':>19} {'cov':<3} {'s':>5}", flush=True)
    with cpu_shim():
        for layout_name in args.layouts.split(","):
            with model_parallel(LAYOUTS[layout_name]):
                for wrapper, overlap, no_sync, fusion in runs:
                    for path in paths:
                        for m in (int(x) for x in args.microbatches.split(",")):
                            refused = False
                            for loss in args.losses.split(","):
                                if loss == "plain" and args.plain == "refused" and not refused:
                                    continue
                                try:
                                    row = run_one(refs, layout_name, wrapper, path, m, loss, overlap, no_sync,
                                                  fusion, release)
                                except Exception as exc:  # noqa: BLE001 - report and go on
                                    if args.traceback and rank == 0:
                                        import traceback

                                        traceback.print_exc()
                                    no_sync_used = uses_no_sync(wrapper, overlap, no_sync)
                                    dp = LAYOUTS[layout_name].dp(dist.get_world_size())
                                    row = Row(release, layout_name, wrapper, overlap, no_sync_used, fusion, path.name,
                                              m, loss, *(math.nan,) * 6, False,
                                              expected_factor(release, wrapper, path, dp, m, no_sync_used, overlap,
                                                              fusion, refs.total_tokens),
                                              0.0, error=f"{type(exc).__name__}: {exc}"[:300])
                                rows.append(row)
                                refused = hook_refused(row)
                                if rank == 0 and args.json:  # after every row: a crash keeps what ran
                                    with open(args.json, "w") as f:
                                        json.dump([asdict(r) for r in rows], f, indent=1)
                                if rank == 0:
                                    flag = "" if row.error is None else f"  ERROR {row.error}"
                                    mark = "" if (row.error or agrees(row)) else "  (!)"
                                    name = row.wrapper + ("" if row.div_fusion else " nofuse")
                                    print(f"{row.layout:<7} {name:<31} {'on' if row.overlap else 'off':<3} "
                                          f"{'yes' if row.no_sync else 'no':<6} {row.path:<25} {row.microbatches:>1} "
                                          f"{row.loss:<5} {row.factor:>10.5f} "
                                          f"{'crash' if row.expected == CRASH else format(row.expected, '.4f'):>8} "
                                          f"{row.residual:>8.1e} {row.rank_factor_min:>9.4f}..{row.rank_factor_max:<9.4f} "
                                          f"{'ok' if row.coverage_ok else 'BAD':<3} {row.seconds:>5.2f}{mark}{flag}",
                                          flush=True)
    unexpected = [r for r in rows if not agrees(r)]
    if rank == 0:
        print(f"{len(rows)} configurations in {time.perf_counter() - t0:.1f}s; {len(unexpected)} differ from "
              f"the prediction (marked (!) or ERROR)", flush=True)
    # The safety property, apart from the prediction: the hook is exact (factor 1, no residual) or
    # refuses the step as an upstream defect; Megatron's own crashes are Megatron's.
    silent = [r for r in rows if r.loss == "hook" and r.error is None
              and not (abs(r.factor - 1.0) <= 1e-4 and r.residual <= 1e-5 and r.coverage_ok)]
    if rank == 0:
        for r in silent:
            print(f"SILENTLY WRONG: {r.layout} {r.wrapper} overlap={r.overlap} no_sync={r.no_sync} {r.path} "
                  f"M={r.microbatches}: factor {r.factor:.5f}, residual {r.residual:.1e}", flush=True)
        print(f"wrapper probe: {len(rows)} configurations, {len(unexpected)} differ from the prediction, "
              f"{len(silent)} hook runs neither exact nor refused", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if args.strict and (unexpected or silent) else 0


if __name__ == "__main__":
    sys.exit(main())
