"""megatron_agg.fsdp: FSDP2 gradients equal the single-process reference (4 CPU ranks)."""

import pytest
import torch

from conftest import REPO, SUMMARY, torchrun


def test_fsdp_path_is_exact_and_controls_fail():
    proc = torchrun(4, [str(REPO / "tests" / "support" / "fsdp_check.py")], timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(("ok  ", "FAIL"))]
    assert proc.returncode == 0 and len(lines) == 29, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert all(l.startswith("ok") for l in lines), "\n".join(lines)
    SUMMARY.append(f"fsdp: {len(lines) - 3} exact FSDP2 configurations (DP4, DP2×SP2; every mode incl. token-sum and "
                   "prompt-mean, two terms, a term over its own mask with exact metrics, gradient accumulation over "
                   "uneven micro-batches) and 3 failing controls")


def test_prepare_requires_fsdp_and_is_undone(one_rank_world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from megatron_agg.fsdp import FSDPLossHook

    hook = FSDPLossHook("token-mean")
    with pytest.raises(ValueError, match="found no FSDP2 module"):
        hook.prepare(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"Call FSDPLossHook.prepare\(model\)"):
        with hook.step([torch.ones(1, 2)]):
            pass
    model = torch.nn.Linear(2, 2)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    group = model._get_fsdp_state()._fsdp_param_groups[0]
    before = (group.gradient_divide_factor, group.force_sum_reduction_for_comms)
    hook.prepare(model)
    hook.prepare(model)  # idempotent
    assert group.gradient_divide_factor == 1.0
    hook.restore()
    assert (group.gradient_divide_factor, group.force_sum_reduction_for_comms) == before
    with pytest.raises(ValueError, match="grad_group"):
        FSDPLossHook("token-mean", sp_group=object())
