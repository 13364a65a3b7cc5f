"""Which data-parallel wrapper holds the model, and what the scaling makes of it (the gradients
under each wrapper are compared with the single-process reference in tests/test_features.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_agg.megatron.averaging import (WRAPPERS, GradReduction, LossReturn, MegatronAveraging, Wrapper,
                                             loss_multiplier, wrapper_behaviour)
from megatron_agg.megatron.model_setup import step_wrapper, wrapper_of


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


# ---------------------------------------------------------------------------------------------
# Upstream defects: refused, and refused exactly where the wrapper's code (measured per release by
# tests/support/wrapper_probe.py) makes a plain Megatron run wrong
# ---------------------------------------------------------------------------------------------
import itertools
import math
import sys
from pathlib import Path
from types import SimpleNamespace

from megatron_agg.megatron import model_setup
from megatron_agg.megatron.wrapper_defects import WRAPPER_DEFECTS, WrapperSetup, find_wrapper_defect

sys.path.insert(0, str(Path(__file__).parent / "support"))
MATRIX_RELEASES = ("0.13", "0.14", "0.15", "0.16", "0.17", "0.18", "0.19", "0.20")


def _probe():
    import wrapper_probe

    return wrapper_probe


def _mfsdp(strategy, **ddp):
    chunk = MFSDP()
    fields = dict(data_parallel_sharding_strategy=strategy, overlap_grad_reduce=False, average_in_collective=False,
                  gradient_reduce_div_fusion=True, grad_reduce_in_fp32=True)
    chunk.ddp_config = SimpleNamespace(**{**fields, **ddp})
    return chunk


def _release(monkeypatch, release):
    monkeypatch.setattr(model_setup, "megatron_core_version", lambda: release + ".1")
    monkeypatch.setattr(model_setup, "minor_release", lambda: release)


def test_the_defect_table_matches_the_per_release_prediction_of_every_probed_set_up():
    """For every release × Megatron-FSDP strategy × path × no_sync × overlap × division fusion:
    the table refuses exactly the set-ups whose factor (predicted from the wrapper's code and
    measured by the probe on 0.13-0.19) is neither 1 nor a crash of Megatron's own."""
    probe = _probe()
    checked = refused = 0
    for release, strategy, path, no_sync, overlap, fusion in itertools.product(
            MATRIX_RELEASES, probe.STRATEGIES, probe.PATHS, (False, True), (False, True), (False, True)):
        if overlap and not no_sync:
            continue  # Megatron-LM sets no_sync_func with overlap_grad_reduce
        for m in (1, 3):
            factor = probe.expected_factor(release + ".0", f"megatron-fsdp/{strategy}", path, 4, m, no_sync, overlap,
                                           fusion, 57)
            if factor == probe.CRASH:
                continue
            setup = WrapperSetup.of(strategy, no_sync=no_sync, overlap=overlap, per_token=path.per_token,
                                    average_in_collective=path.average_in_collective, div_fusion=fusion,
                                    low_precision_grads=False)
            defect = find_wrapper_defect(Wrapper.MEGATRON_FSDP, release, setup)
            wrong = math.isnan(factor) or factor != 1.0
            assert (defect is not None) == wrong, (release, strategy, path, no_sync, overlap, fusion, m, factor, defect)
            checked += 1
            refused += wrong
    assert checked > 500 and refused > 50


def test_every_defect_names_a_release_range_and_a_way_out():
    for defect in WRAPPER_DEFECTS:
        assert any(defect.covers(r) for r in MATRIX_RELEASES)
        assert defect.what and defect.instead and defect.strategies
    assert not WRAPPER_DEFECTS[0].covers("0.13") and WRAPPER_DEFECTS[0].covers("0.17")
    assert not WRAPPER_DEFECTS[0].covers("0.18") and WRAPPER_DEFECTS[1].covers("0.19")
    assert not WRAPPER_DEFECTS[1].covers("0.20")  # fixed in Megatron-LM main (0.20), measured


@pytest.mark.parametrize("release, strategy, no_sync, overlap, refused", [
    ("0.16", "optim", True, True, "adds the reduce-scattered shard"),  # Megatron-LM --overlap-grad-reduce
    ("0.16", "optim", False, False, None),  # Megatron-LM without it: exact
    ("0.16", "no_shard", False, False, "never reduces the gradients"),
    ("0.16", "no_shard", True, True, None),
    ("0.19", "optim", True, False, "without overlap_grad_reduce: not a scaling"),
    ("0.19", "optim", True, True, None),
    ("0.19", "optim_grads", True, False, None),
    ("0.20", "optim", True, False, None),  # fixed in Megatron-LM main (measured by the wrapper probe)
    ("0.20", "no_shard", True, False, None),
])
def test_a_step_with_a_defective_megatron_fsdp_set_up_is_refused_before_it_runs(
        monkeypatch, release, strategy, no_sync, overlap, refused):
    _release(monkeypatch, release)
    config = SimpleNamespace(calculate_per_token_loss=False, no_sync_func=(lambda: None) if no_sync else None,
                             bf16=False, fp8=None)
    chunks = [_mfsdp(strategy, overlap_grad_reduce=overlap)]
    if refused is None:
        model_setup.refuse_wrapper_defects(Wrapper.MEGATRON_FSDP, chunks, config)
        return
    with pytest.raises(ValueError, match=f"megatron-fsdp with data_parallel_sharding_strategy='{strategy}' in "
                                         f"megatron-core {release}.1 .*{refused}.*upstream defect.*Instead: "):
        model_setup.refuse_wrapper_defects(Wrapper.MEGATRON_FSDP, chunks, config)


def test_bf16_gradients_count_as_an_unfused_division_in_0_15(monkeypatch):
    _release(monkeypatch, "0.15")
    chunks = [_mfsdp("optim_grads", grad_reduce_in_fp32=False)]
    config = SimpleNamespace(calculate_per_token_loss=False, no_sync_func=None, bf16=True, fp8=None)
    with pytest.raises(ValueError, match="instead of the bucket"):
        model_setup.refuse_wrapper_defects(Wrapper.MEGATRON_FSDP, chunks, config)
    chunks[0].ddp_config.grad_reduce_in_fp32 = True  # fp32 buffer: fused PREMUL_SUM, exact
    model_setup.refuse_wrapper_defects(Wrapper.MEGATRON_FSDP, chunks, config)
    config.calculate_per_token_loss = True  # no 1/dp at all
    chunks[0].ddp_config.grad_reduce_in_fp32 = False
    model_setup.refuse_wrapper_defects(Wrapper.MEGATRON_FSDP, chunks, config)


def test_the_deferred_mode_refuses_the_same_defects(monkeypatch):
    from megatron_agg import DeferredLossHook

    _release(monkeypatch, "0.16")
    chunk = _mfsdp("no_shard")
    config = SimpleNamespace(calculate_per_token_loss=True, no_sync_func=None, bf16=False, fp8=None)
    monkeypatch.setattr(model_setup, "model_config", lambda m: config)
    from megatron_agg.megatron import deferred_rules

    monkeypatch.setattr(deferred_rules, "model_config", lambda m: config)
    monkeypatch.setattr(deferred_rules, "minor_release", lambda: "0.16")
    with pytest.raises(ValueError, match="never reduces the gradients"):
        DeferredLossHook.check_wrapper([chunk])
