"""A long run with the hook: memory and step time must not grow (run under torchrun).

    torchrun --nproc-per-node 2 benchmarks/soak.py --steps 1000 --out results/soak.json

Trains a small GPT on 2 CPU ranks (DP2) with ``LossHook("seq-mean-token-mean")`` and Megatron's
optimizer for ``--steps`` steps. Every step uses a fresh ragged batch; every 10th step is a
forward-only evaluation step; the number of micro-batches changes from step to step (each DP rank
drops its last micro-batch on odd steps); every 100th step first runs a step that raises (a mask
of the wrong shape) and is caught. Per window of 100 steps it records the peak and current
resident memory of rank 0 and the median step time, and at the end ``global_loss`` of the last
step. A window-over-window growth in memory or time shows a leak.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch.distributed as dist

from megatron_agg import LossHook
from megatron_agg.compare import data as data_mod
from megatron_agg.compare.cpu import cpu_shim
from megatron_agg.compare.gpt import TinyGPT, build_chunks, load_full_weights, wrap_ddp
from megatron_agg.compare.parallel import Layout, model_parallel
from megatron_agg.compare.reference_gpt import init_full_weights


def current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * (resource.getpagesize() // 1024)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    windows = []
    with cpu_shim(), model_parallel(Layout()):
        from megatron.core import parallel_state as ps
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func

        spec = TinyGPT(num_layers=2)
        chunks = build_chunks(spec, Layout())
        load_full_weights(chunks, init_full_weights(spec))
        model = wrap_ddp(chunks)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=0.1, sgd_momentum=0.0, clip_grad=1.0,
                                                     bf16=False, fp16=False), model, use_gloo_process_groups=False)
        hook = LossHook("seq-mean-token-mean")
        fb = hook.wrap(get_forward_backward_func())
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

        def run(mbs, forward_only=False, masks=None):
            def forward_step(it, chunk):
                mb = next(it)
                return chunk(mb.tokens, mb.position_ids, None, labels=mb.labels), hook.loss_func(mb.loss_mask)

            return fb(forward_step_func=forward_step, data_iterator=iter(mbs), model=model,
                      num_microbatches=len(mbs), seq_length=16, micro_batch_size=1, forward_only=forward_only,
                      loss_masks=masks if masks is not None else [mb.full_loss_mask for mb in mbs])

        times = []
        for step in range(args.steps):
            mbs = data_mod.split_for_rank(data_mod.make_global_batch(spec.vocab_size, seed=step), dp, dp_rank)
            if step % 2:
                mbs = mbs[:-1]  # a different number of micro-batches
            if step % args.window == 0:
                bad = [mb.full_loss_mask[:, :-1] for mb in mbs]
                try:
                    run(mbs, masks=bad)
                except ValueError:
                    pass
                else:
                    raise SystemExit("a mask of the wrong shape did not raise")
            t0 = time.perf_counter()
            for m in model:
                m.zero_grad_buffer()
            opt.zero_grad()
            run(mbs, forward_only=(step % 10 == 9))
            if step % 10 != 9:
                opt.step()
            times.append(time.perf_counter() - t0)
            if (step + 1) % args.window == 0:
                w = {"steps": f"{step + 2 - args.window}-{step + 1}",
                     "median_step_ms": statistics.median(times) * 1e3,
                     "rss_mib": current_rss_kib() / 1024,
                     "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
                windows.append(w)
                times = []
                if rank == 0:
                    print(f"steps {w['steps']:>9}: median {w['median_step_ms']:6.1f} ms/step, rss "
                          f"{w['rss_mib']:6.1f} MiB (peak {w['peak_rss_mib']:6.1f})", flush=True)
        last = hook.global_loss()
    if rank == 0:
        report = {"steps": args.steps, "world_size": dist.get_world_size(), "windows": windows,
                  "last_global_loss": float(last["loss"]) if last else None}
        first, final = windows[0], windows[-1]
        print(f"rss {first['rss_mib']:.1f} -> {final['rss_mib']:.1f} MiB; median step "
              f"{first['median_step_ms']:.1f} -> {final['median_step_ms']:.1f} ms", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    dist.barrier()  # every rank done before the teardown
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
