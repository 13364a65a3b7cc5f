"""The hook on one rank with a real Megatron GPTModel: errors, host syncs, collectives, state."""

from __future__ import annotations


import pytest
import torch

from megatron_agg import LossHook, LossTerm, reference_loss
from megatron_agg.compare import data as data_mod
from megatron_agg.compare.gpt import TinyGPT, build_chunks, grad_error, load_full_weights, reference_grads, wrap_ddp
from megatron_agg.compare.parallel import Layout
from megatron_agg.compare.reference_gpt import init_full_weights, per_token_loss
from harness.sync_guard import HostSyncError, count_collectives, forbid_host_sync

SPEC = TinyGPT(num_layers=2)


class Setup:
    def __init__(self, per_token: bool = False):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.full = init_full_weights(SPEC, seed=5)
        chunks = build_chunks(SPEC, Layout(), calculate_per_token_loss=per_token)
        load_full_weights(chunks, self.full)
        self.model = wrap_ddp(chunks)
        self.batch = data_mod.make_global_batch(SPEC.vocab_size)
        self.mbs = data_mod.split_for_rank(self.batch, 1, 0)
        self.fb = get_forward_backward_func()

    def step(self, hook: LossHook, *, mbs=None, loss_masks="default", guard=None, forward_only=False, fn=None,
             no_mask=False, **kw):
        mbs = self.mbs if mbs is None else mbs
        for m in self.model:
            m.zero_grad_buffer()

        def forward_step(it, chunk):
            mb = next(it)
            out = chunk(mb.tokens, mb.position_ids, None, labels=mb.labels)
            inner = hook.loss_func(None, fn) if no_mask else hook.loss_func(mb.loss_mask, fn)
            if guard is None:
                return out, inner

            def guarded(*a, **k):
                with guard():
                    return inner(*a, **k)

            return out, guarded

        masks = [mb.full_loss_mask for mb in mbs] if loss_masks == "default" else loss_masks
        kwargs = dict(forward_step_func=forward_step, data_iterator=iter(mbs), model=self.model,
                      num_microbatches=kw.pop("num_microbatches", len(mbs)), seq_length=16,
                      micro_batch_size=mbs[0].tokens.shape[0], forward_only=forward_only, **kw)
        wrapped = hook.wrap(self.fb)
        if masks is None:
            return wrapped(**kwargs)
        return wrapped(loss_masks=masks, **kwargs)

    def reference(self, term):
        b = self.batch
        pos = torch.arange(b.seq_length).unsqueeze(0).expand_as(b.tokens)
        return reference_grads(self.full, lambda w: reference_loss(
            [per_token_loss(w, SPEC, b.tokens, pos, b.labels)], [b.loss_mask], term))

    def grad_err(self, term):
        return max(grad_error(self.model, self.reference(term)).values())


@pytest.fixture
def setup(megatron_cpu):
    return Setup()


def test_the_loss_functions_mask_is_optional(setup):
    """The basic case: hook.loss_func() without the micro-batch's mask; the gradients follow
    loss_masks, exactly as with the mask given."""
    term = LossTerm("seq-mean-token-mean")
    setup.step(LossHook(term.mode), no_mask=True)
    assert setup.grad_err(term) < 1e-5


def test_exact_on_one_rank_and_the_plain_mean_is_not(setup):
    term = LossTerm("seq-mean-token-mean")
    hook = LossHook(term.mode)
    setup.step(hook)
    assert setup.grad_err(term) < 1e-5
    # the same data through a per-micro-batch mean (what Megatron does by itself) is far off
    def plain(mask):
        def f(out):
            v = mask != 0
            return torch.where(v, out, 0 * out).sum() / v.sum().clamp(min=1), {}
        return f
    for m in setup.model:
        m.zero_grad_buffer()
    def fs(it, chunk):
        mb = next(it)
        return chunk(mb.tokens, mb.position_ids, None, labels=mb.labels), plain(mb.loss_mask)
    setup.fb(forward_step_func=fs, data_iterator=iter(setup.mbs), model=setup.model,
             num_microbatches=len(setup.mbs), seq_length=16, micro_batch_size=1, forward_only=False)
    assert setup.grad_err(LossTerm("token-mean")) > 1e-2


def test_no_host_sync_on_the_per_microbatch_path(setup):
    hook = LossHook("seq-mean-token-mean")
    setup.step(hook, guard=forbid_host_sync)  # raises HostSyncError if the loss function syncs
    assert setup.grad_err(LossTerm("seq-mean-token-mean")) < 1e-5


def test_the_sync_guard_can_fail():
    with pytest.raises(HostSyncError):
        with forbid_host_sync():
            torch.ones(2).sum().item()
    with pytest.raises(HostSyncError):
        with forbid_host_sync():
            bool(torch.ones(()) > 0)
    with pytest.raises(HostSyncError):
        with forbid_host_sync():
            torch.ones(3)[torch.tensor([True, False, True])]


def test_step_preparation_makes_no_host_sync(setup):
    """The once-per-step work (totals, per-token weights) is sync-free as well."""
    from megatron_agg.engine import PreparedStep
    from megatron_agg.megatron.model_setup import resolve_groups
    from megatron_agg.scaling import MegatronScaling

    hook = LossHook(terms={"a": LossTerm("seq-mean-token-mean"), "b": LossTerm("seq-mean-token-sum-norm")})
    groups = resolve_groups()
    scaling = MegatronScaling.for_step(setup.model, hook.loss_return, len(setup.mbs), groups)
    with forbid_host_sync():
        step = PreparedStep(hook.config, [mb.full_loss_mask for mb in setup.mbs], groups, scaling)
        step.scales()


def test_collective_counter_sees_the_hooks_collectives(one_rank_world):
    """global_loss issues its all-reduce from megatron_agg: the counter must see it."""
    import torch.distributed as dist

    from megatron_agg.groups import ParallelGroups

    class TwoRanks(ParallelGroups):  # a one-rank world reporting two ranks, so that the call is issued
        dp_size = 2

    groups = TwoRanks(dp=dist.group.WORLD, cp=None, dp_cp=None, pp=None)
    with count_collectives() as counter:
        groups.sum_over_dp(torch.zeros(3, dtype=torch.float64), async_op=False)
        dist.all_reduce(torch.zeros(1))  # from the test itself: not counted
    assert counter.count == 1


def test_missing_loss_masks(setup):
    with pytest.raises(ValueError, match="needs loss_masks"):
        setup.step(LossHook("token-mean"), loss_masks=None)


def test_wrong_number_of_loss_masks(setup):
    masks = [mb.full_loss_mask for mb in setup.mbs]
    with pytest.raises(ValueError, match="Got 5 loss_masks for num_microbatches=6"):
        setup.step(LossHook("token-mean"), loss_masks=masks[:5])
    with pytest.raises(ValueError, match="one mask per micro-batch, got a single tensor"):
        setup.step(LossHook("token-mean"), loss_masks=masks[0])
    with pytest.raises(ValueError, match=r"loss_masks\[1\] must be a \[batch, seq\] tensor"):
        setup.step(LossHook("token-mean"), loss_masks=[masks[0], masks[1][0]] + masks[2:])


def test_mask_shape_does_not_match_the_output(setup):
    masks = [mb.full_loss_mask for mb in setup.mbs]
    swapped = [masks[1], masks[0]] + masks[2:]  # sizes 3 and 5: out of order
    with pytest.raises(ValueError, match=r"Loss evaluation 1 of this step got a mask of shape \(5, 16\), expected \(3, 16\).*skipped or evaluated twice"):
        setup.step(LossHook("token-mean"), loss_masks=swapped)
    # a per-token loss of the wrong shape (e.g. a reduced loss)
    with pytest.raises(ValueError, match="one loss per token"):
        setup.step(LossHook("token-mean"), fn=lambda out: out[:, :-1])


def test_terms_must_match_the_loss_function(setup):
    hook = LossHook(terms={"pg": LossTerm("token-mean"), "kl": LossTerm("seq-mean-token-mean")})
    with pytest.raises(ValueError, match="returned a single tensor"):
        setup.step(hook)
    with pytest.raises(ValueError, match=r"returned terms \['pg'\], expected exactly \['kl', 'pg'\]"):
        setup.step(hook, fn=lambda out: {"pg": out})


def test_loss_func_outside_a_step(setup):
    hook = LossHook("token-mean")
    with pytest.raises(ValueError, match="outside a step"):
        hook.loss_func(torch.ones(1, 4))(torch.ones(1, 4))


def test_fewer_loss_evaluations_than_masks(setup):
    """A forward_step that returns some other loss function once is caught at the step's end."""
    hook = LossHook("token-mean")
    masks = [mb.full_loss_mask for mb in setup.mbs]
    calls = {"n": 0}

    def forward_step(it, chunk):
        mb = next(it)
        out = chunk(mb.tokens, mb.position_ids, None, labels=mb.labels)
        calls["n"] += 1
        if calls["n"] == len(masks):  # the last micro-batch bypasses the hook
            return out, lambda o: (o.sum() * 0, {})
        return out, hook.loss_func(mb.loss_mask)

    with pytest.raises(ValueError, match="given 6 loss_masks but hook.loss_func\(\.\.\.\) was evaluated for 5"):
        hook.wrap(setup.fb)(forward_step_func=forward_step, data_iterator=iter(setup.mbs), model=setup.model,
                            num_microbatches=6, seq_length=16, micro_batch_size=1, loss_masks=masks)
    assert hook.last_step is None  # a failed step leaves no summary behind


def test_state_does_not_leak_across_steps(setup):
    """A step that raised, a forward-only step and a step with fewer micro-batches, then exact."""
    term = LossTerm("seq-mean-token-sum")
    hook = LossHook(term.mode)
    with pytest.raises(ValueError):
        setup.step(hook, fn=lambda out: out[:, :-1])
    setup.step(hook, forward_only=True)
    assert float(hook.global_loss()["loss"]) == pytest.approx(float(reference_loss(
        [per_token_loss(setup.full, SPEC, setup.batch.tokens,
                        torch.arange(16).expand(24, 16), setup.batch.labels)], [setup.batch.loss_mask], term)), rel=1e-5)
    setup.step(hook, mbs=setup.mbs[:2])
    setup.step(hook)
    assert setup.grad_err(term) < 1e-5


def test_wrap_is_idempotent_and_undoable(setup):
    hook = LossHook("token-mean")
    wrapped = hook.wrap(setup.fb)
    assert hook.wrap(wrapped) is wrapped
    assert wrapped.__wrapped__ is setup.fb
    with pytest.raises(ValueError, match="already wrapped by another LossHook"):
        LossHook("token-mean").wrap(wrapped)


def test_per_token_loss_with_calculate_per_token_loss_needs_finalize(megatron_cpu):
    s = Setup(per_token=True)
    s.model[0].config.finalize_model_grads_func = None
    with pytest.raises(ValueError, match="finalize_model_grads_func"):
        s.step(LossHook("token-mean"))


def test_unwrapped_model_with_several_dp_ranks_is_refused(megatron_cpu):
    from megatron_agg.groups import ParallelGroups
    from megatron_agg.megatron.averaging import LossReturn
    from megatron_agg.megatron.model_setup import step_averaging

    (chunk,) = build_chunks(SPEC, Layout())

    class Groups(ParallelGroups):
        dp_cp_size = 2  # as if two data-parallel ranks

    with pytest.raises(ValueError, match="not wrapped in megatron.core.distributed"):
        step_averaging([chunk], LossReturn.TWO_TUPLE, 1, Groups(None, None, None, None))


def test_loss_func_masks_that_disagree_with_loss_masks_are_reported_after_the_step(setup):
    masks = [mb.full_loss_mask for mb in setup.mbs]
    changed = [m.clone() for m in masks]
    changed[3] = torch.ones_like(changed[3])  # same shape, different content
    with pytest.raises(ValueError, match=r"Micro-batch 3: the mask given to hook.loss_func\(\.\.\.\) differs from loss_masks\[3\]"):
        setup.step(LossHook("token-mean"), loss_masks=changed)
    # opting out keeps the gradients of loss_masks
    term = LossTerm("token-mean")
    setup.step(LossHook(term.mode, check_masks=False), loss_masks=masks)
    assert setup.grad_err(term) < 1e-5


def test_hybrid_context_parallelism_is_refused_before_the_step(setup):
    setup.model[0].config.hybrid_context_parallel = True
    try:
        with pytest.raises(ValueError, match=r"does not support dynamic \(hybrid\) context parallelism"):
            setup.step(LossHook("token-mean"))
    finally:
        setup.model[0].config.hybrid_context_parallel = False


def test_wrapping_the_factory_and_masks_on_another_device_are_value_errors(setup):
    """Raw errors once: hook.wrap(get_forward_backward_func) without () (a TypeError later), masks on
    another device than the output (a device error inside the share)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for factory in (get_forward_backward_func, lambda: setup.fb):
        with pytest.raises(ValueError, match=r"takes no arguments.*hook.wrap\(get_forward_backward_func\(\)\)"):
            LossHook("token-mean").wrap(factory)
    with pytest.raises(ValueError, match="mask given to hook.loss_func.*is on device cpu, but loss_masks are on meta"):
        setup.step(LossHook("token-mean"), loss_masks=[mb.full_loss_mask.to("meta") for mb in setup.mbs])
    with pytest.raises(ValueError, match=r"per-token loss of 'loss' is on device meta, but loss_masks are on cpu.*\.to\('meta'\)"):
        setup.step(LossHook("token-mean"), fn=lambda out: out.to("meta"))
