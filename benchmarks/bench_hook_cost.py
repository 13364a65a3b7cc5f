"""The cost of the hook's own work per step, as the step grows (one process, no model).

    python benchmarks/bench_hook_cost.py --out results/bench_hook_cost.json

Times what the hook adds to a step on one rank of the last pipeline stage: building the step
(totals, per-token weights of every micro-batch), one loss evaluation per micro-batch, and the
end-of-step checks — for micro-batches M ∈ {4, 16, 64}, tokens per micro-batch and packed
sequences per row. The collective is not part of it (its size is fixed: 15 float64 values,
whatever the number of ranks); nothing here depends on the number of ranks. Reported: the median
over repeats of the step's hook time, and that time per token (flat when the cost is linear in
tokens).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from typing import Any, Dict, List

import torch

from megatron_agg import LossHook, PackedSequences
from megatron_agg.megatron.averaging import GradReduction, LossReturn, MegatronAveraging
from megatron_agg.engine import PreparedStep
from megatron_agg.groups import ParallelGroups
from megatron_agg.scaling import MegatronScaling


def one_step(hook: LossHook, masks: List[torch.Tensor], losses: List[torch.Tensor], packed) -> float:
    groups = ParallelGroups(dp=None, cp=None, dp_cp=None, pp=None)  # one rank: sizes 1
    avg = MegatronAveraging(LossReturn.THREE_TUPLE, False, len(masks), 1, 1, GradReduction.MEAN)
    t0 = time.perf_counter()
    step = PreparedStep(hook.config, masks, groups, MegatronScaling(avg), packed)
    for loss, mask in zip(losses, masks):
        step.microbatch_loss({"loss": loss}, mask)
    step.finish()
    return time.perf_counter() - t0


def case(num_mb: int, tokens: int, seqs_per_row: int, repeats: int) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    hook = LossHook("seq-mean-token-mean")
    if seqs_per_row == 1:  # unpacked: rows of 512 tokens
        rows, s = max(1, tokens // 512), min(tokens, 512)
        masks = [(torch.rand(rows, s, generator=g) < 0.7) for _ in range(num_mb)]
        packed = None
    else:  # one packed row of `tokens` with `seqs_per_row` sequences
        masks = [(torch.rand(1, tokens, generator=g) < 0.7) for _ in range(num_mb)]
        cu = torch.linspace(0, tokens, seqs_per_row + 1).long()
        packed = [PackedSequences(cu) for _ in range(num_mb)]
    losses = [torch.rand(m.shape, generator=g) for m in masks]
    one_step(hook, masks, losses, packed)  # warm-up
    times = [one_step(hook, masks, losses, packed) for _ in range(repeats)]
    med = statistics.median(times)
    return {"microbatches": num_mb, "tokens_per_microbatch": tokens, "sequences_per_row": seqs_per_row,
            "median_ms": med * 1e3, "min_ms": min(times) * 1e3,
            "ns_per_token": med / (num_mb * tokens) * 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for num_mb, tokens, seqs in itertools.chain(
        ((m, t, 1) for m in (4, 16, 64) for t in (512, 2048, 8192)),
        ((16, 4096, k) for k in (2, 8, 32)),
    ):
        r = case(num_mb, tokens, seqs, args.repeats)
        rows.append(r)
        print(f"M={num_mb:>3} tokens/mb={tokens:>5} seqs/row={seqs:>2}  hook {r['median_ms']:8.2f} ms/step "
              f"(min {r['min_ms']:7.2f})  {r['ns_per_token']:6.1f} ns/token", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": 1, "repeats": args.repeats, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
