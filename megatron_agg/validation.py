"""Checks of what users hand the engine: options, masks and packing boundaries.

Two kinds of checks live here:

- *eager* ones on Python values (options, shapes, list lengths), raising ``ValueError`` at once
  with what was expected, what came and what to do;
- *device-side* ones on tensor contents (mask values other than 0/1, packing boundaries that are
  not cumulative, leave the row or break context parallelism's chunking), computed vectorized as
  counts that the end-of-step check (:mod:`megatron_agg.checks`) reads with its one host sync.
  No host sync here.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from .modes import DEFAULT_MASK_NAME, GROUP_SCOPES
from .packing import PackedSequences

__all__ = [
    "as_bool",
    "as_int",
    "check_loss_masks",
    "check_named_masks",
    "check_same_shapes",
    "check_packed_seqs",
    "check_cp_lengths",
    "check_group_ids",
    "check_sequence_counts",
    "check_share_call",
    "check_per_token_values",
    "checked_num_tokens",
    "checked_group_options",
    "mask_names_of",
    "checked_inputs",
    "mask_value_problems",
    "boundary_problems",
]


def as_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool (Python's or numpy's); anything else (``"no"``, 0, None) raises."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}.")


def as_int(value: Any, name: str, minimum: Optional[int] = None) -> int:
    """``value`` as an int if it is an integer (Python's, numpy's, a 0-dim integer tensor is not:
    it would need a host sync); bools and floats raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        try:
            if isinstance(value, (bool, float, str, torch.Tensor)) or value is None:
                raise TypeError
            value = operator.index(value)
        except TypeError:
            raise ValueError(f"{name} must be an int, got {value!r}.") from None
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}.")
    return value


def check_loss_masks(loss_masks: Any, num_microbatches: Any, *, missing_hint: str,
                     label: str = "loss_masks") -> List[torch.Tensor]:
    """This rank's whole-sequence masks, one ``[b, s]`` tensor per micro-batch, in order."""
    if loss_masks is None:
        raise ValueError(missing_hint)
    if isinstance(loss_masks, torch.Tensor):
        raise ValueError(
            f"{label} must be a list with one mask per micro-batch, got a single tensor; "
            "pass list(masks) if they are stacked."
        )
    if not isinstance(loss_masks, Sequence):
        raise ValueError(f"{label} must be a list of [batch, seq] tensors, got {type(loss_masks).__name__}.")
    num_microbatches = as_int(num_microbatches, "num_microbatches", minimum=1)
    masks = list(loss_masks)
    if len(masks) != num_microbatches:
        raise ValueError(
            f"Got {len(masks)} {label} for num_microbatches={num_microbatches}; pass exactly "
            "one mask per micro-batch, in order."
        )
    for j, mask in enumerate(masks):
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"{label}[{j}] must be a [batch, seq] tensor (bool, int or float 0/1), got {shape}."
            )
        if mask.is_complex():
            raise ValueError(f"{label}[{j}] must be bool, int or float 0/1, got {mask.dtype}.")
    return masks


def check_named_masks(loss_masks: Any, num_microbatches: Any, mask_names: Sequence[str], *,
                      missing_hint: str) -> Dict[str, List[torch.Tensor]]:
    """The step's masks by name: a list is the ``"default"`` mask; with terms or metrics that name
    their own masks, a mapping ``{name: [mask_0, …]}`` with exactly those names, every name's
    masks of the same shapes (they select tokens of the same sequences)."""
    names = list(mask_names)
    if isinstance(loss_masks, Mapping):
        given = list(loss_masks)
        missing = [n for n in names if n not in loss_masks]
        unused = [n for n in given if n not in names]
        if missing or unused:
            raise ValueError(
                f"loss_masks has the masks {given}, but the terms and metrics use {names}"
                + (f"; missing: {missing}" if missing else "") + (f"; used by no term or metric: {unused}" if unused else "")
                + ". Pass exactly one list of masks per name a LossTerm(mask=...) uses (default 'default')."
            )
        out = {n: check_loss_masks(loss_masks[n], num_microbatches, missing_hint=missing_hint,
                                   label=f"loss_masks[{n!r}]") for n in names}
        check_same_shapes(out, names)
        return out
    if names != [DEFAULT_MASK_NAME]:
        if loss_masks is None:
            raise ValueError(missing_hint)
        raise ValueError(
            f"The terms and metrics use the masks {names}; pass loss_masks={{name: [mask_0, ..., mask_(M-1)]}} "
            "with one list per name (a plain list is the 'default' mask only)."
        )
    return {DEFAULT_MASK_NAME: check_loss_masks(loss_masks, num_microbatches, missing_hint=missing_hint)}


def checked_inputs(mask_names: Sequence[str], uses_groups: bool, loss_masks: Any, num_microbatches: Any,
                   packed_seqs: Any, group_ids: Any, missing_hint: str) -> tuple:
    """``(masks by name, packed, group ids, refused)`` of a prepared step whose masks are ``mask_names``
    and whose terms or metrics use prompt groups or not (``uses_groups``) (:func:`check_named_masks`,
    :func:`check_packed_seqs`, :func:`check_group_ids`). Where only this rank's named masks or group
    ids are wrong and stand-ins can be made — zero masks for a missing name (given at least one of
    the names), ids ``-1`` (left out of every group) — they take their place and ``refused`` is the
    error: the engine raises it on every rank instead of this rank alone
    (:func:`megatron_agg.collective.start_totals`). Anything else raises here."""
    refused: Optional[Exception] = None
    try:
        named = check_named_masks(loss_masks, num_microbatches, mask_names, missing_hint=missing_hint)
    except ValueError as exc:
        named = _stand_in_masks(loss_masks, num_microbatches, mask_names)
        if named is None:
            raise
        refused = exc
    masks = next(iter(named.values()))
    packed = check_packed_seqs(packed_seqs, masks)
    try:
        ids = check_group_ids(group_ids, masks, packed, uses_groups)
    except ValueError as exc:
        ids = [torch.full((p.num_sequences if p is not None else m.shape[0],), -1, dtype=torch.int64, device=m.device)
               for m, p in zip(masks, packed or [None] * len(masks))] if uses_groups else None
        refused = refused or exc
    return named, packed, ids, refused


def _stand_in_masks(loss_masks: Any, num_microbatches: Any, names: Sequence[str]) -> Optional[Dict[str, List[torch.Tensor]]]:
    """Masks for every name in ``names`` from a mapping that holds valid masks for some of them
    (zeros of their shapes for the others), or ``None``."""
    if not isinstance(loss_masks, Mapping):
        return None
    valid = {}
    for n in names:
        try:
            valid[n] = check_loss_masks(loss_masks[n], num_microbatches, missing_hint="") if n in loss_masks else None
        except ValueError:
            valid[n] = None
    first = next((v for v in valid.values() if v is not None), None)
    if first is None:
        return None
    same = {n: v is not None and all(a.shape == b.shape for a, b in zip(v, first)) for n, v in valid.items()}
    return {n: valid[n] if same[n] else [torch.zeros_like(m) for m in first] for n in names}


def check_same_shapes(named: Mapping[str, Sequence[torch.Tensor]], names: Sequence[str]) -> None:
    """``ValueError`` unless micro-batch ``j`` of every mask in ``names`` has the shape of the first's:
    the masks of a micro-batch select tokens of the same sequences."""
    first = named[names[0]]
    for n in names[1:]:
        for j, (a, b) in enumerate(zip(first, named[n])):
            if a.shape != b.shape:
                raise ValueError(
                    f"loss_masks[{n!r}][{j}] has shape {tuple(b.shape)} but loss_masks[{names[0]!r}][{j}] "
                    f"has {tuple(a.shape)}: the masks of a micro-batch select tokens of the same sequences "
                    "and must have the same shape."
                )


def check_group_ids(group_ids: Any, masks: Sequence[torch.Tensor], packed: Optional[Sequence[Any]],
                    required: bool) -> Optional[List[torch.Tensor]]:
    """Per micro-batch, one integer group id per sequence (one per row, or one per packed sequence
    of a packed row), as int64 tensors on the masks' device. Shapes and dtypes are checked at once;
    the values' range (``[0, num_groups)``) with the step's other checks, on the device."""
    if group_ids is None:
        if required:
            raise ValueError(
                "prompt-mean needs group_ids=[ids_0, ..., ids_(M-1)] next to loss_masks: per micro-batch one "
                "integer group id per sequence (per row, or per packed sequence of a packed row)."
            )
        return None
    if not required:
        raise ValueError("group_ids were given but no term or metric uses prompt-mean; drop them.")
    if isinstance(group_ids, torch.Tensor) or not isinstance(group_ids, Sequence):
        raise ValueError(
            "group_ids must be a list with one 1-D tensor of group ids per micro-batch, got "
            f"{type(group_ids).__name__}."
        )
    if len(group_ids) != len(masks):
        raise ValueError(f"Got {len(group_ids)} group_ids for {len(masks)} micro-batches; pass one entry per micro-batch.")
    out = []
    for j, (ids, mask) in enumerate(zip(group_ids, masks)):
        entry = packed[j] if packed is not None else None
        num_seqs = entry.num_sequences if entry is not None else mask.shape[0]
        if not isinstance(ids, torch.Tensor):
            try:
                ids = torch.as_tensor(ids, device=mask.device)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"group_ids[{j}] must be a 1-D tensor of integer ids, got {ids!r}.") from None
        if ids.dim() != 1 or ids.numel() != num_seqs or ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            what = "packed sequence(s)" if entry is not None else "row(s)"
            raise ValueError(
                f"group_ids[{j}] must be a 1-D integer tensor with one id per sequence ({num_seqs} {what}), "
                f"got shape {tuple(ids.shape)} of {ids.dtype}."
            )
        out.append(ids.to(device=mask.device, dtype=torch.int64))
    return out


def check_sequence_counts(counts: Any, num_seqs: int, packed: bool, rows: int, where: str) -> None:
    """``DeferredLossHook.loss_func(..., sequence_token_counts=...)``: one whole-sequence count per
    sequence of the micro-batch (``num_seqs``: its rows, or the sequences packed into its row)."""
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.numel() != num_seqs:
        got = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
        layout = "packed row (packed_seqs)" if packed else f"[{rows}, s] mask (one sequence per row)"
        raise ValueError(
            f"sequence_token_counts of {where} has shape {got}, but the {layout} holds {num_seqs} "
            "sequence(s). Pass DeferredLossHook.sequence_token_counts(full_loss_mask, packed_seqs) "
            "with the same packed_seqs as loss_func (a packed row needs packed_seqs in both)."
        )


def mask_names_of(loss_masks: Any, missing_hint: str) -> List[str]:
    """The names of ``StepShares``' masks: a mapping's keys (non-empty strings, ``"default"`` first:
    the mask Megatron's ``num_tokens`` counts), else ``["default"]``."""
    given = list(loss_masks) if isinstance(loss_masks, Mapping) else [DEFAULT_MASK_NAME]
    bad = [n for n in given if not isinstance(n, str) or not n]
    if bad or not given:
        raise ValueError(f"loss_masks names must be non-empty strings, got {bad[0]!r}." if bad else missing_hint)
    return sorted(given, key=lambda n: n != DEFAULT_MASK_NAME)


def checked_num_tokens(num_tokens: Any, num_microbatches: int, device: torch.device) -> torch.Tensor:
    """``StepShares(num_tokens=...)``: one count per micro-batch, as a float64 ``[M]`` tensor."""
    if isinstance(num_tokens, torch.Tensor) and num_tokens.dim() != 1:
        given: Any = f"a {num_tokens.dim()}-dim tensor of"  # len() of a 0-dim tensor raises, of a 2-dim one misleads
    else:
        given = len(num_tokens)
    if given != num_microbatches:
        raise ValueError(f"Got {given} num_tokens for {num_microbatches} micro-batches; pass one per micro-batch.")
    return torch.stack([torch.as_tensor(n, device=device).to(torch.float64).reshape(()) for n in num_tokens])


def checked_group_options(group_ids: Any, num_groups: Any, group_scope: Any) -> tuple:
    """``StepShares(group_ids=, num_groups=, group_scope=)``: ``(grouped, num_groups)``; any one of
    them asks for all three."""
    if group_ids is None and num_groups is None and group_scope is None:
        return False, None
    if num_groups is None or group_scope not in GROUP_SCOPES:
        raise ValueError(
            "StepShares with group_ids needs num_groups=G (the same on every rank) and group_scope='global' "
            f"or 'per-rank'; got num_groups={num_groups!r}, group_scope={group_scope!r}."
        )
    return True, as_int(num_groups, "num_groups", minimum=1)


def check_per_token_values(values: Mapping[str, Any], shape: Sequence[int], where: str, metrics: Sequence[str] = (),
                           device: Optional[torch.device] = None, masks_label: str = "loss_masks") -> None:
    """A micro-batch's per-token losses (and metric values, named in ``metrics``) as the loss
    function returned them: one per token of the mask's ``shape`` and, where ``device`` is given,
    on the device of the step's masks (``masks_label``: what the caller passed them as)."""
    for name, value in values.items():
        if isinstance(value, torch.Tensor) and device is not None and value.device != device:
            raise ValueError(
                f"{where}: the per-token loss of {name!r} is on device {value.device}, but {masks_label} are on "
                f"{device}; pass {masks_label} on the device of the model's output (e.g. "
                f"[m.to({str(value.device)!r}) for m in masks])."
            )
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            what = ("value", "metric") if name in metrics else ("loss", "term")
            raise ValueError(
                f"{where}: the per-token {what[0]} of {what[1]} {name!r} has shape {got} but its mask has shape "
                f"{tuple(shape)}; the loss function must return one {what[0]} per token ([b, s])."
            )


def check_share_call(call: str, loss_mat: Any, loss_mask: Any, device: torch.device, mask_name: Any,
                     mask_names: Sequence[str]) -> None:
    """``StepShares.share``/``metric(loss_mat, loss_mask, mode, mask_name=...)``: two ``[b, s]``
    tensors of one shape on the device of the step's masks, and a mask name of the step."""
    if not isinstance(loss_mat, torch.Tensor) or not isinstance(loss_mask, torch.Tensor):
        raise ValueError(f"{call}() needs tensors: {call}(loss_mat, loss_mask, mode).")
    if loss_mat.shape != loss_mask.shape:
        raise ValueError(
            f"{call}() needs one loss per token: loss_mat has shape {tuple(loss_mat.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}."
        )
    if loss_mask.dim() != 2:
        raise ValueError(f"{call}() needs [batch, seq] tensors, got shape {tuple(loss_mask.shape)}.")
    if loss_mat.device != loss_mask.device or loss_mask.device != device:
        raise ValueError(
            f"{call}() got loss_mat on {loss_mat.device} and loss_mask on {loss_mask.device}, but "
            f"StepShares' loss_masks are on {device}; put all three on the device of the model's output."
        )
    if mask_name not in mask_names:
        raise ValueError(
            f"{call}(mask_name={mask_name!r}): the step's loss_masks are {list(mask_names)}; name one of "
            "them (the totals of that mask apply)."
        )


def check_cp_lengths(loss_masks: Sequence[torch.Tensor], packed_seqs: Optional[Sequence[Optional[PackedSequences]]],
                     groups: Any, masks_name: str = "loss_masks") -> None:
    """``ValueError`` (before the step) for a row whose length the CP layout cannot cut. Packed rows
    of the ``"load-balanced"`` layout are cut per document: their boundaries are checked with the
    step's other checks (:func:`~megatron_agg.validation.boundary_problems`)."""
    cp = groups.cp_size
    if cp == 1:
        return
    for j, mask in enumerate(loss_masks):
        packed = packed_seqs[j] if packed_seqs is not None else None
        length = mask.shape[-1]
        if groups.cp_layout == "contiguous" or (packed is not None and groups.cp_layout == "load-balanced"):
            if length % cp:
                raise ValueError(
                    f"{masks_name}[{j}] has padded length {length}, not divisible by the {cp} ranks that "
                    "share each sequence."
                )
        elif length % (2 * cp):
            what = ("packed row, cut as a whole (cp_layout='per-row')" if packed is not None
                    else "sequences")
            raise ValueError(
                f"{masks_name}[{j}] has padded length {length}, but context parallelism of size {cp} cuts "
                f"{what} into 2·cp = {2 * cp} chunks; pad the batch (and its masks) to a multiple of 2·cp."
            )


def check_packed_seqs(packed_seqs: Any, masks: Sequence[torch.Tensor]) -> Optional[List[Optional[PackedSequences]]]:
    """One :class:`PackedSequences` (or ``None``) per micro-batch, shapes checked against the masks."""
    if packed_seqs is None:
        return None
    if isinstance(packed_seqs, (torch.Tensor, PackedSequences)) or not isinstance(packed_seqs, Sequence):
        raise ValueError(
            "packed_seqs must be a list with one entry per micro-batch (None for an unpacked one), "
            f"got {type(packed_seqs).__name__}."
        )
    if len(packed_seqs) != len(masks):
        raise ValueError(
            f"Got {len(packed_seqs)} packed_seqs for {len(masks)} loss_masks; pass one entry per "
            "micro-batch (None where a micro-batch is not packed)."
        )
    return [coerce_packed(entry, mask, f"packed_seqs[{j}]") for j, (entry, mask) in enumerate(zip(packed_seqs, masks))]


def coerce_packed(entry: Any, mask: torch.Tensor, where: str) -> Optional[PackedSequences]:
    """``entry`` as :class:`PackedSequences` (or ``None``), checked against its ``[1, t]`` mask."""
    packed = PackedSequences.coerce(entry, where)
    if packed is not None:
        packed.validate(where)
        if mask.dim() != 2 or mask.shape[0] != 1:
            raise ValueError(
                f"{where} packs sequences into one row (Megatron's THD layout), but its mask has "
                f"shape {tuple(mask.shape)}; give packed micro-batches as [1, t] whole rows."
            )
    return packed


def mask_value_problems(mask: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Number of entries of ``mask`` that are neither 0 nor 1 (NaN included), as an int64 0-dim
    tensor on the mask's device, or one count per row with ``per_row`` (zeros for bool masks)."""
    if mask.dtype == torch.bool:
        shape = mask.shape[:1] if per_row else ()
        return torch.zeros(shape, dtype=torch.int64, device=mask.device)
    bad = (mask != 0) & (mask != 1)
    return bad.sum(dim=-1) if per_row else bad.sum()


#: The problems :func:`boundary_problems` counts, in order (used in messages).
BOUNDARY_PROBLEMS = (
    "cu_seqlens/cu_seqlens_padded do not start at 0",
    "boundaries are not cumulative (they decrease somewhere)",
    "cu_seqlens_padded[-1] lies past the end of the row",
    "a sequence's real length exceeds its padded length",
    "a padded length (or the row's tail after the last sequence) is not a multiple of 2·cp, as "
    "cp_layout='load-balanced' (a packed row cut per document) needs; if the row is cut as a whole "
    "(Megatron-LM's --dataloader-inter-document-masking), pass cp_layout='per-row'",
)


def boundary_problems(packed: PackedSequences, total: int, cp_size: int, device: torch.device,
                      per_document: bool = True) -> torch.Tensor:
    """Per entry of :data:`BOUNDARY_PROBLEMS`, how many boundaries of ``packed`` show it, for a row
    of ``total`` positions under context parallelism of ``cp_size`` (int64 ``[5]``, no host sync).
    ``per_document``: the row is cut per document (``cp_layout="load-balanced"``), so every padded
    document length must be a multiple of ``2·cp``; a row cut as a whole (``"per-row"``) has no such
    requirement on its documents."""
    cu, cu_padded = packed.boundaries(device)
    real = cu[1:] - cu[:-1]
    padded = cu_padded[1:] - cu_padded[:-1]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    counts = [
        (cu[:1] != 0).sum() + (cu_padded[:1] != 0).sum(),
        (real < 0).sum() + (padded < 0).sum(),
        (cu_padded[-1:] > total).sum(),
        (real > padded).sum(),
        zero,
    ]
    if cp_size > 1 and per_document:
        tail = total - cu_padded[-1:]
        counts[4] = (padded % (2 * cp_size) != 0).sum() + (tail % (2 * cp_size) != 0).sum()
    return torch.stack([c.to(torch.int64) for c in counts])
