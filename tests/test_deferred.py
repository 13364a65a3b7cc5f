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
        hook.install(_Config())
        numerator, num_tokens, report = hook.loss_func(mask)(loss)
        expected = {"token-mean": 4, "seq-mean-token-mean": 2 if term.exclude_fully_masked_seqs else 3,
                    "seq-mean-token-sum-norm": 3}[term.agg_mode.value]
        assert int(num_tokens) == expected and num_tokens.dtype == torch.int32
        assert float(numerator / num_tokens) == pytest.approx(float(reference_loss([loss], [mask], term)))
        assert report["loss"].tolist() == pytest.approx([float(numerator), float(expected)])


class _Config:
    """A Megatron config as far as the deferred mode reads it."""

    calculate_per_token_loss = True

    def __init__(self, per_token: bool = True) -> None:
        self.calculate_per_token_loss = per_token
        self.finalize_model_grads_func = lambda *a, **k: "finalized"


def test_deferred_refuses_megatrons_default_config_before_the_first_loss(megatron_cpu):
    """calculate_per_token_loss=False (Megatron's default) would divide every micro-batch by its own
    num_tokens: refused by install, and by the first loss when the model is passed."""
    hook = DeferredLossHook("token-mean")
    with pytest.raises(ValueError, match="calculate_per_token_loss=True.*silently wrong"):
        hook.install(_Config(per_token=False))
    assert not hook.installed
    mask, loss = torch.ones(2, 4), torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"must check Megatron's config before the first loss.*install\(model\)"):
        hook.loss_func(mask)(loss)
    with pytest.raises(ValueError, match="calculate_per_token_loss=True"):
        hook.loss_func(mask, model=_Config(per_token=False))(loss)


def test_deferred_install_wraps_finalize_and_uninstall_restores_it(megatron_cpu):
    config = _Config()
    original = config.finalize_model_grads_func
    hook = DeferredLossHook("seq-mean-token-mean")
    hook.install(config)
    hook.install(config)  # idempotent
    assert config.finalize_model_grads_func.__wrapped__ is original
    hook.loss_func(torch.ones(2, 4))(torch.ones(2, 4))
    assert config.finalize_model_grads_func([]) == "finalized"  # the step's checks pass, then Megatron's
    with pytest.raises(ValueError, match="already wrapped by another DeferredLossHook"):
        DeferredLossHook("seq-mean-token-mean").install(config)
    hook.uninstall()
    assert config.finalize_model_grads_func is original


@pytest.mark.parametrize("case", ["nan-valid", "nan-masked", "mask-values", "counts-rows", "counts-packed",
                                  "counts-values", "boundaries"])
def test_deferred_checks_run_before_megatron_reduces_the_gradients(megatron_cpu, case):
    from megatron_agg import NonFiniteLossError

    config = _Config()
    hook = DeferredLossHook("seq-mean-token-mean")
    hook.install(config)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    loss = torch.ones(2, 4)
    kwargs = {}
    error, match = ValueError, None
    if case == "nan-valid":
        loss[0, 0] = float("nan")
        error, match = NonFiniteLossError, r"valid token's loss was NaN.*micro-batch\(es\) \[0\]"
    elif case == "nan-masked":
        loss[0, 3] = float("nan")
        error, match = NonFiniteLossError, "masked positions.*mask the \\*inputs\\*"
    elif case == "mask-values":
        mask[0, 0] = 0.5
        match = "Mask values other than 0 and 1.*1 value"
    elif case == "counts-rows":  # counts of a packed row handed with an unpacked mask
        kwargs["sequence_token_counts"] = torch.tensor([1.0, 1.0, 1.0])
        with pytest.raises(ValueError, match=r"holds 2 sequence\(s\).*packed_seqs in both"):
            hook.loss_func(mask, **kwargs)(loss)
        return
    elif case == "counts-packed":  # a packed row whose counts forgot the packing: no IndexError
        row = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 0]])
        kwargs = {"packed_seqs": PackedSequences([0, 3, 6], [0, 4, 8]),
                  "sequence_token_counts": DeferredLossHook.sequence_token_counts(row)}
        with pytest.raises(ValueError, match=r"has shape \(1,\).*holds 2 sequence"):
            hook.loss_func(row, **kwargs)(torch.ones(1, 8))
        return
    elif case == "counts-values":
        kwargs["sequence_token_counts"] = torch.tensor([5.0, 3.0])
        match = "sequence_token_counts do not fit"
    elif case == "boundaries":
        row = torch.ones(1, 8)
        kwargs["packed_seqs"] = PackedSequences([0, 5, 3], [0, 6, 4])  # not cumulative
        mask, loss = row, torch.ones(1, 8)
        match = "not cumulative"
    hook.loss_func(mask, **kwargs)(loss)  # nothing is raised per micro-batch (no host sync)
    with pytest.raises(error, match=match):
        config.finalize_model_grads_func([])  # the wrapped finalize: before Megatron's own
    hook.loss_func(torch.ones(2, 4))(torch.ones(2, 4))  # the next step starts clean
    assert config.finalize_model_grads_func([]) == "finalized"


def test_hybrid_context_parallelism_is_refused_before_the_first_loss(megatron_cpu):
    config = _Config()
    config.hybrid_context_parallel = True
    with pytest.raises(ValueError, match="does not support hybrid context parallelism"):
        DeferredLossHook("token-mean").install(config)
