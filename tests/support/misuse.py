"""Run under torchrun with 2 ranks: misuse that only shows across ranks, at every entry point.

For each scenario rank 1 (or both) does something wrong; *both* ranks must raise the expected
error (the rank that did not see the problem says another rank found it), and nothing may hang
(the pytest caller runs this under a timeout). Prints one line per scenario on rank 0 and exits
non-zero on any unexpected outcome.
"""

import sys
import traceback

import torch
import torch.distributed as dist

from megatron_agg import DeferredLossHook, LossHook, LossTerm, NonFiniteLossError, StepShares
from megatron_agg.compare import data as data_mod
from megatron_agg.compare.cpu import cpu_shim
from megatron_agg.compare.gpt import TinyGPT, build_chunks, load_full_weights, wrap_ddp
from megatron_agg.compare.parallel import Layout, model_parallel
from megatron_agg.compare.reference_gpt import init_full_weights

BASE = dict(mode="seq-mean-token-mean", exclude=False, weight=1.0, loss_return="3-tuple", per_token=False)
SPEC = TinyGPT(num_layers=1)


def _model(per_token: bool):
    chunks = build_chunks(SPEC, Layout(), calculate_per_token_loss=per_token)
    load_full_weights(chunks, init_full_weights(SPEC))
    return wrap_ddp(chunks)


def _mbs():
    from megatron.core import parallel_state as ps

    return data_mod.split_for_rank(data_mod.make_global_batch(SPEC.vocab_size), 2, ps.get_data_parallel_rank())


def _run(model, mbs, loss_func_of, fb_wrapper=None, **extra):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(it, chunk):
        mb = next(it)
        return chunk(mb.tokens, mb.position_ids, None, labels=mb.labels), loss_func_of(mb, chunk)

    fb = get_forward_backward_func()
    fb = fb_wrapper(fb) if fb_wrapper else fb
    return fb(forward_step_func=forward_step, data_iterator=iter(mbs), model=model, num_microbatches=len(mbs),
              seq_length=16, micro_batch_size=1, **extra)


# -- LossHook -------------------------------------------------------------------------------------
def hook_setup(rank: int, changes: dict) -> None:
    cfg = dict(BASE, **(changes if rank == 1 else {}))
    model = _model(cfg["per_token"])
    term = LossTerm(cfg["mode"], exclude_fully_masked_seqs=cfg["exclude"], weight=cfg["weight"])
    hook = LossHook(terms={"loss": term}, loss_return=cfg["loss_return"])
    mbs = _mbs()
    _run(model, mbs, lambda mb, chunk: hook.loss_func(mb.loss_mask), hook.wrap,
         loss_masks=[mb.full_loss_mask for mb in mbs])


def hook_nan_on_rank_1(rank: int) -> None:
    model, mbs = _model(False), _mbs()
    hook = LossHook("token-mean")

    def fn(out):
        return out * float("nan") if rank == 1 else out

    _run(model, mbs, lambda mb, chunk: hook.loss_func(mb.loss_mask, fn), hook.wrap,
         loss_masks=[mb.full_loss_mask for mb in mbs])


def hook_mask_mismatch_on_rank_1(rank: int) -> None:
    model, mbs = _model(False), _mbs()
    hook = LossHook("token-mean")
    _run(model, mbs, lambda mb, chunk: hook.loss_func(torch.ones_like(mb.loss_mask) if rank == 1 else mb.loss_mask),
         hook.wrap, loss_masks=[mb.full_loss_mask for mb in mbs])


def hook_skipped_loss_on_rank_1(rank: int) -> None:
    """Rank 1's last micro-batch returns a loss function of its own instead of the hook's."""
    model, mbs = _model(False), _mbs()
    hook = LossHook("token-mean")

    def own_loss(out):
        return out.sum(), torch.tensor(1, dtype=torch.int), {}

    def loss_func_of(mb, chunk):
        return own_loss if (rank == 1 and mb is mbs[-1]) else hook.loss_func(mb.loss_mask)

    _run(model, mbs, loss_func_of, hook.wrap, loss_masks=[mb.full_loss_mask for mb in mbs])


def hook_layout(rank: int, what: str) -> None:
    """Rank 1 builds a set-up whose totals vector has another length (another num_groups, a term on
    a mask of its own): the ranks' agreement is checked before an all-reduce of that length."""
    model, mbs = _model(False), _mbs()
    ids = [torch.tensor([data_mod.GROUP_IDS[r] for r in mb.rows]) for mb in mbs]
    if what == "num_groups":
        hook = LossHook("prompt-mean", num_groups=10 if rank == 0 else 12, group_scope="global")
        _run(model, mbs, lambda mb, chunk: hook.loss_func(mb.loss_mask), hook.wrap,
             loss_masks=[mb.full_loss_mask for mb in mbs], group_ids=ids)
        return
    mask = "correct" if rank == 1 else "default"
    hook = LossHook(terms={"pg": LossTerm("token-mean"), "nll": LossTerm("token-mean", mask=mask)})
    names = ["default", "correct"] if rank == 1 else ["default"]
    _run(model, mbs, lambda mb, chunk: hook.loss_func({n: mb.masks[n] for n in names} if rank == 1 else mb.loss_mask,
                                                      lambda out: {"pg": out, "nll": out}),
         hook.wrap, loss_masks={n: [mb.full_masks[n] for mb in mbs] for n in names} if rank == 1 else
         [mb.full_loss_mask for mb in mbs])


def hook_prompt_mean(rank: int) -> None:
    """The same prompt-mean set-up on both ranks (groups straddling them): no error."""
    model, mbs = _model(False), _mbs()
    ids = [torch.tensor([data_mod.GROUP_IDS[r] for r in mb.rows]) for mb in mbs]
    hook = LossHook("prompt-mean", num_groups=10, group_scope="global")
    _run(model, mbs, lambda mb, chunk: hook.loss_func(mb.loss_mask), hook.wrap,
         loss_masks=[mb.full_loss_mask for mb in mbs], group_ids=ids)


def _ids(mbs):
    return [torch.tensor([data_mod.GROUP_IDS[r] for r in mb.rows]) for mb in mbs]


def hook_one_sided_inputs(rank: int, what: str, step: int) -> None:
    """Rank 1 hands the step an input only it refuses, on the hook's first step (every rank reads
    the agreement before the schedule: all raise there) or on a later one (every rank runs the
    step: all raise at its end)."""
    model, mbs = _model(False), _mbs()
    terms = {"pg": LossTerm("prompt-mean"), "nll": LossTerm("token-mean", mask="correct")}
    hook = LossHook(terms=terms, num_groups=10, group_scope="global")
    for i in range(step):
        bad = rank == 1 and i == step - 1
        ids, names, given = _ids(mbs), ["default", "correct"], ["default", "correct"]
        if bad and what == "group_ids":
            ids = ids[:-1]
        if bad and what == "loss_masks":
            names = ["default"]
        if bad and what == "loss_func":
            given = ["default"]
        _run(model, mbs, lambda mb, chunk: hook.loss_func({n: mb.masks[n] for n in given},
                                                          lambda out: {"pg": out, "nll": out}),
             hook.wrap, loss_masks={n: [mb.full_masks[n] for mb in mbs] for n in names}, group_ids=ids)


def hook_rebuilt_on_rank_1(rank: int, what: str) -> None:
    """Step 2: rank 1 builds a new hook with another num_groups (another totals length) or mode."""
    model, mbs = _model(False), _mbs()
    hook = None
    for i in range(2):
        changed = rank == 1 and i == 1
        if what == "num_groups" and (hook is None or changed):  # rank 0 keeps its hook: its step 2 runs unread
            hook = LossHook("prompt-mean", num_groups=12 if changed else 10, group_scope="global")
        elif hook is None or changed:
            hook = LossHook("token-mean" if changed else "seq-mean-token-mean")
        kwargs = dict(group_ids=_ids(mbs)) if what == "num_groups" else {}
        _run(model, mbs, lambda mb, chunk: hook.loss_func(mb.loss_mask), hook.wrap,
             loss_masks=[mb.full_loss_mask for mb in mbs], **kwargs)


# -- StepShares -----------------------------------------------------------------------------------
def shares_setup(rank: int, loss_return: str, mode_of_rank_1: str) -> None:
    model, mbs = _model(False), _mbs()
    shares = StepShares([mb.full_loss_mask for mb in mbs], model=model,
                        loss_return=loss_return if rank == 1 else "3-tuple")
    mode = mode_of_rank_1 if rank == 1 else "seq-mean-token-mean"
    _run(model, mbs, lambda mb, chunk: (lambda out: shares.megatron_return(
        shares.share(out, mb.loss_mask, mode), {})))
    shares.finish()


def shares_num_groups(rank: int) -> None:
    model, mbs = _model(False), _mbs()
    ids = [torch.tensor([data_mod.GROUP_IDS[r] for r in mb.rows]) for mb in mbs]
    shares = StepShares([mb.full_loss_mask for mb in mbs], model=model, group_ids=ids,
                        num_groups=10 + 2 * rank, group_scope="global")
    _run(model, mbs, lambda mb, chunk: (lambda out: shares.megatron_return(
        shares.share(out, mb.loss_mask, "prompt-mean"), {})))
    shares.finish()


def shares_nan_on_rank_1(rank: int) -> None:
    model, mbs = _model(False), _mbs()
    shares = StepShares([mb.full_loss_mask for mb in mbs], model=model)
    poison = float("nan") if rank == 1 else 1.0
    _run(model, mbs, lambda mb, chunk: (lambda out: shares.megatron_return(
        shares.share(out * poison, mb.loss_mask, "token-mean"), {})))
    shares.finish()


def shares_mismatch_without_finish(rank: int) -> None:
    """The loss function reduces with masks other than loss_masks and nobody calls finish(): the
    check runs inside Megatron's finalize_model_grads, before the gradients are reduced."""
    model, mbs = _model(False), _mbs()
    shares = StepShares([mb.full_loss_mask for mb in mbs], model=model)
    _run(model, mbs, lambda mb, chunk: (lambda out: shares.megatron_return(
        shares.share(out, torch.ones_like(mb.loss_mask), "seq-mean-token-mean"), {})))


def shares_group_ids_on_rank_1(rank: int, step: int) -> None:
    model, mbs = _model(False), _mbs()
    for i in range(step):
        ids = _ids(mbs)
        if rank == 1 and i == step - 1:
            ids = ids[:-1]
        shares = StepShares([mb.full_loss_mask for mb in mbs], model=model, group_ids=ids, num_groups=10,
                            group_scope="global")
        _run(model, mbs, lambda mb, chunk: (lambda out: shares.megatron_return(
            shares.share(out, mb.loss_mask, "prompt-mean"), {})))


def shares_agreement_on_change(rank: int) -> None:
    """StepShares is rebuilt every step; its agreement memory lives with the DP group: a step whose
    set-up the group checked last runs its totals' all-reduce asynchronously, a changed set-up's
    step awaits it (the synchronous check), and the next step with that set-up does not."""
    model, mbs = _model(False), _mbs()
    synchronous = []
    for loss_return in ("3-tuple", "3-tuple", "2-tuple", "2-tuple"):
        shares = StepShares([mb.full_loss_mask for mb in mbs], model=model, loss_return=loss_return)
        synchronous.append(shares._work is None)
        _run(model, mbs, lambda mb, chunk: (lambda out: shares.megatron_return(
            shares.share(out, mb.loss_mask, "token-mean"), {})))
    assert synchronous[1:] == [False, True, False], synchronous  # the first depends on earlier scenarios
    for _ in range(2):  # agreement="every-step": the synchronous check on every step, as at LossHook
        shares = StepShares([mb.full_loss_mask for mb in mbs], model=model, loss_return="2-tuple",
                            agreement="every-step")
        assert shares._work is None
        _run(model, mbs, lambda mb, chunk: (lambda out: shares.megatron_return(
            shares.share(out, mb.loss_mask, "token-mean"), {})))


# -- DeferredLossHook -----------------------------------------------------------------------------
def deferred_mode(rank: int) -> None:
    model, mbs = _model(True), _mbs()
    hook = DeferredLossHook("token-mean" if rank == 1 else "seq-mean-token-mean")
    try:
        _run(model, mbs, lambda mb, chunk: hook.loss_func(mb.loss_mask, model=chunk))
    finally:
        hook.uninstall()


def deferred_nan_on_rank_1(rank: int) -> None:
    model, mbs = _model(True), _mbs()
    hook = DeferredLossHook("token-mean")
    hook.install(model)

    def fn(out):
        return out * float("nan") if rank == 1 else out

    try:
        _run(model, mbs, lambda mb, chunk: hook.loss_func(mb.loss_mask, fn))
    finally:
        hook.uninstall()


SCENARIOS = {
    # name: (function, expected error type, text both ranks' messages must contain)
    "agree": (lambda r: hook_setup(r, {}), None, None),
    "mode": (lambda r: hook_setup(r, {"mode": "token-mean"}), ValueError, "disagree on: terms and their modes"),
    "exclude": (lambda r: hook_setup(r, {"exclude": True}), ValueError, "disagree on: exclude_fully_masked_seqs"),
    "weight": (lambda r: hook_setup(r, {"weight": 0.5}), ValueError, "disagree on: term weights"),
    "loss_return": (lambda r: hook_setup(r, {"loss_return": "2-tuple"}), ValueError, "disagree on: loss_return"),
    "mode+weight": (lambda r: hook_setup(r, {"mode": "token-mean", "weight": 2.0}), ValueError,
                    "disagree on: terms and their modes, term weights"),
    # Megatron's finalize would all-reduce num_tokens on one rank only and hang: refused before.
    "calculate_per_token_loss": (lambda r: hook_setup(r, {"per_token": True}), ValueError,
                                 "disagree on: calculate_per_token_loss"),
    "hook: NaN on rank 1 only": (hook_nan_on_rank_1, NonFiniteLossError, "NaN or Inf"),
    "hook: mask mismatch on rank 1 only": (hook_mask_mismatch_on_rank_1, ValueError, "differ"),
    "hook: a loss skipped on rank 1 only": (hook_skipped_loss_on_rank_1, ValueError, "evaluated"),
    # The totals vector's length follows the set-up: checked before an all-reduce of that length.
    "hook: num_groups": (lambda r: hook_layout(r, "num_groups"), ValueError,
                         "disagree on: prompt groups (num_groups, group_scope)"),
    "hook: a term's mask": (lambda r: hook_layout(r, "mask"), ValueError, "disagree on: term masks"),
    "hook: prompt-mean agrees": (hook_prompt_mean, None, None),
    # An input only one rank refuses: every rank raises (before the schedule on a step whose agreement
    # every rank reads, else at the step's end), never a rank left in a collective alone.
    **{f"hook: {what} refused on rank 1, step {step}": (
        (lambda w, n: lambda r: hook_one_sided_inputs(r, w, n))(what, step), ValueError, "on every rank")
       for what in ("group_ids", "loss_masks", "loss_func") for step in (1, 2)},
    # A rank that builds a new hook mid-run (another totals length, another mode): both raise.
    "hook: rebuilt with another num_groups on rank 1": (lambda r: hook_rebuilt_on_rank_1(r, "num_groups"),
                                                          ValueError, "disagree on: prompt groups"),
    "hook: rebuilt with another mode on rank 1": (lambda r: hook_rebuilt_on_rank_1(r, "mode"),
                                                  ValueError, "disagree on: terms and their modes"),
    "shares: loss_return": (lambda r: shares_setup(r, "2-tuple", "seq-mean-token-mean"), ValueError,
                            "disagree on: loss_return"),
    "shares: modes used": (lambda r: shares_setup(r, "3-tuple", "token-mean"), ValueError,
                           "disagree on: terms and their modes"),
    "shares: NaN on rank 1 only": (shares_nan_on_rank_1, NonFiniteLossError, "NaN or Inf"),
    "shares: masks differ, finish() never called": (shares_mismatch_without_finish, ValueError, "differ"),
    **{f"shares: group_ids refused on rank 1, step {step}": (
        (lambda n: lambda r: shares_group_ids_on_rank_1(r, n))(step), ValueError, "on every rank")
       for step in (1, 2)},
    "shares: agreement checked on the first step and on changes only": (shares_agreement_on_change, None, None),
    "shares: num_groups": (shares_num_groups, ValueError, "disagree on: prompt groups (num_groups, group_scope)"),
    "deferred: mode": (deferred_mode, ValueError, "disagree on: terms and their modes"),
    "deferred: NaN on rank 1 only": (deferred_nan_on_rank_1, NonFiniteLossError, "NaN or Inf"),
}


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    failures = 0
    only = sys.argv[1:]
    with cpu_shim(), model_parallel(Layout()):
        for name, (fn, error, text) in SCENARIOS.items():
            if only and name not in only:
                continue
            message, kind = "", None
            try:
                fn(rank)
            except Exception as exc:  # noqa: BLE001 - every outcome is compared below
                message, kind = str(exc), type(exc)
                if error is None or not isinstance(exc, error):
                    traceback.print_exc()
            if error is None:
                ok = kind is None
            else:
                ok = kind is not None and issubclass(kind, error) and text in message
            flags = torch.tensor([0 if ok else 1])
            dist.all_reduce(flags)
            failures += int(flags)
            if rank == 0:
                print(f"{'ok  ' if int(flags) == 0 else 'FAIL'} {name}: {message[:160] or 'no error'}", flush=True)
            dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
