"""``megatron-agg compare``: the same objective on Megatron and on FSDP2, side by side.

Trains one small GPT from one initial state on one stream of ragged batches for ``--steps`` steps
on three paths, in the same processes:

- **megatron+hook**: Megatron-Core (the TP/PP/VPP layout of the command line, DP from the rest) with
  :class:`~megatron_agg.LossHook`;
- **fsdp+hook**: the same model in plain PyTorch sharded with FSDP2 over all ranks, with
  :class:`~megatron_agg.fsdp.FSDPLossHook`;
- **megatron-plain**: Megatron-Core with its own per-micro-batch averaging (a 2-tuple masked mean).

Each path steps with SGD and gradient-norm clipping. Per step it prints the loss and gradient norm
of each path and the largest relative difference of each Megatron path's gradients from the FSDP
path's, writes the table as JSON and a PNG plot of the loss curves and the per-step gradient
differences, and exits non-zero when the hooked Megatron path and the FSDP path differ by more than
``--tol``. Runs on CPU with gloo (the default) and on GPUs with NCCL (``--device cuda``).
``megatron-agg compare`` starts ``torchrun`` itself when it is not already running under it.

Both Megatron paths run under the same Megatron set-up, chosen with:

- ``--wrapper``: Megatron's data-parallel wrapper, as Megatron-LM builds it
  (:func:`megatron_agg.compare.wrappers.wrap_model`): ``ddp`` (``DistributedDataParallel``, the
  default), ``torch-fsdp2`` (``TorchFullyShardedDataParallel``, ``--use-torch-fsdp2``) or
  ``megatron-fsdp`` (``--use-megatron-fsdp``) with ``--fsdp-strategy`` as its
  ``data_parallel_sharding_strategy`` (default ``optim_grads``). Neither FSDP wrapper takes
  pipeline parallelism here (Megatron-LM asserts it for torch-fsdp2; Megatron-FSDP has no PP
  support in this harness). Megatron-LM requires an untied output layer with torch-fsdp2, so under
  it all three paths train the untied model (the output layer starts as a copy of the word
  embeddings, so the first step computes what the tied model computes; the FSDP2 path's plain
  PyTorch model gets the same untied output layer). Under both FSDP wrappers the Megatron paths
  split the batch as the FSDP2 path does, with the same number of micro-batches on every rank
  (still ragged): they reduce in every micro-batch's backward pass.
- ``--sequence-parallel`` (``tp > 1``): ``sequence_parallel=True``, with the LayerNorm of
  :mod:`megatron_agg.compare.layers` that marks its weights ``sequence_parallel`` as Apex's and
  Transformer Engine's norms do (the local spec's own norm refuses sequence parallelism).
- ``--distributed-optimizer``: ``use_distributed_optimizer=True`` in the DDP config and in the
  optimizer config (Megatron's ``DistributedOptimizer``). Megatron-FSDP always steps with the
  distributed optimizer here; torch-fsdp2 refuses it (Megatron-LM asserts the same).
  ``DistributedOptimizer`` only takes Adam (megatron-core 0.16.1 asserts "Only Adam and
  HybridDeviceOptimizer currently supported"; Megatron-LM cannot run ``--optimizer sgd`` with it
  either), so wherever it is used all three paths step with Adam (``torch.optim.AdamW`` with weight
  decay 0, what Megatron's Adam is without Transformer Engine or Apex; the same betas and epsilon
  on the FSDP2 path; default ``--lr`` 0.01 instead of SGD's 1.0). That is Megatron's real optimizer
  stepping the real shards, not a stand-in.

The gradients are compared where each rank holds them after Megatron's ``finalize_model_grads``
(:func:`megatron_agg.compare.wrappers.gather_main_grads`): the whole ``main_grad`` under DDP, the
rank's own shard of the grad buffer with the distributed optimizer, the rank's FSDP shard under the
FSDP wrappers. Each shard is compared with the same elements of the FSDP2 path's full gradient,
relative to the largest reference value of the (TP-local) parameter, and the maximum is taken over
parameters and ranks. Every wrapper steps with Megatron's own optimizer
(``get_megatron_optimizer``: SGD, or Adam with the distributed optimizer; clipping at
``--clip-grad``). On the first step compare also proves that the shards it reads cover every element
of every parameter exactly as often as expected (:func:`~megatron_agg.compare.wrappers.check_coverage`).

A set-up that :class:`~megatron_agg.LossHook` refuses (a known upstream defect of a wrapper, e.g.
Megatron-FSDP's ``optim`` strategy in some releases) ends compare with its one-line error and exit
status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ..modes import AggMode

__all__ = ["add_arguments", "run", "main"]

PATHS = ("megatron+hook", "fsdp+hook", "megatron-plain")
#: ``--wrapper`` (:data:`megatron_agg.compare.wrappers.WRAPPERS`, spelled out to keep the parser light).
WRAPPER_CHOICES = ("ddp", "torch-fsdp2", "megatron-fsdp")
#: ``--fsdp-strategy`` (:data:`megatron_agg.compare.wrappers.STRATEGIES`).
FSDP_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
DEFAULT_FSDP_STRATEGY = "optim_grads"
#: Default learning rates of the two optimizers (SGD without, Adam with the distributed optimizer).
SGD_LR = 1.0
ADAM_LR = 0.01


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=4, help="ranks to start when not under torchrun (default 4)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--steps", type=int, default=8)
    # prompt-mean needs group ids, which compare's synthetic batches do not carry
    p.add_argument("--loss-agg-mode", default="seq-mean-token-mean",
                   choices=[m.value for m in AggMode if not m.needs_groups])
    p.add_argument("--exclude-fully-masked-seqs", action="store_true")
    p.add_argument("--loss-scale-factor", type=float, default=None)
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {SGD_LR:g} with SGD; {ADAM_LR:g} with Adam, which the distributed "
                        "optimizer steps with)")
    p.add_argument("--clip-grad", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4,
                   help="largest relative gradient difference allowed between megatron+hook and fsdp+hook")
    p.add_argument("--out", default="results/compare", help="folder for compare.json and compare.png")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--inject-bug", default="none", choices=["none", "local-denominator"],
                   help="self-test: break the hooked Megatron path on purpose (totals local × dp)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--wrapper", default="ddp", choices=list(WRAPPER_CHOICES),
                   help="Megatron's data-parallel wrapper of both Megatron paths: ddp (DistributedDataParallel, "
                        "the default), torch-fsdp2 (TorchFullyShardedDataParallel) or megatron-fsdp "
                        "(Megatron-FSDP); the FSDP wrappers take no --pp")
    p.add_argument("--fsdp-strategy", default=None, choices=list(FSDP_STRATEGIES),
                   help="Megatron-FSDP's data_parallel_sharding_strategy (only with --wrapper megatron-fsdp; "
                        f"default {DEFAULT_FSDP_STRATEGY})")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="sequence_parallel=True in the Megatron model (needs --tp 2 or more)")
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="use_distributed_optimizer=True (Megatron's DistributedOptimizer; gradients compared on "
                        "each rank's own shard; every path then steps with Adam, the only optimizer it takes); "
                        "always on with megatron-fsdp, refused with torch-fsdp2")


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def _progress(step: int, total: int) -> None:
    if dist.get_rank() == 0 and sys.stderr.isatty():
        width = 30
        done = width * step // total
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total}")
        sys.stderr.write("\n" if step == total else "")
        sys.stderr.flush()


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


_OUTPUT = "output_layer.weight"
_EMBEDDING = "embedding.word_embeddings.weight"


def fsdp_strategy(args: argparse.Namespace) -> Optional[str]:
    """Megatron-FSDP's ``data_parallel_sharding_strategy`` of the run (``None`` for other wrappers)."""
    if args.wrapper != "megatron-fsdp":
        return None
    return args.fsdp_strategy or DEFAULT_FSDP_STRATEGY


def uses_distributed_optimizer(args: argparse.Namespace) -> bool:
    """``--distributed-optimizer``, or Megatron-FSDP (which Megatron-LM only runs with it)."""
    return bool(args.distributed_optimizer) or args.wrapper == "megatron-fsdp"


def optimizer_of(args: argparse.Namespace) -> str:
    """``"sgd"``, or ``"adam"`` with the distributed optimizer.

    Megatron's ``DistributedOptimizer`` only takes Adam (megatron-core 0.16.1,
    ``distrib_optimizer.py``: "Only Adam and HybridDeviceOptimizer currently supported"), so with
    it every path steps with Adam (decoupled weight decay 0; Megatron's Adam on a machine without
    Transformer Engine or Apex is ``torch.optim.AdamW``, which the FSDP path uses with the same
    betas and epsilon).
    """
    return "adam" if uses_distributed_optimizer(args) else "sgd"


def setup_name(args: argparse.Namespace) -> str:
    """The Megatron set-up beyond the layout, for the header and the plot: ``""`` for the default."""
    parts = []
    if args.wrapper != "ddp":
        parts.append(args.wrapper + (f"/{fsdp_strategy(args)}" if fsdp_strategy(args) else ""))
    if args.sequence_parallel:
        parts.append("sp")
    if args.distributed_optimizer:
        parts.append("distopt")
    if optimizer_of(args) == "adam":
        parts.append("adam")
    return "".join(f" +{p}" for p in parts)


def _sequence_parallel_spec(spec: Any, layout: Any) -> Any:
    """``spec`` built with :mod:`.layers`' sequence-parallel LayerNorm.

    :func:`~.layers.with_norm` builds a block of all the model's layers (one
    pipeline stage); with pipeline parallelism each model chunk builds its share of them.
    """
    import dataclasses
    import functools

    from .layers import SequenceParallelLayerNorm, sequence_parallel_layer_spec, with_norm

    chunks = layout.pp * (layout.vpp or 1)
    if chunks == 1:
        return with_norm(spec, SequenceParallelLayerNorm)
    return dataclasses.replace(spec, layer_spec=functools.partial(
        sequence_parallel_layer_spec, spec.num_layers // chunks, None, SequenceParallelLayerNorm))


def _backward_on_cpu(args: argparse.Namespace) -> Any:
    """:func:`.layers.cpu_backward` where sequence parallelism needs it on the CPU."""
    if args.device != "cpu" or not args.sequence_parallel:
        return contextlib.nullcontext()
    from .layers import cpu_backward

    return cpu_backward()


def _equal_counts(args: argparse.Namespace) -> Any:
    """Under the FSDP wrappers, split the Megatron paths' batch as the FSDP2 path's: every DP rank
    with the same number of micro-batches (:data:`megatron_agg.compare.data.EQUAL_COUNT_PLANS`,
    still ragged). They reduce in every micro-batch's backward pass, so ranks with different counts
    would run different collectives (gloo aborts); Megatron-LM's micro-batch count is the same on
    every rank anyway. DDP keeps the ragged counts."""
    if args.wrapper == "ddp":
        return contextlib.nullcontext()
    from . import data as data_mod
    from .controls import microbatch_plans

    return microbatch_plans(data_mod.EQUAL_COUNT_PLANS)


def _quiet_megatron_fsdp(args: argparse.Namespace) -> Any:
    """Megatron-FSDP warns on every rank that it runs on the CPU: keep the table readable."""
    import logging

    if args.wrapper != "megatron-fsdp":
        return contextlib.nullcontext()
    logger = logging.getLogger("megatron.core.distributed.fsdp")
    level = logger.level

    @contextlib.contextmanager
    def quiet():
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)

    return quiet()


def _refused_by_megatron_agg(exc: ValueError) -> None:
    """A ``ValueError`` raised by megatron_agg itself in the hooked step is the hook refusing this
    set-up (e.g. a wrapper's known upstream defect): one line, exit status 2, as a bad command line.
    Returns (the caller re-raises) for any other ``ValueError``."""
    import traceback

    from .checks import USAGE_ERROR, error_line

    frames = traceback.extract_tb(exc.__traceback__)
    here = os.path.dirname(os.path.abspath(__file__))  # compare's own CPU kit: not the hook
    package = os.path.dirname(here)
    where = os.path.abspath(frames[-1].filename) if frames else ""
    if not where.startswith(package + os.sep) or (where.startswith(here + os.sep) and where != os.path.abspath(__file__)):
        return
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(error_line(f"LossHook refused this set-up: {' '.join(str(exc).split())}"), file=sys.stderr, flush=True)
    raise SystemExit(USAGE_ERROR) from None


def run(args: argparse.Namespace) -> int:
    from .checks import check_in_worker

    check_in_worker(args)  # the command line, checked before anything is built: one line and exit 2
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .. import LossHook, LossTerm
    from ..fsdp import FSDPLossHook
    from . import data as data_mod
    from .cpu import cpu_shim
    from .gpt import TinyGPT
    from .controls import LocalTimesDpGroups, groups_like, plain_masked_mean
    from .parallel import Layout, model_parallel
    from .reference_gpt import TorchGPT, init_full_weights
    from .wrappers import build_chunks_for, check_coverage, gather_main_grads, shard_error, wrap_model
    from ..megatron import LossReturn

    dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    world = dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    term = LossTerm(args.loss_agg_mode, exclude_fully_masked_seqs=args.exclude_fully_masked_seqs,
                    loss_scale_factor=args.loss_scale_factor)
    layout = Layout(tp=args.tp, pp=args.pp, vpp=args.vpp)
    dp_m = layout.dp(world)
    for dp in (dp_m, world):
        if dp not in data_mod.MICROBATCH_PLANS:
            raise SystemExit(f"compare splits its batches for data-parallel sizes {sorted(data_mod.MICROBATCH_PLANS)}; "
                             f"this run needs {dp} (Megatron dp={dp_m}, FSDP dp={world})")
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    shim = cpu_shim() if args.device == "cpu" else contextlib.nullcontext()
    rows: List[Dict[str, Any]] = []
    strategy = fsdp_strategy(args)
    distributed_optimizer = uses_distributed_optimizer(args)
    optimizer_name = optimizer_of(args)
    if args.lr is None:
        args.lr = ADAM_LR if optimizer_name == "adam" else SGD_LR
    with shim, _backward_on_cpu(args), _quiet_megatron_fsdp(args), _equal_counts(args), model_parallel(layout):
        from megatron.core import parallel_state as ps
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func

        spec = TinyGPT()
        full = init_full_weights(spec, seed=args.seed)
        if args.wrapper == "torch-fsdp2":  # untied output layer (see the module docstring)
            full[_OUTPUT] = full[_EMBEDDING].clone()
        megatron_spec = _sequence_parallel_spec(spec, layout) if args.sequence_parallel else spec
        overrides = {"sequence_parallel": True} if args.sequence_parallel else {}

        opt_config = OptimizerConfig(optimizer=optimizer_name, lr=args.lr, sgd_momentum=0.0, weight_decay=0.0,
                                     clip_grad=args.clip_grad, bf16=False, fp16=False,
                                     use_distributed_optimizer=distributed_optimizer)

        def megatron_path():
            chunks = build_chunks_for(megatron_spec, layout, args.wrapper, **overrides)
            model = wrap_model(chunks, args.wrapper, full_weights=full, strategy=strategy,
                               use_distributed_optimizer=distributed_optimizer)
            opt = get_megatron_optimizer(opt_config, model, use_gloo_process_groups=False)
            return model, opt

        hooked, hooked_opt = megatron_path()
        plain, plain_opt = megatron_path()
        # --inject-bug: the broken variant goes in through the hook's public groups= argument
        # (totals = local × dp instead of their all-reduce), never by patching megatron_agg.
        from ..megatron import resolve_groups

        broken = ({"groups": groups_like(resolve_groups(), LocalTimesDpGroups)}
                  if args.inject_bug == "local-denominator" else {})
        hook = LossHook(term.mode, exclude_fully_masked_seqs=term.exclude_fully_masked_seqs,
                        loss_scale_factor=term.loss_scale_factor, **broken)
        fb = get_forward_backward_func()
        hooked_fb = hook.wrap(fb)
        plain_loss = plain_masked_mean(LossReturn.TWO_TUPLE)

        fsdp_model = TorchGPT(spec, full).to(device)
        fully_shard(fsdp_model, mesh=init_device_mesh(device.type, (world,)))
        fsdp_hook = FSDPLossHook(term.mode, exclude_fully_masked_seqs=term.exclude_fully_masked_seqs,
                                 loss_scale_factor=term.loss_scale_factor)
        fsdp_hook.prepare(fsdp_model)
        fsdp_opt = (torch.optim.SGD(fsdp_model.parameters(), lr=args.lr) if optimizer_name == "sgd" else
                    torch.optim.AdamW(fsdp_model.parameters(), lr=args.lr, weight_decay=0.0,
                                      betas=(opt_config.adam_beta1, opt_config.adam_beta2), eps=opt_config.adam_eps))

        dp_rank_m = ps.get_data_parallel_rank()
        is_last = ps.is_pipeline_last_stage()
        dp_group_m = ps.get_data_parallel_group()
        _log(f"megatron-agg compare: {args.steps} steps, mode={term.mode.value}"
             f"{' +exclude_fully_masked_seqs' if term.exclude_fully_masked_seqs else ''}, "
             f"megatron {layout.name(world)}{setup_name(args)} vs FSDP2 dp{world}, {world} ranks on {args.device}"
             + (f"  [injected bug: {args.inject_bug}]" if args.inject_bug != "none" else ""))
        _log(f"{'step':>4}  {'loss hook':>10}  {'loss fsdp':>10}  {'loss plain':>10}  {'norm hook':>9}  "
             f"{'norm fsdp':>9}  {'norm plain':>10}  {'Δgrad hook':>10}  {'Δgrad plain':>11}")
        for step in range(args.steps):
            t0 = time.perf_counter()
            batch = data_mod.make_global_batch(spec.vocab_size, seed=args.seed * 1000 + step)
            mbs = data_mod.split_for_rank(batch, dp_m, dp_rank_m)

            def megatron_step(model, opt, loss_fn, fb_call, **extra):
                for m in model:
                    m.zero_grad_buffer()
                opt.zero_grad()  # as Megatron-LM's train_step: param.grad must not alias main_grad

                def forward_step(it, chunk):
                    mb = next(it)
                    return chunk(mb.tokens, mb.position_ids, None, labels=mb.labels), loss_fn(mb.loss_mask)

                return fb_call(forward_step_func=forward_step,
                               data_iterator=[iter(mbs) for _ in model] if layout.vpp else iter(mbs),
                               model=model, num_microbatches=len(mbs), seq_length=batch.seq_length,
                               micro_batch_size=1, forward_only=False, **extra)

            try:
                megatron_step(hooked, hooked_opt, hook.loss_func, hooked_fb,
                              loss_masks=[mb.full_loss_mask for mb in mbs])
            except ValueError as exc:
                _refused_by_megatron_agg(exc)
                raise
            hooked_loss = hook.global_loss()
            reports = megatron_step(plain, plain_opt, plain_loss, fb)

            # FSDP: every rank is a data-parallel rank; equal micro-batch counts per rank.
            fsdp_opt.zero_grad()
            rows_f = data_mod.rows_for_rank(world, dist.get_rank(), data_mod.EQUAL_COUNT_PLANS)
            s = batch.seq_length
            with fsdp_hook.step([batch.loss_mask[r].to(device) for r in rows_f]) as fstep:
                for r in rows_f:
                    pos = torch.arange(s, device=device).unsqueeze(0).expand(r.stop - r.start, s)
                    out = fsdp_model(batch.tokens[r].to(device), pos, batch.labels[r].to(device))
                    fstep.loss(out, batch.loss_mask[r].to(device)).backward()
            fsdp_loss = float(fsdp_hook.global_loss()["loss"])
            fsdp_grads = fsdp_model.named_full_grads()
            hook_shards = gather_main_grads(hooked, fold_output_layer=False)
            plain_shards = gather_main_grads(plain, fold_output_layer=False)
            if step == 0:  # the shards compared cover every element of every parameter as often as expected
                for name, shards in (("megatron+hook", hook_shards), ("megatron-plain", plain_shards)):
                    gaps = check_coverage(shards)
                    if gaps:
                        raise RuntimeError(f"compare reads {name}'s gradient shards wrongly: {gaps}")
            d_hook = _max_over_ranks(shard_error(hook_shards, fsdp_grads))
            d_plain = _max_over_ranks(shard_error(plain_shards, fsdp_grads))
            fsdp_norm = float(torch.nn.utils.clip_grad_norm_(fsdp_model.parameters(), args.clip_grad))
            fsdp_opt.step()
            _, hook_norm, _ = hooked_opt.step()
            _, plain_norm, _ = plain_opt.step()

            # Losses live on the last pipeline stage: send them to rank 0. The plain path's logged
            # loss is Megatron's: the mean of the micro-batch means, averaged over DP ranks.
            plain_value = sum(float(r["loss"]) for r in reports) / len(mbs) if is_last else 0.0
            values = torch.tensor([float(hooked_loss["loss"]) if hooked_loss else -math.inf,
                                   plain_value if is_last else -math.inf], dtype=torch.float64)
            if is_last:
                pv = torch.tensor([plain_value], dtype=torch.float64)
                dist.all_reduce(pv, group=dp_group_m)
                values[1] = float(pv) / dp_m
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
            row = {"step": step, "loss": {"megatron+hook": float(values[0]), "fsdp+hook": fsdp_loss,
                                          "megatron-plain": float(values[1])},
                   "grad_norm": {"megatron+hook": float(hook_norm), "fsdp+hook": fsdp_norm,
                                 "megatron-plain": float(plain_norm)},
                   "max_rel_grad_diff_vs_fsdp": {"megatron+hook": d_hook, "megatron-plain": d_plain},
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            if dist.get_rank() == 0 and sys.stderr.isatty():
                sys.stderr.write("\r\033[K")
            _log(f"{step:>4}  {row['loss']['megatron+hook']:>10.6f}  {fsdp_loss:>10.6f}  {row['loss']['megatron-plain']:>10.6f}  "
                 f"{hook_norm:>9.5f}  {fsdp_norm:>9.5f}  {plain_norm:>10.5f}  {d_hook:>10.2e}  {d_plain:>11.2e}")
            _progress(step + 1, args.steps)
        fsdp_hook.restore()
    worst = max(r["max_rel_grad_diff_vs_fsdp"]["megatron+hook"] for r in rows)
    worst_plain = max(r["max_rel_grad_diff_vs_fsdp"]["megatron-plain"] for r in rows)
    ok = worst <= args.tol
    if dist.get_rank() == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {"args": vars(args), "world_size": world, "megatron_layout": layout.name(world),
                  "megatron_setup": {"wrapper": args.wrapper, "fsdp_strategy": strategy,
                                     "sequence_parallel": bool(args.sequence_parallel),
                                     "distributed_optimizer": distributed_optimizer},
                  "tolerance": args.tol, "max_rel_grad_diff": {"megatron+hook": worst, "megatron-plain": worst_plain},
                  "agree": ok, "steps": rows}
        (out / "compare.json").write_text(json.dumps(report, indent=1))
        if not args.no_plot:
            plot(rows, args, layout.name(world) + setup_name(args), world, out / "compare.png")
        verdict = "AGREE" if ok else "DISAGREE"
        print(f"{verdict}: megatron+hook vs fsdp+hook, largest relative gradient difference {worst:.2e} "
              f"(tolerance {args.tol:.0e}); megatron-plain vs fsdp+hook {worst_plain:.2e}. "
              f"Wrote {out / 'compare.json'}" + ("" if args.no_plot else f" and {out / 'compare.png'}"), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


def plot(rows: List[Dict[str, Any]], args: argparse.Namespace, layout: str, world: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"megatron+hook": ("tab:blue", "-", "o"), "fsdp+hook": ("tab:orange", "--", "x"),
              "megatron-plain": ("tab:red", ":", "s")}
    for name in PATHS:
        color, ls, marker = styles[name]
        label = name + (" (its own logged loss)" if name == "megatron-plain" else "")
        ax1.plot(steps, [r["loss"][name] for r in rows], ls, color=color, marker=marker, label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"loss ({args.loss_agg_mode})")
    ax1.set_title("loss")
    ax1.legend()
    for name in ("megatron+hook", "megatron-plain"):
        color, ls, marker = styles[name]
        ax2.semilogy(steps, [max(r["max_rel_grad_diff_vs_fsdp"][name], 1e-12) for r in rows], ls, color=color,
                     marker=marker, label=f"{name} vs fsdp+hook")
    ax2.axhline(args.tol, color="gray", lw=1, label=f"tolerance {args.tol:.0e}")
    ax2.set_xlabel("step")
    ax2.set_ylabel("max relative gradient difference")
    ax2.set_title("gradients vs the FSDP path")
    ax2.legend()
    fig.suptitle(f"megatron-agg compare: Megatron {layout} vs FSDP2 dp{world} ({world} ranks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-agg compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
