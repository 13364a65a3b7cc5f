"""The gradient-equivalence matrix: every mode under many parallel layouts and Megatron paths.

Run under ``torchrun`` (gloo, CPU)::

    torchrun --nproc-per-node 4 -m harness.matrix --suite core --out results.json

Each *configuration* is one optimizer step of a small ``GPTModel`` on a ragged global batch
(:mod:`.data`) under a layout (TP/PP/VPP/CP, DP from the world size), a Megatron path (loss
return convention × ``calculate_per_token_loss`` × ``average_in_collective``) and a loss spec
(mode × options, or a two-term GRPO-style loss; and the specs of issue 13: ``token-sum``,
``prompt-mean`` with groups that straddle micro-batches and ranks, terms over masks of their own,
exact metrics). It passes when every rank's gradients
(``main_grad`` after ``finalize_model_grads``) equal the matching slice of the single-process
reference gradients (:func:`megatron_agg.reference_loss` over the whole global batch, the model
written out in plain PyTorch (:mod:`.reference_gpt`), plain autograd) to ``--tol`` relative, the hook's :meth:`~megatron_agg.LossHook.global_loss` and its
``[sum, count]`` reports equal the reference loss, every metric (``global_loss()`` and its
reports) equals its single-process value, and the hook issued exactly the expected number of
collectives. Negative controls (Megatron's plain per-micro-batch averaging, a
``local × dp`` denominator) run in the same harness and must *fail* the comparison; the native
``calculate_per_token_loss`` token-mean must pass it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_agg.megatron.averaging import LossReturn
from megatron_agg.groups import ParallelGroups
from megatron_agg.scaling import MegatronScaling
from megatron_agg.definition import reference_loss
from megatron_agg.modes import AggMode
from megatron_agg.terms import DEFAULT_MASK_NAME, LossTerm
from megatron_agg.compare import data as data_mod
from megatron_agg.compare.controls import LocalTimesDpGroups, groups_like, plain_masked_mean
from megatron_agg.compare.cpu import cpu_shim
from megatron_agg.compare.gpt import TinyGPT, build_chunks, grad_error, load_full_weights, reference_grads, wrap_ddp
from megatron_agg.compare.parallel import Layout, model_parallel
from megatron_agg.compare.reference_gpt import init_full_weights, per_token_loss
from .sync_guard import count_collectives, forbid_host_sync

__all__ = ["LossSpec", "Variant", "Layout", "SUITES", "LOSS_SPECS", "EXTENDED_SPECS", "VARIANTS", "CONTROLS",
           "CP_CONTROLS", "LocalTimesDpGroups", "CpFactorLeftIn", "groups_like", "plain_masked_mean", "main"]

TOLERANCE = 1e-5
#: A negative control must miss the reference by at least this much (not a borderline pass).
CONTROL_MARGIN = 1e-3


# ---------------------------------------------------------------------------------------------
# What is computed
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSpec:
    """A loss: named terms and a map from the model output (per-token CE) to per-token losses
    (and to the per-token values of the ``metrics``); terms and metrics may name masks of their
    own (the batch's ``"correct"`` mask) and be ``prompt-mean`` over ``group_ids`` (one id per
    global-batch row) numbered as ``group_scope`` says."""

    name: str
    terms: Mapping[str, LossTerm]
    fn: Optional[Callable[[torch.Tensor], Any]] = None
    metrics: Mapping[str, LossTerm] = field(default_factory=dict)
    group_ids: Optional[Tuple[int, ...]] = None
    num_groups: Optional[int] = None
    group_scope: Optional[str] = None

    @property
    def channels(self) -> Dict[str, LossTerm]:
        return {**self.terms, **self.metrics}

    @property
    def named_masks(self) -> bool:
        """Whether the hook needs ``loss_masks={name: [...]}`` (a term or metric off the default mask)."""
        return any(t.mask != DEFAULT_MASK_NAME for t in self.channels.values())

    @property
    def mask_names(self) -> List[str]:
        used = [t.mask for t in self.channels.values()]
        return [n for n in dict.fromkeys([DEFAULT_MASK_NAME] * (DEFAULT_MASK_NAME in used) + used)]

    def hook_options(self) -> Dict[str, Any]:
        options: Dict[str, Any] = {}
        if self.metrics:
            options["metrics"] = dict(self.metrics)
        if self.group_ids is not None:
            options.update(num_groups=self.num_groups, group_scope=self.group_scope)
        return options

    def _per_token(self, ce: torch.Tensor) -> Dict[str, torch.Tensor]:
        per_token = self.fn(ce) if self.fn is not None else ce
        if isinstance(per_token, torch.Tensor):
            per_token = {next(iter(self.terms)): per_token}
        return per_token

    def _reference(self, values: torch.Tensor, masks: Any, term: LossTerm) -> torch.Tensor:
        mask = masks[term.mask] if isinstance(masks, Mapping) else masks
        groups = [list(self.reference_groups())] if term.agg_mode.needs_groups else None
        return reference_loss([values], [mask], term, group_ids=groups)

    def reference_groups(self) -> Tuple[int, ...]:
        """The groups of the definition: the spec's ids read as global ids. A ``"per-rank"`` spec
        uses :data:`.data.ALIGNED_GROUP_IDS`, whose groups never straddle a data-parallel rank, so
        that the hook's (rank, id) pairs are these same groups."""
        assert self.group_ids is not None
        return tuple(self.group_ids)

    def reference(self, ce: torch.Tensor, mask: Any) -> torch.Tensor:
        """The loss by its definition over the global batch: ``mask`` is the default mask or every
        mask of the batch by name."""
        per_token = self._per_token(ce)
        return sum(self._reference(per_token[n], mask, t) for n, t in self.terms.items())

    def metric_references(self, ce: torch.Tensor, mask: Any) -> Dict[str, float]:
        per_token = self._per_token(ce)
        with torch.no_grad():
            return {n: float(self._reference(per_token[n].detach(), mask, t)) for n, t in self.metrics.items()}


def _grpo_fn(ce: torch.Tensor) -> Dict[str, torch.Tensor]:
    # A policy term and a KL-like term, both functions of the per-token output.
    return {"pg": ce, "kl": 0.5 * ce * ce}


def _mode_specs() -> List[LossSpec]:
    specs = []
    for mode in AggMode:
        if mode in (AggMode.TOKEN_SUM, AggMode.PROMPT_MEAN):  # the issue-13 specs: EXTENDED_SPECS
            continue
        for exclude in (False, True):
            name = mode.value + ("+excl" if exclude else "")
            specs.append(LossSpec(name, {"loss": LossTerm(mode, exclude_fully_masked_seqs=exclude)}))
    specs.append(
        LossSpec("seq-mean-token-sum-norm+C12", {"loss": LossTerm("seq-mean-token-sum-norm", loss_scale_factor=12.0)})
    )
    specs.append(
        LossSpec(
            "grpo:pg-token-mean+0.1*kl-seq-mean-token-mean+excl",
            {
                "pg": LossTerm("token-mean"),
                "kl": LossTerm("seq-mean-token-mean", weight=0.1, exclude_fully_masked_seqs=True),
            },
            fn=_grpo_fn,
        )
    )
    return specs


def _rl_fn(ce: torch.Tensor) -> Dict[str, torch.Tensor]:
    # A policy term, an NLL term (VAPO: over the "correct" samples' tokens) and per-token metrics:
    # an entropy-like value, a ratio-like value, a 0/1 clip indicator and a KL-like value.
    return {"pg": ce, "nll": 0.5 * ce * ce, "entropy": torch.exp(-ce), "clipfrac": (ce > 4.0).float(),
            "kl": 0.1 * ce * ce, "ratio": 1.0 + 0.01 * ce}


def _metrics_fn(ce: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {"loss": ce, "entropy": torch.exp(-ce), "kl": 0.1 * ce * ce, "kl_excl": 0.1 * ce * ce,
            "tokens": torch.ones_like(ce), "ratio": 1.0 + 0.01 * ce}


def _extended_specs() -> List[LossSpec]:
    """Issue 13: token-sum; prompt-mean over groups that straddle micro-batches and ranks (global
    ids), with empty groups excluded or not, and over per-rank ids; terms over masks of their own
    with exact metrics of every kind of mode; metrics on the default mask (which the deferred mode
    reports through Megatron's [sum, count] pairs)."""
    groups = dict(group_ids=data_mod.GROUP_IDS, num_groups=data_mod.NUM_GROUPS, group_scope="global")
    return [
        LossSpec("token-sum", {"loss": LossTerm("token-sum")}),
        LossSpec("prompt-mean", {"loss": LossTerm("prompt-mean")}, **groups),
        LossSpec("prompt-mean+excl", {"loss": LossTerm("prompt-mean", exclude_fully_masked_seqs=True)}, **groups),
        LossSpec("prompt-mean+excl[per-rank ids]", {"loss": LossTerm("prompt-mean", exclude_fully_masked_seqs=True)},
                 group_ids=data_mod.ALIGNED_GROUP_IDS, num_groups=data_mod.NUM_GROUPS, group_scope="per-rank"),
        LossSpec(
            "vapo:pg-token-mean+0.5*nll-token-mean[correct]+metrics",
            {"pg": LossTerm("token-mean"), "nll": LossTerm("token-mean", weight=0.5, mask="correct")},
            fn=_rl_fn,
            metrics={"entropy": LossTerm("token-mean"),
                     "clipfrac": LossTerm("prompt-mean", mask="correct"),
                     "kl": LossTerm("seq-mean-token-mean", exclude_fully_masked_seqs=True, mask="correct"),
                     "ratio": LossTerm("token-sum")},
            **groups,
        ),
        LossSpec(
            "token-mean+metrics",
            {"loss": LossTerm("token-mean")},
            fn=_metrics_fn,
            metrics={"entropy": LossTerm("token-mean"), "kl": LossTerm("seq-mean-token-mean"),
                     "kl_excl": LossTerm("seq-mean-token-mean", exclude_fully_masked_seqs=True),
                     "tokens": LossTerm("token-sum"), "ratio": LossTerm("seq-mean-token-sum-norm")},
        ),
    ]


LOSS_SPECS: List[LossSpec] = _mode_specs()
TOKEN_MEAN = LOSS_SPECS[0]
SEQ_MEAN_TOKEN_MEAN = next(s for s in LOSS_SPECS if s.name == "seq-mean-token-mean")
#: The specs of issue 13, run on every layout of the core suite and on a subset elsewhere
#: (:data:`EXTENDED_IN`).
EXTENDED_SPECS: List[LossSpec] = _extended_specs()
LOSS_SPECS += EXTENDED_SPECS
PROMPT_MEAN = next(s for s in EXTENDED_SPECS if s.name == "prompt-mean")
TOKEN_SUM = next(s for s in EXTENDED_SPECS if s.name == "token-sum")
RL_SPEC = next(s for s in EXTENDED_SPECS if s.name.startswith("vapo:"))


@dataclass(frozen=True)
class Variant:
    """A Megatron path: the loss return convention and the averaging options."""

    loss_return: LossReturn
    per_token: bool = False  # TransformerConfig.calculate_per_token_loss
    average_in_collective: bool = False  # DistributedDataParallelConfig
    deferred: bool = False  # DeferredLossHook: data streamed, num_tokens channel, no collective

    @property
    def name(self) -> str:
        return (
            f"{'deferred-' if self.deferred else ''}{self.loss_return.value}"
            f"{'+per-token' if self.per_token else ''}"
            f"{'+avg-in-collective' if self.average_in_collective else ''}"
        )


VARIANTS: List[Variant] = [
    Variant(LossReturn.TWO_TUPLE),
    Variant(LossReturn.TWO_TUPLE, average_in_collective=True),
    Variant(LossReturn.TWO_TUPLE, per_token=True),
    Variant(LossReturn.THREE_TUPLE),
    Variant(LossReturn.THREE_TUPLE, average_in_collective=True),
    Variant(LossReturn.THREE_TUPLE, per_token=True),
    Variant(LossReturn.THREE_TUPLE, per_token=True, deferred=True),
]


def runs_in(variant: Variant, spec: LossSpec) -> bool:
    """The deferred mode carries one denominator: specs whose terms have several, that use
    ``prompt-mean`` or masks of their own are not run there (DeferredLossHook refuses them, tested
    in tests/test_deferred.py)."""
    if not variant.deferred:
        return True
    if spec.group_ids is not None or spec.named_masks:
        return False
    kinds = {(t.agg_mode is AggMode.TOKEN_MEAN, t.agg_mode is AggMode.TOKEN_SUM, t.exclude_fully_masked_seqs)
             for t in spec.terms.values()}
    return len(kinds) == 1


#: Where the issue-13 specs run: per suite (and ``"suite:world"`` where a world differs), the
#: variants (``None``: all) of each extended spec (absent: not run there). Every layout of the
#: core suite runs them, with every Megatron path on 1 and 2 ranks and four paths on 4; the
#: cp suite with three paths (two on its slowest launch, 4 ranks); the version matrix's release
#: suite a few.
_SHORT = ("2-tuple", "3-tuple+per-token", "deferred-3-tuple+per-token")
_MID = ("2-tuple", "3-tuple", "3-tuple+per-token", "deferred-3-tuple+per-token")
EXTENDED_IN: Dict[str, Dict[str, Optional[Tuple[str, ...]]]] = {
    "core": {s.name: None for s in EXTENDED_SPECS},
    "core:4": {s.name: _MID for s in EXTENDED_SPECS},
    "cp": {s.name: _SHORT for s in EXTENDED_SPECS},
    "cp:4": {s.name: ("2-tuple", "deferred-3-tuple+per-token") for s in EXTENDED_SPECS},
    "release": {"token-sum": None, "token-mean+metrics": None, "prompt-mean+excl": ("3-tuple+per-token",),
                "vapo:pg-token-mean+0.5*nll-token-mean[correct]+metrics": ("2-tuple",)},
    "smoke": {},
}


def runs_in_suite(suite: Optional[str], variant: Variant, spec: LossSpec, world: Optional[int] = None) -> bool:
    """Whether ``spec`` runs with ``variant`` in ``suite`` on ``world`` ranks (``suite`` ``None``:
    every spec everywhere; ``world`` ``None``: on some world size of the suite)."""
    if not runs_in(variant, spec):
        return False
    if suite is None or spec not in EXTENDED_SPECS:
        return True
    keys = [f"{suite}:{world}"] if world is not None else [k for k in EXTENDED_IN if k.startswith(suite + ":")]
    tables = [EXTENDED_IN[k] for k in keys if k in EXTENDED_IN] or [EXTENDED_IN.get(suite, {})]
    if world is None and suite in EXTENDED_IN:
        tables.append(EXTENDED_IN[suite])
    for table in tables:
        if spec.name in table and (table[spec.name] is None or variant.name in table[spec.name]):
            return True
    return False

#: Layouts of each suite by world size (every layout uses the whole world; dp = world / tp·pp·cp).
SUITES: Dict[str, Dict[int, List[Layout]]] = {
    "core": {
        1: [Layout()],
        2: [Layout(tp=2), Layout(pp=2), Layout(pp=2, vpp=2), Layout()],
        4: [
            Layout(),
            Layout(tp=2),
            Layout(pp=2),
            Layout(pp=2, vpp=2),
            Layout(tp=2, pp=2, vpp=2),  # TP x PP (dp 1); TP2xPP2 without VPP adds no pair
        ],
    },
    # Context parallelism and packed sequences; needs a core attention that supports both
    # (tests/support/cp_attention.py, passed with --layer-spec). Every layout runs unpacked
    # and packed, but TP x CP packed only (packings_of).
    "cp": {
        2: [Layout(cp=2), Layout()],
        4: [Layout(cp=2), Layout(cp=2, tp=2), Layout(cp=2, pp=2)],
    },
    # One launch per megatron-core release in the version matrix (scripts/run_version_matrix.sh):
    # DP, TP, PP, VPP and CP, each beside DP 2 (what a release changes: where the schedule takes
    # its groups and how it scales, finalize, DDP; TP only decides where the loss is computed),
    # every loss spec and Megatron path; needs --layer-spec for CP.
    "release": {
        4: [Layout(pp=2, vpp=2), Layout(tp=2), Layout(cp=2)],
    },
    # The fast tier's one launch (tests/test_smoke.py): TP, interleaved PP and CP (with packing)
    # beside DP on 4 ranks; needs --layer-spec for CP.
    "smoke": {
        2: [Layout(tp=2)],
        4: [Layout(tp=2), Layout(pp=2, vpp=2), Layout(cp=2)],
    },
}
#: Which suites also run every layout with packed sequences, and which add the CP controls.
PACKED_SUITES = {"cp"}
#: How a micro-batch's rows are laid out: one sequence per row; packed rows cut per document over
#: CP (Megatron's default, ``cp_layout="load-balanced"``); packed rows cut as a whole (Megatron-LM's
#: ``--dataloader-inter-document-masking``, ``cp_layout="per-row"``; run where cp > 1 only, as it
#: equals "packed" without CP).
PACKINGS = ("unpacked", "packed", "packed-per-row")
CP_CONTROL_SUITES = {"cp", "release", "smoke"}


# ---------------------------------------------------------------------------------------------
# Pairwise coverage (the core and cp suites of the test command, the release suite of the version matrix)
# ---------------------------------------------------------------------------------------------
# Why pairs suffice. The hook returns ``S·F`` per micro-batch. The share ``S = Σ m·α·l / D`` depends
# on the loss spec (the weights α, the denominator D), on the data-parallel totals and on how the
# rows are cut over CP (packing, per document or per row); it does not depend on the Megatron path.
# The factor ``F`` depends on the path (2-/3-tuple, calculate_per_token_loss, average in
# collective, deferred), on M, cp and dp_cp, and on the spec only through the ``num_tokens`` it
# returns (one count per spec's denominator kind: tokens or sequences). TP, PP and VPP decide only
# where the loss is computed (the last stage) and which replicas must not be counted twice. So the
# interactions that can go wrong are spec × (dp, cp, packing) and path × (dp, cp, layout) and
# spec × path through the denominator kind, and each is a pair:
#   - every path on every layout with a token mean and a sequence mean (the two denominator kinds);
#   - every spec on every layout with one path, rotating over the paths from layout to layout
#     (and packing to packing);
#   - the full product spec × path on the layouts of FULL_PRODUCT (dp > 1, and cp > 1 packed).
# tests/test_matrix.py checks that every spec meets every factor value and every path.
PAIRWISE_SUITES = {"core", "cp", "release"}
PAIRWISE_BASE_SPECS = ("token-mean", "seq-mean-token-mean")
FULL_PRODUCT: Dict[str, Tuple[Tuple[Any, ...], ...]] = {  # (world, layout) or (world, layout, packing)
    "core": ((2, "dp2-tp1-pp1"),),
    "cp": ((2, "dp1-tp1-pp1-cp2", "packed"),),
    "release": ((4, "dp2-tp1-pp2-vpp2"),),
}


def suite_layout_index(suite: str, world: int, layout: Layout) -> int:
    """The position of ``layout`` of ``world`` among all layouts of ``suite`` (by world, then order)."""
    index = 0
    for w in sorted(SUITES[suite]):
        for candidate in SUITES[suite][w]:
            if w == world and candidate == layout:
                return index
            index += 1
    raise ValueError(f"{layout} is not a layout of suite {suite!r} at world {world}")


def runs_on_layout(suite: Optional[str], world: int, layout: Layout, variant: Variant, spec: LossSpec,
                   packing: Optional[str] = None) -> bool:
    """Whether ``spec`` runs with ``variant`` on ``layout`` (with ``packing``) (the pairwise rule
    above for :data:`PAIRWISE_SUITES`, the path rotating over layouts and packings; every pair
    :func:`runs_in_suite` allows elsewhere)."""
    if not runs_in_suite(suite, variant, spec, world):
        return False
    full = FULL_PRODUCT.get(suite, ())
    if suite not in PAIRWISE_SUITES or (world, layout.name(world)) in full or (world, layout.name(world), packing) in full:
        return True
    if spec.name in PAIRWISE_BASE_SPECS:
        return True
    paths = [v for v in VARIANTS if runs_in_suite(suite, v, spec, world)]
    spec_index = next(i for i, s in enumerate(LOSS_SPECS) if s.name == spec.name)
    shift = PACKINGS.index(packing) if packing in PACKINGS else 0
    return variant == paths[(suite_layout_index(suite, world, layout) + spec_index + shift) % len(paths)]


# ---------------------------------------------------------------------------------------------
# Controls: loss functions that do *not* use the hook's exact scaling
# ---------------------------------------------------------------------------------------------
class CpFactorLeftIn(MegatronScaling):
    """A broken scaling, injected through ``LossHook(scaling=...)``: Megatron's × cp of the 2-tuple
    path is left uncancelled."""

    def multipliers(self, num_tokens: torch.Tensor, total_tokens: torch.Tensor) -> torch.Tensor:
        return super().multipliers(num_tokens, total_tokens) * self.averaging.cp_size


def _local_times_dp(groups: ParallelGroups) -> Dict[str, Any]:
    return {"groups": groups_like(groups, LocalTimesDpGroups)}


def _cp_uncancelled(groups: ParallelGroups) -> Dict[str, Any]:
    return {"scaling": CpFactorLeftIn}


def _dp_cp_as_dp(groups: ParallelGroups) -> Dict[str, Any]:
    """The user hands the hook the data×context group as its data-parallel group: every CP rank's
    totals are summed (N and T × cp)."""
    return {"groups": groups_like(groups, dp=groups.dp_cp)}


def _told_per_document(groups: ParallelGroups) -> Dict[str, Any]:
    """The Megatron-LM patch's old mistake: rows cut as a whole (inter-document masking), the hook
    told the default per-document layout. The documents are padded to multiples of 2·cp so that
    both layouts can cut the row. The prepared hook's mask check sees the mismatch (the loss
    function's CP-local mask is not the told layout's slice of ``loss_masks``) and raises: it is
    switched off here to show the gradient the check prevents. (The deferred mode's count check,
    whole-sequence counts >= the tokens it maps to each sequence, caught it in these runs too,
    but it cannot in general: it relies on being told.)"""
    return {"cp_layout": "load-balanced", "pad_documents": True, "check_masks": False}


def _groups_counted_per_rank(groups: ParallelGroups) -> Dict[str, Any]:
    """The step's global group ids told to the hook as per-rank ids: each rank's part of a group
    becomes a group of its own, M_g and P counted per rank (what a trainer gets when it averages
    prompt groups inside one DP shard)."""
    return {"group_scope": "per-rank"}


def _term_mask_ignored(groups: ParallelGroups) -> Dict[str, Any]:
    """The NLL term over the "correct" tokens built on the default mask, its per-token loss zeroed
    outside the correct tokens: the numerator is right, the denominator counts every valid token
    of the step (the approximation NeMo-RL #3791 reports)."""
    return {"term_masks_to_default": True}


def _metrics_mean_of_local_means(groups: ParallelGroups) -> Dict[str, Any]:
    """The metrics reported as Megatron-LM reports them without the hook: per micro-batch the
    local masked mean with a count of 1, averaged over micro-batches and ranks."""
    return {"local_mean_metrics": True}


def _told_no_cp(groups: ParallelGroups) -> Dict[str, Any]:
    """The user does not tell the hook about context parallelism and gives it the CP-local masks:
    per-sequence counts come from the slice, sequences are counted per CP rank."""
    return {"groups": groups_like(groups, cp=None), "local_masks": True}


@dataclass(frozen=True)
class Control:
    name: str
    variant: Variant
    spec: LossSpec  # the reference it is compared against
    expect_pass: Callable[[int, int], bool]  # of the dp and cp sizes
    plain: Optional[LossReturn] = None  # Megatron's plain loss instead of the hook
    #: Builds LossHook arguments from the step's real groups: the broken variant, injected through
    #: the hook's public arguments (groups=, scaling=), never by patching megatron_agg.
    breaker: Optional[Callable[[ParallelGroups], Dict[str, Any]]] = None
    #: The packings it runs in (the per-row controls run only there).
    packings: Tuple[str, ...] = ("unpacked", "packed")
    #: With ``plain``: the local masked sum instead of the mean (a token-sum left to Megatron's averaging).
    plain_sum: bool = False


CONTROLS: List[Control] = [
    Control("plain-mean-2-tuple", Variant(LossReturn.TWO_TUPLE), TOKEN_MEAN, lambda dp, cp: False, plain=LossReturn.TWO_TUPLE),
    Control("plain-mean-3-tuple", Variant(LossReturn.THREE_TUPLE), TOKEN_MEAN, lambda dp, cp: False, plain=LossReturn.THREE_TUPLE),
    Control(
        "native-per-token-3-tuple", Variant(LossReturn.THREE_TUPLE, per_token=True), TOKEN_MEAN,
        lambda dp, cp: True, plain=LossReturn.THREE_TUPLE,
    ),
    Control("hook-local-x-dp", Variant(LossReturn.TWO_TUPLE), SEQ_MEAN_TOKEN_MEAN, lambda dp, cp: dp == 1,
            breaker=_local_times_dp),
    # issue 13: one control per new option (the arithmetic's in tests/test_aggregation.py)
    Control("plain-token-sum-2-tuple", Variant(LossReturn.TWO_TUPLE), TOKEN_SUM, lambda dp, cp: False,
            plain=LossReturn.TWO_TUPLE, plain_sum=True),
    Control("hook-prompt-groups-counted-per-rank", Variant(LossReturn.THREE_TUPLE, per_token=True), PROMPT_MEAN,
            lambda dp, cp: dp == 1, breaker=_groups_counted_per_rank),
    Control("hook-term-mask-counted-from-the-default-mask", Variant(LossReturn.TWO_TUPLE), RL_SPEC,
            lambda dp, cp: False, breaker=_term_mask_ignored),
    Control("metrics-mean-of-local-means", Variant(LossReturn.THREE_TUPLE), RL_SPEC,
            lambda dp, cp: False, breaker=_metrics_mean_of_local_means),
]
CP_CONTROLS: List[Control] = [
    Control("hook-2-tuple-cp-uncancelled", Variant(LossReturn.TWO_TUPLE), TOKEN_MEAN,
            lambda dp, cp: cp == 1, breaker=_cp_uncancelled),
    Control("hook-seqs-counted-per-cp-rank", Variant(LossReturn.THREE_TUPLE), SEQ_MEAN_TOKEN_MEAN,
            lambda dp, cp: cp == 1, breaker=_dp_cp_as_dp),
    Control("hook-seq-mean-over-cp-slice", Variant(LossReturn.THREE_TUPLE), SEQ_MEAN_TOKEN_MEAN,
            lambda dp, cp: cp == 1, breaker=_told_no_cp),
    Control("hook-per-row-told-per-document", Variant(LossReturn.THREE_TUPLE), SEQ_MEAN_TOKEN_MEAN,
            lambda dp, cp: cp == 1, breaker=_told_per_document, packings=("packed-per-row",)),
]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclass
class Result:
    layout: str
    packed: bool
    packing: str
    variant: str
    spec: str
    control: Optional[str]
    grad_err: float
    loss_err: float
    report_err: float
    collectives_ok: bool
    expect_pass: bool
    seconds: float
    passed: bool = field(default=False)
    #: The largest relative error of a metric (global_loss() and the [sum, count] reports).
    metric_err: float = 0.0

    def finalize(self, tol: float) -> None:
        exact = (self.grad_err <= tol and self.loss_err <= tol and self.report_err <= tol and self.collectives_ok
                 and self.metric_err <= tol)
        if self.expect_pass:
            self.passed = exact
        else:  # a control must clearly miss the reference (its gradients, or its metrics)
            self.passed = max(self.grad_err, self.metric_err) > CONTROL_MARGIN


#: Reads this rank's gradients after a step and returns its largest relative error against the
#: reference gradients (``Harness.run(grad_error_fn=...)``).
GradErrorFn = Callable[[List[torch.nn.Module], Dict[str, torch.Tensor]], float]


class Harness:
    def __init__(self, model: TinyGPT, seq_length: int = 16, tol: float = TOLERANCE,
                 cp_layer_spec: Optional[Callable[[], Any]] = None) -> None:
        self.model = model
        # Megatron's local attention refuses CP and packed input: those runs use this spec.
        self.cp_model = replace(model, layer_spec=cp_layer_spec) if cp_layer_spec else None
        self.tol = tol
        self.batch = data_mod.make_global_batch(model.vocab_size, seq_length)
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.full: Dict[str, torch.Tensor] = {}
        self.ref: Dict[str, Tuple[Dict[str, torch.Tensor], float]] = {}
        self.metric_ref: Dict[str, Dict[str, float]] = {}

    # -- reference: the plain-PyTorch model on the whole global batch, on every rank -------------
    def compute_references(self, specs: Sequence[LossSpec]) -> None:
        self.full = init_full_weights(self.model, self.model.seed)
        b = self.batch
        position_ids = torch.arange(b.seq_length).unsqueeze(0).expand_as(b.tokens)
        for spec in specs:
            if spec.name in self.ref:
                continue
            value: List[float] = []

            def loss_fn(w: Dict[str, torch.Tensor], spec: LossSpec = spec) -> torch.Tensor:
                ce = per_token_loss(w, self.model, b.tokens, position_ids, b.labels)
                loss = spec.reference(ce, b.masks)
                value.append(float(loss))
                if spec.metrics:
                    self.metric_ref[spec.name] = spec.metric_references(ce, b.masks)
                return loss

            grads = reference_grads(self.full, loss_fn)
            self.ref[spec.name] = (grads, value[0])

    # -- one configuration ---------------------------------------------------------------------
    def run(self, layout: Layout, variant: Variant, spec: LossSpec, control: Optional[Control] = None,
            packing: str = "unpacked", *, model_spec: Optional[TinyGPT] = None,
            config_overrides: Optional[Mapping[str, Any]] = None,
            ddp_options: Optional[Mapping[str, Any]] = None, steps: int = 1,
            grad_error_fn: Optional[GradErrorFn] = None, wrapper: str = "ddp",
            wrapper_options: Optional[Mapping[str, Any]] = None) -> Result:
        """One configuration. The keyword options (used by :mod:`.features`; the matrix leaves them
        at their defaults) build another Megatron model of the same reference (``model_spec``,
        e.g. another layer spec), add ``TransformerConfig`` overrides,
        ``DistributedDataParallelConfig`` options, further steps (the same global batch again
        after ``zero_grad_buffer``; every step is compared after its ``finalize_model_grads``, the
        result carries the worst) and another way of reading the gradients to compare
        (``grad_error_fn(model, ref_grads)`` -> this rank's largest relative error; default: every
        parameter's ``main_grad``, :func:`.gpt.grad_error`). ``wrapper`` other than ``"ddp"``
        (or any ``wrapper_options``) builds and wraps the chunks with :mod:`.wrappers`
        (``build_chunks_for``/``wrap_model(**wrapper_options)``; ``ddp_options`` unused there)."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_agg.deferred import DeferredLossHook
        from megatron_agg.hook import LossHook

        t0 = time.perf_counter()
        packed = packing != "unpacked"
        model_spec = model_spec or self.model
        if layout.cp > 1 or packed:
            if self.cp_model is None:
                raise SystemExit("context parallelism and packed sequences need --layer-spec with an "
                                 "attention that supports them (tests/support/cp_attention.py:layer_spec)")
            model_spec = self.cp_model
        overrides = dict(config_overrides or {})
        overrides["calculate_per_token_loss"] = variant.per_token
        if wrapper != "ddp" or wrapper_options:
            from megatron_agg.compare.wrappers import build_chunks_for, full_weights_for, wrap_model

            chunks = build_chunks_for(model_spec, layout, wrapper, **overrides)
            model = wrap_model(chunks, wrapper, full_weights=full_weights_for(chunks, self.full),
                               average_in_collective=variant.average_in_collective, **dict(wrapper_options or {}))
        else:
            chunks = build_chunks(model_spec, layout, **overrides)
            load_full_weights(chunks, self.full)
            model = wrap_ddp(chunks, average_in_collective=variant.average_in_collective, **dict(ddp_options or {}))
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        from megatron_agg.megatron.model_setup import resolve_groups

        broken = control.breaker(resolve_groups()) if control and control.breaker else {}
        local_masks = bool(broken.pop("local_masks", False))
        cp_layout = "per-row" if packing == "packed-per-row" else "load-balanced"
        if packed:
            mbs = data_mod.split_for_rank_packed(self.batch, dp, dp_rank, cp, cp_rank, cp_layout=cp_layout,
                                                 pad_documents=broken.pop("pad_documents", None))
        else:
            mbs = data_mod.split_for_rank(self.batch, dp, dp_rank, cp, cp_rank)
        broken.setdefault("cp_layout", cp_layout)  # the layout the data was cut with (unless a control lies)
        is_last = ps.is_pipeline_last_stage()
        deferred = variant.deferred and not (control and control.plain)
        options = spec.hook_options()
        if "group_scope" in broken:  # a control that numbers the groups otherwise than the data does
            options["group_scope"] = broken.pop("group_scope")
        terms = dict(spec.terms)
        zero_outside: Dict[str, str] = {}  # term -> the mask its per-token loss is zeroed outside
        if broken.pop("term_masks_to_default", False):
            for name, term in terms.items():
                if term.mask != DEFAULT_MASK_NAME:
                    zero_outside[name] = term.mask
                    terms[name] = LossTerm(term.mode, weight=term.weight, exclude_fully_masked_seqs=term.exclude_fully_masked_seqs)
        local_mean_metrics = bool(broken.pop("local_mean_metrics", False))
        named = spec.named_masks
        if deferred:
            hook: Any = DeferredLossHook(terms=terms, cp_layout=broken.pop("cp_layout"), **options)
            hook.install(model)  # checks the config and the ranks' agreement before the step
        else:
            if "groups" in broken:
                # keep the class of the injected groups (LocalTimesDpGroups & co.), change the layout only
                broken["groups"] = groups_like(broken["groups"], type(broken["groups"]), cp_layout=broken.pop("cp_layout"))
            hook = LossHook(terms=terms, loss_return=variant.loss_return, **options, **broken)
        plain = plain_masked_mean(control.plain, control.plain_sum) if control and control.plain else None

        local_means: Dict[str, List[torch.Tensor]] = {name: [] for name in spec.metrics}

        def loss_fn_of(mb: data_mod.MicroBatch) -> Optional[Callable[[torch.Tensor], Any]]:
            if not zero_outside and not local_mean_metrics:
                return spec.fn

            def changed(output: torch.Tensor) -> Any:
                values = dict(spec.fn(output))  # type: ignore[misc]
                for name, mask in zero_outside.items():
                    values[name] = torch.where(mb.masks[mask] != 0, values[name], torch.zeros_like(values[name]))
                if local_mean_metrics:  # what a trainer logs without the hook: the local masked mean
                    with torch.no_grad():
                        for name, metric in spec.metrics.items():
                            valid = mb.masks[metric.mask] != 0
                            total = torch.where(valid, values[name], torch.zeros_like(values[name])).sum()
                            local_means[name].append(total / valid.sum().clamp(min=1))
                return values

            return changed

        def group_ids_of(mbs: Sequence[data_mod.MicroBatch]) -> Optional[List[torch.Tensor]]:
            if spec.group_ids is None:
                return None
            return [torch.tensor([spec.group_ids[r] for r in mb.rows], dtype=torch.int64) for mb in mbs]

        def forward_step(data_iterator: Iterator[data_mod.MicroBatch], chunk: torch.nn.Module):
            mb = next(data_iterator)
            output = chunk(mb.tokens, mb.position_ids, None, labels=mb.labels,
                           packed_seq_params=mb.packed_seq_params)
            if plain is not None:
                return output, plain(mb.loss_mask)
            if deferred:  # counts from whole sequences, as a data pipeline would before the CP split
                counts = DeferredLossHook.sequence_token_counts(mb.full_loss_mask, mb.packed) if cp > 1 else None
                inner = hook.loss_func(mb.loss_mask, spec.fn, sequence_token_counts=counts, packed_seqs=mb.packed)
            else:
                mask = {n: mb.masks[n] for n in spec.mask_names} if named else mb.loss_mask
                inner = hook.loss_func(mask, loss_fn_of(mb))

            def guarded(*args: Any, **kwargs: Any):
                with forbid_host_sync():
                    return inner(*args, **kwargs)

            return output, guarded

        fb = get_forward_backward_func()
        ref_grads, ref_loss = self.ref[spec.name]
        broken_totals = isinstance(broken.get("groups"), LocalTimesDpGroups)
        totals_collectives = 1 if (is_last and dp > 1 and plain is None and not broken_totals and not deferred) else 0
        expected_collectives = totals_collectives
        if plain is None:  # the end-of-step check, spread over the step (deferred: over the loss stage)
            groups = resolve_groups()
            spread = groups.loss_groups() if deferred else groups.step_groups()
            expected_collectives += len(spread)  # the harness installs the deferred hook on every rank
        grad_err = loss_err = report_err = metric_err = 0.0
        metric_ref = self.metric_ref.get(spec.name, {})
        collectives_ok = True
        for step in range(steps):
            if step > 0:  # a new step: Megatron-LM zeroes the grad buffers before each one
                for chunk in model:
                    chunk.zero_grad_buffer()
            iterators: Any = [iter(mbs) for _ in model] if layout.vpp else iter(mbs)
            kwargs = dict(
                forward_step_func=forward_step,
                data_iterator=iterators,
                model=model,
                num_microbatches=len(mbs),
                seq_length=mbs[0].tokens.shape[1],
                micro_batch_size=mbs[0].tokens.shape[0],
                forward_only=False,
            )
            # The 3-tuple runs hand the schedule the caller's groups (pg_collection & co., which the
            # hook must take its groups from); the 2-tuple runs leave them to parallel_state.
            if variant.loss_return is LossReturn.THREE_TUPLE:
                kwargs.update(schedule_group_kwargs(layout, model[0].config))
            with count_collectives() as counter:
                if plain is not None or deferred:
                    losses = fb(**kwargs)
                else:
                    told_cp = not local_masks or cp == 1
                    masks: Any = [mb.loss_mask if local_masks else mb.full_loss_mask for mb in mbs]
                    if named:
                        masks = {n: [mb.full_masks[n] for mb in mbs] for n in spec.mask_names}
                    losses = hook.wrap(fb)(
                        loss_masks=masks,
                        packed_seqs=[mb.packed for mb in mbs] if packed and told_cp else None,
                        group_ids=group_ids_of(mbs),
                        **kwargs,
                    )
            if grad_error_fn is None:
                grad_err = max(grad_err, max(grad_error(model, ref_grads).values()))
            else:
                grad_err = max(grad_err, float(grad_error_fn(model, ref_grads)))
            # The hook's first step checks the ranks' agreement on the set-up in a small all-reduce
            # of its own before the totals (once per hook).
            first = totals_collectives if step == 0 else 0
            collectives_ok = collectives_ok and counter.count == expected_collectives + first
            if plain is None and is_last:
                scale = max(abs(ref_loss), 1e-12)
                dp_cp_group = ps.get_data_parallel_group(with_context_parallel=True)
                pair = torch.stack([r["loss"] for r in losses]).sum(dim=0)
                dist.all_reduce(pair, group=dp_cp_group)
                report_err = max(report_err, abs(float(pair[0] / pair[1]) - ref_loss) / scale)
                values = None if deferred else hook.global_loss()
                if deferred:  # no global_loss() in the deferred mode: its value is the report's
                    loss_err = report_err
                else:
                    loss_err = max(loss_err, abs(float(values["loss"]) - ref_loss) / scale)
                for name, ref_value in metric_ref.items():
                    metric_scale = max(abs(ref_value), 1e-12)
                    if local_mean_metrics:  # the control: per micro-batch [local mean, 1]
                        means = local_means[name][-len(mbs):]
                        pairs = torch.stack([torch.stack(means).sum(), torch.tensor(float(len(means)))]).double()
                        dist.all_reduce(pairs, group=dp_cp_group)
                        metric_err = max(metric_err, abs(float(pairs[0] / pairs[1]) - ref_value) / metric_scale)
                        continue
                    metric_pair = torch.stack([r[name] for r in losses]).sum(dim=0).to(torch.float64)
                    dist.all_reduce(metric_pair, group=dp_cp_group)
                    metric_err = max(metric_err, abs(float(metric_pair[0] / metric_pair[1]) - ref_value) / metric_scale)
                    if values is not None:
                        metric_err = max(metric_err, abs(float(values[name]) - ref_value) / metric_scale)
        if deferred:
            hook.uninstall()

        stats = torch.tensor([grad_err, loss_err, report_err, 0.0 if collectives_ok else 1.0, metric_err],
                             dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        result = Result(
            layout=layout.name(self.world),
            packed=packed,
            packing=packing,
            variant=variant.name,
            spec=spec.name,
            control=control.name if control else None,
            grad_err=float(stats[0]),
            loss_err=float(stats[1]),
            report_err=float(stats[2]),
            collectives_ok=bool(stats[3] == 0),
            expect_pass=control.expect_pass(dp, cp) if control else True,
            seconds=time.perf_counter() - t0,
            metric_err=float(stats[4]),
        )
        result.finalize(self.tol)
        return result


def schedule_group_kwargs(layout: Layout, config: Any) -> Dict[str, Any]:
    """The process groups the installed release's schedules accept, built as a caller would:
    ``pg_collection`` (>= 0.15), ``grad_finalize_pgs`` (0.14) or nothing (0.13), plus the
    ``p2p_communicator`` pipelined schedules then require."""
    import inspect

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import schedules

    params = inspect.signature(schedules.forward_backward_no_pipelining).parameters
    kwargs: Dict[str, Any] = {}
    if "pg_collection" in params:
        from megatron.core.process_groups_config import ProcessGroupCollection

        kwargs["pg_collection"] = ProcessGroupCollection.use_mpu_process_groups()
    elif "grad_finalize_pgs" in params:
        from megatron.core.process_groups_config import GradFinalizeProcessGroups

        pgs = GradFinalizeProcessGroups()
        pgs.tp = ps.get_tensor_model_parallel_group()
        pgs.cp = ps.get_context_parallel_group()
        pgs.pp = ps.get_pipeline_model_parallel_group()
        pgs.embd = ps.get_embedding_group(check_initialized=False)
        pgs.pos_embd = ps.get_position_embedding_group(check_initialized=False)
        pgs.dp_cp = ps.get_data_parallel_group(with_context_parallel=True, partial_data_parallel=False)
        kwargs["grad_finalize_pgs"] = pgs
    else:
        return kwargs
    if layout.pp > 1:
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=ps.get_pipeline_model_parallel_group(), config=config)
    return kwargs


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def packings_of(layout: Layout, packings: Sequence[str]) -> List[str]:
    """The packings a layout runs: ``packed-per-row`` only where cp > 1; a TP × CP layout (the
    slowest on the CPU) only ``packed`` where packing is offered. TP decides only where the loss is
    computed, so the pairs packing × (dp, cp) are covered by the CP layouts without TP, and TP × CP
    (replicas not counted twice beside CP parts that are) by the packed run."""
    kept = [p for p in packings if p != "packed-per-row" or layout.cp > 1]
    if layout.tp > 1 and layout.cp > 1 and "packed" in kept:
        kept = ["packed"]
    return kept


def jobs_of(packing: str, variants: Sequence[Variant], specs: Sequence[LossSpec],
            controls: Sequence[Control], suite: Optional[str] = None,
            world: Optional[int] = None, layout: Optional[Layout] = None) -> List[Tuple[Variant, LossSpec, Optional[Control]]]:
    keep = ((lambda v, s: runs_on_layout(suite, world, layout, v, s, packing)) if layout is not None and world is not None
            else (lambda v, s: runs_in_suite(suite, v, s, world)))
    jobs: List[Tuple[Variant, LossSpec, Optional[Control]]] = [
        (v, s, None) for v in variants for s in specs if keep(v, s)]
    return jobs + [(c.variant, c.spec, c) for c in controls if packing in c.packings]


def run_suite(model: TinyGPT, layouts: Sequence[Layout], specs: Sequence[LossSpec], variants: Sequence[Variant],
              controls: Sequence[Control], tol: float, packings: Sequence[str] = ("unpacked",),
              cp_layer_spec: Optional[Callable[[], Any]] = None, suite: Optional[str] = None) -> List[Result]:
    harness = Harness(model, tol=tol, cp_layer_spec=cp_layer_spec)
    harness.compute_references(list(specs) + [c.spec for c in controls])
    results: List[Result] = []
    world = dist.get_world_size()
    total = sum(len(jobs_of(p, variants, specs, controls, suite, world, layout)) for layout in layouts
                for p in packings_of(layout, packings))
    for layout in layouts:
        with model_parallel(layout):
            for packing in packings_of(layout, packings):
                for variant, spec, control in jobs_of(packing, variants, specs, controls, suite, world, layout):
                    res = harness.run(layout, variant, spec, control, packing=packing)
                    results.append(res)
                    mark = "ok  " if res.passed else "FAIL"
                    what = f"control {res.control}" if res.control else f"{res.variant:<30} {res.spec}"
                    where = res.layout + ("" if packing == "unpacked" else "+" + packing)
                    _log(
                        harness.rank,
                        f"[{len(results):>4}/{total}] {mark} {where:<22} {what:<70} "
                        f"grad_err={res.grad_err:.2e} loss_err={res.loss_err:.1e} "
                        f"report_err={res.report_err:.1e} "
                        + (f"metric_err={res.metric_err:.1e} " if res.metric_err else "")
                        + f"coll={'ok' if res.collectives_ok else 'BAD'} "
                        f"({res.seconds:.2f}s)",
                    )
    return results


def _load_layer_spec(target: str) -> Callable[[], Any]:
    """``path/to/file.py:function`` (or ``module:function``) -> the function."""
    import importlib
    import importlib.util

    location, _, name = target.partition(":")
    if location.endswith(".py"):
        spec = importlib.util.spec_from_file_location("megatron_agg_layer_spec", location)
        if spec is None or spec.loader is None:
            raise SystemExit(f"cannot load {location}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    return getattr(module, name or "layer_spec")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="core", choices=sorted(SUITES))
    parser.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    parser.add_argument("--tol", type=float, default=TOLERANCE)
    parser.add_argument("--specs", default=None, help="comma-separated loss spec names (default: all)")
    parser.add_argument("--no-controls", action="store_true")
    parser.add_argument("--layouts", default=None,
                        help="comma-separated layout names of the suite at this world size (default: all), "
                             "e.g. dp2-tp2-pp1")
    parser.add_argument("--layer-spec", default=None,
                        help="file.py:function or module:function returning the GPT layer spec for "
                             "layouts with CP and packed runs (Megatron's local attention refuses both)")
    parser.add_argument("--packing", default=None, choices=["off", "on", "per-row", "both", "all"],
                        help="run unpacked (off), packed per document (on), packed per row (per-row), "
                             "off+on (both) or all three (all; default for the cp suite)")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    layouts = SUITES[args.suite].get(world)
    if not layouts:
        raise SystemExit(f"suite {args.suite!r} has no layouts for world size {world}; "
                         f"it has {sorted(SUITES[args.suite])}")
    if args.layouts:
        wanted = set(args.layouts.split(","))
        unknown = wanted - {layout.name(world) for layout in layouts}
        if unknown:
            raise SystemExit(f"suite {args.suite!r} at world {world} has no layout {sorted(unknown)}; it has "
                             f"{[layout.name(world) for layout in layouts]}")
        layouts = [layout for layout in layouts if layout.name(world) in wanted]
    specs = LOSS_SPECS if not args.specs else [s for s in LOSS_SPECS if s.name in args.specs.split(",")]
    controls = [] if args.no_controls else CONTROLS + (CP_CONTROLS if args.suite in CP_CONTROL_SUITES else [])
    packing_arg = args.packing or ("all" if args.suite in PACKED_SUITES else "off")
    packing = {"off": ("unpacked",), "on": ("packed",), "per-row": ("packed-per-row",),
               "both": ("unpacked", "packed"), "all": PACKINGS}[packing_arg]
    cp_layer_spec = _load_layer_spec(args.layer_spec) if args.layer_spec else None
    t0 = time.perf_counter()
    with cpu_shim():
        results = run_suite(TinyGPT(), layouts, specs, VARIANTS, controls, args.tol, packing, cp_layer_spec,
                            suite=args.suite)
    failed = [r for r in results if not r.passed]
    n_controls = sum(1 for r in results if r.control)
    _log(
        dist.get_rank(),
        f"world {world}: ran {len(results)} configurations ({len(results) - n_controls} exactness checks, "
        f"{n_controls} controls) on {len(layouts)} layouts in {time.perf_counter() - t0:.1f}s; "
        f"{len(failed)} failed",
    )
    if args.out and dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": world, "suite": args.suite, "tolerance": args.tol,
                       "results": [asdict(r) for r in results]}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
