"""The deferred mode: exact aggregation for data streamed inside ``forward_step``, with zero
collectives of the hook's own.

Megatron-LM's ``pretrain_gpt.py`` reads each micro-batch inside ``forward_step`` (TP rank 0
reads, then broadcasts), so the masks of a step are not known before ``forward_backward_func``
runs and :meth:`LossHook.wrap` cannot count the step's totals up front. For a loss with a single
denominator Megatron already carries one to the end of the step: with
``calculate_per_token_loss=True`` the 3-tuple's ``num_tokens`` are summed over micro-batches,
broadcast over PP, all-reduced over DP×CP inside ``finalize_model_grads``, and the gradients
(summed by DDP) are divided by that sum. :class:`DeferredLossHook` returns, per micro-batch,

- the loss ``Σ_k w_k Σ_{i,t} m·α_{k,i}·l_k`` (the numerator of every term: α as in
  :mod:`megatron_agg.aggregation`), and
- ``num_tokens`` = this micro-batch's part of the denominator ``D``: its valid tokens on this CP
  slice (``token-mean``: Σ over DP×CP is ``T``), or its sequences (``seq-mean-*``: ``N``, or the
  non-empty ones with ``exclude_fully_masked_seqs``), counted on CP rank 0 only so that each
  sequence is counted once, not once per CP rank.

so that Megatron's own division lands exactly on ``L = numerator / D``. Its reports
``{name: [numerator, num_tokens]}`` give ``L`` under Megatron-LM's sum/count logging.

When a step needs the prepared mode instead: several terms with *different* denominators (e.g. a
``token-mean`` policy loss plus a ``seq-mean-token-mean`` KL term, or the same mode with and
without ``exclude_fully_masked_seqs``) — one ``num_tokens`` channel carries one denominator. The
constructor raises and says so. Per-sequence token counts ``n_i`` (``seq-mean-token-mean``,
``exclude_fully_masked_seqs``) need whole sequences: with context parallelism pass
``sequence_token_counts`` computed before the CP split (:meth:`DeferredLossHook.sequence_token_counts`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from . import aggregation as agg
from .hook import PerTokenLossFn
from .integration import check_megatron_version, resolve_groups
from .layout import thd_cp_local_positions
from .modes import AggMode, AggModeLike
from .packing import PackedSequences
from .terms import DEFAULT_TERM_NAME, LossTerm, normalize_terms, split_term_losses

__all__ = ["DeferredLossHook"]


def _denominator_kind(term: LossTerm) -> str:
    if term.agg_mode is AggMode.TOKEN_MEAN:
        return "valid tokens (T)"
    return "non-empty sequences" if term.exclude_fully_masked_seqs else "sequences (N)"


class DeferredLossHook:
    """Exact loss aggregation through Megatron's ``num_tokens`` channel (no collective of its own).

    Args:
        mode, exclude_fully_masked_seqs, loss_scale_factor, terms: as for
            :class:`~megatron_agg.LossHook`; every term must share one denominator.
        pg_collection: where to read the context-parallel rank and size from (default
            ``parallel_state``); no collective is issued on it.

    Requires ``TransformerConfig(calculate_per_token_loss=True)`` with Megatron's DDP and
    ``config.finalize_model_grads_func`` set (:meth:`check_config`).
    """

    def __init__(
        self,
        mode: Optional[AggModeLike] = None,
        *,
        exclude_fully_masked_seqs: bool = False,
        loss_scale_factor: Optional[float] = None,
        terms: Optional[Mapping[str, LossTerm]] = None,
        pg_collection: Any = None,
    ) -> None:
        self.terms: Dict[str, LossTerm] = normalize_terms(
            mode, exclude_fully_masked_seqs, loss_scale_factor, terms
        )
        kinds = {name: _denominator_kind(t) for name, t in self.terms.items()}
        if len(set(kinds.values())) > 1:
            detail = ", ".join(f"{n!r}: {k}" for n, k in kinds.items())
            raise ValueError(
                f"The deferred mode carries one denominator per step (Megatron's num_tokens), but "
                f"these terms divide by different ones ({detail}). Use the prepared mode, "
                "LossHook(terms=...).wrap(get_forward_backward_func()) with loss_masks=..., which "
                "counts every denominator in its one all-reduce."
            )
        self._term = next(iter(self.terms.values()))
        self._pg_collection = pg_collection
        check_megatron_version()

    def check_config(self, config: Any) -> None:
        """Raise ``ValueError`` unless Megatron's config routes ``num_tokens`` as needed."""
        if not getattr(config, "calculate_per_token_loss", False):
            raise ValueError(
                "DeferredLossHook needs TransformerConfig(calculate_per_token_loss=True) "
                "(Megatron-LM: --calculate-per-token-loss): its denominator travels in num_tokens."
            )
        if getattr(config, "finalize_model_grads_func", None) is None:
            raise ValueError(
                "DeferredLossHook needs config.finalize_model_grads_func "
                "(megatron.core.distributed.finalize_model_grads): it divides by the step's total."
            )

    @staticmethod
    def sequence_token_counts(
        full_loss_mask: torch.Tensor, packed_seqs: Union[PackedSequences, Any, None] = None
    ) -> torch.Tensor:
        """``n_i`` of every sequence of a micro-batch, from its whole-sequence (pre-CP-split)
        mask: ``[b]`` for unpacked rows, ``[K]`` for a packed row. No host sync."""
        packed = PackedSequences.coerce(packed_seqs, "packed_seqs")
        return agg.sequence_view(full_loss_mask, packed).counts

    def loss_func(
        self,
        loss_mask: torch.Tensor,
        per_token_loss_fn: Optional[PerTokenLossFn] = None,
        *,
        sequence_token_counts: Optional[torch.Tensor] = None,
        packed_seqs: Union[PackedSequences, Any, None] = None,
    ) -> Callable[..., tuple]:
        """The ``loss_func`` for ``forward_step`` to return (a 3-tuple one).

        Args:
            loss_mask: the micro-batch's mask as the output sees it (CP-local under CP).
            per_token_loss_fn: as for :meth:`LossHook.loss_func`.
            sequence_token_counts: ``n_i`` of whole sequences (before the CP split), needed
                under context parallelism by ``seq-mean-token-mean`` and
                ``exclude_fully_masked_seqs``; from :meth:`sequence_token_counts`.
            packed_seqs: the sequences packed into the row (whole-row boundaries), or ``None``.
        """
        packed = PackedSequences.coerce(packed_seqs, "packed_seqs")

        def deferred_loss_func(output_tensor: torch.Tensor, non_loss_data: bool = False) -> Any:
            per_token = per_token_loss_fn(output_tensor) if per_token_loss_fn is not None else output_tensor
            if non_loss_data:
                if isinstance(per_token, Mapping):
                    return {k: v.detach() for k, v in per_token.items()}
                return per_token.detach()
            losses = split_term_losses(self.terms, per_token, 0)
            return self._loss(losses, loss_mask, sequence_token_counts, packed)

        return deferred_loss_func

    # -- one micro-batch ------------------------------------------------------------------------
    def _loss(self, losses: Dict[str, torch.Tensor], loss_mask: torch.Tensor,
              counts: Optional[torch.Tensor], packed: Optional[PackedSequences]) -> tuple:
        groups = resolve_groups(self._pg_collection)
        cp_size, cp_rank = groups.cp_size, groups.cp_rank
        if packed is not None and loss_mask.shape[0] != 1:
            raise ValueError(
                f"packed_seqs packs sequences into one row (Megatron's THD layout), but the mask "
                f"has {loss_mask.shape[0]} rows."
            )
        for name, loss in losses.items():
            if loss.shape != loss_mask.shape:
                raise ValueError(
                    f"The per-token loss of term {name!r} has shape {tuple(loss.shape)} but the mask "
                    f"has {tuple(loss_mask.shape)}; the loss function must return one loss per token."
                )
        device = loss_mask.device
        local_len = loss_mask.shape[-1]
        valid = agg.valid_tokens(loss_mask)
        # Sequence index of every local token, and the default C_i (whole-sequence padded length).
        if packed is None:
            num_seqs = loss_mask.shape[0]
            seq_index = None
            lengths = torch.full((num_seqs,), float(local_len * cp_size), dtype=torch.float64, device=device)
        else:
            total = local_len * cp_size
            whole = agg.sequence_view(torch.ones(1, total, dtype=torch.bool, device=device), packed)
            num_seqs = whole.num_seqs
            seq_index = whole.seq_index
            if cp_size > 1:
                _, cu_padded = packed.boundaries(device)
                seq_index = seq_index.index_select(-1, thd_cp_local_positions(cu_padded, total, cp_size, cp_rank))
            valid = valid & (seq_index < num_seqs)
            lengths = whole.padded_lengths
        if counts is None:
            needs_counts = any(
                t.agg_mode is AggMode.SEQ_MEAN_TOKEN_MEAN or t.exclude_fully_masked_seqs
                for t in self.terms.values()
            )
            if needs_counts and cp_size > 1:
                raise ValueError(
                    "Under context parallelism, seq-mean-token-mean and exclude_fully_masked_seqs need "
                    "each sequence's token count over the whole sequence; pass sequence_token_counts="
                    "DeferredLossHook.sequence_token_counts(full_loss_mask[, packed_seqs]) computed "
                    "before the CP split."
                )
            if seq_index is None:
                counts = valid.sum(dim=-1, dtype=torch.float64)
            else:
                counts = torch.zeros(num_seqs + 1, dtype=torch.float64, device=device)
                counts = counts.index_add_(0, seq_index.reshape(-1), valid.reshape(-1).to(torch.float64))[:num_seqs]
        counts = counts.to(device=device, dtype=torch.float64)
        view = agg.SequenceView(valid, seq_index, num_seqs, counts, lengths)
        numerator = None
        report: Dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            part = agg.masked_weighted_sum(losses[name], valid, agg.sequence_weights(term, view))
            weighted = part * term.weight if term.weight != 1.0 else part
            numerator = weighted if numerator is None else numerator + weighted
            if len(self.terms) > 1:
                report[name] = part.detach()
        assert numerator is not None
        term = self._term
        if term.agg_mode is AggMode.TOKEN_MEAN:
            num_tokens = valid.sum(dtype=torch.int)
        else:
            seqs = (counts > 0).sum(dtype=torch.int) if term.exclude_fully_masked_seqs else torch.tensor(
                num_seqs, dtype=torch.int, device=device
            )
            num_tokens = seqs if cp_rank == 0 else torch.zeros((), dtype=torch.int, device=device)
        count = num_tokens.to(torch.float32)
        out = {DEFAULT_TERM_NAME: torch.stack([numerator.detach().to(torch.float32), count])}
        for name, value in report.items():
            out[name] = torch.stack([value.to(torch.float32), count])
        return numerator, num_tokens, out
