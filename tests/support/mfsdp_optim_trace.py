"""Run under torchrun with 4 ranks: why Megatron-FSDP's ``optim`` strategy miscounts gradients.

One step of TinyGPT under Megatron-FSDP ``data_parallel_sharding_strategy="optim"`` (DP4, two
micro-batches, Megatron's plain 3-tuple loss with ``calculate_per_token_loss=True``: no pre-scaling,
SUM reductions, so every number below is a plain sum), for three set-ups:

- ``no no_sync``: ``config.no_sync_func`` unset (Megatron-LM without ``--overlap-grad-reduce``);
- ``no_sync, overlap off``: ``no_sync_func`` set, ``overlap_grad_reduce=False``;
- ``no_sync, overlap on``: both (Megatron-LM with ``--overlap-grad-reduce``).

Every gradient reduction Megatron-FSDP performs is traced: the per-bucket reductions of the backward
hooks (``GradReducePipeline._bucket_group_gradient_reduce``) and the one of ``finish_grad_sync``
(``ParamAndGradBuffer.reduce_scatter_gradients``). For each, the rank's gradient buffer is recorded
before and after, the "before" buffers of all DP ranks are gathered, and the rank's own (virtual)
shard afterwards is compared with two hypotheses:

- ``replace``: own shard = Σ_ranks before[own shard] (a correct reduce-scatter);
- ``add``:     own shard = before[own shard] + Σ_ranks before[own shard] (the result *added* to the
  rank's local sum, which an unsharded ``optim`` buffer still holds there).

The printed deviations say which one the release does; the final factor is that of the optimizer's
gradient against the correct sum (1 = exact; the probe's table calls this the ``optim`` factor).
The trace is pure control flow and arithmetic of the wrapper: which reductions run is decided by
``is_last_microbatch`` and ``overlap_grad_reduce``, never by streams or events, and the reductions
are checked against the sums of the gathered buffers, so gloo computes what NCCL would.

    torchrun --nproc-per-node 4 tests/support/mfsdp_optim_trace.py
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from megatron_agg.megatron.averaging import LossReturn
from megatron_agg.compare import data as data_mod
from megatron_agg.compare.cpu import cpu_shim
from megatron_agg.compare.gpt import TinyGPT, reference_grads
from harness.matrix import schedule_group_kwargs
from megatron_agg.compare.controls import plain_masked_mean
from megatron_agg.compare.parallel import Layout, model_parallel
from megatron_agg.compare.reference_gpt import init_full_weights, per_token_loss
from megatron_agg.compare.wrappers import build_chunks_for, fit_factor, gather_main_grads, wrap_model

SPEC = TinyGPT(num_layers=2)
PLAN = [[2, 4], [3, 3], [1, 5], [4, 2]]  # rows per micro-batch of each DP rank (24 in all)


def _trace(events: List[Dict[str, Any]]):
    """Patch Megatron-FSDP's two gradient reductions to record the buffers around them."""
    from megatron.core.distributed.fsdp.src.megatron_fsdp import param_and_grad_buffer as pgb

    originals = (pgb.GradReducePipeline._bucket_group_gradient_reduce, pgb.ParamAndGradBuffer.reduce_scatter_gradients)

    def record(kind: str, gbufs: List[Any], call):
        before = [g.data.detach().clone() for g in gbufs]
        result = call()
        after = [g.data.detach().clone() for g in gbufs]
        own = [slice(g.shard_bucket_index.local_data_index, g.shard_bucket_index.local_data_index
                     + g.shard_bucket_index.size) for g in gbufs]
        events.append(dict(kind=kind, before=before, after=after, own=own))
        return result

    def bucket_reduce(self, bucket_group, *args, **kwargs):
        gbufs = [self.buffer.parameter_groups[b].main_grad_buffer for b in bucket_group]
        return record("backward hook", gbufs, lambda: originals[0](self, bucket_group, *args, **kwargs))

    def finish_reduce(self, *args, **kwargs):
        gbufs = [g.main_grad_buffer for g in self.parameter_groups if g.main_grad_buffer is not None]
        return record("finish_grad_sync", gbufs, lambda: originals[1](self, *args, **kwargs))

    pgb.GradReducePipeline._bucket_group_gradient_reduce = bucket_reduce
    pgb.ParamAndGradBuffer.reduce_scatter_gradients = finish_reduce

    def restore() -> None:
        pgb.GradReducePipeline._bucket_group_gradient_reduce = originals[0]
        pgb.ParamAndGradBuffer.reduce_scatter_gradients = originals[1]

    return restore


def _analyse(event: Dict[str, Any], group: Any) -> Dict[str, float]:
    """Max |own shard after − hypothesis| over the event's buffers, for both hypotheses."""
    worst = {"replace": 0.0, "add": 0.0, "scale": 0.0}
    for before, after, own in zip(event["before"], event["after"], event["own"]):
        gathered = [torch.zeros_like(before) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, before, group=group)
        total = torch.stack(gathered).sum(dim=0)[own]
        worst["scale"] = max(worst["scale"], float(total.abs().max()))
        worst["replace"] = max(worst["replace"], float((after[own] - total).abs().max()))
        worst["add"] = max(worst["add"], float((after[own] - before[own] - total).abs().max()))
    return worst


def run(no_sync: bool, overlap: bool, full: Dict[str, torch.Tensor], batch: data_mod.GlobalBatch,
        ref: Dict[str, torch.Tensor]) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rank = dist.get_rank()
    dp_rank = ps.get_data_parallel_rank()
    group = ps.get_data_parallel_group(with_context_parallel=True)
    chunks = build_chunks_for(SPEC, Layout(), "megatron-fsdp", calculate_per_token_loss=True)
    model = wrap_model(chunks, "megatron-fsdp", full_weights=full, strategy="optim", overlap_grad_reduce=overlap,
                       no_sync="always" if no_sync else "never")
    start = sum(sum(p) for p in PLAN[:dp_rank])
    mbs = []
    for size in PLAN[dp_rank]:
        rows = slice(start, start + size)
        start += size
        mbs.append(rows)
    loss = plain_masked_mean(LossReturn.THREE_TUPLE)
    s = batch.seq_length

    def forward_step(data_iterator, chunk):
        rows = next(data_iterator)
        n = rows.stop - rows.start
        output = chunk(batch.tokens[rows], torch.arange(s).unsqueeze(0).expand(n, s), None, labels=batch.labels[rows])
        return output, loss(batch.loss_mask[rows])

    events: List[Dict[str, Any]] = []
    restore = _trace(events)
    try:
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=model, num_microbatches=len(mbs),
            seq_length=s, micro_batch_size=2, forward_only=False,
            **schedule_group_kwargs(Layout(), model[0].config))
    finally:
        restore()
    fit = fit_factor(gather_main_grads(model), ref)
    name = f"{'no_sync' if no_sync else 'no no_sync'}, overlap {'on' if overlap else 'off'}"
    if rank == 0:
        print(f"\n{name}: {len(events)} gradient reduction(s)", flush=True)
    for i, event in enumerate(events):
        worst = _analyse(event, group)
        if rank == 0:
            verdict = min(("replace", "add"), key=lambda k: worst[k])
            print(f"  {i + 1}. {event['kind']:<17} own shard vs Σ before: replace {worst['replace']:.1e}, "
                  f"add {worst['add']:.1e} (|Σ| {worst['scale']:.1e}) -> {verdict}", flush=True)
    if rank == 0:
        print(f"  optimizer gradient / correct sum: factor {fit.factor:.5f}, residual {fit.residual:.1e}, "
              f"per rank {fit.rank_factor_min:.4f}..{fit.rank_factor_max:.4f}", flush=True)


def main() -> int:
    from megatron_agg.megatron.releases import megatron_core_version

    dist.init_process_group("gloo")
    assert dist.get_world_size() == 4, "run with --nproc-per-node 4"
    logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.ERROR)
    full = init_full_weights(SPEC, SPEC.seed)
    batch = data_mod.make_global_batch(SPEC.vocab_size, 16)
    positions = torch.arange(batch.seq_length).unsqueeze(0).expand_as(batch.tokens)
    mask = batch.loss_mask
    # The plain 3-tuple loss with calculate_per_token_loss: Σ ce·mask / Σ mask over the global batch.
    ref = reference_grads(full, lambda w: (per_token_loss(w, SPEC, batch.tokens, positions, batch.labels) * mask).sum()
                          / mask.sum())
    if dist.get_rank() == 0:
        print(f"megatron-core {megatron_core_version()}: Megatron-FSDP 'optim', DP4, 2 micro-batches, "
              "per-token 3-tuple (SUM, no pre-scaling)", flush=True)
    with cpu_shim(), model_parallel(Layout()):
        for no_sync, overlap in ((False, False), (True, False), (True, True)):
            run(no_sync, overlap, full, batch, ref)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
