"""Packed sequences: several sequences along the one row of a micro-batch (THD layout).

Megatron describes a packed micro-batch with ``PackedSeqParams`` (``cu_seqlens_q`` and, with
context parallelism, ``cu_seqlens_q_padded``); :class:`PackedSequences` carries the same facts
plus, optionally, the padded length each sequence had before packing (the default ``C_i`` of
``seq-mean-token-sum-norm``). Either is accepted where megatron_agg takes packing information.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

__all__ = ["PackedSequences", "CuSeqlens"]

CuSeqlens = Union[torch.Tensor, Sequence[int]]


@dataclass(frozen=True)
class PackedSequences:
    """The sequences packed into a ``[1, t]`` micro-batch row.

    Args:
        cu_seqlens: ``[K + 1]`` cumulative *real* lengths: sequence ``k`` has
            ``cu_seqlens[k+1] − cu_seqlens[k]`` tokens.
        cu_seqlens_padded: ``[K + 1]`` cumulative *padded* lengths: sequence ``k`` occupies row
            positions ``[cu_seqlens_padded[k], cu_seqlens_padded[k+1])``, its real tokens first.
            Default: ``cu_seqlens`` (no padding between sequences). With context parallelism each
            padded length must be a multiple of ``2·cp`` (Megatron's THD requirement) and the row
            must end at ``cu_seqlens_padded[-1]`` or continue with padding of such a length.
        padded_length: the length each sequence was padded to before packing; the default
            ``C_i`` of ``seq-mean-token-sum-norm``. Default: each sequence's own padded length
            ``cu_seqlens_padded[k+1] − cu_seqlens_padded[k]`` (never the pack's, nor a CP slice's).

    Row positions outside every sequence, and padding inside a sequence, belong to no sequence:
    they are never counted, whatever the mask says there.
    """

    cu_seqlens: CuSeqlens
    cu_seqlens_padded: Optional[CuSeqlens] = None
    padded_length: Optional[int] = None

    @property
    def num_sequences(self) -> int:
        return len(self.cu_seqlens) - 1

    def boundaries(self, device: torch.device) -> "tuple[torch.Tensor, torch.Tensor]":
        """``(cu_seqlens, cu_seqlens_padded)`` as int64 tensors on ``device``."""
        cu = torch.as_tensor(self.cu_seqlens, dtype=torch.int64, device=device)
        padded = self.cu_seqlens_padded if self.cu_seqlens_padded is not None else self.cu_seqlens
        return cu, torch.as_tensor(padded, dtype=torch.int64, device=device)

    @classmethod
    def coerce(cls, obj: Any, where: str) -> Optional["PackedSequences"]:
        """``None``, a :class:`PackedSequences`, or a Megatron ``PackedSeqParams``."""
        if obj is None or isinstance(obj, cls):
            return obj
        if hasattr(obj, "cu_seqlens_q"):
            qkv_format = getattr(obj, "qkv_format", "thd")
            if qkv_format != "thd":
                raise ValueError(f"{where}: PackedSeqParams with qkv_format={qkv_format!r}; only 'thd' packs sequences.")
            return cls(obj.cu_seqlens_q, getattr(obj, "cu_seqlens_q_padded", None))
        raise ValueError(
            f"{where} must be None, megatron_agg.PackedSequences or Megatron's PackedSeqParams, "
            f"got {type(obj).__name__}."
        )

    def validate(self, where: str) -> None:
        for name in ("cu_seqlens", "cu_seqlens_padded"):
            value = getattr(self, name)
            if value is None:
                continue
            dims = value.dim() if isinstance(value, torch.Tensor) else 1
            if dims != 1 or len(value) < 1:
                raise ValueError(f"{where}.{name} must be a 1-D sequence of boundaries [K + 1], got {value!r}.")
        if self.cu_seqlens_padded is not None and len(self.cu_seqlens_padded) != len(self.cu_seqlens):
            raise ValueError(
                f"{where}: cu_seqlens has {len(self.cu_seqlens)} boundaries but cu_seqlens_padded has "
                f"{len(self.cu_seqlens_padded)}; both describe the same K sequences."
            )
        if self.padded_length is not None and (
            isinstance(self.padded_length, bool) or not isinstance(self.padded_length, numbers.Integral)
            or self.padded_length <= 0
        ):
            raise ValueError(f"{where}.padded_length must be a positive int, got {self.padded_length!r}.")
