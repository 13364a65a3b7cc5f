"""StepShares (for loss functions that reduce themselves, e.g. verl's agg_loss): shares add up to
the definition, Megatron's return conventions, the checks, no host sync per micro-batch. The
multi-rank gradient proof runs through the patched verl engine (tests/test_patches_verl.py)."""

import pytest
import torch

from megatron_agg import AggMode, LossTerm, StepShares, reference_loss
from megatron_agg.compare.gpt import TinyGPT, build_chunks, wrap_ddp
from megatron_agg.compare.parallel import Layout
from megatron_agg.step_math import TotalsLayout
from harness.sync_guard import HostSyncError, count_collectives, forbid_host_sync

MASKS = [
    torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool),
    torch.tensor([[0, 1, 1, 1]], dtype=torch.bool),
    torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool),
]


def model(per_token=False):
    return wrap_ddp(build_chunks(TinyGPT(num_layers=1), Layout(), calculate_per_token_loss=per_token))


def losses(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m.shape, generator=g) for m in MASKS]


#: Group ids of the rows of MASKS: groups 1 and 2 straddle micro-batches, group 3 is the fully masked
#: sequence alone (M_3 = 0: left out of P with exclude_fully_masked_seqs), id 4 is absent.
GROUP_IDS = [torch.tensor([0, 3, 2]), torch.tensor([1]), torch.tensor([2, 1])]


@pytest.mark.parametrize("mode", [m.value for m in AggMode])
@pytest.mark.parametrize("exclude", [False, True])
def test_shares_add_up_to_the_definition(megatron_cpu, mode, exclude):
    grouped = dict(group_ids=GROUP_IDS, num_groups=5, group_scope="global") if mode == "prompt-mean" else {}
    shares = StepShares(MASKS, model=model(), exclude_fully_masked_seqs=exclude, **grouped)
    ls = losses()
    total = 0.0
    for loss, mask in zip(ls, MASKS):
        s = shares.share(loss, mask, mode, loss_scale_factor=3.0 if "norm" in mode else None)
        total = total + s
        shares.megatron_return(s)
    shares.finish()
    term = LossTerm(mode, exclude_fully_masked_seqs=exclude, loss_scale_factor=3.0 if "norm" in mode else None)
    expected = float(reference_loss(ls, MASKS, term, group_ids=[g.tolist() for g in GROUP_IDS]))
    assert abs(float(total) - expected) <= 1e-6 * max(abs(expected), 1.0)


def test_named_masks_and_metrics(megatron_cpu):
    """A term over its own mask divides by that mask's counts; a metric is aggregated like a term and
    reported by global_metrics() (one rank: no collective)."""
    correct = [m.clone() for m in MASKS]
    correct[0][2] = False  # the third sequence of micro-batch 0 is not "correct"
    shares = StepShares({"default": MASKS, "correct": correct}, model=model())
    ls = losses()
    total = 0.0
    with forbid_host_sync():
        for loss, mask, good in zip(ls, MASKS, correct):
            s = shares.share(loss, mask, "token-mean") + 0.5 * shares.share(loss, good, "seq-mean-token-mean",
                                                                            mask_name="correct")
            shares.metric("entropy", loss * 2, good, "token-mean", mask_name="correct")
            shares.megatron_return(s)
            total = total + s
    shares.finish()
    expected = float(reference_loss(ls, MASKS, "token-mean")) + 0.5 * float(
        reference_loss(ls, correct, "seq-mean-token-mean"))
    assert float(total) == pytest.approx(expected, rel=1e-6)
    metrics = shares.global_metrics()
    assert float(metrics["entropy"]) == pytest.approx(float(reference_loss([2 * l for l in ls], correct, "token-mean")),
                                                      rel=1e-6)
    with pytest.raises(ValueError, match=r"mask_name='wrong'.*\['default', 'correct'\]"):
        StepShares({"default": MASKS, "correct": correct}, model=model()).share(ls[0], MASKS[0], "token-mean",
                                                                                mask_name="wrong")
    with pytest.raises(ValueError, match=r"needs StepShares\(\.\.\., group_ids"):
        StepShares(MASKS, model=model()).share(ls[0], MASKS[0], "prompt-mean")
    with pytest.raises(ValueError, match="num_groups=G"):
        StepShares(MASKS, model=model(), group_ids=GROUP_IDS)
    with pytest.raises(ValueError, match=r"group_ids\[1\] must be a 1-D integer tensor with one id per sequence \(1 row\(s\)\)"):
        StepShares(MASKS, model=model(), group_ids=[GROUP_IDS[0], GROUP_IDS[0], GROUP_IDS[2]], num_groups=5,
                   group_scope="global")
    bad = StepShares(MASKS, model=model(), group_ids=[torch.tensor([0, 1, 7]), GROUP_IDS[1], GROUP_IDS[2]],
                     num_groups=5, group_scope="global")
    for loss, mask in zip(ls, MASKS):
        bad.megatron_return(bad.share(loss, mask, "prompt-mean"))
    with pytest.raises(ValueError, match=r"Group ids outside \[0, num_groups\): group_ids: 1 id"):
        bad.finish()


def test_totals_layout_counts_every_named_mask(megatron_cpu):
    """Modes are chosen per call: every mask of loss_masks is counted ("default" first) and, with
    group ids, carries per-group counts; one extra field (Σ num_tokens)."""
    correct = [m.clone() for m in MASKS]
    plain = StepShares({"correct": correct, "default": MASKS}, model=model())
    assert plain.layout == TotalsLayout(("default", "correct"), extra=1)
    grouped = StepShares({"default": MASKS, "correct": correct}, model=model(), group_ids=GROUP_IDS, num_groups=5,
                         group_scope="per-rank")
    assert grouped.layout == TotalsLayout(("default", "correct"), ("default", "correct"), 5, "per-rank", extra=1)


def test_token_sum_and_nested_masks(megatron_cpu):
    nested = [torch.nested.nested_tensor([row[: 2 + i % 3].float() for i, row in enumerate(m)], layout=torch.jagged)
              for m in MASKS]
    dense = [n.to_padded_tensor(0.0) for n in nested]
    shares = StepShares(nested, model=model())
    ls = [torch.randn(d.shape) for d in dense]
    total = sum(shares.megatron_return(shares.share(l, d, "token-sum"))[0] for l, d in zip(ls, dense))
    expected = sum(float((l * d).sum()) for l, d in zip(ls, dense))
    assert abs(float(total) / len(MASKS) - expected) < 1e-5  # one rank: F = M for the 2-tuple
    shares.finish()


def test_flattened_view_for_token_modes_and_refused_for_sequence_modes(megatron_cpu):
    shares = StepShares(MASKS, model=model())
    flat_mask, flat_loss = MASKS[0].reshape(1, -1), torch.randn(1, MASKS[0].numel())
    shares.share(flat_loss, flat_mask, "token-mean")
    with pytest.raises(ValueError, match="needs one row per sequence"):
        shares.share(flat_loss, flat_mask, "seq-mean-token-mean")


def test_return_conventions(megatron_cpu):
    two = StepShares(MASKS, model=model())
    s = two.share(losses()[0], MASKS[0], "token-mean")
    loss, extra = two.megatron_return(s, "out")
    assert extra == "out" and torch.allclose(loss, s * 3)  # M = 3, one rank
    three = StepShares(MASKS, model=model(per_token=True), num_tokens=[7, 2, 5])
    s = three.share(losses()[0], MASKS[0], "token-mean")
    loss, nt, extra = three.megatron_return(s, "out")
    assert int(nt) == 7 and torch.allclose(loss, s * 14)  # F = Σ num_tokens = 14


def test_no_host_sync_and_one_collective(megatron_cpu):
    with count_collectives() as counter:
        shares = StepShares(MASKS, model=model())
    assert counter.count == 0  # one data-parallel rank: nothing to all-reduce
    with forbid_host_sync():
        for loss, mask in zip(losses(), MASKS):
            shares.megatron_return(shares.share(loss, mask, "seq-mean-token-mean"))
    shares.finish()
    with pytest.raises(HostSyncError):
        with forbid_host_sync():
            float(torch.ones(()))


def test_user_mistakes(megatron_cpu):
    shares = StepShares(MASKS, model=model())
    with pytest.raises(ValueError, match="'token-mean'.*token-sum"):
        shares.share(losses()[0], MASKS[0], "token-avg")
    with pytest.raises(ValueError, match="one loss per token"):
        shares.share(torch.zeros(3, 3), MASKS[0], "token-mean")
    with pytest.raises(ValueError, match="one mask per micro-batch"):
        StepShares(MASKS, model=model(), num_microbatches=2)
    with pytest.raises(ValueError, match="single tensor"):
        StepShares(MASKS[0], model=model())
    with pytest.raises(ValueError, match="1 of 3 micro-batches"):
        shares.megatron_return(shares.share(losses()[0], MASKS[0], "token-mean"))
        shares.finish()


def test_finish_detects_masks_that_are_not_the_counted_ones(megatron_cpu):
    shares = StepShares(MASKS, model=model())
    for loss, mask in zip(losses(), MASKS):
        shares.megatron_return(shares.share(loss, torch.ones_like(mask), "token-mean"))
    with pytest.raises(ValueError, match=r"differs from loss_masks\[0\].*valid-token counts"):
        shares.finish()
    over = StepShares(MASKS, model=model())
    for loss, mask in zip(losses(), MASKS):
        over.megatron_return(over.share(loss, mask, "token-mean"))
    with pytest.raises(ValueError, match="called 4 times"):
        over.megatron_return(torch.zeros(()))


def test_the_checks_run_inside_finalize_without_finish(megatron_cpu):
    """Without finish(): Megatron's finalize_model_grads_func runs the step's checks first and
    raises before the gradients are reduced (the wrapper is one-shot; finish() afterwards is a
    no-op); a wrapper whose step never reached finalize is dropped by the next StepShares."""
    chunks = model()
    config = chunks[0].config
    reduced = []
    config.finalize_model_grads_func = lambda *a, **k: reduced.append(a)
    original = config.finalize_model_grads_func
    StepShares(MASKS, model=chunks)  # a step that never reached finalize (e.g. forward-only)
    shares = StepShares(MASKS, model=chunks)
    assert config.finalize_model_grads_func.__wrapped__ is original
    for loss, mask in zip(losses(), MASKS):
        shares.megatron_return(shares.share(loss, torch.ones_like(mask), "token-mean"))
    with pytest.raises(ValueError, match=r"differs from loss_masks\[0\]"):
        config.finalize_model_grads_func(chunks)
    assert reduced == [] and config.finalize_model_grads_func is original
    shares.finish()  # already checked: nothing more
    good = StepShares(MASKS, model=chunks)
    for loss, mask in zip(losses(), MASKS):
        good.megatron_return(good.share(loss, mask, "token-mean"))
    config.finalize_model_grads_func(chunks)
    assert len(reduced) == 1 and config.finalize_model_grads_func is original


def test_config_gives_the_shared_options(megatron_cpu):
    """One config object at every front end: StepShares takes an AggConfig's check and collective
    options (its terms do not apply: share() names the mode); never both a config and those options,
    never a config whose metrics or groups StepShares would silently ignore."""
    from megatron_agg import AggConfig

    config = AggConfig({"loss": LossTerm("token-mean")}, async_totals=False, allow_nonfinite_masked=True,
                       agreement="every-step")
    shares = StepShares(MASKS, model=model(), config=config)
    assert shares.config is config and shares._work is None  # async_totals=False: reduced at once
    loss = losses()[0]
    loss[0, 3] = float("nan")  # a masked position: allowed by the config
    for j, (l, m) in enumerate(zip([loss] + losses()[1:], MASKS)):
        shares.megatron_return(shares.share(l, m, "token-mean"))
    shares.finish()
    with pytest.raises(ValueError, match=r"Give either config=AggConfig\(...\) or the options \['agreement'\]"):
        StepShares(MASKS, model=model(), config=config, agreement="on-change")
    with pytest.raises(ValueError, match=r"config's check and collective options only.*StepShares.metric"):
        StepShares(MASKS, model=model(), config=config.replace(metrics={"kl": "token-mean"}))
    assert StepShares(MASKS, model=model()).config.agreement == "on-change"  # the defaults as everywhere


def test_num_tokens_of_the_wrong_form_is_a_value_error():
    """A 0-dim or 2-dim tensor of num_tokens gets the message, not a raw TypeError from len()."""
    from megatron_agg.validation import checked_num_tokens

    for bad, what in [(torch.tensor(5), "a 0-dim tensor of"), (torch.ones(2, 2), "a 2-dim tensor of"), ([1], "1")]:
        with pytest.raises(ValueError, match=rf"Got {what} num_tokens for 3 micro-batches"):
            checked_num_tokens(bad, 3, torch.device("cpu"))
