"""Packed sequences (THD) and the context-parallel layouts: the arithmetic, without Megatron."""

import itertools

import pytest
import torch

from megatron_agg import AggMode, LossTerm, PackedSequences, reference_loss
from megatron_agg import step_math as sm
from megatron_agg.layout import cp_local_positions, thd_cp_local_positions, to_cp_local

# prompt-mean's packed and CP arithmetic: tests/test_aggregation.py (group counts) and the matrix's cp suite
TERMS = [LossTerm(m, exclude_fully_masked_seqs=e)
         for m, e in itertools.product([m for m in AggMode if not m.needs_groups], (False, True))]


def one_mask_totals(views):
    """The one-mask totals vector ``[T, N, N⁺]`` of the sequences of ``views`` (no all-reduce)."""
    return sm.count_totals(sm.TotalsLayout(("default",)), {"default": list(views)}, None, torch.device("cpu")).vector


def one_mask_denominator(term, totals):
    """``D`` of ``term`` (not prompt-mean) from a one-mask totals vector."""
    return sm.StepTotals(sm.TotalsLayout((term.mask,)), totals).denominator(term)


def literal_thd_positions(cu_padded, total, cp, r):
    out = []
    bounds = list(cu_padded) + ([total] if cu_padded[-1] < total else [])
    for a, b in zip(bounds[:-1], bounds[1:]):
        chunk = (b - a) // (2 * cp)
        out += list(range(a + r * chunk, a + (r + 1) * chunk))
        second = 2 * cp - 1 - r
        out += list(range(a + second * chunk, a + (second + 1) * chunk))
    return out


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("cu_padded,total", [([0, 8, 16, 40], 40), ([0, 8], 16), ([0, 16, 24], 24), ([0], 8)])
def test_thd_layout_matches_the_literal_definition(cp, cu_padded, total):
    if any((b - a) % (2 * cp) for a, b in zip(cu_padded[:-1], cu_padded[1:])) or (total - cu_padded[-1]) % (2 * cp):
        pytest.skip("not a valid THD layout for this cp")
    got = thd_cp_local_positions(torch.tensor(cu_padded), total, cp, 0)
    for r in range(cp):
        got = thd_cp_local_positions(torch.tensor(cu_padded), total, cp, r).tolist()
        assert got == (list(range(total)) if cp == 1 else literal_thd_positions(cu_padded, total, cp, r))
    # every position is held by exactly one rank
    held = sorted(itertools.chain.from_iterable(thd_cp_local_positions(torch.tensor(cu_padded), total, cp, r).tolist() for r in range(cp)))
    assert held == list(range(total))


def test_one_packed_sequence_is_the_unpacked_load_balanced_layout():
    for cp in (2, 4):
        for r in range(cp):
            assert thd_cp_local_positions(torch.tensor([0, 16]), 16, cp, r).tolist() == cp_local_positions(16, cp, r).tolist()


def make_pack(seed=0, cp=2):
    """Sequences of real lengths 5, 3 (fully masked), 7, 1 packed with padding to 2·cp."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 7, 1]
    masks_unpacked = torch.zeros(4, 12)
    losses_unpacked = torch.rand(4, 12, generator=g, dtype=torch.float64)
    for i, n in enumerate(lengths):
        if i != 1:
            masks_unpacked[i, 1:n] = 1.0  # first token a masked prompt
    padded = [-(-n // (2 * cp)) * 2 * cp for n in lengths]
    cu = [0, *itertools.accumulate(lengths)]
    cu_padded = [0, *itertools.accumulate(padded)]
    total = cu_padded[-1] + 2 * cp  # trailing padding after the last sequence
    mask = torch.zeros(1, total)
    loss = torch.full((1, total), float("nan"), dtype=torch.float64)  # padding is poison
    for i, n in enumerate(lengths):
        mask[0, cu_padded[i] : cu_padded[i] + n] = masks_unpacked[i, :n]
        loss[0, cu_padded[i] : cu_padded[i] + n] = losses_unpacked[i, :n]
    mask[0, cu_padded[0] + lengths[0]] = 1.0  # a stray 1 in padding: belongs to no sequence
    mask[0, -1] = 1.0  # and one after the last sequence
    packed = PackedSequences(cu, cu_padded, padded_length=12)
    return losses_unpacked, masks_unpacked, loss, mask, packed


def test_sequence_view_counts_sequences_not_rows_and_ignores_padding():
    _, _, _, mask, packed = make_pack()
    view = sm.sequence_view(mask, packed)
    assert view.num_seqs == 4
    assert view.token_counts().tolist() == [4.0, 0.0, 6.0, 0.0]
    assert one_mask_totals([view]).tolist() == [10.0, 4.0, 2.0]


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("term", TERMS + [LossTerm("seq-mean-token-sum-norm", loss_scale_factor=3.0)],
                         ids=lambda t: f"{t.agg_mode.value}-excl{t.exclude_fully_masked_seqs}-C{t.loss_scale_factor}")
def test_packed_cp_slices_add_up_to_the_unpacked_definition(cp, term):
    losses_u, masks_u, loss, mask, packed = make_pack(cp=cp)
    view = sm.sequence_view(mask, packed)
    inv = sm.safe_reciprocal(one_mask_denominator(term, one_mask_totals([view])))
    weights = sm.sequence_weights(term, view).double()
    _, cu_padded = packed.boundaries(mask.device)
    total = 0.0
    for r in range(cp):
        pos = thd_cp_local_positions(cu_padded, mask.shape[-1], cp, r)
        local = lambda t: to_cp_local(t, cp, r, pos)  # noqa: E731
        total = total + sm.masked_weighted_sum(local(loss), local(view.valid), local(weights)) * inv
    ref = reference_loss([losses_u], [masks_u], term)
    assert torch.allclose(torch.as_tensor(total, dtype=torch.float64), ref, rtol=1e-6)


def test_default_c_of_a_packed_sequence_is_its_own_padded_length():
    mask = torch.ones(1, 8)
    view = sm.sequence_view(mask, PackedSequences([0, 3, 5], [0, 4, 8]))
    w = sm.sequence_weights(LossTerm("seq-mean-token-sum-norm"), view)
    assert w[0].tolist() == [0.25] * 3 + [0.0] + [0.25] * 2 + [0.0] * 2


def test_megatron_packed_seq_params_are_accepted():
    class FakeParams:
        qkv_format = "thd"
        cu_seqlens_q = torch.tensor([0, 3, 5], dtype=torch.int32)
        cu_seqlens_q_padded = torch.tensor([0, 4, 8], dtype=torch.int32)

    packed = PackedSequences.coerce(FakeParams(), "x")
    assert packed.num_sequences == 2
    with pytest.raises(ValueError, match="only 'thd'"):
        FakeParams.qkv_format = "sbhd"
        PackedSequences.coerce(FakeParams(), "x")
    with pytest.raises(ValueError, match="Megatron's PackedSeqParams"):
        PackedSequences.coerce([0, 3], "packed_seqs[0]")
    with pytest.raises(ValueError, match="both describe the same K sequences"):
        PackedSequences([0, 3, 5], [0, 4]).validate("p")


# -- the per-row cut (Megatron-LM's --dataloader-inter-document-masking) ------------------------
@pytest.mark.parametrize("cp", [2, 4])
def test_local_positions_per_layout(cp):
    from megatron_agg.layout import local_positions

    cu = torch.tensor([0, 8, 16, 40])
    for r in range(cp):
        # packed: per document for "load-balanced", the whole row for "per-row"
        assert local_positions("load-balanced", 40, cp, r, cu).tolist() == thd_cp_local_positions(cu, 40, cp, r).tolist()
        assert local_positions("per-row", 40, cp, r, cu).tolist() == cp_local_positions(40, cp, r).tolist()
        # unpacked rows are cut the same way by both
        assert local_positions("per-row", 16, cp, r).tolist() == local_positions("load-balanced", 16, cp, r).tolist()
        assert local_positions("contiguous", 16, cp, r).tolist() == list(range(r * 16 // cp, (r + 1) * 16 // cp))
    assert local_positions("per-row", 40, 1, 0, cu) is None
    with pytest.raises(ValueError, match="cp_layout must be one of"):
        local_positions("per-document", 40, 2, 0, cu)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("term", TERMS, ids=lambda t: f"{t.agg_mode.value}-excl{t.exclude_fully_masked_seqs}")
def test_per_row_cp_slices_add_up_to_the_unpacked_definition_and_per_document_does_not(cp, term):
    """Documents of any length in a row cut as a whole: the per-row positions give the definition;
    reading the same slices as if cut per document gives another loss for seq-mean-token-mean."""
    from megatron_agg.layout import local_positions

    g = torch.Generator().manual_seed(3)
    lengths = [5, 3, 7, 2, 6]  # not multiples of 2·cp
    masks_u = torch.zeros(len(lengths), 8)
    losses_u = torch.rand(len(lengths), 8, generator=g, dtype=torch.float64)
    for i, n in enumerate(lengths):
        if i != 1:
            masks_u[i, : n - 1] = 1.0
    cu = [0, *itertools.accumulate(lengths)]
    total = -(-cu[-1] // (2 * cp)) * 2 * cp
    mask = torch.zeros(1, total)
    loss = torch.zeros(1, total, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[0, cu[i] : cu[i] + n] = masks_u[i, :n]
        loss[0, cu[i] : cu[i] + n] = losses_u[i, :n]
    packed = PackedSequences(cu, padded_length=8)
    view = sm.sequence_view(mask, packed)
    inv = sm.safe_reciprocal(one_mask_denominator(term, one_mask_totals([view])))
    weights = sm.sequence_weights(term, view).double()
    cu_t = packed.boundaries(mask.device)[1]
    out = wrong = 0.0
    for r in range(cp):
        pos = local_positions("per-row", total, cp, r, cu_t)
        local = lambda t: to_cp_local(t, cp, r, pos)  # noqa: E731
        out = out + sm.masked_weighted_sum(local(loss), local(view.valid), local(weights)) * inv
        # the old patch's mistake: the same slice, its tokens mapped to documents per document
        told = local_positions("load-balanced", total, cp, r, cu_t).clamp(0, total - 1)
        wrong = wrong + sm.masked_weighted_sum(local(loss), local(view.valid), to_cp_local(weights, cp, r, told)) * inv
    ref = reference_loss([losses_u], [masks_u], term)
    assert torch.allclose(torch.as_tensor(out, dtype=torch.float64), ref, rtol=1e-9)
    if term.agg_mode is AggMode.SEQ_MEAN_TOKEN_MEAN:
        assert not torch.allclose(torch.as_tensor(wrong, dtype=torch.float64), ref, rtol=1e-3)


def test_boundary_check_asks_2cp_documents_only_of_the_per_document_cut():
    from megatron_agg.validation import BOUNDARY_PROBLEMS, boundary_problems

    packed = PackedSequences([0, 5, 8])  # documents of 5 and 3 tokens, a row of 8
    per_doc = boundary_problems(packed, 8, 2, torch.device("cpu"), per_document=True)
    per_row = boundary_problems(packed, 8, 2, torch.device("cpu"), per_document=False)
    assert per_doc.tolist()[-1] == 2 and per_row.tolist() == [0] * len(BOUNDARY_PROBLEMS)
    assert "cp_layout='per-row'" in BOUNDARY_PROBLEMS[-1]


def test_cp_layout_is_checked_and_told_once():
    from types import SimpleNamespace

    from megatron_agg.validation import check_cp_lengths
    from megatron_agg.groups import ParallelGroups
    from megatron_agg.megatron.model_setup import checked_cp_layout

    assert checked_cp_layout(None) == "load-balanced"
    assert checked_cp_layout("per-row") == "per-row"
    with pytest.raises(ValueError, match="cp_layout must be one of"):
        checked_cp_layout("contiguous")  # Megatron never cuts that way; FSDP's sequence parallelism does
    with pytest.raises(ValueError, match="cp_layout must be one of"):
        checked_cp_layout("per-document")
    groups = ParallelGroups(dp=None, cp=None, dp_cp=None, pp=None, cp_layout="per-row")
    assert checked_cp_layout(None, groups) == "per-row"
    with pytest.raises(ValueError, match="agree"):
        checked_cp_layout("load-balanced", groups)
    # a packed row cut as a whole must be a multiple of 2·cp; its documents need not be
    per_row = SimpleNamespace(cp_size=2, cp_layout="per-row")
    check_cp_lengths([torch.ones(1, 12)], [PackedSequences([0, 5, 12])], per_row)
    with pytest.raises(ValueError, match="packed row, cut as a whole"):
        check_cp_lengths([torch.ones(1, 10)], [PackedSequences([0, 5, 10])], per_row)
    with pytest.raises(ValueError, match="2·cp = 4 chunks"):
        check_cp_lengths([torch.ones(2, 10)], None, SimpleNamespace(cp_size=2, cp_layout="load-balanced"))
