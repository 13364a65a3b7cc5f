"""Which data-parallel wrapper holds the model, and what the scaling makes of it (the gradients
under each wrapper are compared with the single-process reference in tests/test_features.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_agg.averaging import (WRAPPERS, GradReduction, LossReturn, MegatronAveraging, Wrapper,
                                    loss_multiplier, wrapper_behaviour)
from megatron_agg.integration import step_wrapper, wrapper_of


def _chunk_class(module: str, name: str, ddp_config=True):
    """A stand-in chunk class defined where Megatron defines its wrapper."""
    cls = type(name, (torch.nn.Module,), {})
    cls.__module__, cls.__qualname__ = module, name

    def __init__(self):
        torch.nn.Module.__init__(self)
        if ddp_config:
            self.ddp_config = object()

    cls.__init__ = __init__
    return cls


DDP = _chunk_class("megatron.core.distributed.distributed_data_parallel", "DistributedDataParallel")
TFSDP = _chunk_class("megatron.core.distributed.torch_fully_sharded_data_parallel", "TorchFullyShardedDataParallel")
MFSDP = _chunk_class("megatron.core.distributed.fsdp.mcore_fsdp_adapter", "FullyShardedDataParallel")
MFSDP_013 = _chunk_class("megatron.core.distributed.custom_fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel")


def test_wrappers_are_told_apart_by_class_and_subclass():
    assert wrapper_of(DDP()) is Wrapper.DDP
    assert wrapper_of(TFSDP()) is Wrapper.TORCH_FSDP2
    assert wrapper_of(MFSDP()) is Wrapper.MEGATRON_FSDP and wrapper_of(MFSDP_013()) is Wrapper.MEGATRON_FSDP
    assert wrapper_of(type("MyDDP", (DDP,), {})()) is Wrapper.DDP  # a user's subclass
    assert wrapper_of(torch.nn.Linear(2, 2)) is None  # unwrapped
    unknown = _chunk_class("my_trainer.parallel", "MyDataParallel")
    with pytest.raises(ValueError, match="does not know the data-parallel wrapper my_trainer.parallel.MyDataParallel"):
        wrapper_of(unknown())
    with pytest.raises(ValueError, match="different data-parallel wrappers \\(ddp, torch-fsdp2\\)"):
        step_wrapper([DDP(), TFSDP()])
    assert step_wrapper([TFSDP(), TFSDP()]) is Wrapper.TORCH_FSDP2


def test_every_wrapper_has_a_documented_row():
    assert set(WRAPPERS) >= set(Wrapper)
    for wrapper in Wrapper:
        assert wrapper_behaviour(wrapper, "0.16").note


@pytest.mark.parametrize("dp_cp", [1, 2, 4])
def test_torch_fsdp2_per_token_path_cancels_its_mean_not_the_token_count(dp_cp):
    """TorchFullyShardedDataParallel: FSDP2 means over dp_cp and finalize's ÷ Σnt never reaches
    the gradients, so the 3-tuple per-token share is scaled by dp_cp, not by T."""
    b = wrapper_behaviour(Wrapper.TORCH_FSDP2)
    avg = MegatronAveraging(LossReturn.THREE_TUPLE, True, 3, 1, dp_cp, b.per_token_reduction,
                            finalize_divides=b.finalize_divides, wrapper=Wrapper.TORCH_FSDP2)
    total = torch.tensor(57)
    assert float(loss_multiplier(avg, torch.tensor([5, 7, 9]), total)) == pytest.approx(dp_cp)
    ddp = wrapper_behaviour(Wrapper.DDP)
    avg_ddp = MegatronAveraging(LossReturn.THREE_TUPLE, True, 3, 1, dp_cp, ddp.per_token_reduction)
    assert float(loss_multiplier(avg_ddp, torch.tensor([5, 7, 9]), total)) == pytest.approx(57)
    # the 2-tuple path under per-token loss: FSDP2 means where DDP sums
    two = MegatronAveraging(LossReturn.TWO_TUPLE, True, 3, 1, dp_cp, b.per_token_reduction,
                            finalize_divides=False, wrapper=Wrapper.TORCH_FSDP2)
    assert float(loss_multiplier(two, torch.tensor(0), total)) == pytest.approx(3 * dp_cp)
    assert b.reduction is GradReduction.MEAN


def test_deferred_mode_refuses_a_wrapper_that_drops_finalizes_division():
    from megatron_agg import DeferredLossHook

    with pytest.raises(ValueError, match="TorchFullyShardedDataParallel \\(torch-fsdp2\\), whose scale_gradients does nothing"):
        DeferredLossHook.check_wrapper([TFSDP()])
    DeferredLossHook.check_wrapper([DDP()])
    DeferredLossHook.check_wrapper(object())  # a config alone: nothing to check (the step's model is, in finalize)
