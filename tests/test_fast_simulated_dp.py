"""The fast tier's core proof: several data-parallel ranks simulated in one process, gradients
against the single-process definition, in seconds.

Each simulated rank is a thread that runs the real :class:`megatron_agg.LossHook` (its real engine,
totals, denominators and shares) around a stand-in of Megatron's schedule that calls the
installed release's own ``schedules.forward_step_calc_loss`` on every micro-batch and backpropagates
what it returns. The hook's collectives go through :class:`SimulatedGroups`, a
:class:`~megatron_agg.extend.ParallelGroups` whose sums are taken over the threads (a barrier, no
``torch.distributed``). After the step the ranks' gradients are combined as Megatron's DDP does
(the mean over dp_cp, or the sum with ``calculate_per_token_loss``) and divided as
``finalize_model_grads`` does (by ``Σ num_tokens`` on the per-token 3-tuple path): the DDP and
finalize columns of :mod:`megatron_agg.megatron.averaging`, which the multi-rank launches (the smoke launch
of this tier, the matrix of the full suite) prove against Megatron's real DDP and finalize.

Masks, sequence counts and token counts differ between micro-batches and ranks (fully masked rows
and empty micro-batches included), so a mean of local means, totals counted locally, or a factor
``F`` that is off by 1 % all miss: the controls at the end assert that they do, so this comparison
can fail.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional

import pytest
import torch

from megatron_agg import AggMode, LossHook, LossReturn, LossTerm, reference_loss
from megatron_agg.megatron.averaging import GradReduction, MegatronAveraging
from megatron_agg.groups import ParallelGroups
from megatron_agg.scaling import MegatronScaling

pytestmark = pytest.mark.fast

HIDDEN = 4


class _Hub:
    """One SUM over ``size`` threads at a time (a barrier on each side of the read)."""

    def __init__(self, size: int, times_local: bool = False) -> None:
        self.size, self.times_local = size, times_local
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: List[Optional[torch.Tensor]] = [None] * size

    def all_reduce(self, rank: int, tensor: torch.Tensor) -> None:
        if self.times_local:  # the classic bug: local totals × dp instead of the DP sum
            tensor.mul_(self.size)
            return
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        total = torch.stack([s for s in self.slots]).sum(0)  # type: ignore[misc]
        self.barrier.wait()
        tensor.copy_(total)


class _Done:
    def wait(self) -> None:
        return None


class SimulatedGroups(ParallelGroups):
    """``dp = dp_cp`` of ``hub.size`` simulated ranks (threads); no CP, TP or PP."""

    @property
    def dp_size(self) -> int:
        return self.dp[0].size

    @property
    def dp_cp_size(self) -> int:
        return self.dp[0].size

    @property
    def cp_size(self) -> int:
        return 1

    @property
    def cp_rank(self) -> int:
        return 0

    @property
    def is_last_pipeline_stage(self) -> bool:
        return True

    def _sum(self, tensor: torch.Tensor) -> int:
        hub, rank = self.dp
        if hub.size > 1:
            hub.all_reduce(rank, tensor)
        return int(hub.size > 1)

    def sum_over_dp(self, tensor: torch.Tensor, async_op: bool = True) -> Optional[Any]:
        self._sum(tensor)
        return _Done() if async_op and self.dp_size > 1 else None

    def step_groups(self) -> List[Any]:
        return [self.dp] if self.dp_size > 1 else []

    def loss_groups(self) -> List[Any]:
        return self.step_groups()

    def sum_over_step(self, tensor: torch.Tensor, stage_only: bool = False) -> int:
        return self._sum(tensor)

    def sum_over_dp_cp(self, tensor: torch.Tensor) -> int:
        return self._sum(tensor)


PATHS = {  # Megatron's three loss paths: (loss_func returns, calculate_per_token_loss)
    "2-tuple": (LossReturn.TWO_TUPLE, False),
    "3-tuple": (LossReturn.THREE_TUPLE, False),
    "3-tuple+per-token": (LossReturn.THREE_TUPLE, True),
}


def _table_scaling(path: str, bug_factor: float = 1.0):
    """A ``scaling=`` class for LossHook: Megatron's averaging of ``path`` (DDP's reduction as the
    rules table says), without a Megatron model; ``bug_factor`` ≠ 1 injects a wrong ``F``."""
    loss_return, per_token = PATHS[path]

    class TableScaling(MegatronScaling):
        @classmethod
        def for_step(cls, model, loss_return_, num_microbatches, groups):
            return cls(MegatronAveraging(loss_return, per_token, num_microbatches, 1, groups.dp_cp_size,
                                         GradReduction.SUM if per_token else GradReduction.MEAN))

        def multipliers(self, num_tokens, total_tokens):
            return super().multipliers(num_tokens, total_tokens) * bug_factor

    return TableScaling


def _batches(dp: int, seed: int = 0):
    """Per rank, per micro-batch: inputs ``[b, s, H]``, 0/1 masks ``[b, s]`` and group ids; the
    micro-batch count, rows and lengths differ between ranks, with fully masked rows and an all-masked
    micro-batch."""
    g = torch.Generator().manual_seed(seed)
    ranks = []
    group = 0
    for r in range(dp):
        mbs = []
        for j in range(2 + r % 2):
            b, s = 1 + (r + j) % 3, 3 + (2 * r + j) % 5
            x = torch.randn(b, s, HIDDEN, generator=g, dtype=torch.float64)
            mask = (torch.rand(b, s, generator=g) < 0.6).to(torch.float32)
            if b > 1:
                mask[-1] = 0  # a fully masked row
            if r == dp - 1 and j == 0:
                mask.zero_()  # an all-masked micro-batch
            ids = torch.tensor([(group + i) // 2 for i in range(b)])
            group += b
            mbs.append((x, mask, ids))
        ranks.append(mbs)
    return ranks, (group + 1) // 2


def _per_token(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(x @ weight)  # [b, s]


def _megatron_schedule(calc_loss, weight, mbs, loss_func_of, config, num_tokens_out: list):
    """The stand-in schedule: forward, Megatron's own ``forward_step_calc_loss``, backward."""
    for j, (x, mask, _) in enumerate(mbs):
        out = _per_token(weight, x)
        loss, nt = calc_loss(object(), out, loss_func_of(j, mask), config, None, False, len(mbs), [],
                             cp_group_size=1, is_last_stage=True)
        num_tokens_out.append(nt)
        loss.backward()


def simulate_step(term: LossTerm, path: str, dp: int, *, bug: Optional[str] = None, seed: int = 0) -> float:
    """One step on ``dp`` simulated ranks; returns the relative gradient error against the
    single-process definition. ``bug``: ``"F*1.01"``, ``"local-totals-x-dp"`` or
    ``"mean-of-microbatch-means"`` (Megatron's classic per-micro-batch mean, no hook)."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel import schedules

    loss_return, per_token = PATHS[path]
    ranks, num_groups = _batches(dp, seed)
    prompt = term.agg_mode is AggMode.PROMPT_MEAN
    weight0 = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    hub = _Hub(dp, times_local=bug == "local-totals-x-dp")
    grads: List[Optional[torch.Tensor]] = [None] * dp
    num_tokens: List[list] = [[] for _ in range(dp)]
    errors: List[BaseException] = []
    config = SimpleNamespace(calculate_per_token_loss=per_token, timers=None, grad_scale_func=None)

    def rank_main(r: int) -> None:
        try:
            weight = weight0.clone().requires_grad_(True)
            mbs = ranks[r]
            if bug == "mean-of-microbatch-means":
                def loss_func_of(j, mask):
                    def plain(out):
                        masked = (out * mask).sum()
                        if loss_return is LossReturn.TWO_TUPLE:
                            return masked / mask.sum().clamp(min=1), {}
                        return masked, mask.sum().to(torch.int), {}
                    return plain
                _megatron_schedule(schedules.forward_step_calc_loss, weight, mbs, loss_func_of, config, num_tokens[r])
            else:
                hook = LossHook(terms={"loss": term}, loss_return=loss_return.value, num_groups=num_groups if prompt else None,
                                group_scope="global" if prompt else None,
                                groups=SimulatedGroups(dp=(hub, r), cp=None, dp_cp=(hub, r), pp=None),
                                scaling=_table_scaling(path, 1.01 if bug == "F*1.01" else 1.0))

                def forward_backward(**_):
                    _megatron_schedule(schedules.forward_step_calc_loss, weight, mbs,
                                       lambda j, mask: hook.loss_func(mask), config, num_tokens[r])

                hook.wrap(forward_backward)(num_microbatches=len(mbs), loss_masks=[m for _, m, _ in mbs],
                                            **({"group_ids": [i for _, _, i in mbs]} if prompt else {}))
            grads[r] = weight.grad.clone()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            hub.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(dp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    # DDP, then finalize_model_grads (the table's columns)
    total = torch.stack(grads).sum(0)  # type: ignore[arg-type]
    grad = total if per_token else total / dp
    if path == "3-tuple+per-token":
        grad = grad / max(int(sum(int(nt) for nts in num_tokens for nt in nts)), 1)

    weight = weight0.clone().requires_grad_(True)
    flat = [mb for mbs in ranks for mb in mbs]
    ref = reference_loss([_per_token(weight, x) for x, _, _ in flat], [m for _, m, _ in flat], term,
                         group_ids=[i.tolist() for _, _, i in flat] if prompt else None)
    ref.backward()
    return float((grad - weight.grad).norm() / weight.grad.norm().clamp(min=1e-30))


TERMS = [LossTerm(m) for m in AggMode if m is not AggMode.PROMPT_MEAN] + [
    LossTerm("seq-mean-token-mean", exclude_fully_masked_seqs=True),
    LossTerm("prompt-mean"), LossTerm("prompt-mean", exclude_fully_masked_seqs=True),
]


@pytest.mark.parametrize("dp", [1, 2, 3])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("term", TERMS, ids=lambda t: t.agg_mode.value + ("+excl" if t.exclude_fully_masked_seqs else ""))
def test_simulated_data_parallel_step_is_exact(term, path, dp):
    assert simulate_step(term, path, dp) < 1e-6


@pytest.mark.parametrize("bug", ["F*1.01", "local-totals-x-dp", "mean-of-microbatch-means"])
@pytest.mark.parametrize("path", list(PATHS))
def test_injected_scaling_bugs_miss(bug, path):
    """The controls: each classic scaling bug gives a gradient error far above the tolerance (in a
    sequence mean: on the per-token path Megatron's own token mean is right, and a token mean's ``T``
    cancels out of ``S·F``, so only a wrong ``F`` shows there)."""
    misses = [simulate_step(LossTerm(mode), path, 3, bug=bug) for mode in ("seq-mean-token-mean", "seq-mean-token-sum")]
    assert min(misses) > 1e-3, misses
