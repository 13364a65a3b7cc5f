"""The ``megatron-agg`` console script.

    megatron-agg compare [--nproc 4] [--tp 2] [--steps 8] ...   # Megatron vs FSDP2, side by side
    megatron-agg version                                         # versions and the supported range
    megatron-agg patch --target megatron-lm --path CHECKOUT      # apply the patch that fits (or --revert)

``compare`` starts ``torchrun`` (``python -m torch.distributed.run``) with ``--nproc`` ranks on this
machine unless it already runs under it (``RANK`` set), so the same command works from a shell
and inside a multi-node launch. Before it starts any worker it checks the command line, the
``--out`` folder, the device and the rendezvous port (``MASTER_PORT`` if set, else a free one) and
answers a bad one with one line and exit status 2 (:mod:`megatron_agg.compare.checks`); a worker
that fails anyway is reported in one line, with the workers' whole stderr in
``<out>/compare-workers.log``.

``patch`` detects the release of a Megatron-LM (``pretrain_gpt.py``) or verl checkout, picks the
shipped patch of that release and applies it (``--revert``: reverts it; ``--check``: only says what
it would do); an already patched checkout is left alone. When no patch fits it prints one
``megatron-agg patch: error: ...`` line and exits 1 (:mod:`megatron_agg.patching`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .compare.checks import PROG

__all__ = ["main"]


def _without_nproc(argv: List[str]) -> List[str]:
    """The worker's arguments: all but ``--nproc`` (torchrun's parser would take it for its own)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


#: torchrun's own chatter on stderr (its OMP_NUM_THREADS banner); errors are not noise.
_NOISE = ("OMP_NUM_THREADS", "*****", "torch/distributed/run.py")
#: A line naming an exception: ``RuntimeError: ...``, ``torch.OutOfMemoryError: ...``.
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)\b(?::.*)?$")
#: torchrun's own log lines (``E1125 03:53:47.925000 3070 .../api.py:1002] ...``).
_TORCHRUN_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


def _run_workers(cmd: List[str], env: Dict[str, str]) -> Tuple[int, str, bool]:
    """Run torchrun; pass its stdout through as it comes and keep its stderr.

    Returns the exit status, the whole stderr, and whether the workers printed a DISAGREE verdict
    (compare's own non-zero result, not a failure).
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    err: List[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    disagree = False
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        disagree = disagree or line.startswith("DISAGREE:")
    returncode = proc.wait()
    reader.join()
    return returncode, "".join(err), disagree


def _workers_lines(stderr: str) -> List[str]:
    """The workers' stderr lines, without torchrun's own report of the failure and its log lines."""
    lines = stderr.splitlines()
    cut = next((i for i, line in enumerate(lines) if "failed (exitcode" in line), None)
    if cut is None:
        cut = next((i for i, line in enumerate(lines) if "ChildFailedError" in line), len(lines))
        headers = [i for i in range(cut) if lines[i].startswith("Traceback (most recent call last)")]
        cut = headers[-1] if headers and cut < len(lines) else cut
    return [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in lines[:cut]
            if not _TORCHRUN_LOG.match(line) and not any(n in line for n in _NOISE)]


def _last_error(lines: List[str]) -> str:
    """The last meaningful error line of the workers' stderr ``lines``.

    Preference: compare's own one-line errors, then the last ``XxxError: message`` line (also when
    another rank's output got into the same line), then the last unindented line that is not part
    of a traceback's frame list.
    """
    stripped = [line.strip().lstrip("^ ") for line in lines]
    for wanted in (lambda line: line.startswith(f"{PROG}: error:"), _EXCEPTION.match):
        found = [line for line in stripped if wanted(line)]
        if found:
            return found[-1]
    plain = [line.strip() for line in lines if line.strip() and not line[0].isspace() and line[0] != "^"
             and not line.startswith(("Traceback", "During handling", "The above exception"))]
    return plain[-1] if plain else "no error message on stderr"


def _worker_exit(stderr: str, returncode: int) -> str:
    """The failed worker's exit status from torchrun's report (its root cause), else torchrun's own."""
    root = stderr.split("Root Cause", 1)[-1]
    match = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    code = int(match.group(1)) if match else returncode
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code}, {signal.Signals(-code).name}"
    return str(code)


def _write_log(out: str, stderr: str) -> Optional[Path]:
    """Keep the workers' whole stderr in ``<out>/compare-workers.log``; ``None`` if it cannot be written."""
    path = Path(out) / "compare-workers.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(stderr)
    except OSError:
        return None
    return path


def _launch(argv: List[str], args: argparse.Namespace) -> int:
    """Check the command line, then run ``args.nproc`` workers under torchrun on this machine.

    A bad command line gives one line and exit status 2 before any worker starts; a failed worker
    gives one line with its last error (the workers' whole stderr goes to ``<out>/compare-workers.log``).
    """
    from .compare.checks import USAGE_ERROR, CompareUsageError, check_before_launch, error_line

    try:
        port = check_before_launch(args, os.environ)
    except CompareUsageError as e:
        print(error_line(str(e)), file=sys.stderr, flush=True)
        return USAGE_ERROR
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
           "--master-addr=127.0.0.1", f"--master-port={port}",
           "-m", "megatron_agg.compare", *_without_nproc(argv)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    returncode, stderr, disagree = _run_workers(cmd, env)
    if returncode == 0:
        kept = [line for line in stderr.splitlines() if not any(n in line for n in _NOISE)]
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
        return 0
    log = _write_log(args.out, stderr)
    if disagree:  # the verdict line said it; torchrun's report of the exit status 1 is noise
        return returncode
    error = _last_error(_workers_lines(stderr))
    if error.startswith(f"{PROG}: error:"):  # a worker's own check of the command line (exit 2)
        print(error, file=sys.stderr, flush=True)
        return USAGE_ERROR
    where = f"; the workers' whole stderr is in {log}" if log else ""
    print(f"{PROG}: a worker failed (exit {_worker_exit(stderr, returncode)}): {error}{where}",
          file=sys.stderr, flush=True)
    return returncode or 1


def _add_patch_arguments(parser: argparse.ArgumentParser) -> None:
    from .patching import TARGETS

    releases = "; ".join(f"{name}: {', '.join(t.releases)}" for name, t in TARGETS.items())
    parser.add_argument("--target", required=True, choices=sorted(TARGETS), help="the upstream project")
    parser.add_argument("--path", required=True,
                        help="the checkout's root (Megatron-LM: the folder with pretrain_gpt.py; verl: the folder "
                             "that holds verl/)")
    parser.add_argument("--release", default=None,
                        help=f"use this release's patch instead of detecting it ({releases})")
    parser.add_argument("--revert", action="store_true", help="revert the patch instead of applying it")
    parser.add_argument("--check", action="store_true", help="only say what would happen; write nothing")


def _patch(args: argparse.Namespace) -> int:
    """``megatron-agg patch``: the report on stdout; a failure as one ``error:`` line, exit 1."""
    from .patching import PatchError, run_patch

    try:
        result = run_patch(args.target, args.path, release=args.release, revert=args.revert, check=args.check)
    except PatchError as e:
        print(f"megatron-agg patch: error: {e}", file=sys.stderr, flush=True)
        return 1
    print("\n".join(result.lines()), flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="megatron-agg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from .compare import add_arguments

    add_arguments(sub.add_parser("compare", help="train on Megatron (hooked and plain) and on FSDP2, compare"))
    sub.add_parser("version", help="print versions and the supported megatron-core range")
    _add_patch_arguments(sub.add_parser(
        "patch", help="apply (or revert) the Megatron-LM / verl patch that fits a checkout",
        description="Detect the release of a Megatron-LM or verl checkout and apply (or revert) "
                    "megatron_agg's patch for it."))
    args = parser.parse_args(argv)
    if args.command == "patch":
        return _patch(args)
    if args.command == "version":
        from . import __version__
        from .megatron import SUPPORTED_MEGATRON_CORE, megatron_core_version

        print(f"megatron_agg {__version__}; megatron-core {megatron_core_version()} installed; "
              f"supported {' '.join(SUPPORTED_MEGATRON_CORE)}")
        return 0
    if "RANK" in os.environ:  # already under torchrun: run() checks the command line first
        from .compare import run

        return run(args)
    return _launch(argv[1:], args)


if __name__ == "__main__":
    sys.exit(main())
