"""Detect, inside the step's one all-reduce, data-parallel ranks that disagree on the set-up.

Each option that all DP ranks must share (the terms and their modes, their options, the loss
return path, ``calculate_per_token_loss``) becomes a fingerprint ``f`` (an integer in
``[1, 2**20)``, a CRC of its value). The hook appends ``[f, f²]`` per option to the totals it
all-reduces (SUM) anyway. Over ``n`` ranks, ``n · Σf² = (Σf)²`` holds exactly (float64, no
rounding at these sizes) if and only if every rank has the same ``f`` (Cauchy–Schwarz), so every
rank learns which option differs without a second collective. Pure arithmetic: no
``torch.distributed`` here.
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import torch

from .terms import LossTerm

__all__ = ["AGREEMENT_FIELDS", "fingerprints", "agreement_block", "disagreements"]

#: The options DP ranks must agree on, in the order of the fingerprints.
AGREEMENT_FIELDS = (
    "terms and their modes",
    "exclude_fully_masked_seqs",
    "loss_scale_factor",
    "term weights",
    "loss_return",
    "calculate_per_token_loss",
)
_MODULUS = (1 << 20) - 1


def _fingerprint(value: object) -> float:
    return float(1 + zlib.crc32(repr(value).encode()) % _MODULUS)


def fingerprints(terms: Mapping[str, LossTerm], loss_return: str, per_token: bool) -> Sequence[float]:
    """One fingerprint per entry of :data:`AGREEMENT_FIELDS`."""
    names = sorted(terms)
    return [
        _fingerprint([(n, terms[n].agg_mode.value) for n in names]),
        _fingerprint([terms[n].exclude_fully_masked_seqs for n in names]),
        _fingerprint([terms[n].loss_scale_factor for n in names]),
        _fingerprint([float(terms[n].weight) for n in names]),
        _fingerprint(str(loss_return)),
        _fingerprint(bool(per_token)),
    ]


def agreement_block(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """``[f_0, f_0², f_1, f_1², ...]`` as float64, to be summed over the DP ranks."""
    f = torch.tensor(list(values), dtype=torch.float64, device=device)
    return torch.stack([f, f * f], dim=1).reshape(-1)


def disagreements(summed_block: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Per option, 1 where the ranks' fingerprints differ (on the device; no host sync)."""
    pairs = summed_block.reshape(-1, 2)
    return (num_ranks * pairs[:, 1] != pairs[:, 0] * pairs[:, 0]).to(torch.int64)
