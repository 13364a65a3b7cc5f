"""Step time of a small GPTModel, hooked versus Megatron's own loss paths (run under torchrun).

    torchrun --nproc-per-node 4 benchmarks/bench_step.py --steps 30 --out results/bench_step.json

For each layout (TP2×DP2 and PP2×DP2 on 4 ranks) the paths below train side by side, *interleaved*
step by step so that machine noise hits all of them alike:

- ``plain-2-tuple``: Megatron's classic per-micro-batch masked mean (2-tuple);
- ``native-per-token``: Megatron's ``calculate_per_token_loss`` token-mean (3-tuple);
- ``hooked``: ``LossHook("seq-mean-token-mean")`` (3-tuple, async all-reduce);
- ``hooked-sync`` (PP layouts only): the same with ``async_totals=False``.

Each step is timed from a barrier to a barrier (forward, backward, finalize_model_grads). Reported
per layout and path: median, min and max over the measured steps, the median ratio against both
unhooked paths, the collectives the hook issued per step, and the hook's per-step state in bytes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from megatron_agg import LossHook
from megatron_agg.compare import data as data_mod
from megatron_agg.compare.cpu import cpu_shim
from megatron_agg.compare.gpt import TinyGPT, build_chunks, load_full_weights, wrap_ddp
from megatron_agg.compare.parallel import Layout, model_parallel
from megatron_agg.compare.reference_gpt import init_full_weights
from harness.sync_guard import count_collectives

SPEC = TinyGPT(hidden_size=64, ffn_hidden_size=256, num_layers=4, vocab_size=256, num_attention_heads=4,
               max_sequence_length=64)
SEQ = 64


def plain_loss(mask: torch.Tensor):
    def f(out: torch.Tensor):
        valid = mask != 0
        mean = torch.where(valid, out, torch.zeros_like(out)).sum() / valid.sum().clamp(min=1)
        return mean, {"loss": mean.detach()}
    return f


def native_loss(mask: torch.Tensor):
    def f(out: torch.Tensor):
        valid = mask != 0
        total = torch.where(valid, out, torch.zeros_like(out)).sum()
        count = valid.sum(dtype=torch.int)
        return total, count, {"loss": torch.stack([total.detach(), count.float()])}
    return f


class Path:
    def __init__(self, name: str, layout: Layout, full: Dict[str, torch.Tensor], per_token: bool,
                 hook: "LossHook | None", make_loss=None):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        chunks = build_chunks(SPEC, layout, calculate_per_token_loss=per_token)
        load_full_weights(chunks, full)
        self.model = wrap_ddp(chunks)
        self.name, self.layout, self.hook, self.make_loss = name, layout, hook, make_loss
        fb = get_forward_backward_func()
        self.fb = hook.wrap(fb) if hook is not None else fb
        self.times: List[float] = []
        self.collectives: List[int] = []
        self.hook_seconds: List[float] = []
        self.wait_seconds: List[float] = []
        self.cpu_seconds: List[float] = []

    def step(self, mbs: List[data_mod.MicroBatch]) -> None:
        for m in self.model:
            m.zero_grad_buffer()

        def forward_step(it, chunk):
            mb = next(it)
            out = chunk(mb.tokens, mb.position_ids, None, labels=mb.labels)
            loss = self.hook.loss_func(mb.loss_mask) if self.hook is not None else self.make_loss(mb.loss_mask)
            return out, loss

        kwargs = dict(forward_step_func=forward_step, data_iterator=[iter(mbs) for _ in self.model]
                      if self.layout.vpp else iter(mbs), model=self.model, num_microbatches=len(mbs),
                      seq_length=SEQ, micro_batch_size=mbs[0].tokens.shape[0], forward_only=False)
        if self.hook is not None:
            kwargs["loss_masks"] = [mb.full_loss_mask for mb in mbs]
        dist.barrier()
        t0 = time.perf_counter()
        with count_collectives() as counter:
            self.fb(**kwargs)
        dist.barrier()
        self.times.append(time.perf_counter() - t0)
        # The engine times its own code (StepSummary.engine_seconds / engine_cpu_seconds /
        # wait_seconds): no patching of megatron_agg needed to measure it.
        last = self.hook.last_step if self.hook is not None else None
        self.hook_seconds.append(last.engine_seconds - last.wait_seconds if last else 0.0)
        self.wait_seconds.append(last.wait_seconds if last else 0.0)
        self.cpu_seconds.append(last.engine_cpu_seconds if last else 0.0)
        self.collectives.append(counter.count)


def batch_for_step(step: int) -> data_mod.GlobalBatch:
    return data_mod.make_global_batch(SPEC.vocab_size, seq_length=SEQ, seed=10_000 + step)


def run_layout(layout: Layout, steps: int, warmup: int) -> Dict[str, Any]:
    from megatron.core import parallel_state as ps

    full = init_full_weights(SPEC, seed=0)
    paths = [
        Path("plain-2-tuple", layout, full, False, None, plain_loss),
        Path("native-per-token", layout, full, True, None, native_loss),
        Path("hooked", layout, full, False, LossHook("seq-mean-token-mean")),
    ]
    if layout.pp > 1:
        paths.append(Path("hooked-sync", layout, full, False, LossHook("seq-mean-token-mean", async_totals=False)))
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    for step in range(warmup + steps):
        mbs = data_mod.split_for_rank(batch_for_step(step), dp, dp_rank)
        order = paths[step % len(paths):] + paths[: step % len(paths)]  # rotate who goes first
        for path in order:
            path.step(mbs)
    out: Dict[str, Any] = {"layout": layout.name(dist.get_world_size()), "paths": {}}
    for path in paths:
        t = torch.tensor(path.times[warmup:], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
        times = t.tolist()
        coll = torch.tensor([max(path.collectives[warmup:])], dtype=torch.int64)
        dist.all_reduce(coll, op=dist.ReduceOp.MAX)
        state = path.hook.last_step.state_bytes if path.hook is not None and path.hook.last_step else 0
        st = torch.tensor([state], dtype=torch.int64)
        dist.all_reduce(st, op=dist.ReduceOp.MAX)
        own = torch.tensor(path.hook_seconds[warmup:], dtype=torch.float64)
        dist.all_reduce(own, op=dist.ReduceOp.MAX)
        wait = torch.tensor(path.wait_seconds[warmup:], dtype=torch.float64)
        dist.all_reduce(wait, op=dist.ReduceOp.MAX)
        cpu = torch.tensor(path.cpu_seconds[warmup:], dtype=torch.float64)
        dist.all_reduce(cpu, op=dist.ReduceOp.MAX)
        out["paths"][path.name] = {
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "hook_collectives_per_step": int(coll), "hook_state_bytes": int(st),
            "hook_own_median_s": statistics.median(own.tolist()),
            "hook_wait_median_s": statistics.median(wait.tolist()),
            "hook_cpu_median_s": statistics.median(cpu.tolist()),
        }
    p = out["paths"]
    for ref in ("plain-2-tuple", "native-per-token"):
        p["hooked"][f"ratio_vs_{ref}"] = p["hooked"]["median_s"] / p[ref]["median_s"]
    # The hook's own work (its waits for the all-reduce excluded) against the step.
    p["hooked"]["ratio_own_work"] = 1.0 + p["hooked"]["hook_own_median_s"] / p["plain-2-tuple"]["median_s"]
    p["hooked"]["ratio_own_cpu"] = 1.0 + p["hooked"]["hook_cpu_median_s"] / p["plain-2-tuple"]["median_s"]
    if "hooked-sync" in p:
        p["hooked-sync"]["ratio_vs_hooked"] = p["hooked-sync"]["median_s"] / p["hooked"]["median_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dist.init_process_group("gloo")
    results = []
    with cpu_shim():
        for layout in (Layout(tp=2), Layout(pp=2)):
            with model_parallel(layout):
                results.append(run_layout(layout, args.steps, args.warmup))
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss], dtype=torch.int64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        report = {"world_size": dist.get_world_size(), "steps": args.steps, "warmup": args.warmup,
                  "peak_rss_kib_per_rank": int(peak), "model": repr(SPEC), "layouts": results}
        for r in results:
            print(r["layout"])
            for name, v in r["paths"].items():
                extra = " ".join(f"{k}={v[k]:.3f}" for k in v if k.startswith("ratio"))
                print(f"  {name:<18} median {v['median_s'] * 1e3:7.1f} ms  min {v['min_s'] * 1e3:7.1f}  "
                      f"max {v['max_s'] * 1e3:7.1f}  hook: {v['hook_collectives_per_step']} collective(s)/step, "
                      f"own work {v['hook_own_median_s'] * 1e3:5.2f} ms (cpu {v['hook_cpu_median_s'] * 1e3:5.2f}), waits on it "
                      f"{v['hook_wait_median_s'] * 1e3:5.2f} ms, state {v['hook_state_bytes']} B  {extra}",
                      flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    dist.barrier()  # every rank done before the teardown (as the suites do): rank 0 once aborted in it
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
