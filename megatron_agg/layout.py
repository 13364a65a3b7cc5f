"""Where a sequence's tokens live on this rank: Megatron's context-parallel layout.

Pure tensor indexing, no ``torch.distributed``.
"""

from __future__ import annotations

import torch

__all__ = ["CP_LAYOUTS", "cp_local_positions", "thd_cp_local_positions", "local_positions", "to_cp_local"]

#: How a row is split over the context-parallel (or Ulysses sequence-parallel) ranks:
#:
#: - ``"load-balanced"`` — Megatron's default (``get_batch_on_this_cp_rank`` without
#:   ``use_per_sequence_balancing``): an unpacked row is cut into ``2·cp`` chunks, rank ``r``
#:   holding chunks ``r`` and ``2·cp − 1 − r``; a *packed* row is cut that way per document
#:   (Transformer-Engine's THD layout, every document padded to a multiple of ``2·cp``).
#: - ``"per-row"`` — the ``2·cp`` zigzag over the *whole* row even when it is packed: Megatron-LM
#:   with ``--dataloader-inter-document-masking`` (``use_per_sequence_balancing=True``), where
#:   documents have any length and only the row is a multiple of ``2·cp``. Unpacked rows are cut
#:   as with ``"load-balanced"``.
#: - ``"contiguous"`` — rank ``r`` holds the ``r``-th of ``cp`` equal slices (Ulysses-style
#:   sequence parallelism under FSDP).
#:
#: Megatron's hybrid context parallelism (a CP group size per sample) is none of these and is
#: refused by the Megatron entry points.
CP_LAYOUTS = ("load-balanced", "per-row", "contiguous")


def cp_local_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Positions of a padded length-``seq_len`` sequence held by ``cp_rank``.

    Megatron's load-balanced context-parallel layout
    (``megatron.training.utils.get_batch_on_this_cp_rank``): the sequence is cut into
    ``2·cp`` equal chunks and rank ``r`` holds chunks ``r`` and ``2·cp − 1 − r``, in that order.
    """
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"With context parallelism of size {cp_size}, sequences must be padded to a multiple "
            f"of 2·cp = {2 * cp_size}; got padded length {seq_len}. Pad the batch (and its masks) "
            "to a multiple of 2·cp."
        )
    chunk = seq_len // (2 * cp_size)
    second = 2 * cp_size - 1 - cp_rank
    return torch.cat(
        [
            torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device),
            torch.arange(second * chunk, (second + 1) * chunk, device=device),
        ]
    )


def thd_cp_local_positions(cu_seqlens_padded: torch.Tensor, total: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions of a packed ``[1, total]`` row held by ``cp_rank`` (Megatron's THD layout).

    Every packed sequence (padded boundaries ``cu_seqlens_padded``) is cut into ``2·cp`` equal
    chunks on its own, and rank ``r`` holds chunks ``r`` and ``2·cp − 1 − r`` of each sequence,
    sequence after sequence (Transformer-Engine's ``thd_get_partitioned_indices``). A tail of the
    row after the last sequence is treated as one more (padding) sequence. Vectorized: no host
    sync even when the boundaries live on a GPU.
    """
    device = cu_seqlens_padded.device
    if cp_size == 1:
        return torch.arange(total, device=device)
    if total % (2 * cp_size):
        raise ValueError(
            f"With context parallelism of size {cp_size}, a packed row must have a length that is a "
            f"multiple of 2·cp = {2 * cp_size}; got {total}. Pad every packed sequence to a multiple of 2·cp."
        )
    cu = torch.cat([cu_seqlens_padded.to(torch.int64), torch.tensor([total], dtype=torch.int64, device=device)])
    local_cu = cu // cp_size
    j = torch.arange(total // cp_size, device=device)
    seq = torch.searchsorted(local_cu[1:], j, right=True)
    chunk = (cu[seq + 1] - cu[seq]) // (2 * cp_size)
    offset = j - local_cu[seq]
    first = offset < chunk
    within = torch.where(first, cp_rank * chunk + offset, (2 * cp_size - 1 - cp_rank) * chunk + offset - chunk)
    return cu[seq] + within


def local_positions(cp_layout: str, total: int, cp_size: int, cp_rank: int,
                    cu_seqlens_padded: "torch.Tensor | None" = None, device=None) -> "torch.Tensor | None":
    """Positions of a row of ``total`` positions held by ``cp_rank`` under ``cp_layout`` (one of
    :data:`CP_LAYOUTS`); ``cu_seqlens_padded`` is given for a packed row. ``None`` when
    ``cp_size == 1`` (the whole row). The one place that says where a token lives: the engine,
    the deferred hook and the tests' data and attention all ask it."""
    if cp_layout not in CP_LAYOUTS:
        raise ValueError(f"cp_layout must be one of {CP_LAYOUTS}, got {cp_layout!r}.")
    if cp_size == 1:
        return None
    if cu_seqlens_padded is not None and device is None:
        device = cu_seqlens_padded.device
    if cp_layout == "contiguous":
        local = total // cp_size
        return torch.arange(cp_rank * local, (cp_rank + 1) * local, device=device)
    if cp_layout == "load-balanced" and cu_seqlens_padded is not None:
        return thd_cp_local_positions(cu_seqlens_padded, total, cp_size, cp_rank)
    return cp_local_positions(total, cp_size, cp_rank, device=device)


def to_cp_local(tensor: torch.Tensor, cp_size: int, cp_rank: int, positions: "torch.Tensor | None" = None) -> torch.Tensor:
    """The slice of ``tensor`` (``[..., s]``, whole sequences) that ``cp_rank`` holds.

    ``positions`` overrides the layout (e.g. :func:`thd_cp_local_positions` for packed rows);
    by default the load-balanced layout of :func:`cp_local_positions`.
    """
    if cp_size == 1:
        return tensor
    if positions is None:
        positions = cp_local_positions(tensor.shape[-1], cp_size, cp_rank, device=tensor.device)
    return tensor.index_select(-1, positions)
