"""The gradient-equivalence matrix: every mode under many parallel layouts and Megatron paths.

Run under ``torchrun`` (gloo, CPU)::

    torchrun --nproc-per-node 4 -m megatron_agg.testing.matrix --suite core --out results.json

Each *configuration* is one optimizer step of a small ``GPTModel`` on a ragged global batch
(:mod:`.data`) under a layout (TP/PP/VPP/CP, DP from the world size), a Megatron path (loss
return convention × ``calculate_per_token_loss`` × ``average_in_collective``) and a loss spec
(mode × options, or a two-term GRPO-style loss). It passes when every rank's gradients
(``main_grad`` after ``finalize_model_grads``) equal the matching slice of the single-process
reference gradients (:func:`megatron_agg.reference_loss` over the whole global batch, the model
written out in plain PyTorch (:mod:`.reference_gpt`), plain autograd) to ``--tol`` relative, the hook's :meth:`~megatron_agg.LossHook.global_loss` and its
``[sum, count]`` reports equal the reference loss, and the hook issued exactly the expected
number of collectives. Negative controls (Megatron's plain per-micro-batch averaging, a
``local × dp`` denominator) run in the same harness and must *fail* the comparison; the native
``calculate_per_token_loss`` token-mean must pass it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..averaging import LossReturn
from ..groups import ParallelGroups
from ..scaling import MegatronScaling
from ..definition import reference_loss
from ..modes import AggMode
from ..terms import LossTerm
from . import data as data_mod
from .cpu import cpu_shim
from .gpt import TinyGPT, build_chunks, grad_error, load_full_weights, reference_grads, wrap_ddp
from .parallel import Layout, model_parallel
from .reference_gpt import init_full_weights, per_token_loss
from .sync_guard import count_collectives, forbid_host_sync

__all__ = ["LossSpec", "Variant", "Layout", "SUITES", "LOSS_SPECS", "VARIANTS", "CONTROLS", "CP_CONTROLS", "LocalTimesDpGroups",
           "CpFactorLeftIn", "groups_like", "plain_masked_mean", "main"]

TOLERANCE = 1e-5
#: A negative control must miss the reference by at least this much (not a borderline pass).
CONTROL_MARGIN = 1e-3


# ---------------------------------------------------------------------------------------------
# What is computed
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSpec:
    """A loss: named terms and a map from the model output (per-token CE) to per-token losses."""

    name: str
    terms: Mapping[str, LossTerm]
    fn: Optional[Callable[[torch.Tensor], Any]] = None

    def reference(self, ce: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_token = self.fn(ce) if self.fn is not None else ce
        if isinstance(per_token, torch.Tensor):
            per_token = {next(iter(self.terms)): per_token}
        return sum(reference_loss([per_token[n]], [mask], t) for n, t in self.terms.items())


def _grpo_fn(ce: torch.Tensor) -> Dict[str, torch.Tensor]:
    # A policy term and a KL-like term, both functions of the per-token output.
    return {"pg": ce, "kl": 0.5 * ce * ce}


def _mode_specs() -> List[LossSpec]:
    specs = []
    for mode in AggMode:
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


LOSS_SPECS: List[LossSpec] = _mode_specs()
TOKEN_MEAN = LOSS_SPECS[0]
SEQ_MEAN_TOKEN_MEAN = next(s for s in LOSS_SPECS if s.name == "seq-mean-token-mean")


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
    """The deferred mode carries one denominator: specs whose terms have several are not run
    there (DeferredLossHook refuses them, tested in tests/test_deferred.py)."""
    if not variant.deferred:
        return True
    kinds = {(t.agg_mode is AggMode.TOKEN_MEAN, t.exclude_fully_masked_seqs) for t in spec.terms.values()}
    return len(kinds) == 1

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
            Layout(tp=2, pp=2),
            Layout(tp=2, pp=2, vpp=2),
        ],
        8: [Layout(tp=2), Layout(tp=2, pp=2, vpp=2), Layout(pp=2)],
    },
    # Context parallelism and packed sequences; needs a core attention that supports both
    # (tests/support/cp_attention.py, passed with --layer-spec). Every layout runs unpacked
    # and packed.
    "cp": {
        2: [Layout(cp=2), Layout()],
        4: [Layout(cp=2), Layout(cp=2, tp=2), Layout(cp=2, pp=2), Layout(tp=2)],
        8: [Layout(cp=2, tp=2)],
    },
    # One launch per megatron-core release in the version matrix (scripts/run_version_matrix.sh):
    # DP, TP, PP, VPP and CP, every loss spec and Megatron path; needs --layer-spec for CP.
    "release": {
        4: [Layout(tp=2), Layout(pp=2, vpp=2), Layout(cp=2, tp=2), Layout(tp=2, pp=2)],
    },
    "smoke": {
        2: [Layout(tp=2)],
        4: [Layout(tp=2), Layout(pp=2, vpp=2)],
    },
}
#: Which suites also run every layout with packed sequences, and which add the CP controls.
PACKED_SUITES = {"cp"}
#: How a micro-batch's rows are laid out: one sequence per row; packed rows cut per document over
#: CP (Megatron's default, ``cp_layout="load-balanced"``); packed rows cut as a whole (Megatron-LM's
#: ``--dataloader-inter-document-masking``, ``cp_layout="per-row"``; run where cp > 1 only, as it
#: equals "packed" without CP).
PACKINGS = ("unpacked", "packed", "packed-per-row")
CP_CONTROL_SUITES = {"cp", "release"}


# ---------------------------------------------------------------------------------------------
# Controls: loss functions that do *not* use the hook's exact scaling
# ---------------------------------------------------------------------------------------------
def plain_masked_mean(loss_return: LossReturn):
    """Megatron's classic per-micro-batch loss: the local masked mean (or sum + count)."""

    def make(mask: torch.Tensor):
        def loss_func(output: torch.Tensor):
            valid = mask != 0
            total = torch.where(valid, output, torch.zeros_like(output)).sum()
            count = valid.sum(dtype=torch.int)
            if loss_return is LossReturn.TWO_TUPLE:
                mean = total / torch.clamp(count, min=1)
                return mean, {"loss": mean.detach().clone()}  # the schedule rescales `mean` in place
            return total, count, {"loss": torch.stack([total.detach(), count.float()])}

        return loss_func

    return make


class LocalTimesDpGroups(ParallelGroups):
    """A broken set of groups, injected as a user would pass groups: the step's totals are this
    rank's local totals × dp instead of their all-reduced sum (verl's old shortcut)."""

    def sum_over_dp(self, tensor: torch.Tensor, async_op: bool = True) -> None:
        tensor.mul_(self.dp_size)
        return None


class CpFactorLeftIn(MegatronScaling):
    """A broken scaling, injected through ``LossHook(scaling=...)``: Megatron's × cp of the 2-tuple
    path is left uncancelled."""

    def multipliers(self, num_tokens: torch.Tensor, total_tokens: torch.Tensor) -> torch.Tensor:
        return super().multipliers(num_tokens, total_tokens) * self.averaging.cp_size


def groups_like(groups: ParallelGroups, cls: type = ParallelGroups, **changes: Any) -> ParallelGroups:
    values = {f.name: getattr(groups, f.name) for f in dataclass_fields(groups)}
    values.update(changes)
    return cls(**values)


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


CONTROLS: List[Control] = [
    Control("plain-mean-2-tuple", Variant(LossReturn.TWO_TUPLE), TOKEN_MEAN, lambda dp, cp: False, plain=LossReturn.TWO_TUPLE),
    Control("plain-mean-3-tuple", Variant(LossReturn.THREE_TUPLE), TOKEN_MEAN, lambda dp, cp: False, plain=LossReturn.THREE_TUPLE),
    Control(
        "native-per-token-3-tuple", Variant(LossReturn.THREE_TUPLE, per_token=True), TOKEN_MEAN,
        lambda dp, cp: True, plain=LossReturn.THREE_TUPLE,
    ),
    Control("hook-local-x-dp", Variant(LossReturn.TWO_TUPLE), SEQ_MEAN_TOKEN_MEAN, lambda dp, cp: dp == 1,
            breaker=_local_times_dp),
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

    def finalize(self, tol: float) -> None:
        exact = self.grad_err <= tol and self.loss_err <= tol and self.report_err <= tol and self.collectives_ok
        if self.expect_pass:
            self.passed = exact
        else:  # a control must clearly miss the reference
            self.passed = self.grad_err > CONTROL_MARGIN


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
                loss = spec.reference(ce, b.loss_mask)
                value.append(float(loss))
                return loss

            grads = reference_grads(self.full, loss_fn)
            self.ref[spec.name] = (grads, value[0])

    # -- one configuration ---------------------------------------------------------------------
    def run(self, layout: Layout, variant: Variant, spec: LossSpec, control: Optional[Control] = None,
            packing: str = "unpacked") -> Result:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from ..deferred import DeferredLossHook
        from ..hook import LossHook

        t0 = time.perf_counter()
        packed = packing != "unpacked"
        model_spec = self.model
        if layout.cp > 1 or packed:
            if self.cp_model is None:
                raise SystemExit("context parallelism and packed sequences need --layer-spec with an "
                                 "attention that supports them (tests/support/cp_attention.py:layer_spec)")
            model_spec = self.cp_model
        chunks = build_chunks(model_spec, layout, calculate_per_token_loss=variant.per_token)
        load_full_weights(chunks, self.full)
        model = wrap_ddp(chunks, average_in_collective=variant.average_in_collective)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        from ..integration import resolve_groups

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
        if deferred:
            hook: Any = DeferredLossHook(terms=spec.terms, cp_layout=broken.pop("cp_layout"))
            hook.install(model)  # checks the config and the ranks' agreement before the step
        else:
            if "groups" in broken:
                # keep the class of the injected groups (LocalTimesDpGroups & co.), change the layout only
                broken["groups"] = groups_like(broken["groups"], type(broken["groups"]), cp_layout=broken.pop("cp_layout"))
            hook = LossHook(terms=spec.terms, loss_return=variant.loss_return, **broken)
        plain = plain_masked_mean(control.plain) if control and control.plain else None

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
                inner = hook.loss_func(mb.loss_mask, spec.fn)

            def guarded(*args: Any, **kwargs: Any):
                with forbid_host_sync():
                    return inner(*args, **kwargs)

            return output, guarded

        fb = get_forward_backward_func()
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
                losses = hook.wrap(fb)(
                    loss_masks=[mb.loss_mask if local_masks else mb.full_loss_mask for mb in mbs],
                    packed_seqs=[mb.packed for mb in mbs] if packed and told_cp else None,
                    **kwargs,
                )
        if deferred:
            hook.uninstall()

        ref_grads, ref_loss = self.ref[spec.name]
        grad_err = max(grad_error(model, ref_grads).values())
        loss_err = report_err = 0.0
        broken_totals = isinstance(broken.get("groups"), LocalTimesDpGroups)
        expected_collectives = 1 if (is_last and dp > 1 and plain is None and not broken_totals and not deferred) else 0
        if plain is None:  # the end-of-step check, spread over the step (deferred: over the loss stage)
            groups = resolve_groups()
            spread = groups.loss_groups() if deferred else groups.step_groups()
            expected_collectives += len(spread)  # the harness installs the deferred hook on every rank
        collectives_ok = counter.count == expected_collectives
        if plain is None and is_last:
            scale = max(abs(ref_loss), 1e-12)
            pair = torch.stack([r["loss"] for r in losses]).sum(dim=0)
            dist.all_reduce(pair, group=ps.get_data_parallel_group(with_context_parallel=True))
            report_err = abs(float(pair[0] / pair[1]) - ref_loss) / scale
            if deferred:  # no global_loss() in the deferred mode: its value is the report's
                loss_err = report_err
            else:
                loss_err = abs(float(hook.global_loss()["loss"]) - ref_loss) / scale
        stats = torch.tensor([grad_err, loss_err, report_err, 0.0 if collectives_ok else 1.0], dtype=torch.float64)
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
    """The packings a layout runs: ``packed-per-row`` only where cp > 1."""
    return [p for p in packings if p != "packed-per-row" or layout.cp > 1]


def jobs_of(packing: str, variants: Sequence[Variant], specs: Sequence[LossSpec],
            controls: Sequence[Control]) -> List[Tuple[Variant, LossSpec, Optional[Control]]]:
    jobs: List[Tuple[Variant, LossSpec, Optional[Control]]] = [
        (v, s, None) for v in variants for s in specs if runs_in(v, s)]
    return jobs + [(c.variant, c.spec, c) for c in controls if packing in c.packings]


def run_suite(model: TinyGPT, layouts: Sequence[Layout], specs: Sequence[LossSpec], variants: Sequence[Variant],
              controls: Sequence[Control], tol: float, packings: Sequence[str] = ("unpacked",),
              cp_layer_spec: Optional[Callable[[], Any]] = None) -> List[Result]:
    harness = Harness(model, tol=tol, cp_layer_spec=cp_layer_spec)
    harness.compute_references(list(specs) + [c.spec for c in controls])
    results: List[Result] = []
    total = sum(len(jobs_of(p, variants, specs, controls)) for layout in layouts for p in packings_of(layout, packings))
    for layout in layouts:
        with model_parallel(layout):
            for packing in packings_of(layout, packings):
                for variant, spec, control in jobs_of(packing, variants, specs, controls):
                    res = harness.run(layout, variant, spec, control, packing=packing)
                    results.append(res)
                    mark = "ok  " if res.passed else "FAIL"
                    what = f"control {res.control}" if res.control else f"{res.variant:<30} {res.spec}"
                    where = res.layout + ("" if packing == "unpacked" else "+" + packing)
                    _log(
                        harness.rank,
                        f"[{len(results):>4}/{total}] {mark} {where:<22} {what:<70} "
                        f"grad_err={res.grad_err:.2e} loss_err={res.loss_err:.1e} "
                        f"report_err={res.report_err:.1e} coll={'ok' if res.collectives_ok else 'BAD'} "
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
    specs = LOSS_SPECS if not args.specs else [s for s in LOSS_SPECS if s.name in args.specs.split(",")]
    controls = [] if args.no_controls else CONTROLS + (CP_CONTROLS if args.suite in CP_CONTROL_SUITES else [])
    packing_arg = args.packing or ("all" if args.suite in PACKED_SUITES else "off")
    packing = {"off": ("unpacked",), "on": ("packed",), "per-row": ("packed-per-row",),
               "both": ("unpacked", "packed"), "all": PACKINGS}[packing_arg]
    cp_layer_spec = _load_layer_spec(args.layer_spec) if args.layer_spec else None
    t0 = time.perf_counter()
    with cpu_shim():
        results = run_suite(TinyGPT(), layouts, specs, VARIANTS, controls, args.tol, packing, cp_layer_spec)
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
