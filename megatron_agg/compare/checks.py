"""Up-front checks of ``megatron-agg compare``'s command line: one clear line, before any worker starts.

``megatron-agg compare`` calls :func:`check_before_launch` in the parent process before it starts
``torchrun``; every worker calls :func:`check_in_worker` before it builds anything (that is what
runs when the command is already under ``torchrun``). A command line ``compare`` cannot run gives
one line on stderr and exit status 2, as argparse's own errors::

    megatron-agg compare: error: <what was expected, what came, what to do>

Checked: positive sizes and steps, finite learning rate / clipping / tolerance, the loss options
(as :class:`~megatron_agg.LossTerm` would check them later), the layout against the number of ranks
and against what compare relies on (its ragged batch is split for 1, 2 or 4 data-parallel ranks,
the test model's heads and layers split evenly, Megatron's interleaved schedule needs micro-batch
counts that are multiples of ``pp``), the Megatron set-up (``--fsdp-strategy`` only with
``--wrapper megatron-fsdp``; no pipeline parallelism with the FSDP wrappers; ``--sequence-parallel``
only with ``--tp`` 2 or more; no ``--distributed-optimizer`` with torch-fsdp2), a CUDA device for
``--device cuda``, a writable ``--out`` folder, and a free rendezvous port.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Tuple

from ..modes import AggMode

__all__ = ["PROG", "USAGE_ERROR", "CompareUsageError", "error_line", "check_arguments",
           "check_before_launch", "check_in_worker", "master_port"]

PROG = "megatron-agg compare"
#: Exit status of a command line compare cannot run (argparse's).
USAGE_ERROR = 2
#: The range of ``torch.Generator.manual_seed``; compare seeds with ``seed`` and ``seed·1000 + step``.
_SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)


class CompareUsageError(ValueError):
    """A command line ``compare`` cannot run; the message says what was expected, what came, what to do."""


def error_line(message: str) -> str:
    """The one line printed for a :class:`CompareUsageError`."""
    return f"{PROG}: error: {message}"


def _sizes() -> str:
    """``1, 2 or 4``: the data-parallel sizes compare's ragged batch is split for."""
    from . import data as data_mod  # the CPU kit loads only when a check needs it, not for --help

    sizes = [str(n) for n in sorted(data_mod.MICROBATCH_PLANS)]
    return ", ".join(sizes[:-1]) + " or " + sizes[-1] if len(sizes) > 1 else sizes[0]


def check_numbers(args: argparse.Namespace) -> None:
    """Sizes, steps, tolerance, learning rate, clipping and seed are numbers compare can use."""
    for flag, value, example in (("--tp", args.tp, "2"), ("--pp", args.pp, "1")):
        if value < 1:
            raise CompareUsageError(f"{flag} must be a positive integer, got {value}; pass e.g. {flag} {example}")
    if args.vpp is not None and args.vpp < 1:
        raise CompareUsageError(f"--vpp must be a positive integer (model chunks per pipeline rank), got {args.vpp}; "
                                "leave it out for no virtual pipelining or pass e.g. --pp 2 --vpp 2")
    if args.steps < 1:
        raise CompareUsageError(f"--steps must be at least 1, got {args.steps}; pass e.g. --steps 8")
    if not (math.isfinite(args.tol) and args.tol > 0):
        raise CompareUsageError("--tol must be a positive finite number (the largest relative gradient difference "
                                f"allowed), got {args.tol}; pass e.g. --tol 1e-4")
    if args.lr is not None and not math.isfinite(args.lr):
        raise CompareUsageError(f"--lr must be a finite number, got {args.lr}; pass e.g. --lr 1.0")
    if not (math.isfinite(args.clip_grad) and args.clip_grad > 0):
        raise CompareUsageError("--clip-grad must be a positive finite number (Megatron does not clip at 0 or "
                                f"below, the FSDP path would), got {args.clip_grad}; pass e.g. --clip-grad 0.5")
    low, high = _SEED_RANGE
    if not (low <= min(args.seed, args.seed * 1000) and args.seed * 1000 + args.steps - 1 <= high):
        raise CompareUsageError(f"--seed must keep seed·1000 + step within torch's seed range {low}..{high}, "
                                f"got {args.seed}; pass a smaller seed, e.g. --seed 0")


def check_loss_options(args: argparse.Namespace) -> None:
    """``--loss-scale-factor`` as :class:`~megatron_agg.LossTerm` accepts it (checked there only later)."""
    factor = args.loss_scale_factor
    if factor is None:
        return
    wanted = AggMode.SEQ_MEAN_TOKEN_SUM_NORM.value
    if args.loss_agg_mode != wanted:
        raise CompareUsageError(f"--loss-scale-factor only applies to --loss-agg-mode {wanted}, got it with "
                                f"--loss-agg-mode {args.loss_agg_mode}; drop --loss-scale-factor or pass "
                                f"--loss-agg-mode {wanted}")
    if not (math.isfinite(factor) and factor > 0):
        raise CompareUsageError("--loss-scale-factor must be a positive finite number (the constant C of "
                                f"{wanted}), got {factor}; pass e.g. --loss-scale-factor 16, or leave it out "
                                "for the padded sequence length")


def check_setup(args: argparse.Namespace) -> None:
    """The Megatron set-up: wrapper, Megatron-FSDP strategy, sequence parallelism, distributed optimizer.

    As Megatron-LM refuses them: pipeline parallelism with torch-fsdp2 (and Megatron-FSDP, which
    this harness runs without PP), MCore's distributed optimizer with torch-fsdp2, sequence
    parallelism without tensor parallelism.
    """
    wrapper = getattr(args, "wrapper", "ddp")
    strategy = getattr(args, "fsdp_strategy", None)
    if strategy is not None and wrapper != "megatron-fsdp":
        raise CompareUsageError(f"--fsdp-strategy is Megatron-FSDP's sharding strategy, got --fsdp-strategy {strategy} "
                                f"with --wrapper {wrapper}; add --wrapper megatron-fsdp or drop --fsdp-strategy")
    if wrapper in ("torch-fsdp2", "megatron-fsdp") and (args.pp > 1 or args.vpp is not None):
        got = f"--pp {args.pp}" + (f" --vpp {args.vpp}" if args.vpp is not None else "")
        why = ("Megatron-LM asserts it" if wrapper == "torch-fsdp2"
               else "compare runs Megatron-FSDP without pipeline stages")
        raise CompareUsageError(f"--wrapper {wrapper} takes no pipeline parallelism ({why}), got {got}; pass --pp 1 "
                                "(and no --vpp) or use --wrapper ddp")
    if getattr(args, "sequence_parallel", False) and args.tp < 2:
        raise CompareUsageError(f"--sequence-parallel splits the sequence over the tensor-parallel ranks and needs "
                                f"--tp 2 or more, got --tp {args.tp}; pass e.g. --tp 2 or drop --sequence-parallel")
    if getattr(args, "distributed_optimizer", False) and wrapper == "torch-fsdp2":
        raise CompareUsageError("--wrapper torch-fsdp2 does not take Megatron's distributed optimizer (Megatron-LM "
                                "asserts it; FSDP2 shards the optimizer state itself), got --distributed-optimizer; "
                                "drop --distributed-optimizer or use --wrapper ddp or megatron-fsdp")


def _ranks(source: str, world: int) -> str:
    """Where the number of ranks came from, for messages: ``--nproc 4`` or ``WORLD_SIZE=4``."""
    return f"{source} {world}" if source.startswith("--") else f"{source}={world}"


def check_layout(args: argparse.Namespace, world: int, source: str) -> None:
    """The TP/PP/VPP layout fits ``world`` ranks, the test model and compare's batch split.

    ``source`` names where ``world`` came from in messages (``--nproc`` or ``WORLD_SIZE``).
    """
    from . import data as data_mod
    from .gpt import TinyGPT

    ranks = _ranks(source, world)
    if world < 1:
        raise CompareUsageError(f"{source} must be a positive integer, got {world}; pass e.g. {_ranks(source, 4)}")
    plans = data_mod.MICROBATCH_PLANS
    if world not in plans or world not in data_mod.EQUAL_COUNT_PLANS:
        raise CompareUsageError(f"compare splits its ragged batch over {_sizes()} ranks (FSDP uses all of "
                                f"them), got {ranks}; use {_sizes()} ranks")
    tp, pp, vpp = args.tp, args.pp, args.vpp
    if world % (tp * pp):
        raise CompareUsageError(f"{ranks} is not divisible by tp·pp = {tp}·{pp} = {tp * pp}; pass --tp and "
                                f"--pp whose product divides {world} (e.g. --tp {min(2, world)} --pp 1), or "
                                "change the number of ranks")
    dp = world // (tp * pp)
    if dp not in plans:
        raise CompareUsageError(f"compare splits its batch for Megatron data-parallel sizes {_sizes()}, got "
                                f"dp = {world}/(tp·pp) = {dp}; change --tp, --pp or the number of ranks")
    spec = TinyGPT()
    for name, size in (("attention heads", spec.num_attention_heads), ("hidden size", spec.hidden_size),
                       ("vocabulary", spec.vocab_size)):
        if size % tp:
            raise CompareUsageError(f"--tp must divide the test model's {name} ({size}), got --tp {tp}; "
                                    "pass e.g. --tp 1 or --tp 2")
    if vpp is not None and pp < 2:
        raise CompareUsageError(f"--vpp needs pipeline parallelism (--pp 2 or more), got --vpp {vpp} with --pp {pp}; "
                                "pass --pp 2 or leave out --vpp")
    chunks = pp * (vpp or 1)
    if spec.num_layers % chunks:
        got = f"--pp {pp}" + (f" --vpp {vpp}" if vpp else "")
        raise CompareUsageError(f"the test model's {spec.num_layers} layers must split evenly over pp·vpp model "
                                f"chunks, got {got} ({chunks} chunks); pass e.g. --pp 2 or --pp 2 --vpp 2")
    if vpp is not None:
        counts = sorted({len(plan) for plan in plans[dp]})
        if any(c % pp for c in counts):
            raise CompareUsageError(f"interleaved pipelining (--vpp) needs every data-parallel rank's micro-batch "
                                    f"count to be a multiple of --pp (Megatron's schedule runs them in groups of "
                                    f"pp), but with dp={dp} the ranks have {counts} micro-batches and --pp is {pp}; "
                                    "pass --pp 2 or leave out --vpp")


def check_device(args: argparse.Namespace, local_ranks: int) -> None:
    """``--device cuda`` has a GPU for each of this machine's ``local_ranks`` ranks."""
    if args.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise CompareUsageError(f"--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False here "
                                f"(torch {torch.__version__}); run with --device cpu (the default) or on a "
                                "machine with GPUs")
    count = torch.cuda.device_count()
    if local_ranks > count:
        raise CompareUsageError(f"--device cuda runs {local_ranks} ranks on this machine, one GPU each, but "
                                f"{count} GPU(s) are visible; start at most {count} ranks or make more GPUs "
                                "visible (CUDA_VISIBLE_DEVICES)")


def check_out(out: str) -> None:
    """``--out`` is a folder compare can write into: create it and write (and delete) a file there."""
    if not out.strip():
        raise CompareUsageError(f"--out must name a folder for compare.json and compare.png, got {out!r} (an empty "
                                "--out would write into the current folder); pass e.g. --out compare-out")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CompareUsageError(f"--out must be a folder for compare.json and compare.png, got {out}, which is a "
                                "file; pass another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompareUsageError(f"--out must be a folder compare can create, got {out} ({e.strerror or e}); "
                                "pass a writable folder with --out") from None
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".compare-write-test-"):
            pass
    except OSError as e:
        raise CompareUsageError(f"--out must be a writable folder, but compare cannot write into {out} "
                                f"({e.strerror or e}); pass a writable folder with --out") from None


def check_arguments(args: argparse.Namespace, world: int, local_ranks: int, source: str,
                    output: bool = True) -> None:
    """All checks of the command line for ``world`` ranks (``local_ranks`` on this machine).

    ``source`` names where ``world`` came from (``--nproc`` or ``WORLD_SIZE``); ``output`` also checks
    that ``--out`` is writable (only the rank that writes needs it). Raises :class:`CompareUsageError`.
    """
    check_numbers(args)
    check_loss_options(args)
    check_setup(args)
    check_layout(args, world, source)
    check_device(args, local_ranks)
    if output:
        check_out(args.out)


def _port_problem(port: int) -> Optional[Tuple[str, str]]:
    """Why ``port`` cannot be torchrun's rendezvous port here and where, or ``None`` when it is free."""
    for host, where in (("127.0.0.1", "on 127.0.0.1"), ("0.0.0.0", "on this machine")):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket's TIME_WAIT is no conflict
            try:
                s.bind((host, port))
            except OSError as e:
                why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be used ({e.strerror or e})"
                return why, where
    return None


def master_port(environ: Mapping[str, str]) -> int:
    """The rendezvous port: ``MASTER_PORT`` when set (checked to be free), else a free port."""
    raw = environ.get("MASTER_PORT")
    if raw is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    if not raw:
        raise CompareUsageError("MASTER_PORT is set but empty; set MASTER_PORT to a free port or unset it "
                                "(compare then picks a free one)")
    if not (raw.isdigit() and 1 <= int(raw) <= 65535):
        raise CompareUsageError(f"MASTER_PORT must be a port number in 1..65535, got {raw!r}; set MASTER_PORT to "
                                "a free port or unset it (compare then picks a free one)")
    port = int(raw)
    problem = _port_problem(port)
    if problem:
        what, where = problem
        raise CompareUsageError(f"port {port} {where} {what}; set MASTER_PORT to a free port or unset it")
    return port


def check_before_launch(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """The parent's checks before it starts ``args.nproc`` workers; returns the rendezvous port."""
    if args.nproc < 1:
        raise CompareUsageError(f"--nproc must be a positive integer, got {args.nproc}; pass e.g. --nproc 4")
    check_arguments(args, world=args.nproc, local_ranks=args.nproc, source="--nproc")
    return master_port(environ)


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    """An integer torchrun put into the environment (``default`` when it is absent or not a number)."""
    try:
        return int(environ.get(name, default))
    except ValueError:
        return default


def check_in_worker(args: argparse.Namespace, environ: Optional[Mapping[str, str]] = None) -> None:
    """The same checks in a worker under torchrun, before it builds anything.

    On a bad command line the first rank of each machine prints the one line; every rank exits
    with status 2.
    """
    environ = os.environ if environ is None else environ
    try:
        check_arguments(args, world=_env_int(environ, "WORLD_SIZE", 1),
                        local_ranks=_env_int(environ, "LOCAL_WORLD_SIZE", 1), source="WORLD_SIZE",
                        output=_env_int(environ, "RANK", 0) == 0)
    except CompareUsageError as e:
        if _env_int(environ, "LOCAL_RANK", 0) == 0:
            print(error_line(str(e)), file=sys.stderr, flush=True)
        raise SystemExit(USAGE_ERROR) from None
