"""Run under torchrun with 4 ranks: megatron_agg.fsdp against the single-process reference.

Layouts: FSDP2 over 4 data-parallel ranks, and 2 DP × 2 simulated sequence-parallel ranks (each SP
rank computes the whole sequences but takes the loss on its contiguous slice of their tokens, as a
Ulysses rank does). For every mode × exclude_fully_masked_seqs (and a two-term loss) one step with
gradient accumulation over uneven micro-batches must give the reference gradients (1e-5
relative). The options of issue 13 too: ``token-sum``, ``prompt-mean`` over groups that straddle
micro-batches and DP ranks (global ids), a term over a mask of its own with exact metrics (checked
against their single-process values). Controls must fail: plain FSDP averaging of per-micro-batch
means, with SP totals counted over DP × SP (every sequence counted once per SP rank), and the
global group ids told as per-rank ids (groups counted per rank). Prints one line per check; exits
non-zero on any unexpected outcome.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from megatron_agg import AggMode, LossTerm, reference_loss
from megatron_agg.fsdp import FSDPLossHook
from megatron_agg.compare import data as data_mod
from megatron_agg.compare.gpt import TinyGPT, reference_grads
from megatron_agg.compare.reference_gpt import TorchGPT, init_full_weights, per_token_loss

SPEC = TinyGPT(num_layers=2)
TOL = 1e-5


def rel_err(grads, ref):
    return max(float((grads[k] - ref[k]).abs().max()) / max(float(ref[k].abs().max()), 1e-30) for k in ref)


def rl_fn(out):
    return {"pg": out, "nll": 0.5 * out * out, "entropy": torch.exp(-out), "clipfrac": (out > 4.0).float(),
            "kl": 0.1 * out * out, "ratio": 1.0 + 0.01 * out}


def run(terms, full, batch, dp, dp_rank, sp, sp_rank, dp_group, grad_group, sp_group, control=None, options=None,
        fn=None):
    options = dict(options or {})
    model = TorchGPT(SPEC, full)
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    rows = data_mod.rows_for_rank(dp, dp_rank, data_mod.EQUAL_COUNT_PLANS)  # FSDP: equal counts
    s = batch.seq_length
    local = slice(sp_rank * s // sp, (sp_rank + 1) * s // sp)
    pos = torch.arange(s).unsqueeze(0)
    if fn is None:
        fn = (lambda out: {"pg": out, "kl": 0.5 * out * out}) if len(terms) > 1 else None
    masks = batch.masks
    names = list(dict.fromkeys(t.mask for t in [*terms.values(), *options.get("metrics", {}).values()]))
    named = names != ["default"]
    group_ids = None
    if "num_groups" in options:
        group_ids = [torch.tensor(data_mod.GROUP_IDS[r.start:r.stop]) for r in rows]
    if control == "groups-per-rank":
        options["group_scope"] = "per-rank"
    if control == "plain-mean":  # FSDP's default averaging of per-micro-batch means
        for r in rows:
            ce = model(batch.tokens[r], pos.expand(r.stop - r.start, s), batch.labels[r])[:, local]
            m = batch.loss_mask[r][:, local]
            (torch.where(m != 0, ce, 0 * ce).sum() / (m != 0).sum().clamp(min=1) / len(rows)).backward()
        return model.named_full_grads()
    hook = FSDPLossHook(terms=terms, dp_group=grad_group if control == "count-over-sp" else dp_group,
                        sp_group=sp_group, grad_group=grad_group if sp_group is not None else None, **options)
    hook.prepare(model)
    loss_masks = {n: [masks[n][r] for r in rows] for n in names} if named else [batch.loss_mask[r] for r in rows]
    with hook.step(loss_masks, group_ids=group_ids) as step:
        for r in rows:
            ce = model(batch.tokens[r], pos.expand(r.stop - r.start, s), batch.labels[r])[:, local]
            mask = {n: masks[n][r][:, local] for n in names} if named else batch.loss_mask[r][:, local]
            step.loss(ce, mask, fn).backward()
    grads = model.named_full_grads()
    hook.restore()
    return grads, hook.global_loss()


def main() -> int:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    assert world == 4
    full = init_full_weights(SPEC, seed=11)
    batch = data_mod.make_global_batch(SPEC.vocab_size, seed=3)
    pos = torch.arange(batch.seq_length).unsqueeze(0).expand_as(batch.tokens)
    specs = {f"{m.value}{'+excl' if e else ''}": {"loss": LossTerm(m, exclude_fully_masked_seqs=e)}
             for m in AggMode for e in (False, True) if not (m is AggMode.TOKEN_SUM and e)}
    specs["two-terms"] = {"pg": LossTerm("token-mean"), "kl": LossTerm("seq-mean-token-mean", weight=0.1)}
    groups = dict(num_groups=data_mod.NUM_GROUPS, group_scope="global")
    rl_metrics = {"entropy": LossTerm("token-mean"), "clipfrac": LossTerm("prompt-mean", mask="correct"),
                  "kl": LossTerm("seq-mean-token-mean", exclude_fully_masked_seqs=True, mask="correct"),
                  "ratio": LossTerm("token-sum")}
    specs["vapo+metrics"] = {"pg": LossTerm("token-mean"), "nll": LossTerm("token-mean", weight=0.5, mask="correct")}
    options_of = {name: groups for name in specs if name.startswith("prompt-mean")}
    options_of["vapo+metrics"] = dict(groups, metrics=rl_metrics)
    fns = {"vapo+metrics": rl_fn}
    # groups: DP4; and DP2 x SP2 (sp ranks adjacent)
    sp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups_sp = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    failures = 0

    def report(name, ok, detail):
        nonlocal failures
        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag)
        failures += int(flag)
        if rank == 0:
            print(f"{'ok  ' if int(flag) == 0 else 'FAIL'} {name}: {detail}", flush=True)

    masks = batch.masks
    ids = [list(data_mod.GROUP_IDS)]

    def reference(parts, term):
        return reference_loss([parts], [masks[term.mask]], term, group_ids=ids if term.agg_mode.needs_groups else None)

    for name, terms in specs.items():
        fn = fns.get(name) or ((lambda out: {"pg": out, "kl": 0.5 * out * out}) if len(terms) > 1 else (lambda out: {"loss": out}))
        options = options_of.get(name, {})

        def ref_loss(w, terms=terms, fn=fn):
            parts = fn(per_token_loss(w, SPEC, batch.tokens, pos, batch.labels))
            return sum(reference(parts[n], t) for n, t in terms.items())

        ref = reference_grads(full, ref_loss)
        ref_value = float(ref_loss(full))
        with torch.no_grad():
            parts = fn(per_token_loss(full, SPEC, batch.tokens, pos, batch.labels))
            metric_refs = {n: float(reference(parts[n], t)) for n, t in options.get("metrics", {}).items()}

        def metrics_ok(gl):
            return all(abs(float(gl[n]) - v) <= TOL * max(abs(v), 1e-12) for n, v in metric_refs.items())

        grads, gl = run(terms, full, batch, 4, rank, 1, 0, dist.group.WORLD, dist.group.WORLD, None,
                        options=options, fn=fns.get(name))
        err = rel_err(grads, ref)
        report(f"dp4 {name}", err <= TOL and abs(float(gl['loss']) - ref_value) <= TOL * abs(ref_value)
               and metrics_ok(gl), f"grad err {err:.1e}, loss {float(gl['loss']):.6f} vs {ref_value:.6f}")
        grads, gl = run(terms, full, batch, 2, rank // 2, 2, rank % 2, dp_groups_sp[rank % 2], dist.group.WORLD,
                        sp_groups[rank // 2], options=options, fn=fns.get(name))
        err = rel_err(grads, ref)
        report(f"dp2xsp2 {name}", err <= TOL and abs(float(gl['loss']) - ref_value) <= TOL * abs(ref_value)
               and metrics_ok(gl), f"grad err {err:.1e}")
    terms = specs["seq-mean-token-mean"]
    ref = reference_grads(full, lambda w: reference_loss([per_token_loss(w, SPEC, batch.tokens, pos, batch.labels)],
                                                         [batch.loss_mask], terms["loss"]))
    grads = run(terms, full, batch, 4, rank, 1, 0, dist.group.WORLD, dist.group.WORLD, None, control="plain-mean")
    err = rel_err(grads, ref)
    report("control plain FSDP mean of per-micro-batch means fails", err > 1e-3, f"grad err {err:.1e}")
    grads, _ = run(terms, full, batch, 2, rank // 2, 2, rank % 2, dp_groups_sp[rank % 2], dist.group.WORLD,
                   sp_groups[rank // 2], control="count-over-sp")
    err = rel_err(grads, ref)
    report("control sequences counted once per SP rank fails", err > 1e-3, f"grad err {err:.1e}")
    terms = specs["prompt-mean"]
    ref = reference_grads(full, lambda w: reference(per_token_loss(w, SPEC, batch.tokens, pos, batch.labels),
                                                    terms["loss"]))
    grads, _ = run(terms, full, batch, 4, rank, 1, 0, dist.group.WORLD, dist.group.WORLD, None,
                   control="groups-per-rank", options=options_of["prompt-mean"])
    err = rel_err(grads, ref)
    report("control prompt groups counted per rank (global ids told per-rank) fails", err > 1e-3, f"grad err {err:.1e}")
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
