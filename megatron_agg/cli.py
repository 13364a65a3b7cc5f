"""The ``megatron-agg`` console script.

    megatron-agg compare [--nproc 4] [--tp 2] [--steps 8] ...   # Megatron vs FSDP2, side by side
    megatron-agg version                                         # versions and the supported range

``compare`` starts ``torchrun`` (``python -m torch.distributed.run``) with ``--nproc`` ranks on this
machine unless it already runs under it (``RANK`` set), so the same command works from a shell
and inside a multi-node launch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List, Optional

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


def _launch(argv: List[str], nproc: int) -> int:
    argv = _without_nproc(argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={os.environ.get('MASTER_PORT', '29561')}",
           "-m", "megatron_agg.compare", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
    # torchrun's own chatter (its OMP_NUM_THREADS banner) is noise; errors are not.
    noise = ("OMP_NUM_THREADS", "*****", "torch/distributed/run.py")
    kept = [line for line in proc.stderr.splitlines() if not any(n in line for n in noise)]
    if kept:
        sys.stderr.write("\n".join(kept) + "\n")
    return proc.returncode


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="megatron-agg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from .compare import add_arguments

    add_arguments(sub.add_parser("compare", help="train on Megatron (hooked and plain) and on FSDP2, compare"))
    sub.add_parser("version", help="print versions and the supported megatron-core range")
    args = parser.parse_args(argv)
    if args.command == "version":
        from . import __version__
        from .integration import SUPPORTED_MEGATRON_CORE, megatron_core_version

        print(f"megatron_agg {__version__}; megatron-core {megatron_core_version()} installed; "
              f"supported {' '.join(SUPPORTED_MEGATRON_CORE)}")
        return 0
    if "RANK" in os.environ:  # already under torchrun
        from .compare import run

        return run(args)
    return _launch(argv[1:], args.nproc)


if __name__ == "__main__":
    sys.exit(main())
