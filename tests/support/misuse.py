"""Run under torchrun with 2 ranks: data-parallel ranks that disagree on the hook's set-up.

For each scenario, rank 1 changes one option; both ranks must raise a ValueError that names
it (detected inside the step's one all-reduce). Prints one line per scenario on rank 0 and
exits non-zero on any unexpected outcome.
"""

import sys

import torch
import torch.distributed as dist

from megatron_agg import LossHook, LossTerm
from megatron_agg.testing import data as data_mod
from megatron_agg.testing.cpu import cpu_shim
from megatron_agg.testing.gpt import TinyGPT, build_chunks, load_full_weights, wrap_ddp
from megatron_agg.testing.parallel import Layout, model_parallel
from megatron_agg.testing.reference_gpt import init_full_weights

BASE = dict(mode="seq-mean-token-mean", exclude=False, weight=1.0, loss_return="3-tuple", per_token=False)
SCENARIOS = {
    "agree": ({}, None),
    "mode": ({"mode": "token-mean"}, "terms and their modes"),
    "exclude": ({"exclude": True}, "exclude_fully_masked_seqs"),
    "weight": ({"weight": 0.5}, "term weights"),
    "loss_return": ({"loss_return": "2-tuple"}, "loss_return"),
    "mode+weight": ({"mode": "token-mean", "weight": 2.0}, "terms and their modes, term weights"),
}
# Ranks that disagree on calculate_per_token_loss are not a scenario here: Megatron's own
# finalize_model_grads then all-reduces num_tokens on some ranks only and hangs before the hook
# can report (the fingerprint still covers it for set-ups that reach the check).


def run(rank: int, changes: dict) -> str:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = dict(BASE, **(changes if rank == 1 else {}))
    spec = TinyGPT(num_layers=1)
    chunks = build_chunks(spec, Layout(), calculate_per_token_loss=cfg["per_token"])
    load_full_weights(chunks, init_full_weights(spec))
    model = wrap_ddp(chunks)
    term = LossTerm(cfg["mode"], exclude_fully_masked_seqs=cfg["exclude"], weight=cfg["weight"])
    hook = LossHook(terms={"loss": term}, loss_return=cfg["loss_return"])
    mbs = data_mod.split_for_rank(data_mod.make_global_batch(spec.vocab_size), 2, ps.get_data_parallel_rank())

    def forward_step(it, chunk):
        mb = next(it)
        return chunk(mb.tokens, mb.position_ids, None, labels=mb.labels), hook.loss_func(mb.loss_mask)

    try:
        hook.wrap(get_forward_backward_func())(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=model, num_microbatches=len(mbs),
            seq_length=16, micro_batch_size=1, loss_masks=[mb.full_loss_mask for mb in mbs])
    except ValueError as exc:
        return str(exc)
    return ""


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    failures = 0
    with cpu_shim(), model_parallel(Layout()):
        for name, (changes, option) in SCENARIOS.items():
            message = run(rank, changes)
            ok = (message == "") if option is None else (f"disagree on: {option}" in message)
            flags = torch.tensor([0 if ok else 1])
            dist.all_reduce(flags)
            failures += int(flags)
            if rank == 0:
                print(f"{'ok  ' if int(flags) == 0 else 'FAIL'} {name}: {message or 'no error'}", flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
