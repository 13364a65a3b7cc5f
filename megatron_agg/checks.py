"""The end-of-step check: what a step found, read with one host sync, raised on every rank.

During a step the engine records device-side findings without reading them: per micro-batch
and term whether the share of the loss is finite (a NaN/Inf at a *valid* token) and whether the
per-token loss was finite at all (a NaN/Inf at a *masked* position, which poisons the gradients
of the op that produced it), mask tokens that differ from ``loss_masks``, mask values other than
0/1, packing boundaries that do not describe the row, and (deferred mode) per-sequence counts
that do not fit the micro-batch. :meth:`StepChecks.finish` then

1. folds them into a fixed-length summary ``[problem counts..., agreement triples...]`` (float64),
2. sums it over every rank of the step (:meth:`ParallelGroups.sum_over_step`: one all-reduce over
   the data×context-parallel group and one over the model-parallel group, synchronous; skipped
   with ``raise_on_every_rank=False``),
3. reads the summary and the local details with **one** host sync, and
4. raises on every rank the first problem found anywhere: the rank that saw it names the
   micro-batches and terms, the others say that another rank of the step found it.

So no rank can carry on silently after another found its gradients wrong: every rank raises
before the optimizer step. The cost is the two small collectives and the host sync, per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .agreement import AGREEMENT_FIELDS, agreement_block, disagreements
from .groups import ParallelGroups
from .validation import BOUNDARY_PROBLEMS

__all__ = ["NonFiniteLossError", "StepChecks", "FrontEndNames"]


class NonFiniteLossError(FloatingPointError):
    """A loss term was NaN or Inf on a valid token, or at a masked position (raised after the
    step, naming the term and the micro-batches)."""


@dataclass(frozen=True)
class FrontEndNames:
    """How the entry point's own API is named in messages."""

    entry: str = "LossHook"
    loss_call: str = "hook.loss_func(...)"
    masks: str = "loss_masks"
    #: What to do when the loss function's masks differ from the step's masks.
    mismatch_fix: str = ("pass the same masks, in micro-batch order (CP-local slices of them under context "
                         "parallelism), or set LossHook(check_masks=False) if the loss function's mask is "
                         "meant to differ")


#: The summary's problem kinds, in the order they are reported.
_KINDS = ("evaluations", "mask_values", "boundaries", "counts", "mismatch", "nonfinite_valid", "nonfinite_masked")


@dataclass
class StepChecks:
    """Device-side findings of one step on this rank (see the module docstring)."""

    terms: Sequence[str]
    names: FrontEndNames = field(default_factory=FrontEndNames)
    allow_nonfinite_masked: bool = False
    #: (micro-batch, term, share) — a non-finite share means a NaN/Inf at a valid token.
    shares: List[Tuple[int, str, torch.Tensor]] = field(default_factory=list)
    #: (micro-batch, term, Σ of the detached per-token loss over all positions).
    sums: List[Tuple[int, str, torch.Tensor]] = field(default_factory=list)
    #: (micro-batch, tokens where the loss function's mask differs from loss_masks).
    mismatch: List[Tuple[int, torch.Tensor]] = field(default_factory=list)
    #: (where, entries neither 0 nor 1).
    mask_values: List[Tuple[str, torch.Tensor]] = field(default_factory=list)
    #: (where, [5] counts of BOUNDARY_PROBLEMS).
    boundaries: List[Tuple[str, torch.Tensor]] = field(default_factory=list)
    #: (where, what is wrong, count) for per-sequence counts (deferred mode).
    counts: List[Tuple[str, str, torch.Tensor]] = field(default_factory=list)
    #: A problem known on the host already (the number of loss evaluations).
    evaluations: Optional[str] = None
    #: This rank's fingerprints of the set-up (None entries: no say), for the agreement check.
    fingerprints: Optional[Sequence[Optional[float]]] = None

    # -- recording (no host sync) -----------------------------------------------------------------
    def record_loss(self, microbatch: int, term: str, share: torch.Tensor, per_token: torch.Tensor) -> None:
        """A term's share of micro-batch ``microbatch`` (kept as is: read after the step) and its
        per-token loss (one op: its sum, outside autograd)."""
        self.shares.append((microbatch, term, share))
        if not self.allow_nonfinite_masked:
            with torch.no_grad():
                self.sums.append((microbatch, term, per_token.sum(dtype=torch.float32)))

    # -- the end of the step ----------------------------------------------------------------------
    def finish(self, groups: Optional[ParallelGroups], spread: bool, device: torch.device,
               stage_only: bool = False) -> int:
        """Read everything with one host sync and raise the first problem (see the module
        docstring). Returns the number of collectives issued."""
        with torch.no_grad():
            return self._finish(groups, spread, device, stage_only)

    def _finish(self, groups: Optional[ParallelGroups], spread: bool, device: torch.device,
                stage_only: bool) -> int:
        details = self._details(device)  # per kind, this rank's per-item counts (vectorized)
        local = torch.stack([
            torch.tensor(1.0 if self.evaluations else 0.0, dtype=torch.float64, device=device),
            *[d.sum() for d in details],
        ])
        summary = torch.cat([local, agreement_block(self.fingerprints or [None] * len(AGREEMENT_FIELDS), device)])
        collectives = groups.sum_over_step(summary, stage_only) if (spread and groups is not None) else 0
        values = torch.cat([summary, *details]).tolist()  # the one host sync
        n = len(_KINDS)
        totals = dict(zip(_KINDS, values[:n]))
        block = torch.tensor(values[n : n + 3 * len(AGREEMENT_FIELDS)], dtype=torch.float64)
        differing = [f for f, d in zip(AGREEMENT_FIELDS, disagreements(block).tolist()) if d]
        rest, parts = values[n + 3 * len(AGREEMENT_FIELDS):], []
        for d in details:
            parts.append(rest[: d.numel()])
            rest = rest[d.numel():]
        self._raise(totals, differing, parts)
        return collectives

    def _masked_pairs(self) -> List[Tuple[int, str, torch.Tensor, torch.Tensor]]:
        """``(micro-batch, term, Σ per-token loss, share)`` for every recorded sum."""
        shares = {(j, t): s for j, t, s in self.shares}
        return [(j, t, s, shares[(j, t)]) for j, t, s in self.sums if (j, t) in shares]

    def _details(self, device: torch.device) -> List[torch.Tensor]:
        """Per problem kind after ``evaluations`` (see :data:`_KINDS`), float64 counts per item."""
        empty = torch.zeros(0, dtype=torch.float64, device=device)

        def stack(parts: List[torch.Tensor]) -> torch.Tensor:
            return torch.stack([p.reshape(()) for p in parts]).to(torch.float64) if parts else empty

        shares = stack([s for _, _, s in self.shares])
        pairs = self._masked_pairs()
        masked = empty
        if pairs:
            sums = stack([s for _, _, s, _ in pairs])
            masked = (~torch.isfinite(sums) & torch.isfinite(stack([sh for _, _, _, sh in pairs]))).to(torch.float64)
        return [
            stack([c for _, c in self.mask_values]),
            torch.cat([c for _, c in self.boundaries]).to(torch.float64) if self.boundaries else empty,
            stack([c for _, _, c in self.counts]),
            stack([c for _, c in self.mismatch]),
            (~torch.isfinite(shares)).to(torch.float64),
            masked,
        ]

    def _raise(self, totals: Dict[str, float], differing: List[str], parts: List[List[float]]) -> None:
        names = self.names
        mask_values, boundaries, counts, mismatch, nonfinite, masked = parts
        elsewhere = " (found on another rank of this step; this rank's own data passed the check)"
        found_elsewhere = "found on another rank of this step (this rank's own data passed the check)"
        if differing:
            raise ValueError(
                f"The ranks of this step disagree on: {', '.join(differing)}. Every rank must build the "
                f"same {names.entry} (terms, modes, options, loss_return) and the same Megatron config; "
                "the gradients of this step are not the loss of any one of them. Raised on every rank, "
                "before the optimizer step."
            )
        if totals["evaluations"]:
            raise ValueError((self.evaluations or "A rank evaluated the loss function a wrong number of times")
                             + ("" if self.evaluations else elsewhere))
        if totals["mask_values"]:
            bad = [(w, int(v)) for (w, _), v in zip(self.mask_values, mask_values) if v]
            where = "; ".join(f"{w}: {v} value(s)" for w, v in bad) if bad else found_elsewhere
            raise ValueError(
                f"Mask values other than 0 and 1 (e.g. 0.5, 2, -1 or NaN): {where}. Masks select tokens; "
                "they are not weights. Pass 0/1 (or bool) masks; put per-token weights into the loss."
            )
        if totals["boundaries"]:
            bad = []
            for j, (w, _) in enumerate(self.boundaries):
                found = [BOUNDARY_PROBLEMS[k] for k in range(5) if boundaries[5 * j + k]]
                if found:
                    bad.append(f"{w}: {'; '.join(found)}")
            raise ValueError(
                "Packed-sequence boundaries do not describe the row: "
                + (" | ".join(bad) if bad else found_elsewhere)
                + ". cu_seqlens and cu_seqlens_padded start at 0, never decrease, each real length is at "
                "most its padded length, cu_seqlens_padded[-1] is at most the row length, and under "
                "context parallelism every padded length is a multiple of 2·cp."
            )
        if totals["counts"]:
            bad = [f"{w}: {what}" for (w, what, _), v in zip(self.counts, counts) if v]
            raise ValueError("sequence_token_counts do not fit the micro-batch: "
                             + ("; ".join(bad) if bad else found_elsewhere))
        if totals["mismatch"]:
            bad = [(j, int(v)) for (j, _), v in zip(self.mismatch, mismatch) if v]
            if bad:
                j, v = bad[0]
                raise ValueError(
                    f"Micro-batch {j}: the mask given to {names.loss_call} differs from {names.masks}[{j}] "
                    f"in {v} token(s) (micro-batches with differences: {[b for b, _ in bad]}). The "
                    f"gradients of this step used {names.masks}; {names.mismatch_fix}."
                )
            raise ValueError(f"The masks given to {names.loss_call} differ from {names.masks}{elsewhere}.")
        if totals["nonfinite_valid"]:
            detail = _by_term([(j, t) for j, t, _ in self.shares], nonfinite) or found_elsewhere
            raise NonFiniteLossError(
                f"A valid token's loss was NaN or Inf: {detail}. The step's gradients are not finite; "
                "do not apply them. Raised on every rank of the step."
            )
        if totals["nonfinite_masked"] and not self.allow_nonfinite_masked:
            detail = _by_term([(j, t) for j, t, _, _ in self._masked_pairs()], masked) or found_elsewhere
            raise NonFiniteLossError(
                f"The per-token loss is NaN or Inf at masked positions: {detail}. The loss itself "
                "selects them away, but an op that produced them (e.g. exp(logp - old_logp) with NaN "
                "old_logp in padding, log(0)) passes NaN into the gradients through its own backward. "
                "Fix: mask the *inputs* of that op (torch.where(mask, x, 0) before exp/log), not only "
                "its output. If the non-finite values are written into the per-token loss itself "
                "(torch.where(mask, loss, nan)), set allow_nonfinite_masked=True."
            )


def _by_term(items: Sequence[Tuple[int, str]], flags: Sequence[float]) -> str:
    """``"term 'kl' in micro-batch(es) [0, 3]; ..."`` for the flagged (micro-batch, term) items."""
    bad: Dict[str, List[int]] = {}
    for (j, term), flag in zip(items, flags):
        if flag:
            bad.setdefault(term, []).append(j)
    return "; ".join(f"term {t!r} in micro-batch(es) {mbs}" for t, mbs in bad.items())
