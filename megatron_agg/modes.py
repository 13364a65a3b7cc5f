"""Loss aggregation modes: the names RL trainers use (verl's ``loss_agg_mode``), as an ``Enum``.

A mode says how per-token losses ``l[i, t]`` of the *global batch* (every sequence on every
data-parallel rank in every micro-batch of one optimizer step) with a 0/1 mask ``m[i, t]``
become one scalar ``L``. With ``n_i = Σ_t m[i, t]``, ``T = Σ_i n_i``, ``N`` the number of
sequences (or of sequences with ``n_i > 0`` when fully masked ones are excluded), and for
``prompt-mean`` the group ``g(i)`` of each sequence (the prompt it answers), ``M_g = Σ_{i∈g} n_i``
and ``P`` the number of groups in the step (or of groups with ``M_g > 0`` when excluded):

=========================== =========================================================
``token-mean``              ``L = Σ_i Σ_t m·l / T``
``seq-mean-token-sum``      ``L = Σ_i Σ_t m·l / N``
``seq-mean-token-mean``     ``L = Σ_i (Σ_t m·l / n_i) / N`` (a sequence with n_i = 0 adds 0)
``seq-mean-token-sum-norm`` ``L = Σ_i Σ_t m·l / (N · C_i)``, ``C_i`` = ``loss_scale_factor``,
                            default the padded length of sequence i's mask row
``token-sum``               ``L = Σ_i Σ_t m·l``
``prompt-mean``             ``L = (1/P) Σ_g Σ_{i∈g} Σ_t m·l / M_g`` (a group with M_g = 0 adds 0)
=========================== =========================================================

Where the denominator is 0 (no valid token, no sequence or no group in the whole step), ``L = 0``.
"""

from __future__ import annotations

from enum import Enum
from typing import Union

__all__ = ["AggMode", "AggModeLike", "DEFAULT_MASK_NAME", "GROUP_SCOPES"]

#: Name of the step's mask that a term uses unless it names another one (``LossTerm(mask=...)``);
#: a plain list of ``loss_masks`` is this mask.
DEFAULT_MASK_NAME = "default"

#: How ``prompt-mean`` group ids are numbered: ``"global"`` (an id names the same prompt on every
#: rank) or ``"per-rank"`` (ids count this rank's prompts); see :mod:`megatron_agg.step_math`.
GROUP_SCOPES = ("global", "per-rank")


class AggMode(str, Enum):
    """How per-token losses are aggregated into one loss per optimizer step."""

    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"
    TOKEN_SUM = "token-sum"
    PROMPT_MEAN = "prompt-mean"

    @classmethod
    def parse(cls, value: "AggModeLike") -> "AggMode":
        """Accept an ``AggMode`` or one of its string values; anything else is a ``ValueError``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            for mode in cls:
                if mode.value == value:
                    return mode
        choices = ", ".join(repr(m.value) for m in cls)
        raise ValueError(
            f"Unknown loss aggregation mode {value!r}. Expected one of: {choices} "
            f"(or a megatron_agg.AggMode member)."
        )

    @property
    def is_sequence_mean(self) -> bool:
        """True for the ``seq-mean-*`` modes, whose denominator is a number of sequences."""
        return self.value.startswith("seq-mean-")

    @property
    def needs_groups(self) -> bool:
        """True for ``prompt-mean``: its weights and denominator come from per-group counts, so a
        step needs each sequence's group id."""
        return self is AggMode.PROMPT_MEAN

    def __str__(self) -> str:  # "token-mean", not "AggMode.TOKEN_MEAN", in messages
        return self.value


AggModeLike = Union[AggMode, str]
