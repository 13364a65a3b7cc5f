"""The aggregation arithmetic, without Megatron: shares of any split add up to the definition."""

import itertools
import math

import pytest
import torch

from megatron_agg import AggMode, LossTerm, reference_loss
from megatron_agg import step_math as sm
from megatron_agg.megatron.averaging import (GradReduction, LossReturn, MegatronAveraging, loss_multiplier,
                                             report_count)
from megatron_agg.layout import cp_local_positions, to_cp_local
from megatron_agg.step_math import StepTotals, TotalsLayout, checked_group_ids, count_totals, local_totals_vector

TERMS = [
    LossTerm(mode, exclude_fully_masked_seqs=exclude)
    for mode, exclude in itertools.product(AggMode, (False, True))
] + [LossTerm("seq-mean-token-sum-norm", loss_scale_factor=5.0, weight=0.3)]
#: Groups (prompts) of the 13 sequences of ragged_batch: 6 ids, id 4 absent, group 3 holds only the
#: fully masked sequences 2 and 5 (M_3 = 0); groups straddle every split below.
GROUPS = [0, 1, 3, 1, 0, 3, 2, 0, 5, 2, 1, 5, 0]
NUM_GROUPS = 6


def one_mask_totals(views):
    """The one-mask totals vector ``[T, N, N⁺]`` of the sequences of ``views`` (no all-reduce)."""
    return count_totals(TotalsLayout(("default",)), {"default": list(views)}, None, torch.device("cpu")).vector


def one_mask_denominator(term, totals):
    """``D`` of ``term`` (not prompt-mean) from a one-mask totals vector."""
    return StepTotals(TotalsLayout((term.mask,)), totals).denominator(term)


def ragged_batch(seed: int, num_seqs: int = 13, seq_len: int = 8):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(num_seqs, seq_len, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(num_seqs, seq_len, generator=g) < 0.5).float()
    mask[2] = 0  # a fully masked sequence
    mask[5] = 0
    return loss, mask


def random_split(num_seqs: int, dp: int, seed: int):
    """Assign sequences to dp ranks and micro-batches with uneven sizes (some ranks get few)."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(num_seqs - 1, generator=g)[: dp - 1].add(1).tolist())
    bounds = [0, *cuts, num_seqs]
    ranks = []
    for r in range(dp):
        rows = list(range(bounds[r], bounds[r + 1]))
        mbs, i = [], 0
        while i < len(rows):
            size = int(torch.randint(1, 4, (1,), generator=g))
            mbs.append(rows[i : i + size])
            i += size
        ranks.append(mbs)
    return ranks


def shares(term, loss, mask, split, groups=GROUPS, scope="global"):
    """Every micro-batch's share of ``L``, each DP rank counting its part of the totals vector and the
    vectors summed (the all-reduce). ``scope="per-rank"``: each rank's group ids are its own."""
    grouped = term.agg_mode.needs_groups
    layout = TotalsLayout(("default",), ("default",) if grouped else (), NUM_GROUPS if grouped else 0,
                          scope if grouped else None)
    local = []
    for mbs in split:
        rows = [r for mb in mbs for r in mb]
        ids, _ = checked_group_ids(torch.tensor([groups[r] for r in rows]), NUM_GROUPS)
        counts = torch.cat([sm.sequence_view(mask[mb]).counts for mb in mbs]) if mbs else torch.zeros(0)
        local.append(local_totals_vector(layout, {"default": counts}, len(rows), ids if grouped else None,
                                         torch.device("cpu")))
    summed = sum(t.vector for t in local)  # the all-reduce
    out = []
    for t, mbs in zip(local, split):
        totals = StepTotals(layout, summed, t.group_tokens)
        inv = sm.safe_reciprocal(totals.denominator(term))
        for rows in mbs:
            view = sm.sequence_view(mask[rows])
            w = sm.sequence_weights(term, view).double()
            if grouped:
                index = sm.group_index(view, torch.tensor([groups[r] for r in rows]), NUM_GROUPS)
                w = w * torch.take(totals.group_reciprocals("default").double(), index)
            out.append(sm.masked_weighted_sum(loss[rows], sm.valid_tokens(mask[rows]), w) * inv * term.weight)
    return out


def reference(term, loss, mask, groups=GROUPS):
    return reference_loss([loss], [mask], term, group_ids=[groups[: loss.shape[0]]])


@pytest.mark.parametrize("term", TERMS, ids=lambda t: f"{t.agg_mode.value}-excl{t.exclude_fully_masked_seqs}-C{t.loss_scale_factor}")
@pytest.mark.parametrize("dp,seed", [(1, 0), (2, 1), (3, 2), (4, 3)])
def test_shares_sum_to_the_definition_value_and_gradient(term, dp, seed):
    loss, mask = ragged_batch(seed)
    loss.requires_grad_(True)
    total = sum(shares(term, loss, mask, random_split(loss.shape[0], dp, seed)))
    ref = reference(term, loss, mask)
    assert torch.allclose(total.double(), ref, rtol=1e-6, atol=0)
    g_total, = torch.autograd.grad(total, loss)
    g_ref, = torch.autograd.grad(ref, loss)
    assert torch.allclose(g_total, g_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("term", [t for t in TERMS[:12] if t.agg_mode is not AggMode.TOKEN_SUM],
                         ids=lambda t: f"{t.agg_mode.value}-excl{t.exclude_fully_masked_seqs}")
def test_a_mean_of_local_means_is_wrong(term):
    """The negative control of the arithmetic: local denominators miss the definition."""
    loss, mask = ragged_batch(7)
    split = random_split(loss.shape[0], 3, 7)
    local_means = []
    for mbs in split:
        for rows in mbs:
            local_means.append(reference_loss([loss[rows]], [mask[rows]], term, group_ids=[[GROUPS[r] for r in rows]]))
    mean_of_means = sum(local_means) / len(local_means)
    assert not torch.allclose(mean_of_means, reference(term, loss, mask), rtol=1e-3)


def test_all_masked_step_is_zero_with_zero_gradients_not_nan():
    loss = torch.full((3, 4), float("nan"), dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(3, 4)
    for term in TERMS:
        total = sum(shares(term, loss, mask, [[[0, 1], [2]]]))
        assert float(total) == 0.0
        (grad,) = torch.autograd.grad(total, loss)
        assert torch.equal(grad, torch.zeros_like(grad))
        assert float(reference(term, loss.detach().nan_to_num(), mask)) == 0.0


def test_nan_and_inf_in_masked_positions_do_not_leak():
    loss, mask = ragged_batch(3)
    poisoned = loss.clone()
    poisoned[mask == 0] = float("nan")
    poisoned[0, mask[0] == 0] = float("inf")
    poisoned.requires_grad_(True)
    for term in TERMS:
        total = sum(shares(term, poisoned, mask, [[list(range(13))]]))
        assert math.isfinite(float(total))
        (grad,) = torch.autograd.grad(total, poisoned)
        assert torch.isfinite(grad).all()
        assert torch.allclose(total.double(), reference(term, loss, mask))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.int64, torch.float16, torch.float32])
def test_mask_dtypes_agree(dtype):
    loss, mask = ragged_batch(4)
    for term in TERMS:
        base = sum(shares(term, loss, mask, [[list(range(13))]]))
        other = sum(shares(term, loss, mask.to(dtype), [[list(range(13))]]))
        assert torch.equal(base, other)


def test_totals_count_tokens_sequences_and_nonempty_sequences():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]])
    totals = one_mask_totals([sm.sequence_view(mask), sm.sequence_view(mask[:1])])
    assert totals.tolist() == [6.0, 4.0, 3.0]
    assert totals.dtype == torch.float64


def test_default_loss_scale_factor_is_the_padded_length_of_each_sequence():
    term = LossTerm("seq-mean-token-sum-norm")
    a = torch.ones(1, 4)
    b = torch.ones(1, 6)
    la, lb = torch.ones(1, 4), torch.ones(1, 6)
    # Σ_i Σ_t m·l / (N · C_i) = (4/4 + 6/6) / 2
    assert float(reference_loss([la, lb], [a, b], term)) == pytest.approx(1.0)
    w = sm.sequence_weights(term, sm.sequence_view(b))
    assert torch.allclose(w, torch.full((1, 6), 1 / 6))


def test_cp_layout_is_megatrons_load_balanced_order():
    assert cp_local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert cp_local_positions(16, 4, 1).tolist() == [2, 3, 12, 13]
    with pytest.raises(ValueError, match="multiple of 2·cp = 4"):
        cp_local_positions(6, 2, 0)


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_slices_with_whole_sequence_weights_sum_to_the_whole(cp):
    loss, mask = ragged_batch(5, seq_len=8)
    for term in [t for t in TERMS if not t.agg_mode.needs_groups]:  # prompt-mean under CP: the matrix
        whole = sum(shares(term, loss, mask, [[list(range(13))]]))
        totals = one_mask_totals([sm.sequence_view(mask)])
        inv = sm.safe_reciprocal(one_mask_denominator(term, totals))
        weights = sm.sequence_weights(term, sm.sequence_view(mask)).double()
        parts = []
        for r in range(cp):
            local = lambda t: to_cp_local(t, cp, r)  # noqa: E731
            parts.append(sm.masked_weighted_sum(local(loss), sm.valid_tokens(local(mask)), local(weights)) * inv * term.weight)
        assert torch.allclose(sum(parts), whole)


# -- Megatron's averaging, simulated from the table, is cancelled exactly ----------------------
def megatron_gradient_factor(avg: MegatronAveraging, nt: int, total_nt: int) -> float:
    """What Megatron multiplies ∂(returned loss) by, per the rules table (written independently)."""
    if avg.loss_return is LossReturn.TWO_TUPLE:
        schedule = avg.cp_size / avg.num_microbatches
    elif not avg.calculate_per_token_loss:
        schedule = 1.0 / max(nt, 1) / avg.num_microbatches
    else:
        schedule = 1.0
    ddp = 1.0 / avg.dp_cp_size if avg.grad_reduction is GradReduction.MEAN else 1.0
    finalize = 1.0
    if avg.loss_return is LossReturn.THREE_TUPLE and avg.calculate_per_token_loss and total_nt > 0:
        finalize = 1.0 / total_nt
    return schedule * ddp * finalize


@pytest.mark.parametrize("loss_return", list(LossReturn))
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("m,cp,dp", [(1, 1, 1), (3, 1, 2), (4, 2, 2), (5, 2, 4)])
@pytest.mark.parametrize("nt", [0, 1, 7])
def test_loss_multiplier_cancels_megatron_averaging(loss_return, per_token, m, cp, dp, nt):
    avg = MegatronAveraging(loss_return, per_token, m, cp, dp * cp, GradReduction.SUM if per_token else GradReduction.MEAN)
    total_nt = 37
    f = float(loss_multiplier(avg, torch.tensor(nt), torch.tensor(float(total_nt))))
    assert f * megatron_gradient_factor(avg, nt, total_nt) == pytest.approx(1.0, rel=1e-6)
    # the report counts of a step add up to one: dp·cp ranks × m micro-batches
    assert report_count(avg) * m * dp * cp == pytest.approx(1.0)


# -- prompt-mean: group counts that straddle micro-batches and ranks ----------------------------
def test_prompt_groups_straddle_the_splits_and_include_an_empty_and_an_absent_group():
    split = random_split(13, 3, 2)
    owners = {}
    for r, mbs in enumerate(split):
        for j, rows in enumerate(mbs):
            for row in rows:
                owners.setdefault(GROUPS[row], set()).add((r, j))
    assert any(len({r for r, _ in o}) > 1 for o in owners.values())  # across ranks
    assert 4 not in owners  # an id of no sequence: not counted in P
    _, mask = ragged_batch(2)
    assert float(mask[[i for i, g in enumerate(GROUPS) if g == 3]].sum()) == 0  # M_3 = 0


@pytest.mark.parametrize("exclude", [False, True])
def test_per_rank_group_ids_are_pairs_of_rank_and_id(exclude):
    """group_scope='per-rank': the same id on two ranks is two groups; the definition with global
    ids rank·G + id gives the same loss."""
    term = LossTerm("prompt-mean", exclude_fully_masked_seqs=exclude)
    loss, mask = ragged_batch(4)
    loss.requires_grad_(True)
    split = random_split(13, 3, 4)
    local_ids = [0] * 13
    global_ids = [0] * 13
    for r, mbs in enumerate(split):
        for rows in mbs:
            for row in rows:
                local_ids[row] = GROUPS[row] % 3  # each rank numbers its groups 0, 1, 2
                global_ids[row] = r * NUM_GROUPS + local_ids[row]
    total = sum(shares(term, loss, mask, split, groups=local_ids, scope="per-rank"))
    ref = reference(term, loss, mask, groups=global_ids)
    assert torch.allclose(total.double(), ref, rtol=1e-6)
    assert torch.allclose(torch.autograd.grad(total, loss)[0], torch.autograd.grad(ref, loss)[0], rtol=1e-5, atol=1e-7)


def test_counting_group_tokens_per_rank_is_wrong():
    """The control: global ids read as per-rank ids (each rank's part of a group a group of its own)
    miss the definition when groups straddle ranks."""
    term = LossTerm("prompt-mean")
    loss, mask = ragged_batch(6)
    split = random_split(13, 3, 6)
    per_rank = sum(shares(term, loss, mask, split, scope="per-rank"))
    assert not torch.allclose(per_rank.double(), reference(term, loss, mask), rtol=1e-3)
    assert torch.allclose(sum(shares(term, loss, mask, split)).double(), reference(term, loss, mask), rtol=1e-6)


def test_token_sum_is_the_plain_masked_sum():
    loss, mask = ragged_batch(8)
    total = sum(shares(LossTerm("token-sum", weight=0.5), loss, mask, random_split(13, 2, 8)))
    assert torch.allclose(total.double(), 0.5 * torch.where(mask != 0, loss, 0.0).sum())


def test_out_of_range_group_ids_are_counted_and_never_index_out_of_bounds():
    ids, bad = checked_group_ids(torch.tensor([0, 5, -1, 6, 2]), 6)
    assert ids.tolist() == [0, 5, 6, 6, 2] and int(bad) == 2
    layout = TotalsLayout(("default",), ("default",), 6, "global")
    t = local_totals_vector(layout, {"default": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])}, 5, ids, torch.device("cpu"))
    totals = StepTotals(layout, t.vector)
    assert totals.group_tokens("default").tolist() == [1.0, 0, 5.0, 0, 0, 2.0]  # ids -1 and 6 in no group
    assert float(totals.groups("default", False)) == 3.0


def test_totals_layout_and_its_size_at_1024_groups():
    one = TotalsLayout(("default",))
    assert one.size == 3  # [T, N, N⁺]: the layout of one_mask_totals
    two = TotalsLayout(("default", "correct"))
    assert two.size == 5 and two.tokens_index("correct") == 3 and two.nonempty_index("correct") == 4
    dense = TotalsLayout(("default",), ("default",), 1024, "global")
    assert dense.size == 3 + 2 * 1024 and dense.nbytes() == 8 * 2051  # 16,408 bytes (+ 27 agreement values)
    per_rank = TotalsLayout(("default",), ("default",), 1024, "per-rank")
    assert per_rank.size == 5  # P and P⁺ only: the groups' counts stay on their rank


def test_per_term_masks_count_their_own_denominators():
    """Two masks over the same sequences: each term's T, N⁺ and 1/n_i come from its own mask."""
    loss, mask = ragged_batch(9)
    correct = mask.clone()
    correct[::3] = 0  # the "correct" subset
    layout = TotalsLayout(("default", "correct"))
    counts = {"default": sm.sequence_view(mask).counts, "correct": sm.sequence_view(correct).counts}
    totals = StepTotals(layout, local_totals_vector(layout, counts, 13, None, torch.device("cpu")).vector)
    for mode in ("token-mean", "seq-mean-token-mean"):
        term = LossTerm(mode, mask="correct", exclude_fully_masked_seqs=True)
        w = sm.sequence_weights(term, sm.sequence_view(correct)).double()
        share = sm.masked_weighted_sum(loss, sm.valid_tokens(correct), w) * sm.safe_reciprocal(totals.denominator(term))
        assert torch.allclose(share.double(), reference_loss([loss], [correct], term))
        assert not torch.allclose(share.double(), reference_loss([loss], [mask], term), rtol=1e-3)


def test_step_math_is_pure_and_the_only_home_of_the_arithmetic():
    """#19: the step's arithmetic is one module with no torch.distributed, no Megatron and no state
    of its own (module level: constants only); the old re-export modules aggregation and totals are
    gone (one import path per name)."""
    import ast
    import inspect
    from pathlib import Path

    tree = ast.parse(inspect.getsource(sm))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if "distributed" in m or "megatron" in m], imported
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "distributed"]
    for node in tree.body:  # module-level assignments: constants (tuples, dtypes, __all__) only
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            value = node.value
            assert not isinstance(value, (ast.Dict, ast.List, ast.Set)) or (
                isinstance(node, ast.Assign) and node.targets[0].id == "__all__"), ast.dump(node)
    package = Path(sm.__file__).parent  # the files, not find_spec: an editable install may map other checkouts
    assert not [name for name in ("aggregation.py", "totals.py") if (package / name).exists()]
