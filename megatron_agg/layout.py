"""Where a sequence's tokens live on this rank: Megatron's context-parallel layout.

Pure tensor indexing, no ``torch.distributed``.
"""

from __future__ import annotations

import torch

__all__ = ["cp_local_positions", "to_cp_local"]


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


def to_cp_local(tensor: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The slice of ``tensor`` (``[..., s]``, whole sequences) that ``cp_rank`` holds."""
    if cp_size == 1:
        return tensor
    index = cp_local_positions(tensor.shape[-1], cp_size, cp_rank, device=tensor.device)
    return tensor.index_select(-1, index)
