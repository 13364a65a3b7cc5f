"""The deferred mode's contract (its gradients are in the matrix: variant deferred-3-tuple)."""

import pytest
import torch

from megatron_agg import DeferredLossHook, LossTerm, PackedSequences


def test_terms_with_different_denominators_need_the_prepared_mode():
    with pytest.raises(ValueError, match=r"different ones .*'pg': valid tokens \(T\).*'kl': sequences \(N\).*prepared mode"):
        DeferredLossHook(terms={"pg": LossTerm("token-mean"), "kl": LossTerm("seq-mean-token-mean")})
    with pytest.raises(ValueError, match="non-empty sequences"):
        DeferredLossHook(terms={"a": LossTerm("seq-mean-token-sum"),
                                "b": LossTerm("seq-mean-token-mean", exclude_fully_masked_seqs=True)})
    # one denominator, several terms: fine
    DeferredLossHook(terms={"a": LossTerm("seq-mean-token-sum"), "b": LossTerm("seq-mean-token-mean", weight=0.1)})


def test_config_must_route_num_tokens():
    hook = DeferredLossHook("seq-mean-token-mean")

    class Config:
        calculate_per_token_loss = False
        finalize_model_grads_func = object()

    with pytest.raises(ValueError, match="calculate_per_token_loss=True"):
        hook.check_config(Config())
    Config.calculate_per_token_loss = True
    hook.check_config(Config())
    Config.finalize_model_grads_func = None
    with pytest.raises(ValueError, match="finalize_model_grads_func"):
        hook.check_config(Config())


def test_sequence_token_counts_of_rows_and_packs():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    assert DeferredLossHook.sequence_token_counts(mask).tolist() == [2.0, 0.0]
    packed = PackedSequences([0, 3, 5], [0, 4, 8])
    row = torch.tensor([[1, 0, 1, 1, 1, 1, 0, 1]])  # position 3 and 7 are padding: not counted
    assert DeferredLossHook.sequence_token_counts(row, packed).tolist() == [2.0, 2.0]


def test_one_rank_deferred_loss_values(megatron_cpu):
    """On one rank the returned numerator / num_tokens is L, and num_tokens counts sequences."""
    from megatron_agg import reference_loss

    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]])
    for term in [LossTerm("token-mean"), LossTerm("seq-mean-token-mean"),
                 LossTerm("seq-mean-token-mean", exclude_fully_masked_seqs=True),
                 LossTerm("seq-mean-token-sum-norm")]:
        hook = DeferredLossHook(terms={"loss": term})
        numerator, num_tokens, report = hook.loss_func(mask)(loss)
        expected = {"token-mean": 4, "seq-mean-token-mean": 2 if term.exclude_fully_masked_seqs else 3,
                    "seq-mean-token-sum-norm": 3}[term.agg_mode.value]
        assert int(num_tokens) == expected and num_tokens.dtype == torch.int32
        assert float(numerator / num_tokens) == pytest.approx(float(reference_loss([loss], [mask], term)))
        assert report["loss"].tolist() == pytest.approx([float(numerator), float(expected)])
