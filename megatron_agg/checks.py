"""The end-of-step check: what a step found, read with one host sync, raised on every rank.

During a step the engine records device-side findings without reading them: per micro-batch
and term whether the share of the loss is finite (a NaN/Inf at a *valid* token) and whether the
per-token loss was finite at all (a NaN/Inf at a *masked* position, which poisons the gradients
of the op that produced it), mask tokens that differ from ``loss_masks``, mask values other than
0/1, packing boundaries that do not describe the row, group ids outside ``[0, num_groups)``, and
(deferred mode) per-sequence counts that do not fit the micro-batch. :meth:`StepChecks.finish` then

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

from .agreement import AGREEMENT_FIELDS, agreement_values, disagreements
from .groups import ParallelGroups
from .packing import PackedSequences
from .validation import BOUNDARY_PROBLEMS, boundary_problems, mask_value_problems

__all__ = ["NonFiniteLossError", "StepChecks", "FrontEndNames", "group_ids_expected"]


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


def group_ids_expected(num_groups: int, group_scope: str) -> str:
    """What the end-of-step check says group ids must be."""
    if group_scope == "per-rank":
        return (f"With group_scope='per-rank' each data-parallel rank numbers its own groups 0 … "
                f"{num_groups - 1} (num_groups={num_groups}).")
    return (f"With group_scope='global' ids name the step's prompts 0 … {num_groups - 1} on every rank "
            f"(num_groups={num_groups}).")


#: The summary's problem kinds, in the order they are reported.
_KINDS = ("inputs", "evaluations", "mask_values", "boundaries", "group_ids", "counts", "mismatch", "nonfinite_valid",
          "nonfinite_masked")


@dataclass
class StepChecks:
    """Device-side findings of one step on this rank (see the module docstring)."""

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
    #: (where, group ids outside [0, num_groups)), and the text that says what ids are expected.
    group_ids: List[Tuple[str, torch.Tensor]] = field(default_factory=list)
    group_ids_expected: str = ""
    #: (where, what is wrong, count) for per-sequence counts (deferred mode).
    counts: List[Tuple[str, str, torch.Tensor]] = field(default_factory=list)
    #: Problems known on the host already: inputs this rank refused while the step ran on (stand-ins
    #: took their place, see :func:`megatron_agg.collective.start_totals`), the number of loss evaluations.
    inputs: Optional[str] = None
    evaluations: Optional[str] = None
    #: This rank's fingerprints of the set-up (None entries: no say), for the agreement check.
    fingerprints: Optional[Sequence[Optional[float]]] = None

    # -- recording (no host sync) -----------------------------------------------------------------
    def record_mask(self, where: str, mask: torch.Tensor) -> None:
        """A mask's entries other than 0/1 (a bool mask has none: nothing is recorded)."""
        if mask.dtype != torch.bool:
            self.mask_values.append((where, mask_value_problems(mask)))

    def record_packing(self, where: str, packed: PackedSequences, row_length: int, cp_size: int, cp_layout: str,
                       device: torch.device) -> None:
        """Packing boundaries that do not describe a whole row of ``row_length`` tokens or break the CP
        cut (:func:`~megatron_agg.validation.boundary_problems`)."""
        self.boundaries.append((where, boundary_problems(packed, row_length, cp_size, device,
                                                         per_document=cp_layout == "load-balanced")))

    def record_loss(self, microbatch: int, term: str, share: torch.Tensor, per_token: torch.Tensor,
                    grad_mode: bool = True) -> None:
        """A term's share of micro-batch ``microbatch`` (kept as is: read after the step) and its
        per-token loss (one op: its sum, outside autograd; ``grad_mode=False`` when the caller is
        already under ``torch.no_grad()``)."""
        self.shares.append((microbatch, term, share))
        if not self.allow_nonfinite_masked:
            if grad_mode:
                with torch.no_grad():
                    self.sums.append((microbatch, term, per_token.sum(dtype=torch.float32)))
            else:
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
        details, lengths = self._details(device)  # this rank's per-item counts, one flat vector
        kinds = torch.tensor([k for k, n in enumerate(lengths) for _ in range(n)], dtype=torch.int64, device=device)
        head = [1.0 if self.inputs else 0.0, 1.0 if self.evaluations else 0.0] + [0.0] * len(lengths)
        head += agreement_values(self.fingerprints or [None] * len(AGREEMENT_FIELDS))
        summary = torch.tensor(head, dtype=torch.float64, device=device)
        summary[2 : 2 + len(lengths)].index_add_(0, kinds, details)  # per-kind totals of this rank
        collectives = groups.sum_over_step(summary, stage_only) if (spread and groups is not None) else 0
        values = torch.cat([summary, details]).tolist()  # the one host sync
        n = len(_KINDS)
        totals = dict(zip(_KINDS, values[:n]))
        block = torch.tensor(values[n : n + 3 * len(AGREEMENT_FIELDS)], dtype=torch.float64)
        differing = [f for f, d in zip(AGREEMENT_FIELDS, disagreements(block).tolist()) if d]
        rest, parts = values[n + 3 * len(AGREEMENT_FIELDS):], []
        for length in lengths:
            parts.append(rest[:length])
            rest = rest[length:]
        self._raise(totals, differing, parts)
        return collectives

    def _masked_pairs(self) -> List[Tuple[int, str, torch.Tensor, torch.Tensor]]:
        """``(micro-batch, term, Σ per-token loss, share)`` for every recorded sum (record_loss
        records a sum with each share, or none at all)."""
        return [(j, t, s, share) for (j, t, s), (_, _, share) in zip(self.sums, self.shares)]

    def _details(self, device: torch.device) -> Tuple[torch.Tensor, List[int]]:
        """Per problem kind after ``evaluations`` (see :data:`_KINDS`) this rank's per-item counts,
        concatenated into one float64 vector, and the number of items of each kind."""
        parts: List[torch.Tensor] = []
        lengths: List[int] = []

        def add(items: List[torch.Tensor], stacked: Optional[torch.Tensor] = None) -> None:
            if stacked is None and items:  # 0-dim counts, or one labelled vector (vectorized set-ups)
                stacked = torch.stack(items) if all(i.dim() == 0 for i in items) else torch.cat(
                    [i.reshape(-1) for i in items])
            if stacked is not None and stacked.numel():
                parts.append(stacked.reshape(-1))
            lengths.append(0 if stacked is None else stacked.numel())

        add([c for _, c in self.mask_values])
        add([], torch.cat([c for _, c in self.boundaries]) if self.boundaries else None)
        add([c for _, c in self.group_ids])
        add([c for _, _, c in self.counts])
        add([c for _, c in self.mismatch])
        shares = torch.stack([s for _, _, s in self.shares]) if self.shares else None
        add([], None if shares is None else ~torch.isfinite(shares))
        pairs = self._masked_pairs()
        masked = None
        if pairs:
            masked = ~torch.isfinite(torch.stack([s for _, _, s, _ in pairs])) & torch.isfinite(shares)
        add([], masked)
        if not parts:
            return torch.zeros(0, dtype=torch.float64, device=device), lengths
        return torch.cat(parts).to(torch.float64), lengths  # cat promotes bool/int to one dtype

    def _raise(self, totals: Dict[str, float], differing: List[str], parts: List[List[float]]) -> None:
        names = self.names
        mask_labels = _labels(self.mask_values)
        mismatch_labels = _labels(self.mismatch)
        mask_values, boundaries, group_ids, counts, mismatch, nonfinite, masked = parts
        elsewhere = " (found on another rank of this step; this rank's own data passed the check)"
        found_elsewhere = "found on another rank of this step (this rank's own data passed the check)"
        if differing:
            raise ValueError(
                f"The ranks of this step disagree on: {', '.join(differing)}. Every rank must build the "
                f"same {names.entry} (terms, modes, options, loss_return) and the same Megatron config; "
                "the gradients of this step are not the loss of any one of them. Raised on every rank, "
                "before the optimizer step."
            )
        if totals["inputs"]:
            raise ValueError((self.inputs or "A rank of this step refused its inputs (its error says which).")
                             + " Raised on every rank of the step, before the optimizer step.")
        if totals["evaluations"]:
            raise ValueError((self.evaluations or "A rank evaluated the loss function a wrong number of times")
                             + ("" if self.evaluations else elsewhere))
        if totals["mask_values"]:
            bad = [(w, int(v)) for w, v in zip(mask_labels, mask_values) if v]
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
        if totals["group_ids"]:
            bad = [f"{w}: {int(v)} id(s)" for (w, _), v in zip(self.group_ids, group_ids) if v]
            raise ValueError(
                "Group ids outside [0, num_groups): " + ("; ".join(bad) if bad else found_elsewhere)
                + f". {self.group_ids_expected or 'Group ids must be integers in [0, num_groups).'} Those "
                "sequences were left out of every group, so this step's prompt-mean is not the loss of "
                "your groups; raised on every rank before the optimizer step."
            )
        if totals["counts"]:
            bad = [f"{w}: {what}" for (w, what, _), v in zip(self.counts, counts) if v]
            raise ValueError("sequence_token_counts do not fit the micro-batch: "
                             + ("; ".join(bad) if bad else found_elsewhere))
        if totals["mismatch"]:
            bad = [(j, int(v)) for j, v in zip(mismatch_labels, mismatch) if v]
            if bad:
                j, v = bad[0]  # j: the micro-batch, or (mask name, micro-batch) with several masks
                name, j = j if isinstance(j, tuple) else (None, j)
                which = f"{names.masks}[{j}]" if name is None else f"{names.masks}[{name!r}][{j}] (mask {name!r})"
                given = "mask" if name is None else f"mask {name!r}"
                raise ValueError(
                    f"Micro-batch {j}: the {given} given to {names.loss_call} differs from {which} "
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


def _labels(items: Sequence[Tuple[object, torch.Tensor]]) -> List[object]:
    """One label per counted item: an entry is ``(label, 0-dim count)`` or ``([labels], vector)``."""
    out: List[object] = []
    for label, _ in items:
        out.extend(label if isinstance(label, list) else [label])
    return out
