"""Megatron-LM's real GPT training script, patched with megatron_agg, end to end on the CPU.

Run under ``torchrun`` (4 ranks)::

    torchrun --nproc-per-node 4 -m harness.megatron_lm --out results/megatron_lm_e2e

Each rank copies Megatron-LM's three top-level files of the 0.19 line (``pretrain_gpt.py``,
``gpt_builders.py``, ``model_provider.py``) into a temporary directory, applies megatron_agg's
patch to them with ``git apply``, and runs the *patched* ``pretrain_gpt.py`` as ``__main__``
(``runpy``) once per run — one run is one configuration (TP2×DP2, PP2×DP2, CP2×DP2 with packed
SFT data, CP2×DP2 with ``--dataloader-inter-document-masking``) and one ``--loss-agg-mode``, one
training step (``--train-iters 1``). Megatron-LM's own ``destroy_global_state`` (what its
in-process restart uses) resets Megatron's global state between runs, so that all runs share one
launch (importing Megatron costs several seconds per process).

Nothing of Megatron-LM is edited. What the launcher installs from outside, and why:

- :func:`megatron_agg.compare.cpu.cpu_shim` (CUDA device arguments, streams, RNG tracker -> CPU);
- ``megatron.training.training.initialize_megatron`` gets ``allow_no_cuda=True`` (it asserts CUDA);
- ``megatron.core.utils.tex.thd_get_partitioned_indices`` (Transformer Engine, absent): the
  per-document context-parallel split of packed rows, written out literally from TE's documented
  layout (every document cut into ``2·cp`` chunks, rank ``r`` holding chunks ``r`` and
  ``2·cp−1−r``), sharing no code with megatron_agg's layout functions;
- ``--spec harness.megatron_lm cpu_layer_spec`` (Megatron-LM's own flag) for the
  context-parallel runs: the local layer spec with :class:`CpuCoreAttention`, causal attention
  within each document that gathers keys/values over the CP group (the local spec's
  ``DotProductAttention`` refuses CP and packed sequences; TE's is CUDA-only);
- data: ``MockGPTLowLevelDataset.max_sequence_length`` (a class constant, 4096) is lowered so that
  mock documents are shorter than a row — with ``--eod-mask-loss`` every row then masks a different
  number of EOD tokens and holds several documents; for ``--sft`` (0.19 has no mock SFT data:
  ``SFTLowLevelDataset`` reads a jsonl through HF ``datasets`` and ``SFTTokenizer`` needs an HF
  tokenizer) ``SFTDataset.build_low_level_dataset`` returns synthetic conversations when no data
  path is given, and the NullTokenizer gets a ``tokenize_conversation`` that maps the
  space-separated ids of each turn and masks system/user turns with ``IGNORE_INDEX`` (as
  ``SFTTokenizer`` does) — ``SFTDataset.__getitem__`` (packing, CP padding, ``cu_seqlens``, loss
  mask) is Megatron's own;
- capture only: ``megatron.core.utils.get_batch_on_this_cp_rank`` (records every micro-batch
  *before* the CP split), ``megatron.training.training.finalize_model_grads`` (records every
  rank's parameters and ``main_grad`` *after* Megatron's own finalize — DP all-reduce, tied
  embeddings, the ``num_tokens`` division — and before the optimizer step) and
  ``megatron.training.training.train_step`` (records the logged ``lm loss``).

After all runs, rank 0 assembles the full gradients over the TP/PP shards and compares them with
those of one process that holds the whole global batch (every rank's captured micro-batches) and
computes the loss by its definition (:func:`megatron_agg.definition.reference_loss`) with the
plain-PyTorch reference GPT (:mod:`megatron_agg.compare.reference_gpt`; packed documents are
evaluated one by one, which is what attention restricted to each document computes). Negative
control: Megatron's own averaging (no ``--loss-agg-mode``, no ``--calculate-per-token-loss``: the
mean of per-micro-batch token means) against the ``token-mean`` definition must miss.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "RELEASE",
    "Sources",
    "resolve_sources",
    "Config",
    "Run",
    "CONFIGS",
    "plan_runs",
    "megatron_argv",
    "cpu_layer_spec",
    "CpuCoreAttention",
    "compare_run",
    "main",
]

#: The Megatron-LM source whose top-level training files match the installed megatron-core, by its
#: minor release: the 0.19.x wheel (which ships megatron/training) and Megatron-LM main (0.20.0,
#: installed from its source); ``patches/megatron-lm/<line>/`` and the pinned copies of each.
RELEASE_LINES = {"0.19": ("core_r0.19.0", "releases/Megatron-LM-core_r0.19.0"), "0.20": ("main", "Megatron-LM")}


def installed_line() -> str:
    """The key of :data:`RELEASE_LINES` for the installed megatron-core (0.19 when it is neither)."""
    try:
        from megatron_agg.megatron.releases import minor_release

        minor = minor_release()
    except Exception:  # noqa: BLE001 - no megatron-core here: the default line
        minor = "0.19"
    return minor if minor in RELEASE_LINES else "0.19"


RELEASE = RELEASE_LINES["0.19"][0]
UPSTREAM_FILES = ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py")
#: float32-tight, as the gradient-equivalence matrix.
TOLERANCE = 1e-5
#: A negative control must miss by at least this much.
CONTROL_MARGIN = 1e-3
MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# ---------------------------------------------------------------------------------------------
# Where the upstream files and the patch come from
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sources:
    patch: Path
    upstream: Path
    note: str


def repo_root() -> Path:
    """The megatron_agg checkout (this package is installed editable from it)."""
    return Path(__file__).resolve().parents[2]


def resolve_sources(root: Optional[Path] = None, patch: Optional[str] = None,
                    upstream: Optional[str] = None, line: Optional[str] = None) -> Sources:
    """The patch and the pinned upstream files of a release line (:data:`RELEASE_LINES`; default:
    the installed megatron-core's): ``patches/megatron-lm/<release>/pretrain_gpt.patch`` and its
    pinned copies under ``patches/upstream/``, unless explicit paths are given."""
    root = root or repo_root()
    release, pinned = RELEASE_LINES[line or installed_line()]
    patch_path = Path(patch) if patch is not None else root / "patches" / "megatron-lm" / release / "pretrain_gpt.patch"
    upstream_path = Path(upstream) if upstream is not None else root / "patches" / "upstream" / pinned
    missing = [str(p) for p in [patch_path] + [upstream_path / f for f in UPSTREAM_FILES] if not p.is_file()]
    if missing:
        raise FileNotFoundError("megatron_lm: missing " + ", ".join(missing))
    note = "explicit paths" if patch is not None or upstream is not None else "per-release paths"
    return Sources(patch_path, upstream_path, note)


def prepare_script(sources: Sources, workdir: Path) -> Path:
    """Copy the three upstream files into ``workdir`` and ``git apply`` the patch there."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in UPSTREAM_FILES:
        shutil.copyfile(sources.upstream / name, workdir / name)
    proc = subprocess.run(["git", "apply", "--whitespace=nowarn", str(sources.patch.resolve())],
                          cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git apply {sources.patch} failed in {workdir}: {proc.stderr.strip()}")
    return workdir / "pretrain_gpt.py"


# ---------------------------------------------------------------------------------------------
# Configurations and runs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    name: str
    tp: int = 1
    pp: int = 1
    cp: int = 1
    #: "mock" (MockGPTDataset, unpacked rows), "sft" (packed, per-document CP split) or
    #: "inter-doc" (MockGPTDataset with --dataloader-inter-document-masking: packed rows, per-row
    #: CP split).
    data: str = "mock"

    @property
    def layout(self) -> str:
        return {"mock": "unpacked", "sft": "packed, per-document CP split",
                "inter-doc": "packed, per-row CP split"}[self.data]


CONFIGS = {
    "tp2-dp2": Config("tp2-dp2", tp=2),
    "pp2-dp2": Config("pp2-dp2", pp=2),
    "cp2-dp2-sft": Config("cp2-dp2-sft", cp=2, data="sft"),
    "cp2-dp2-interdoc": Config("cp2-dp2-interdoc", cp=2, data="inter-doc"),
}


@dataclass(frozen=True)
class Run:
    config: Config
    #: --loss-agg-mode, or None for Megatron's own loss (the negative control).
    mode: Optional[str]
    #: A negative control: must *miss* the definition of ``reference_mode``.
    control: bool = False
    #: What the control breaks: "megatron-own" (no --loss-agg-mode, no --calculate-per-token-loss:
    #: Megatron's mean of per-micro-batch means) or "told-load-balanced" (the patch's hook told
    #: the per-document layout while get_batch cut each row as a whole).
    breaker: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.config.name}.{self.mode or 'megatron-own'}" + (f".{self.breaker}" if self.mode and self.breaker else "")

    @property
    def reference_mode(self) -> str:
        return self.mode or "token-mean"


CONTROLS = ("megatron-own", "told-load-balanced")


#: The modes every configuration runs in a pairwise plan: one per denominator kind (tokens,
#: sequences); the others rotate over the configurations.
PAIRWISE_MODES = ("token-mean", "seq-mean-token-mean")


def plan_runs(configs: Sequence[str], modes: Sequence[str], controls: Sequence[str] = CONTROLS,
              pairwise: bool = False) -> List[Run]:
    """The runs of one launch: every configuration × mode, or (``pairwise``) every configuration
    with the modes of :data:`PAIRWISE_MODES` and each other mode on one configuration, rotating.
    Pairs suffice: the patched ``loss_func`` is megatron_agg's for every mode (tests/test_patches.py),
    so a mode meets a configuration only through its denominator kind, which the two base modes
    cover on every configuration; the controls run as always."""
    if pairwise:
        base = [m for m in modes if m in PAIRWISE_MODES]
        rest = [m for m in modes if m not in PAIRWISE_MODES]
        runs = [Run(CONFIGS[c], m) for c in configs for m in base]
        runs += [Run(CONFIGS[configs[i % len(configs)]], m) for i, m in enumerate(rest)]
    else:
        runs = [Run(CONFIGS[c], m) for c in configs for m in modes]
    for breaker in controls:
        if breaker == "megatron-own":
            runs.append(Run(CONFIGS["tp2-dp2"], None, control=True, breaker=breaker))
        elif breaker == "told-load-balanced":
            runs.append(Run(CONFIGS["cp2-dp2-interdoc"], "seq-mean-token-mean", control=True, breaker=breaker))
        else:
            raise ValueError(f"unknown control {breaker!r}; known: {CONTROLS}")
    return runs


#: The tiny model and the step; every argument the reference GPT must mirror is explicit.
MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64)
SEQ_LENGTH = 32
MICRO_BATCH = 2
MICRO_BATCHES_PER_DP_RANK = 3
VOCAB = 64
#: Mock documents get lengths in [1, MOCK_DOC_LENGTH) (instead of [1, 4096)).
MOCK_DOC_LENGTH = 14
SFT_PAD = 0
#: The --data-path under which the launcher's synthetic SFT conversations are found.
MOCK_SFT_PATH = "megatron_agg-mock-sft"


def megatron_argv(run: Run, world_size: int, seed: int = 1234) -> List[str]:
    c = run.config
    dp = world_size // (c.tp * c.pp * c.cp)
    argv = [
        "--num-layers", str(MODEL["num_layers"]), "--hidden-size", str(MODEL["hidden_size"]),
        "--ffn-hidden-size", str(MODEL["ffn_hidden_size"]),
        "--num-attention-heads", str(MODEL["num_attention_heads"]), "--seq-length", str(SEQ_LENGTH),
        "--max-position-embeddings", str(SEQ_LENGTH),
        "--position-embedding-type", "learned_absolute", "--normalization", "LayerNorm",
        "--attention-dropout", "0", "--hidden-dropout", "0", "--init-method-std", "0.02",
        "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
        "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
        "--no-persist-layer-norm", "--use-cpu-initialization", "--distributed-backend", "gloo",
        "--distributed-timeout-minutes", "5",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
        "--make-vocab-size-divisible-by", "16", "--num-workers", "0",
        "--micro-batch-size", str(MICRO_BATCH),
        "--global-batch-size", str(MICRO_BATCH * MICRO_BATCHES_PER_DP_RANK * dp),
        "--train-iters", "1", "--eval-iters", "0", "--eval-interval", "1000", "--log-interval", "1",
        "--optimizer", "sgd", "--lr", "0.1", "--min-lr", "0.0", "--lr-decay-style", "constant",
        "--weight-decay", "0", "--clip-grad", "0", "--seed", str(seed),
        "--tensor-model-parallel-size", str(c.tp), "--pipeline-model-parallel-size", str(c.pp),
        "--context-parallel-size", str(c.cp),
        "--eod-mask-loss",
        # The rerun state machine (fault replay) saves the CUDA RNG state every step.
        "--rerun-mode", "disabled",
    ]
    if c.cp > 1:
        argv += ["--spec", __name__ if __name__ != "__main__" else "harness.megatron_lm",
                 "cpu_layer_spec"]
    if c.data == "sft":
        # --mock-data forces a 1,1,1 split, and an SFTDataset with no samples (validation under
        # --eval-iters 0) trips the sampler's assertion: name the synthetic data instead, train only.
        argv += ["--sft", "--data-path", MOCK_SFT_PATH, "--split", "100,0,0",
                 "--null-tokenizer-pad-id", str(SFT_PAD), "--no-create-attention-mask-in-dataloader"]
    else:
        argv += ["--mock-data"]
        if c.data == "inter-doc":
            argv += ["--dataloader-inter-document-masking"]
    if run.mode is not None:
        argv += ["--calculate-per-token-loss", "--loss-agg-mode", run.mode]
    return argv


# ---------------------------------------------------------------------------------------------
# CPU attention for context parallelism and packed documents (the --spec of the CP runs)
# ---------------------------------------------------------------------------------------------
def per_document_positions(cu_seqlens: Sequence[int], cp: int, rank: int) -> List[int]:
    """Row positions held by CP ``rank`` when every document is cut into ``2·cp`` chunks
    (Transformer Engine's ``thd_get_partitioned_indices``), written out literally."""
    out: List[int] = []
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        length = end - start
        if length % (2 * cp):
            raise ValueError(f"document [{start}, {end}) is not a multiple of 2·cp = {2 * cp}")
        chunk = length // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            out.extend(range(start + c * chunk, start + (c + 1) * chunk))
    return out


def per_row_positions(total: int, cp: int, rank: int) -> List[int]:
    """Row positions held by CP ``rank`` when the whole row is cut into ``2·cp`` chunks
    (``get_batch_on_this_cp_rank(..., use_per_sequence_balancing=True)``)."""
    chunk = total // (2 * cp)
    return [p for c in (rank, 2 * cp - 1 - rank) for p in range(c * chunk, (c + 1) * chunk)]


class _CpuTex:
    """The one Transformer-Engine function Megatron-LM's per-document CP split calls."""

    @staticmethod
    def thd_get_partitioned_indices(cu_seqlens, total_tokens, world_size, rank):
        cu = [int(x) for x in cu_seqlens.reshape(-1).tolist()]
        if cu[-1] != int(total_tokens):
            raise ValueError(f"cu_seqlens end at {cu[-1]}, the row has {int(total_tokens)} tokens")
        return torch.tensor(per_document_positions(cu, world_size, rank), dtype=torch.int64,
                            device=cu_seqlens.device)


class _AllGather(torch.autograd.Function):
    """``[n, ...] -> [cp·n, ...]`` over ``group`` (rank order); backward keeps this rank's part
    of the all-reduced gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def _per_row_layout() -> bool:
    """Megatron-LM's own condition for the per-row CP split (``get_batch`` in pretrain_gpt)."""
    from megatron.training import get_args

    args = get_args()
    return bool(args.dataloader_inter_document_masking and not args.sft)


class CpuCoreAttention(torch.nn.Module):
    """Causal softmax attention within each packed document, under context parallelism.

    Drop-in ``core_attention`` (``DotProductAttention``'s constructor and forward). The query holds
    this CP rank's tokens in the layout Megatron-LM's ``get_batch`` produced (per document for
    ``--sft``, per row for ``--dataloader-inter-document-masking``); keys and values are gathered
    over the CP group and put back in row order. Scale ``1/sqrt(head_dim)``, softmax in fp32,
    no dropout — what the local ``DotProductAttention`` computes. Test-only (full score matrix)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **_):
        super().__init__()
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
            self.cp_group = pg_collection.cp
        else:
            from megatron.core import parallel_state

            self.cp_group = parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        thd = packed_seq_params is not None
        if thd:  # [t, np, hn] -> [t, 1, np, hn]
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        cp, rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
        total = query.shape[0] * cp
        device = query.device
        segment = torch.zeros(total, dtype=torch.int64, device=device)
        if thd:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            cu = [int(x) for x in cu.reshape(-1).tolist()]
            for k, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
                segment[a:b] = k
            segment[cu[-1]:] = len(cu)
            if cp > 1 and not _per_row_layout():
                positions = [per_document_positions(cu, cp, r) for r in range(cp)]
            else:
                positions = [per_row_positions(total, cp, r) for r in range(cp)]
        else:
            positions = [per_row_positions(total, cp, r) for r in range(cp)]
        positions = [torch.tensor(p, dtype=torch.int64, device=device) for p in positions]
        if cp > 1:
            order = torch.argsort(torch.cat(positions))  # gathered (rank-major) -> row order
            key = _AllGather.apply(key, self.cp_group).index_select(0, order)
            value = _AllGather.apply(value, self.cp_group).index_select(0, order)
        q_pos, k_pos = positions[rank], torch.arange(total, device=device)
        allowed = (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)) & (segment[k_pos].unsqueeze(0) == segment[q_pos].unsqueeze(1))
        scores = torch.einsum("qbhd,kbhd->bhqk", query.float(), key.float()) * self.scale
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).to(value.dtype)
        context = torch.einsum("bhqk,kbhd->qbhd", probs, value)
        sq, b, heads, head_dim = context.shape
        return context.reshape(sq, heads * head_dim) if thd else context.reshape(sq, b, heads * head_dim)


def cpu_layer_spec(model_config: Any = None, vp_stage: Optional[int] = None):
    """Megatron's local GPT layer spec with :class:`CpuCoreAttention` (``--spec`` target)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = CpuCoreAttention
    return spec


# ---------------------------------------------------------------------------------------------
# Mock data for the packed layouts
# ---------------------------------------------------------------------------------------------
IGNORE_INDEX = -100


class _MockConversations:
    """Synthetic SFT data: each item is a list of messages holding 1–3 conversations (system,
    user, assistant, sometimes a second user/assistant turn), contents are space-separated token
    ids in ``[1, VOCAB − 2]`` (0 is the pad id, ``VOCAB − 1`` the NullTokenizer's EOD)."""

    def __init__(self, size: int = 4096, seed: int = 0):
        import numpy

        rng = numpy.random.default_rng(seed)
        self.items = []
        for _ in range(size):
            messages = []
            for _ in range(int(rng.integers(1, 4))):
                turns = [("system", 1, 3), ("user", 1, 6), ("assistant", 1, 9)]
                if rng.random() < 0.4:
                    turns += [("user", 1, 4), ("assistant", 1, 6)]
                for role, low, high in turns:
                    n = int(rng.integers(low, high))
                    ids = rng.integers(1, VOCAB - 1, size=n)
                    messages.append({"role": role, "content": " ".join(str(int(i)) for i in ids)})
            self.items.append(messages)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int):
        return self.items[idx]


def _null_tokenize_conversation(conversation, return_target=True, add_generation_prompt=False):
    """``SFTTokenizer.tokenize_conversation`` for the NullTokenizer: turns' ids concatenated,
    system and user turns masked in the target."""
    import numpy

    tokens, target = [], []
    for turn in conversation:
        ids = [int(x) for x in turn["content"].split()]
        tokens += ids
        target += [IGNORE_INDEX] * len(ids) if turn["role"] in ("system", "user", "tool") else ids
    tokens, target = numpy.array(tokens, dtype=numpy.int64), numpy.array(target, dtype=numpy.int64)
    return (tokens, target) if return_target else tokens


# ---------------------------------------------------------------------------------------------
# Shims and capture
# ---------------------------------------------------------------------------------------------
class Capture:
    """What one rank records during one run."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.batches: List[Dict[str, Any]] = []
        self.params: List[Dict[str, Any]] = []
        self.logged: Dict[str, float] = {}
        self.finalize_calls = 0

    def coords(self) -> Dict[str, int]:
        from megatron.core import parallel_state as ps

        return dict(dp=ps.get_data_parallel_rank(), tp=ps.get_tensor_model_parallel_rank(),
                    pp=ps.get_pipeline_model_parallel_rank(), cp=ps.get_context_parallel_rank(),
                    pp_size=ps.get_pipeline_model_parallel_world_size(),
                    tp_size=ps.get_tensor_model_parallel_world_size(),
                    cp_size=ps.get_context_parallel_world_size())

    def record_batch(self, batch: Dict[str, Any]) -> None:
        keep = {}
        for key in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "cu_seqlens_padded"):
            value = batch.get(key)
            keep[key] = value.detach().clone().cpu() if isinstance(value, torch.Tensor) else None
        keep.update(self.coords(), index=len(self.batches))
        self.batches.append(keep)

    def record_params(self, model: Sequence[torch.nn.Module]) -> None:
        from megatron_agg.compare.gpt import full_name

        self.finalize_calls += 1
        coords = self.coords()
        if coords["dp"] != 0 or coords["cp"] != 0 or self.params:
            return
        for chunk in model:
            inner = chunk
            while hasattr(inner, "module"):
                inner = inner.module
            for local, p in inner.named_parameters():
                grad = getattr(p, "main_grad", None)
                if grad is None:
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                self.params.append(dict(
                    name=full_name(chunk, local), local=local, data=p.detach().clone().cpu(),
                    grad=grad.detach().clone().float().cpu(),
                    tensor_model_parallel=bool(getattr(p, "tensor_model_parallel", False)),
                    partition_dim=int(getattr(p, "partition_dim", -1)),
                    partition_stride=int(getattr(p, "partition_stride", 1)), **coords))


CAPTURE = Capture()


@contextlib.contextmanager
def cpu_environment() -> Iterator[None]:
    """Everything Megatron-LM's pretrain_gpt needs to run on the CPU with gloo, plus the capture
    wrappers (see the module docstring); undone on exit."""
    from megatron.core import utils as core_utils
    from megatron.core.datasets import gpt_dataset
    from megatron.core.datasets import utils as datasets_utils
    from megatron.core.tokenizers.text import text_tokenizer
    from megatron.training import arguments as megatron_arguments
    from megatron.training import initialize as megatron_initialize
    from megatron.training import training
    from megatron.training.datasets import sft_dataset

    from megatron_agg.compare.cpu import cpu_shim

    patches: List[Tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        patches.append((obj, name, obj.__dict__.get(name) if isinstance(obj, type) else getattr(obj, name, None)))
        setattr(obj, name, value)

    # initialize_megatron asserts CUDA unless allow_no_cuda.
    patch(training, "initialize_megatron", functools.partial(training.initialize_megatron, allow_no_cuda=True))
    # validate_args asks the GPU's architecture (Blackwell or not) under TP/CP: answer "older",
    # whose only requirement is CUDA_DEVICE_MAX_CONNECTIONS=1 (set by main).
    patch(megatron_arguments, "get_device_arch_version", lambda: 0)
    # _initialize_distributed builds the model-parallel groups only "if device_count > 0": count one
    # device during that call (nothing else in it touches CUDA once torch.distributed is up).
    original_init_distributed = megatron_initialize._initialize_distributed

    def _initialize_distributed(*args, **kwargs):
        count = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return original_init_distributed(*args, **kwargs)
        finally:
            torch.cuda.device_count = count

    patch(megatron_initialize, "_initialize_distributed", _initialize_distributed)
    # The wheel ships the dataset index helpers prebuilt (helpers_cpp) but not their Makefile, so
    # Megatron-LM's "make -C megatron/core/datasets" fails: use the prebuilt module when present.
    original_compile = datasets_utils.compile_helpers

    def compile_helpers():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            original_compile()

    patch(datasets_utils, "compile_helpers", compile_helpers)
    # Transformer Engine's per-document CP index function.
    if getattr(core_utils, "tex", None) is None:
        patch(core_utils, "tex", _CpuTex())
    # Short mock documents.
    patch(gpt_dataset.MockGPTLowLevelDataset, "max_sequence_length", MOCK_DOC_LENGTH)
    # Mock SFT data.
    original_build = sft_dataset.SFTDataset.build_low_level_dataset

    def build_low_level_dataset(dataset_path, config):
        if dataset_path in (None, MOCK_SFT_PATH):
            return _MockConversations()
        return original_build(dataset_path, config)

    patch(sft_dataset.SFTDataset, "build_low_level_dataset", staticmethod(build_low_level_dataset))
    original_tokenize = text_tokenizer.MegatronTokenizerText.tokenize_conversation

    def tokenize_conversation(self, conversation, return_target, add_generation_prompt):
        if self.library == "null-text":
            return _null_tokenize_conversation(conversation, return_target, add_generation_prompt)
        return original_tokenize(self, conversation, return_target, add_generation_prompt)

    patch(text_tokenizer.MegatronTokenizerText, "tokenize_conversation", tokenize_conversation)

    # Capture: micro-batches before the CP split, gradients after Megatron's finalize, the loss.
    original_cp_split = core_utils.get_batch_on_this_cp_rank

    def get_batch_on_this_cp_rank(batch, *args, **kwargs):
        CAPTURE.record_batch(batch)
        return original_cp_split(batch, *args, **kwargs)

    patch(core_utils, "get_batch_on_this_cp_rank", get_batch_on_this_cp_rank)
    original_finalize = training.finalize_model_grads

    def finalize_model_grads(model, *args, **kwargs):
        out = original_finalize(model, *args, **kwargs)
        CAPTURE.record_params(model)
        return out

    patch(training, "finalize_model_grads", finalize_model_grads)
    original_train_step = training.train_step

    def train_step(*args, **kwargs):
        out = original_train_step(*args, **kwargs)
        for key, value in (out[0] or {}).items():
            CAPTURE.logged[key] = float(value)
        return out

    patch(training, "train_step", train_step)
    try:
        with cpu_shim():
            yield
    finally:
        for obj, name, old in reversed(patches):
            setattr(obj, name, old)


def run_pretrain(script: Path, run: Run, world_size: int) -> Tuple[Optional[str], float]:
    """One call of the patched pretrain_gpt.py as ``__main__``; returns (error, seconds)."""
    from megatron.training.training import destroy_global_state

    import megatron_agg

    CAPTURE.reset()
    sys.argv = [str(script)] + megatron_argv(run, world_size)
    start = time.time()
    error = None
    hook_class = megatron_agg.DeferredLossHook
    if run.breaker == "told-load-balanced":  # what the patch did before it passed cp_layout
        class ToldLoadBalanced(hook_class):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["cp_layout"] = "load-balanced"
                super().__init__(*args, **kwargs)

        megatron_agg.DeferredLossHook = ToldLoadBalanced
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            error = f"SystemExit({exc.code})"
    except Exception as exc:  # recorded; the hook's checks raise on every rank alike
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        megatron_agg.DeferredLossHook = hook_class
        destroy_global_state()
    return error, time.time() - start


# ---------------------------------------------------------------------------------------------
# The reference and the comparison (rank 0, after all runs)
# ---------------------------------------------------------------------------------------------
@dataclass
class _Spec:
    hidden_size: int
    num_attention_heads: int
    num_layers: int


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a − b| / max|b|`` (absolute when ``b`` is 0)."""
    scale = float(b.abs().max())
    diff = float((a.float() - b.float()).abs().max())
    return diff / scale if scale > 0 else diff


def assemble(records: Sequence[Dict[str, Any]]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], float]:
    """Full weights and gradients from the (dp 0, cp 0) ranks' TP/PP shards, and the largest
    relative difference between copies of one shard (tied embeddings on the first and last
    pipeline stage, TP-replicated LayerNorms): Megatron must leave them equal."""
    shards: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
    for rec in records:
        for p in rec["params"]:
            shards.setdefault(p["name"], {}).setdefault(p["tp"], []).append(p)
    weights, grads, replica_err = {}, {}, 0.0
    for name, by_tp in shards.items():
        parts = [by_tp[r][0] for r in sorted(by_tp)]
        # (copy, original): pipeline copies of a shard (tied embeddings), and for parameters that
        # TP does not split, every TP rank's copy.
        pairs = [(c, by_tp[r][0]) for r in sorted(by_tp) for c in by_tp[r][1:]]
        if parts[0]["tensor_model_parallel"] and len(parts) > 1:
            assert parts[0]["partition_stride"] == 1, name
            dim = parts[0]["partition_dim"]
            weights[name] = torch.cat([p["data"] for p in parts], dim=dim)
            grads[name] = torch.cat([p["grad"] for p in parts], dim=dim)
        else:
            weights[name], grads[name] = parts[0]["data"], parts[0]["grad"]
            pairs += [(c, parts[0]) for c in parts[1:]]
        for copy, original in pairs:
            replica_err = max(replica_err, _relative_error(copy["grad"], original["grad"]),
                              _relative_error(copy["data"], original["data"]))
    return weights, grads, replica_err


def global_batch(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every DP rank's micro-batches (before the CP split), fields merged over PP stages."""
    merged: Dict[Tuple[int, int], Dict[str, Any]] = {}
    for rec in records:
        for mb in rec["batches"]:
            if mb["tp"] != 0 or mb["cp"] != 0:
                continue
            slot = merged.setdefault((mb["dp"], mb["index"]), {"dp": mb["dp"], "index": mb["index"]})
            for key, value in mb.items():
                if isinstance(value, torch.Tensor) and slot.get(key) is None:
                    slot[key] = value
    return [merged[k] for k in sorted(merged)]


def _documents(mb: Dict[str, Any]) -> List[Tuple[int, int, int]]:
    """(row, start, end) of every sequence of a micro-batch: rows, or packed documents."""
    cu = mb.get("cu_seqlens_padded")
    if cu is None:
        cu = mb.get("cu_seqlens")
    rows, length = mb["labels"].shape
    if cu is None:
        return [(r, 0, length) for r in range(rows)]
    cu = [int(x) for x in cu.reshape(-1).tolist()]
    assert rows == 1 and cu[0] == 0 and cu[-1] == length, (rows, cu, length)
    return [(0, a, b) for a, b in zip(cu[:-1], cu[1:])]


def reference_per_token(weights: Dict[str, torch.Tensor], spec: _Spec, mb: Dict[str, Any]):
    """Per-token losses and masks of every sequence of one micro-batch, one ``[1, len]`` row per
    sequence (packed documents one by one: attention never crosses a document boundary)."""
    from megatron_agg.compare.reference_gpt import per_token_loss

    losses, masks = [], []
    for row, a, b in _documents(mb):
        tokens = mb["tokens"][row:row + 1, a:b]
        labels = mb["labels"][row:row + 1, a:b].clamp(min=0)  # IGNORE_INDEX positions are masked
        position_ids = mb["position_ids"][row:row + 1, a:b]
        losses.append(per_token_loss(weights, spec, tokens, position_ids, labels))
        masks.append(mb["loss_mask"][row:row + 1, a:b])
    return losses, masks


def definition_loss(mode: str, batches: Sequence[Dict[str, Any]], spec: _Spec):
    """``w -> L``: the loss of ``mode`` over the whole global batch, by its definition."""
    from megatron_agg.definition import reference_loss

    def loss_fn(w):
        losses, masks = [], []
        for mb in batches:
            mb_losses, mb_masks = reference_per_token(w, spec, mb)
            losses += mb_losses
            masks += mb_masks
        return reference_loss(losses, masks, mode)

    return loss_fn


def mean_of_means_loss(batches: Sequence[Dict[str, Any]], spec: _Spec):
    """``w -> L`` of Megatron's own averaging without ``calculate_per_token_loss`` (no CP): the
    mean over DP ranks and micro-batches of each micro-batch's token mean."""
    from megatron_agg.definition import reference_loss

    def loss_fn(w):
        parts = [reference_loss(*reference_per_token(w, spec, mb), "token-mean") for mb in batches]
        return sum(parts) / len(parts)

    return loss_fn


def _sanity(run: Run, records: Sequence[Dict[str, Any]], batches: Sequence[Dict[str, Any]]) -> List[str]:
    problems = []
    calls = sorted({r["finalize_calls"] for r in records})
    if calls != [1]:
        problems.append(f"finalize_model_grads ran {calls} times per rank, expected once")
    dp = len(records) // (run.config.tp * run.config.pp * run.config.cp)
    if len(batches) != dp * MICRO_BATCHES_PER_DP_RANK:
        problems.append(f"captured {len(batches)} micro-batches, expected {dp * MICRO_BATCHES_PER_DP_RANK}")
    for mb in batches:
        missing = [k for k in ("tokens", "labels", "loss_mask", "position_ids") if mb.get(k) is None]
        if missing:
            problems.append(f"micro-batch {mb['dp']}/{mb['index']} lacks {missing}")
    return problems


def compare_run(run: Run, records: Sequence[Dict[str, Any]], distinguish: bool = True) -> Dict[str, Any]:
    """Compare one run's gradients (and logged loss) with the definition on the global batch."""
    from megatron_agg.compare.gpt import reference_grads

    spec = _Spec(**records[0]["spec"])
    weights, grads, replica_err = assemble(records)
    batches = global_batch(records)
    problems = _sanity(run, records, batches)

    def error_against(loss_fn) -> Tuple[float, str]:
        ref = reference_grads(weights, loss_fn)
        missing = set(ref) ^ set(grads)
        if missing:
            problems.append(f"parameters not in both: {sorted(missing)}")
        errors = {n: _relative_error(grads[n], ref[n]) for n in ref if n in grads}
        worst = max(errors, key=errors.get)
        return errors[worst], worst

    loss_fn = definition_loss(run.reference_mode, batches, spec)
    grad_err, worst = error_against(loss_fn)
    with torch.no_grad():
        ref_loss = float(loss_fn(weights))
    logged = [r["logged"]["lm loss"] for r in records if "lm loss" in r["logged"]]
    logged_loss = logged[0] if logged else float("nan")
    loss_err = abs(logged_loss - ref_loss) / max(abs(ref_loss), 1e-30)
    # How far the other modes' definitions are: the data must tell the modes apart.
    others = {m: error_against(definition_loss(m, batches, spec))[0] for m in MODES
              if distinguish and m != run.reference_mode}
    explained = None
    if run.breaker == "megatron-own" and run.config.cp == 1:
        explained = error_against(mean_of_means_loss(batches, spec))[0]
    counts = []
    for mb in batches:
        docs = _documents(mb)
        mask = mb["loss_mask"]
        counts.append(dict(dp=mb["dp"], mb=mb["index"], tokens=int(mask.sum()), sequences=len(docs),
                           empty=sum(int(mask[r, a:b].sum() == 0) for r, a, b in docs)))
    exact = grad_err <= TOLERANCE and loss_err <= TOLERANCE and replica_err <= TOLERANCE and not problems
    passed = (grad_err >= CONTROL_MARGIN and not problems) if run.control else exact
    return dict(run=run.name, config=run.config.name, layout=run.config.layout, mode=run.mode,
                reference_mode=run.reference_mode, control=run.control, breaker=run.breaker,
                grad_err=grad_err, worst_param=worst, loss=logged_loss, ref_loss=ref_loss,
                loss_err=loss_err, replica_err=replica_err, other_modes=others,
                explained_by_mean_of_means=explained, exact=exact, passed=passed, problems=problems,
                counts=counts)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.megatron_lm",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/megatron_lm_e2e", help="captures, logs, summary.json")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--controls", default=",".join(CONTROLS),
                        help="negative controls to run (comma-separated, '' for none): " + ", ".join(CONTROLS))
    parser.add_argument("--pairwise", action="store_true",
                        help="each configuration with a token mean and a sequence mean, the other modes rotating "
                             "over the configurations (plan_runs)")
    parser.add_argument("--patch", default=None, help="the pretrain_gpt patch (default: resolved)")
    parser.add_argument("--upstream", default=None, help="directory with the three upstream files")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    # --spec imports this module by name: make that the running module, not a second copy.
    if __name__ == "__main__":
        sys.modules.setdefault("harness.megatron_lm", sys.modules["__main__"])
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    configs = [c for c in args.configs.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    runs = plan_runs(configs, modes, [c for c in args.controls.split(",") if c], pairwise=args.pairwise)
    sources = resolve_sources(patch=args.patch, upstream=args.upstream)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"megatron_lm_rank{rank}_"))
    script = prepare_script(sources, workdir)
    sys.path.insert(0, str(workdir))
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # what Megatron-LM asks for under TP/CP
    # The default group outlives the runs (Megatron-LM's initialize skips an initialized one).
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    if rank == 0:
        print(f"megatron_lm: {len(runs)} runs on {world} ranks; patched {sources.upstream}/pretrain_gpt.py "
              f"with {sources.patch} ({sources.note})", flush=True)
    timings: Dict[str, float] = {}
    start = time.time()
    with cpu_environment():
        for run in runs:
            error, seconds = run_pretrain(script, run, world)
            timings[run.name] = seconds
            record = dict(batches=CAPTURE.batches, params=CAPTURE.params, logged=CAPTURE.logged,
                          error=error, finalize_calls=CAPTURE.finalize_calls,
                          spec={k: MODEL[k] for k in ("hidden_size", "num_attention_heads", "num_layers")})
            (out / "captures" / run.name).mkdir(parents=True, exist_ok=True)
            torch.save(record, out / "captures" / run.name / f"rank{rank}.pt")
            if rank == 0:
                print(f"megatron_lm: ran {run.name} in {seconds:.1f}s" + (f" (error: {error})" if error else ""),
                      flush=True)
            dist.barrier()
    shutil.rmtree(workdir, ignore_errors=True)
    train_seconds = time.time() - start
    if rank != 0:
        return 0
    return report(runs, out, world, timings, train_seconds)


#: What the hook says when it is told the per-document layout on rows cut as a whole.
REFUSAL = "cp_layout='per-row'"


def _span(values: Sequence[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def config_line(name: str, rs: Sequence[Dict[str, Any]]) -> Tuple[bool, str]:
    ok = all(r["passed"] for r in rs)
    done = [r for r in rs if "grad_err" in r]
    head = f"megatron-lm e2e {name} [{rs[0]['layout']}]: {'PASS' if ok else 'FAIL'} {sum(r['passed'] for r in rs)}/{len(rs)} modes exact"
    if not done:
        return ok, head + f" — {rs[0].get('error', '')[:160]}"
    others = [v for r in done for v in r["other_modes"].values()]
    counts = done[0]["counts"]
    line = (f"{head} — max grad err {max(r['grad_err'] for r in done):.1e}, logged lm loss err "
            f"{max(r['loss_err'] for r in done):.1e} (tol {TOLERANCE:g})"
            + (f"; other modes' definitions missed by >= {min(others):.1e}" if others else "")
            + f"; per micro-batch {_span([c['tokens'] for c in counts])} valid tokens, "
            f"{_span([c['sequences'] for c in counts])} sequences ({sum(c['empty'] for c in counts)} fully masked in all)")
    failed = [r["run"] for r in rs if not r["passed"]]
    return ok, line + (f"; FAILED: {', '.join(failed)}" if failed else "")


def control_line(r: Dict[str, Any]) -> Tuple[bool, str]:
    head = f"megatron-lm e2e control {r['breaker']} ({r['config']}): {'PASS' if r['passed'] else 'FAIL'}"
    if "error" in r:
        how = "refused by the hook" if r["passed"] else "failed with an unexpected error"
        return r["passed"], f"{head} — {how}: {r['error'][:220]}"
    line = (f"{head} — misses the {r['reference_mode']} definition by {r['grad_err']:.1e} "
            f"(must be >= {CONTROL_MARGIN:g})")
    if r.get("explained_by_mean_of_means") is not None:
        line += (f"; equals Megatron's mean of per-micro-batch token means to "
                 f"{r['explained_by_mean_of_means']:.1e}; its logged lm loss is the exact token mean "
                 f"(err {r['loss_err']:.1e})")
    return r["passed"], line


def report(runs: Sequence[Run], out: Path, world: int, timings: Dict[str, float], train_seconds: float) -> int:
    """Rank 0, after all runs: compare, print one line per run and per configuration, write
    ``summary.json``; 0 when every run is exact and every control misses."""
    start = time.time()
    results = []
    for run in runs:
        records = [torch.load(out / "captures" / run.name / f"rank{r}.pt", weights_only=False)
                   for r in range(world)]
        error = next((r["error"] for r in records if r["error"]), None)
        if error is not None:
            refused = run.breaker == "told-load-balanced" and REFUSAL in error
            result = dict(run=run.name, config=run.config.name, layout=run.config.layout, mode=run.mode,
                          reference_mode=run.reference_mode, control=run.control, breaker=run.breaker,
                          error=error, exact=False, passed=refused)
        else:
            result = compare_run(run, records)
        result["seconds"] = timings[run.name]
        results.append(result)
    compare_seconds = time.time() - start
    summary = dict(tolerance=TOLERANCE, control_margin=CONTROL_MARGIN, train_seconds=train_seconds,
                   compare_seconds=compare_seconds, results=results)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print()
    for r in results:
        if "error" in r:
            print(f"  {r['run']:<58} ERROR {r['error'][:200]}  [{r['seconds']:.1f}s]")
            continue
        verdict = ("misses, as it must" if r["passed"] else "DOES NOT MISS") if r["control"] else \
            ("exact" if r["exact"] else "MISMATCH")
        print(f"  {r['run']:<58} grad err {r['grad_err']:.2e} ({r['worst_param']}), lm loss "
              f"{r['loss']:.6f} vs {r['ref_loss']:.6f} (err {r['loss_err']:.1e}): {verdict}"
              + (f" {r['problems']}" if r["problems"] else "") + f"  [{r['seconds']:.1f}s]")
    print()
    status = 0
    by_config: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        if not r["control"]:
            by_config.setdefault(r["config"], []).append(r)
    lines = [config_line(name, rs) for name, rs in by_config.items()]
    lines += [control_line(r) for r in results if r["control"]]
    for ok, line in lines:
        status |= 0 if ok else 1
        print(line)
    print(f"megatron-lm e2e: {'PASS' if status == 0 else 'FAIL'} — {len(results)} runs, pretrain "
          f"{train_seconds:.0f}s, reference {compare_seconds:.0f}s; {out / 'summary.json'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
