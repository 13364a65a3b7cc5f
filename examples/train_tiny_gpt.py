"""Train a small GPT with Megatron-Core and megatron_agg's LossHook, next to the exact reference.

    torchrun --nproc-per-node 4 examples/train_tiny_gpt.py --tp 2 --steps 5 \
        --loss-agg-mode seq-mean-token-mean

Every step feeds a fresh ragged global batch (masked prompts, responses of varying length, fully
masked sequences, uneven micro-batches and data-parallel ranks) through Megatron's pipeline
schedule with the hook, clips the gradient norm and takes an SGD step with Megatron's optimizer.
Beside it, every rank keeps the same model in plain PyTorch on one process
(:mod:`megatron_agg.compare.reference_gpt`) and applies the same update from the loss computed by
its definition on the whole global batch. Per step it prints the hooked global loss, the
reference loss, both gradient norms, and the largest relative difference between Megatron's
gradients and the reference's. It exits non-zero if that difference exceeds ``--tol``.

On CPU (the default) it runs with gloo under :func:`megatron_agg.compare.cpu.cpu_shim`; with
``--device cuda`` it runs with NCCL.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time

import torch
import torch.distributed as dist

from megatron_agg import AggMode, LossHook, LossTerm, reference_loss
from megatron_agg.compare import data as data_mod
from megatron_agg.compare.cpu import cpu_shim
from megatron_agg.compare.gpt import TinyGPT, build_chunks, grad_error, load_full_weights, reference_grads, wrap_ddp
from megatron_agg.compare.parallel import Layout, model_parallel
from megatron_agg.compare.reference_gpt import init_full_weights, per_token_loss


def te_layer_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--loss-agg-mode", default="seq-mean-token-mean",
                   choices=[m.value for m in AggMode if not m.needs_groups])  # prompt-mean needs group ids
    p.add_argument("--exclude-fully-masked-seqs", action="store_true")
    p.add_argument("--loss-scale-factor", type=float, default=None,
                   help="C of seq-mean-token-sum-norm (default: the padded sequence length)")
    p.add_argument("--loss-return", default="3-tuple", choices=["2-tuple", "3-tuple"])
    p.add_argument("--calculate-per-token-loss", action="store_true",
                   help="Megatron's calculate_per_token_loss path (3-tuple)")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--clip-grad", type=float, default=0.5,
                   help="gradient-norm clipping threshold (the default clips: norms start near 0.8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-5, help="max relative gradient difference")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--layer-spec", default="auto", choices=["auto", "local", "te"],
                   help="Transformer-Engine layer spec (te), Megatron's local spec (local), or te when "
                        "running on CUDA with Transformer-Engine importable (auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or present but unusable (no CUDA)
        return False
    return True


def progress(step: int, total: int, width: int = 30) -> None:
    """A progress bar on the last terminal line (stderr), below the per-step table."""
    if not sys.stderr.isatty():
        return
    done = width * step // total
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} steps")
    sys.stderr.write("\n" if step == total else "")
    sys.stderr.flush()


def clear_progress() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")


def main(argv=None) -> int:
    args = parse_args(argv)
    term = LossTerm(args.loss_agg_mode, exclude_fully_masked_seqs=args.exclude_fully_masked_seqs,
                    loss_scale_factor=args.loss_scale_factor)
    dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    layout = Layout(tp=args.tp, pp=args.pp, vpp=args.vpp)
    shim = cpu_shim() if args.device == "cpu" else contextlib.nullcontext()
    worst = 0.0
    with shim, model_parallel(layout):
        from megatron.core import parallel_state as ps
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func

        use_te = args.layer_spec == "te" or (args.layer_spec == "auto" and args.device == "cuda" and te_available())
        spec = TinyGPT(layer_spec=te_layer_spec if use_te else None)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if dp not in data_mod.MICROBATCH_PLANS:
            raise SystemExit(f"this example splits its batches for dp in {sorted(data_mod.MICROBATCH_PLANS)}, got dp={dp}")

        # The same initial weights for the sharded model and the reference.
        full = init_full_weights(spec, seed=args.seed)
        chunks = build_chunks(spec, layout, calculate_per_token_loss=args.calculate_per_token_loss)
        if use_te:  # TE fuses the LayerNorms into the linears: other names, no weight map (yet)
            full = None
            if rank == 0:
                print("Transformer-Engine layer spec: the single-process reference is not compared", flush=True)
        else:
            load_full_weights(chunks, full)
        model = wrap_ddp(chunks)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="sgd", lr=args.lr, sgd_momentum=0.0, weight_decay=0.0,
                            clip_grad=args.clip_grad, bf16=False, fp16=False),
            model,
            use_gloo_process_groups=False,
        )

        hook = LossHook(term.mode, exclude_fully_masked_seqs=term.exclude_fully_masked_seqs,
                        loss_scale_factor=term.loss_scale_factor, loss_return=args.loss_return)
        forward_backward = hook.wrap(get_forward_backward_func())

        def forward_step(data_iterator, chunk):
            mb = next(data_iterator)
            output = chunk(mb.tokens, mb.position_ids, None, labels=mb.labels)
            return output, hook.loss_func(mb.loss_mask)

        if rank == 0:
            print(f"megatron_agg example: {layout.name(world)} on {world} ranks ({args.device}), "
                  f"mode={term.mode.value}, exclude_fully_masked_seqs={term.exclude_fully_masked_seqs}, "
                  f"loss_return={args.loss_return}, calculate_per_token_loss={args.calculate_per_token_loss}",
                  flush=True)
            print(f"{'step':>4}  {'hooked loss':>12}  {'reference':>12}  {'grad norm':>10}  "
                  f"{'ref norm':>10}  {'max grad err':>12}  {'time':>6}", flush=True)
        for step in range(args.steps):
            t0 = time.perf_counter()
            batch = data_mod.make_global_batch(spec.vocab_size, seed=args.seed * 1000 + step)
            mbs = data_mod.split_for_rank(batch, dp, dp_rank)
            for m in model:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            forward_backward(
                forward_step_func=forward_step,
                data_iterator=[iter(mbs) for _ in model] if args.vpp else iter(mbs),
                model=model, num_microbatches=len(mbs), seq_length=batch.seq_length,
                micro_batch_size=mbs[0].tokens.shape[0], forward_only=False,
                loss_masks=[mb.full_loss_mask for mb in mbs],
            )
            losses = hook.global_loss()  # one all-reduce, for logging

            if full is not None:
                # The reference: the whole global batch, the loss by its definition, one process.
                position_ids = torch.arange(batch.seq_length).unsqueeze(0).expand_as(batch.tokens)
                ref_value = []

                def ref_loss(w):
                    loss = reference_loss([per_token_loss(w, spec, batch.tokens, position_ids, batch.labels)],
                                          [batch.loss_mask], term)
                    ref_value.append(float(loss))
                    return loss

                ref = reference_grads(full, ref_loss)
                stats = torch.tensor([max(grad_error(model, ref).values())], dtype=torch.float64)
                dist.all_reduce(stats, op=dist.ReduceOp.MAX)
                err = float(stats[0])
                worst = max(worst, err)

            _, grad_norm, _ = optimizer.step()  # Megatron's clipping sees the hooked gradient
            if full is not None:
                ref_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in ref.values()))
                coeff = min(1.0, args.clip_grad / (ref_norm + 1e-6))
                with torch.no_grad():
                    for name in full:
                        full[name] = full[name] - args.lr * coeff * ref[name]

            # The hooked loss lives on the last pipeline stage; send it to rank 0 for printing.
            value = torch.tensor([float(losses["loss"]) if losses is not None else -math.inf], dtype=torch.float64)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            if rank == 0:
                if not args.no_progress:
                    clear_progress()
                if full is not None:
                    print(f"{step:>4}  {float(value):>12.6f}  {ref_value[0]:>12.6f}  {grad_norm:>10.6f}  "
                          f"{ref_norm:>10.6f}  {err:>12.2e}  {time.perf_counter() - t0:>5.2f}s", flush=True)
                else:
                    print(f"{step:>4}  {float(value):>12.6f}  {'n/a':>12}  {grad_norm:>10.6f}  "
                          f"{'n/a':>10}  {'n/a':>12}  {time.perf_counter() - t0:>5.2f}s", flush=True)
                if not args.no_progress:
                    progress(step + 1, args.steps)
    verdict = "EXACT" if worst <= args.tol else "MISMATCH"
    if rank == 0:
        print(f"{verdict}: largest relative gradient difference {worst:.2e} (tolerance {args.tol:.0e})", flush=True)
    dist.destroy_process_group()
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
