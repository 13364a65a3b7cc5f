import pytest

from megatron_agg import AggMode, LossHook, LossReturn, LossTerm


def test_modes_parse_from_strings_and_members():
    for mode in AggMode:
        assert AggMode.parse(mode.value) is mode
        assert AggMode.parse(mode) is mode
        assert str(mode) == mode.value


@pytest.mark.parametrize("bad", ["token_mean", "seq-mean", "", None, 3])
def test_unknown_mode_lists_the_valid_ones(bad):
    with pytest.raises(ValueError) as info:
        AggMode.parse(bad)
    message = str(info.value)
    for mode in AggMode:
        assert repr(mode.value) in message


def test_hook_rejects_unknown_mode_with_the_choices():
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        LossHook("mean")


def test_loss_term_validation():
    assert LossTerm("token-mean").agg_mode is AggMode.TOKEN_MEAN
    with pytest.raises(ValueError, match="only applies to mode 'seq-mean-token-sum-norm'"):
        LossTerm("token-mean", loss_scale_factor=4.0)
    with pytest.raises(ValueError, match="positive finite"):
        LossTerm("seq-mean-token-sum-norm", loss_scale_factor=0)
    with pytest.raises(ValueError, match="finite number"):
        LossTerm("token-mean", weight=float("nan"))
    with pytest.raises(ValueError, match="True or False"):
        LossTerm("token-mean", exclude_fully_masked_seqs=1)


def test_hook_terms_and_mode_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        LossHook("token-mean", terms={"a": LossTerm("token-mean")})
    with pytest.raises(ValueError, match="reserved"):
        LossHook(terms={"loss": LossTerm("token-mean"), "kl": LossTerm("token-mean")})
    with pytest.raises(ValueError, match="non-empty mapping"):
        LossHook(terms={})
    with pytest.raises(ValueError, match="LossTerm objects"):
        LossHook(terms={"a": "token-mean"})


def test_loss_return_parse():
    assert LossReturn.parse("2-tuple") is LossReturn.TWO_TUPLE
    with pytest.raises(ValueError, match="'2-tuple', '3-tuple'"):
        LossHook("token-mean", loss_return="4-tuple")
