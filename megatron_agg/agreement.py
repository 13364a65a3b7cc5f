"""Detect, inside the step's one all-reduce, data-parallel ranks that disagree on the set-up.

Each option that all DP ranks must share (the terms and their modes, their options and masks, the
metrics, the prompt groups, the loss return path, ``calculate_per_token_loss``) becomes a fingerprint ``f`` (an integer in
``[1, 2**20)``, a CRC of its value). The engine appends ``[p, p·f, p·f²]`` per option to a vector
it all-reduces (SUM) anyway, with ``p = 1`` on ranks that hold the option and ``p = 0`` on ranks
that have no say in it (e.g. a pipeline stage that computes no loss). Over the ``n = Σp`` ranks
that hold it, ``n · Σf² = (Σf)²`` holds exactly (float64, no rounding at these sizes) if and only
if they all have the same ``f`` (Cauchy–Schwarz), so every rank learns which option differs
without a collective of its own. Pure arithmetic: no ``torch.distributed`` here.
"""

from __future__ import annotations

import zlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .terms import LossTerm

__all__ = ["AGREEMENT_FIELDS", "fingerprints", "set_up_fingerprints", "config_fingerprints", "agreement_values",
           "agreement_block", "disagreements", "step_block", "flag_counts"]

#: The options DP ranks must agree on, in the order of the fingerprints.
AGREEMENT_FIELDS = (
    "terms and their modes",
    "exclude_fully_masked_seqs",
    "loss_scale_factor",
    "term weights",
    "loss_return",
    "calculate_per_token_loss",
    "term masks (the step's masks)",
    "metrics",
    "prompt groups (num_groups, group_scope)",
)
_MODULUS = (1 << 20) - 1


def _fingerprint(value: object) -> float:
    return float(1 + zlib.crc32(repr(value).encode()) % _MODULUS)


def _metric_print(metric: LossTerm) -> tuple:
    factor = None if metric.loss_scale_factor is None else float(metric.loss_scale_factor)
    return (metric.agg_mode.value, bool(metric.exclude_fully_masked_seqs), factor, metric.mask)


def fingerprints(terms: Optional[Mapping[str, LossTerm]], loss_return: Optional[str],
                 per_token: Optional[bool], metrics: Optional[Mapping[str, LossTerm]] = None,
                 prompt_groups: Optional[Any] = None, masks: Optional[Sequence[str]] = None) -> List[Optional[float]]:
    """One fingerprint per entry of :data:`AGREEMENT_FIELDS` (``None`` where this rank has no say:
    ``terms`` ``None`` for the term and metric fields). Numbers are normalized (16 and 16.0 agree).
    ``prompt_groups``: ``(num_groups, group_scope)``, or ``None`` without prompt-mean; ``masks``: the
    names of the step's masks, where they are not implied by the terms (:class:`~megatron_agg.StepShares`)."""
    names = sorted(terms) if terms is not None else []
    term_prints: List[Optional[float]] = [None] * 4
    metric_print: Optional[float] = None
    if terms is not None:
        factors = [None if terms[n].loss_scale_factor is None else float(terms[n].loss_scale_factor) for n in names]
        term_prints = [
            _fingerprint([(n, terms[n].agg_mode.value) for n in names]),
            _fingerprint([bool(terms[n].exclude_fully_masked_seqs) for n in names]),
            _fingerprint(factors),
            _fingerprint([float(terms[n].weight) for n in names]),
        ]
        metric_print = _fingerprint([(n, _metric_print(m)) for n, m in sorted((metrics or {}).items())])
    has_say = terms is not None or masks is not None or prompt_groups is not None
    mask_print = _fingerprint(([(n, terms[n].mask) for n in names] if terms is not None else None,
                               list(masks) if masks is not None else None)) if has_say else None
    groups = None if prompt_groups is None else (int(prompt_groups[0]), str(prompt_groups[1]))
    return [
        *term_prints,
        None if loss_return is None else _fingerprint(str(loss_return)),
        None if per_token is None else _fingerprint(bool(per_token)),
        mask_print,
        metric_print,
        _fingerprint(groups) if has_say else None,
    ]


def agreement_values(values: Sequence[Optional[float]]) -> List[float]:
    """``[p_0, p_0·f_0, p_0·f_0², p_1, ...]`` (``p = 0`` where the value is ``None``), as Python floats."""
    out: List[float] = []
    for f in values:
        out += [0.0, 0.0, 0.0] if f is None else [1.0, f, f * f]
    return out


def agreement_block(values: Sequence[Optional[float]], device: torch.device) -> torch.Tensor:
    """:func:`agreement_values` as a float64 tensor, to be summed over the ranks."""
    return torch.tensor(agreement_values(values), dtype=torch.float64, device=device)


def disagreements(summed_block: torch.Tensor) -> torch.Tensor:
    """Per option, 1 where the ranks that hold it have different fingerprints (on the device; no
    host sync)."""
    triples = summed_block.reshape(-1, 3)
    return (triples[:, 0] * triples[:, 2] != triples[:, 1] * triples[:, 1]).to(torch.int64)


def step_block(values: Sequence[Optional[float]], refused: bool, reads: bool, device: torch.device) -> torch.Tensor:
    """The step-start block: :func:`agreement_block` of the set-up's fingerprints followed by two
    flags in the same ``[p, p·f, p·f²]`` form, ``f = 2`` where this rank *refused its inputs* and
    where it *runs the schedule without reading the block first* (asynchronous totals), else 1.
    Summed, each flag's ``Σp·f − Σp`` is the number of ranks that raised it (:func:`flag_counts`)."""
    return agreement_block(list(values) + [2.0 if refused else 1.0, 1.0 if reads else 2.0], device)


def flag_counts(summed_block: torch.Tensor) -> List[int]:
    """``[ranks that refused their inputs, ranks that run the schedule unread]`` of a summed
    :func:`step_block` (one host read)."""
    triples = summed_block.reshape(-1, 3)[len(AGREEMENT_FIELDS):]
    return [int(round(v)) for v in (triples[:, 1] - triples[:, 0]).tolist()]


def set_up_fingerprints(terms: Optional[Dict[str, LossTerm]], scaling: Any,
                        metrics: Optional[Mapping[str, LossTerm]] = None,
                        prompt_groups: Optional[Tuple[int, str]] = None,
                        masks: Optional[Sequence[str]] = None) -> List[Optional[float]]:
    """The fingerprints of :data:`AGREEMENT_FIELDS` for this rank: :func:`fingerprints` with the
    loss-return path and ``calculate_per_token_loss`` read from ``scaling`` (a
    :class:`~megatron_agg.scaling.Scaling`'s ``fingerprint()``; ``None``: no say)."""
    loss_return, per_token = scaling.fingerprint() if scaling is not None else (None, None)
    return fingerprints(terms, loss_return, per_token, metrics, prompt_groups, masks)


def config_fingerprints(config: Any, scaling: Any) -> List[Optional[float]]:
    """:func:`set_up_fingerprints` of a whole :class:`~megatron_agg.AggConfig`."""
    groups = (config.num_groups, config.group_scope) if config.uses_groups else None
    return set_up_fingerprints(dict(config.terms), scaling, config.metrics, groups)
