"""A GRPO-style step with Megatron-Core: a PPO-clipped policy-gradient loss (``token-mean``) plus
a KL penalty (``seq-mean-token-mean``), both exact over the global batch, under one collective.

    torchrun --nproc-per-node 4 examples/grpo_step.py --tp 2 --steps 3

The model's per-token output (``GPTModel`` with ``labels``) is the cross entropy, i.e. ``-log π(a_t)``.
From it and per-micro-batch data (old log-probs, reference log-probs, per-sequence advantages) the
per-token loss function builds the two terms:

    ratio_t = exp(logp_t - old_logp_t)
    pg_t    = -min(ratio_t · A_i, clip(ratio_t, 1-ε, 1+ε) · A_i)          -> token-mean
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (k3 estimator) -> seq-mean-token-mean

    L = L_pg + β · L_kl

The two terms divide by different global totals (valid tokens; sequences), which is why this
needs the *prepared* mode: ``LossHook(terms=...).wrap(...)`` with the step's masks, one
all-reduce. The example checks every step against the single-process reference (whole global
batch, the formula above, plain autograd) and prints the largest gradient difference.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.distributed as dist

from megatron_agg import LossHook, LossTerm, reference_loss
from megatron_agg.compare import data as data_mod
from megatron_agg.compare.cpu import cpu_shim
from megatron_agg.compare.gpt import TinyGPT, build_chunks, grad_error, load_full_weights, reference_grads, wrap_ddp
from megatron_agg.compare.parallel import Layout, model_parallel
from megatron_agg.compare.reference_gpt import init_full_weights, per_token_loss

CLIP = 0.2


def grpo_terms(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
               advantages: torch.Tensor) -> dict:
    """Per-token policy and KL losses ``[b, s]`` from log-probs (advantages ``[b]``)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - CLIP, 1 + CLIP) * adv)
    delta = ref_logp - logp
    kl = torch.exp(delta) - delta - 1
    return {"pg": pg, "kl": kl}


def rollout_data(batch: data_mod.GlobalBatch, seed: int) -> dict:
    """Old and reference log-probs near the current ones, and per-sequence advantages."""
    g = torch.Generator().manual_seed(seed)
    shape = batch.tokens.shape
    return {
        "old_shift": 0.1 * torch.randn(shape, generator=g),
        "ref_shift": 0.1 * torch.randn(shape, generator=g),
        "advantages": torch.randn(shape[0], generator=g),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--kl-coef", type=float, default=0.1)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    rank = dist.get_rank()
    terms = {"pg": LossTerm("token-mean"), "kl": LossTerm("seq-mean-token-mean", weight=args.kl_coef)}
    layout = Layout(tp=args.tp, pp=args.pp)
    worst = 0.0
    with (cpu_shim() if args.device == "cpu" else contextlib.nullcontext()), model_parallel(layout):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        spec = TinyGPT()
        full = init_full_weights(spec, seed=7)
        chunks = build_chunks(spec, layout)
        load_full_weights(chunks, full)
        model = wrap_ddp(chunks)
        hook = LossHook(terms=terms)
        forward_backward = hook.wrap(get_forward_backward_func())
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if rank == 0:
            print(f"GRPO-style step on {layout.name(dist.get_world_size())}: L = pg(token-mean) + "
                  f"{args.kl_coef}·kl(seq-mean-token-mean)", flush=True)
        for step in range(args.steps):
            batch = data_mod.make_global_batch(spec.vocab_size, seed=100 + step)
            roll = rollout_data(batch, seed=step)
            rows = data_mod.rows_for_rank(dp, dp_rank)
            mbs = data_mod.split_for_rank(batch, dp, dp_rank)
            for m in model:
                m.zero_grad_buffer()
            extras = iter([{k: v[r] for k, v in roll.items()} for r in rows])

            def forward_step(data_iterator, chunk):
                mb, extra = next(data_iterator)
                ce = chunk(mb.tokens, mb.position_ids, None, labels=mb.labels)

                def per_token(output: torch.Tensor) -> dict:
                    logp = -output  # the model returns the cross entropy, -log π
                    old = (logp + extra["old_shift"]).detach()
                    ref = (logp + extra["ref_shift"]).detach()
                    return grpo_terms(logp, old, ref, extra["advantages"])

                return ce, hook.loss_func(mb.loss_mask, per_token)

            forward_backward(forward_step_func=forward_step, data_iterator=iter(list(zip(mbs, extras))),
                             model=model, num_microbatches=len(mbs), seq_length=batch.seq_length,
                             micro_batch_size=1, loss_masks=[mb.full_loss_mask for mb in mbs])
            losses = hook.global_loss()

            pos = torch.arange(batch.seq_length).unsqueeze(0).expand_as(batch.tokens)

            def reference(w):
                logp = -per_token_loss(w, spec, batch.tokens, pos, batch.labels)
                t = grpo_terms(logp, (logp + roll["old_shift"]).detach(), (logp + roll["ref_shift"]).detach(),
                               roll["advantages"])
                return sum(reference_loss([t[n]], [batch.loss_mask], terms[n]) for n in terms)

            err = torch.tensor([max(grad_error(model, reference_grads(full, reference)).values())], dtype=torch.float64)
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            worst = max(worst, float(err))
            shown = torch.tensor([float(losses[k]) if losses else -1e30 for k in ("loss", "pg", "kl")], dtype=torch.float64)
            dist.all_reduce(shown, op=dist.ReduceOp.MAX)
            if rank == 0:
                print(f"step {step}: L={float(shown[0]):.6f}  pg={float(shown[1]):.6f}  kl={float(shown[2]):.6f}  "
                      f"max grad err vs reference {float(err):.2e}", flush=True)
    if rank == 0:
        print(("EXACT" if worst <= args.tol else "MISMATCH") + f": largest relative gradient difference {worst:.2e}",
              flush=True)
    dist.destroy_process_group()
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
