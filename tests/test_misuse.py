"""Misuse is loud: disagreeing DP ranks, NaN/Inf in a loss term."""

import pytest
import torch

from megatron_agg import LossHook, LossTerm, NonFiniteLossError

from conftest import REPO, SUMMARY, torchrun
from test_hook_single_process import Setup  # noqa: F401  (the fixture's class)


def test_data_parallel_ranks_that_disagree_fail_on_every_rank():
    proc = torchrun(2, [str(REPO / "tests" / "support" / "misuse.py")], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith(("ok  ", "FAIL"))]
    assert len(lines) == 6 and all(l.startswith("ok") for l in lines), proc.stdout
    SUMMARY.append("misuse: DP ranks disagreeing on mode / exclude / weight / loss_return are each named "
                   "in the error on both ranks; agreeing ranks raise nothing")


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


def test_nan_in_padding_is_not_an_error(setup):
    """NaN/Inf where the mask is 0 is selected away: no error, exact gradients."""
    term = LossTerm("seq-mean-token-mean")
    hook = LossHook(term.mode)
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
    assert setup.grad_err(term) < 1e-5
