"""The step's one collective: the all-reduce of the local totals, and the data-parallel ranks'
agreement on the set-up that rides in it.

:func:`start_totals` starts, per step, **one** all-reduce (SUM, float64) over the pure data-parallel
group of ``[totals..., agreement triples..., two flags]`` (the triples and flags:
:func:`megatron_agg.agreement.step_block`). An entry point's first step, a step whose set-up changed
(:class:`AgreementTracker`) and a step whose inputs this rank refused read the block before the
schedule (one host sync) and raise on every rank on a disagreement; otherwise the all-reduce is
awaited at the first loss. A rank whose totals' length changed first pairs with the others through
a block of the length the group last used, so that no rank is ever left alone in a collective.

The fingerprints of a set-up (:func:`megatron_agg.agreement.set_up_fingerprints`) are the arithmetic of
:mod:`megatron_agg.agreement`; the collectives go through :class:`~megatron_agg.groups.ParallelGroups`.
Every other collective of a step is the end-of-step check's (:mod:`megatron_agg.checks`).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .agreement import AGREEMENT_FIELDS, disagreements, flag_counts, step_block
from .groups import ParallelGroups
from .step_math import TotalsLayout

__all__ = ["AgreementTracker", "StepStart", "start_totals", "raise_if_disagree"]


class AgreementTracker:
    """Remembers the last set-up whose agreement over the DP ranks was checked synchronously, so
    that only the first step and steps whose set-up changed pay for the synchronous check."""

    def __init__(self, policy: str = "on-change") -> None:
        self.policy = policy
        self._verified: Dict[Any, Tuple] = {}
        self._lengths: set = set()

    def needs_sync(self, key: Any, prints: Sequence[Optional[float]]) -> bool:
        return self.policy == "every-step" or self._verified.get(key) != tuple(prints)

    def verified(self, key: Any, prints: Sequence[Optional[float]]) -> None:
        self._verified[key] = tuple(prints)

    def needs_length_check(self, key: Any, layout: TotalsLayout) -> bool:
        """Whether this entry point has yet to check the ranks' agreement on a set-up of this totals
        layout over this group in a small all-reduce of its own (its first step, and the first step
        of each layout): afterwards the agreement rides in the totals (:func:`start_totals`)."""
        return (key, layout) not in self._lengths

    def length_verified(self, key: Any, layout: TotalsLayout) -> None:
        self._lengths.add((key, layout))

    @classmethod
    def of_group(cls, dp_group: Any, policy: str = "on-change") -> "AgreementTracker":
        """The tracker that lives with the data-parallel process group ``dp_group`` (held weakly), for
        an entry point rebuilt every step (:class:`~megatron_agg.StepShares`), which cannot keep one
        itself. The DP group is what the caller keeps across steps (Megatron's ``parallel_state`` or
        ``pg_collection``) and what must agree; not the model config, which a ``StepShares`` over
        ``groups=`` need not have. A new group starts with no memory on all of its ranks at once (its
        first step checks synchronously, as does any step whose set-up changed); the memory dies with
        the group, so a later group at the same address inherits none. A group that cannot be weakly
        referenced gets a fresh tracker (a synchronous check) every time. ``policy`` is the caller's
        ``agreement`` option of this step (``"every-step"``: check synchronously all the same)."""
        try:
            tracker = _GROUP_TRACKERS.get(dp_group)
            if tracker is None:
                tracker = _GROUP_TRACKERS[dp_group] = cls()
        except TypeError:
            tracker = cls()
        tracker.policy = policy
        return tracker


#: The agreement memory of each data-parallel group (:meth:`AgreementTracker.of_group`).
_GROUP_TRACKERS: "weakref.WeakKeyDictionary[Any, AgreementTracker]" = weakref.WeakKeyDictionary()


def raise_if_disagree(block: torch.Tensor, entry: str, where: str) -> None:
    """Read a summed agreement block (one host sync) and raise ``ValueError`` naming the options."""
    problem = _disagreement(block, entry, where)
    if problem:
        raise ValueError(problem)


def _disagreement(block: torch.Tensor, entry: str, where: str) -> Optional[str]:
    differing = [f for f, d in zip(AGREEMENT_FIELDS, disagreements(block).tolist()) if d]
    if differing:
        return (
            f"The data-parallel ranks of this step disagree on: {', '.join(differing)} ({where}). Every "
            f"rank must build the same {entry} (terms, modes, options, loss_return) and the same "
            "Megatron config; nothing was computed. Raised on every rank of the group."
        )
    if block.numel() > 3 * len(AGREEMENT_FIELDS) and flag_counts(block)[0]:
        return ("A data-parallel rank of this step refused its inputs (its error says which); nothing was "
                "computed. Raised on every rank of the group.")
    return None


#: The totals layout each data-parallel group (the process group object: a new group starts
#: empty on every rank) last all-reduced in this process. It is set only after a collective every
#: rank of the group took part in, so all of them hold the same entry: a rank whose set-up (and so
#: its totals' length) changed alone pairs its first collective with the others' through it
#: (:func:`start_totals`).
_LAST_LAYOUT: "weakref.WeakKeyDictionary[Any, TotalsLayout]" = weakref.WeakKeyDictionary()


def _remember(group: Any, layout: Optional[TotalsLayout] = None) -> Optional[TotalsLayout]:
    """The layout ``group`` last all-reduced (``None``: none, or a group that cannot be
    weak-referenced, which is then new at every step); with ``layout``, remember it."""
    try:
        if layout is not None:
            _LAST_LAYOUT[group] = layout
        return _LAST_LAYOUT.get(group)
    except TypeError:
        return None


@dataclass
class StepStart:
    """What :func:`start_totals` started."""

    #: ``[totals, step block]`` being all-reduced (``None``: no all-reduce of this rank's totals).
    reduced: Optional[torch.Tensor] = None
    work: Any = None
    collectives: int = 0
    wait_seconds: float = 0.0
    #: A problem to raise at the end of the step, on every rank (``StepChecks.inputs``): the step
    #: runs on, with stand-ins, because another rank runs its schedule without reading the block.
    deferred: Optional[str] = None


def start_totals(groups: ParallelGroups, layout: TotalsLayout, totals: torch.Tensor,
                 prints: Sequence[Optional[float]], entry: str, *, tracker: AgreementTracker,
                 key: Any, async_ok: bool, refused: Optional[Exception] = None,
                 where: str = "checked before the step") -> StepStart:
    """Start the step's one all-reduce (SUM) over the data-parallel group of ``[totals, step block]``
    (:func:`~megatron_agg.agreement.step_block`: the set-up's fingerprints, whether this rank
    ``refused`` its inputs, whether it reads the block before the schedule).

    This rank reads the block before the schedule (one host sync) on the first step and whenever
    its set-up changed or it refused its inputs. A disagreement or a refusal then raises at once on
    every rank if every rank read the block; if some rank runs its schedule unread (its set-up did
    not change), this rank runs the step too (``deferred``; on stand-in inputs) and every rank raises
    at the step's end (:class:`~megatron_agg.checks.StepChecks`), before the optimizer step — never
    a rank left alone in a collective. A rank whose totals' length changed first sends a block of
    the length the group last used (:data:`_LAST_LAYOUT`; the first time, no totals), so that it
    pairs with the ranks that did not change; a new length is used only once every rank agreed.
    An entry point's first step (of each layout) sends that block too (:class:`AgreementTracker`).
    """
    start = StepStart()
    if groups.dp_size == 1:
        if refused is not None:
            raise refused
        return start
    device = totals.device

    def all_reduce(vector: torch.Tensor, async_op: bool) -> Any:
        t0 = time.perf_counter()
        work = groups.sum_over_dp(vector, async_op=async_op)
        if not async_op:  # a blocking all-reduce is a wait as well
            start.wait_seconds += time.perf_counter() - t0
        start.collectives += 1
        return work

    def outcome(block: torch.Tensor) -> Optional[str]:
        block = block.cpu()  # the one host sync
        problem = _disagreement(block, entry, where)
        if problem is None:
            return None
        if refused is not None:
            problem = (f"{refused} (Refused on this rank; raised on every rank of the data-parallel group, "
                       "before the step.)")
        if flag_counts(block)[1] == 0:  # every rank read this block: all raise now, before the schedule
            raise ValueError(problem) from refused
        return problem

    last = _remember(groups.dp)
    sync = refused is not None or tracker.needs_sync(key, prints)
    if last != layout or tracker.needs_length_check(key, layout):
        length = 0 if last is None else last.size
        block = torch.cat([torch.zeros(length, dtype=torch.float64, device=device),
                           step_block(prints, refused is not None, True, device)])
        all_reduce(block, False)
        start.deferred = outcome(block[length:])
        if start.deferred is not None:
            return start  # this rank's totals are not the step's: it runs on its own, and raises at the end
        sync = False  # every rank read this block and agreed: the set-up is verified
    start.reduced = torch.cat([totals, step_block(prints, refused is not None, sync, device)])
    start.work = all_reduce(start.reduced, async_ok and not sync)
    if sync:
        if start.work is not None:
            start.work.wait()
            start.work = None
        start.deferred = outcome(start.reduced[layout.size:])
    _remember(groups.dp, layout)
    if start.deferred is None:
        tracker.verified(key, prints)
        tracker.length_verified(key, layout)
    return start
