"""Misuse is loud: disagreeing DP ranks, NaN/Inf in a loss term."""

import pytest
import torch

from megatron_agg import LossHook, LossTerm, NonFiniteLossError

from conftest import REPO, SUMMARY, torchrun
from test_hook_single_process import Setup  # noqa: F401  (the fixture's class)


def test_what_one_rank_gets_wrong_raises_on_every_rank_without_hanging():
    """World 2, every entry point: set-ups that disagree (LossHook, StepShares, DeferredLossHook,
    incl. calculate_per_token_loss, which used to hang Megatron's finalize), NaN, a mask mismatch
    and a skipped loss on one rank only — both ranks raise, under a timeout (no hang)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("misuse_support", REPO / "tests" / "support" / "misuse.py")
    scenarios = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scenarios)
    proc = torchrun(2, [str(REPO / "tests" / "support" / "misuse.py")], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith(("ok  ", "FAIL"))]
    assert len(lines) == len(scenarios.SCENARIOS) and all(l.startswith("ok") for l in lines), proc.stdout
    SUMMARY.append(f"misuse (world 2): {len(lines)} scenarios at LossHook / StepShares / DeferredLossHook "
                   "raise on both ranks (disagreeing set-ups before the step), none hangs")


@pytest.fixture
def setup(megatron_cpu):
    return Setup()


def test_nan_in_a_valid_token_is_reported_with_the_terms_name(setup):
    hook = LossHook(terms={"pg": LossTerm("token-mean"), "kl": LossTerm("seq-mean-token-mean")})

    def fn(out):
        kl = out * 1.0
        kl[:, 0] = float("nan")  # a valid token in some micro-batches
        return {"pg": out, "kl": kl}

    masks = [mb.full_loss_mask.clone() for mb in setup.mbs]
    for m in masks:
        m[:, 0] = 1
    mbs = setup.mbs
    for mb, m in zip(mbs, masks):
        mb.loss_mask = m
    with pytest.raises(NonFiniteLossError, match=r"term 'kl' in micro-batch\(es\) \[0, 1, 2, 3, 4, 5\]"):
        setup.step(hook, fn=fn, loss_masks=masks)


def _poisoned_step(setup, hook):
    """One step whose per-token loss is NaN wherever the mask is 0."""
    for m in setup.model:
        m.zero_grad_buffer()

    def forward_step(it, chunk):
        mb = next(it)
        out = chunk(mb.tokens, mb.position_ids, None, labels=mb.labels)
        poison = lambda o, m=mb.loss_mask: torch.where(m != 0, o, torch.full_like(o, float("nan")))  # noqa: E731
        return out, hook.loss_func(mb.loss_mask, poison)

    hook.wrap(setup.fb)(forward_step_func=forward_step, data_iterator=iter(setup.mbs), model=setup.model,
                        num_microbatches=len(setup.mbs), seq_length=16, micro_batch_size=1,
                        loss_masks=[mb.full_loss_mask for mb in setup.mbs])


def test_nan_at_masked_positions_is_reported_unless_allowed(setup):
    """NaN/Inf where the mask is 0: by default an error (an op upstream of the loss would poison
    its own backward); with allow_nonfinite_masked=True (a NaN written into the per-token loss
    itself) it is selected away and the gradients are exact."""
    hook = LossHook("seq-mean-token-mean")
    with pytest.raises(NonFiniteLossError, match=r"NaN or Inf at masked positions.*mask the \*inputs\*"):
        _poisoned_step(setup, hook)
    with pytest.raises(ValueError, match="the last step raised"):
        hook.global_loss()
    term = LossTerm("seq-mean-token-mean")
    _poisoned_step(setup, LossHook(term.mode, allow_nonfinite_masked=True))
    assert setup.grad_err(term) < 1e-5


def test_nan_computed_upstream_at_masked_positions_poisons_the_gradients_and_is_reported(setup):
    """The case the check exists for: exp() of NaN at padding gives NaN gradients through exp's
    own backward although the loss selects the position away."""
    hook = LossHook("token-mean", allow_nonfinite_masked=True)
    for m in setup.model:
        m.zero_grad_buffer()

    def forward_step(it, chunk):
        mb = next(it)
        out = chunk(mb.tokens, mb.position_ids, None, labels=mb.labels)
        old = torch.where(mb.loss_mask != 0, torch.zeros_like(out), torch.full_like(out, float("nan")))
        return out, hook.loss_func(mb.loss_mask, lambda o: torch.exp(o - old))

    kwargs = dict(forward_step_func=forward_step, data_iterator=iter(setup.mbs), model=setup.model,
                  num_microbatches=len(setup.mbs), seq_length=16, micro_batch_size=1,
                  loss_masks=[mb.full_loss_mask for mb in setup.mbs])
    hook.wrap(setup.fb)(**kwargs)
    grads = [p.main_grad for m in setup.model for p in m.parameters()]
    assert any(not torch.isfinite(g).all() for g in grads)  # the harm is real when allowed
    hook = LossHook("token-mean")
    for m in setup.model:
        m.zero_grad_buffer()
    kwargs["data_iterator"] = iter(setup.mbs)
    with pytest.raises(NonFiniteLossError, match="masked positions"):
        hook.wrap(setup.fb)(**kwargs)


def test_mask_values_other_than_0_and_1_raise(setup):
    for bad in (0.5, 2.0, -1.0, float("nan")):
        masks = [mb.full_loss_mask.float().clone() for mb in setup.mbs]
        masks[2][0, 0] = bad
        with pytest.raises(ValueError, match=r"Mask values other than 0 and 1.*loss_masks\[2\]: 1 value"):
            setup.step(LossHook("token-mean", check_masks=False), loss_masks=masks)


@pytest.mark.parametrize("cu,cu_padded,problem", [
    ([0, 5, 3], [0, 8, 16], "not cumulative"),
    ([0, 3, 40], [0, 8, 48], "past the end of the row"),
    ([0, 9, 12], [0, 8, 16], "real length exceeds its padded length"),
    ([1, 3, 9], [1, 8, 16], "do not start at 0"),
])
def test_packed_boundaries_that_do_not_describe_the_row_raise(cu, cu_padded, problem):
    """The engine on one rank (no Megatron): bad boundaries are reported after the step, never an
    IndexError and never a silently wrong L."""
    from megatron_agg import AggConfig, PackedSequences
    from megatron_agg.engine import PreparedStep
    from megatron_agg.groups import ParallelGroups
    from megatron_agg.scaling import SumScaling

    row = torch.ones(1, 16)
    step = PreparedStep(AggConfig({"loss": LossTerm("seq-mean-token-mean")}), [row],
                        ParallelGroups(None, None, None, None), SumScaling(1, 1), [PackedSequences(cu, cu_padded)])
    step.microbatch_loss({"loss": torch.ones(1, 16)}, row)
    with pytest.raises(ValueError, match=problem):
        step.finish()


def test_packed_padded_lengths_must_be_multiples_of_2cp():
    from megatron_agg import PackedSequences
    from megatron_agg.validation import BOUNDARY_PROBLEMS, boundary_problems

    counts = boundary_problems(PackedSequences([0, 5, 10], [0, 6, 12]), 12, 2, torch.device("cpu"))
    assert counts.tolist() == [0, 0, 0, 0, 2] and "2·cp" in BOUNDARY_PROBLEMS[4]  # 6 is not a multiple of 4
    assert boundary_problems(PackedSequences([0, 5, 10], [0, 8, 16]), 16, 2, torch.device("cpu")).sum() == 0


def test_options_are_typed_strictly_and_numbers_normalized():
    import numpy as np

    from megatron_agg import AggConfig
    from megatron_agg.agreement import fingerprints
    from megatron_agg.validation import as_int

    with pytest.raises(ValueError, match="check_masks must be True or False, got 'no'"):
        LossHook("token-mean", check_masks="no")
    assert as_int(np.int64(4), "num_microbatches", minimum=1) == 4
    with pytest.raises(ValueError, match="must be an int"):
        as_int(4.0, "num_microbatches")
    a = LossTerm("seq-mean-token-sum-norm", loss_scale_factor=16)
    b = LossTerm("seq-mean-token-sum-norm", loss_scale_factor=np.float64(16.0))
    assert fingerprints({"x": a}, "3-tuple", True) == fingerprints({"x": b}, "3-tuple", True)
    with pytest.raises(ValueError, match="1/C overflows float32"):
        LossTerm("seq-mean-token-sum-norm", loss_scale_factor=1e-40)
    with pytest.raises(ValueError, match="either config=AggConfig"):
        LossHook("token-mean", config=AggConfig({"loss": LossTerm("token-mean")}))


def test_every_entry_point_has_the_same_defaults(megatron_cpu):
    import inspect

    from megatron_agg import DeferredLossHook, StepShares
    from megatron_agg.fsdp import FSDPLossHook

    for cls in (LossHook, DeferredLossHook, StepShares, FSDPLossHook):
        param = inspect.signature(cls).parameters["exclude_fully_masked_seqs"]
        assert param.default is False, cls


def test_numpy_num_microbatches_is_an_int(setup):
    import numpy as np

    term = LossTerm("token-mean")
    setup.step(LossHook(term.mode), num_microbatches=np.int64(len(setup.mbs)))
    assert setup.grad_err(term) < 1e-5
