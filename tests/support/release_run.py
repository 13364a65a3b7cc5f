"""Run under torchrun with 4 ranks: the version matrix's proofs of one megatron-core release, in one launch.

Each proof would otherwise cost its own torchrun start and Megatron import (~15 s each on 2 cores):

- ``suite``: the gradient-equivalence release suite (``harness.matrix``);
- ``probe``: the FSDP wrapper probe (``wrapper_probe.py``);
- ``dynamic``: dynamic (hybrid) context parallelism through Megatron's own schedule (``dynamic_cp_run.py``).

Parts are separated by ``---``; each starts with its name, the rest are its own arguments::

    torchrun --nproc-per-node 4 tests/support/release_run.py \\
        suite --suite release --out r.json --- probe --strict --json w.json --- dynamic --json d.json

Each part prints its own summary line (the version matrix reads those); every part runs, in the order
given, and the exit code is 1 if any part's was not 0. The parts initialise and destroy the default
process group themselves; here the first initialisation stays for all parts and a part's destroy
destroys only the groups made since (a default group made anew would reuse the group names of the old
one in torchrun's store, and gloo would connect to the old addresses).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch.distributed as dist


def _parts() -> Dict[str, Callable[[List[str]], int]]:
    import dynamic_cp_run
    import wrapper_probe
    from harness import matrix

    return {"suite": matrix.main, "probe": wrapper_probe.main, "dynamic": dynamic_cp_run.main}


def split(argv: Sequence[str]) -> List[List[str]]:
    """``a x --- b y`` → ``[["a", "x"], ["b", "y"]]`` (empty parts dropped)."""
    parts: List[List[str]] = [[]]
    for arg in argv:
        if arg == "---":
            parts.append([])
        else:
            parts[-1].append(arg)
    return [p for p in parts if p]


@contextlib.contextmanager
def one_default_group() -> Iterator[None]:
    """``dist.init_process_group`` once for every part; ``dist.destroy_process_group()`` of a part
    destroys every group but the default one; the default one is destroyed at the end."""
    init, destroy = dist.init_process_group, dist.destroy_process_group

    def init_once(*args, **kwargs):
        if not dist.is_initialized():
            init(*args, **kwargs)

    def destroy_subgroups(group=None):
        if group is not None:
            return destroy(group)
        for pg in list(dist.distributed_c10d._world.pg_map):
            if pg is not dist.GroupMember.WORLD:
                destroy(pg)

    dist.init_process_group, dist.destroy_process_group = init_once, destroy_subgroups
    try:
        yield
    finally:
        dist.init_process_group, dist.destroy_process_group = init, destroy
        if dist.is_initialized():
            destroy()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parts = split(sys.argv[1:] if argv is None else argv)
    known = _parts()
    unknown = [p[0] for p in parts if p[0] not in known]
    if not parts or unknown:
        raise SystemExit(f"release_run.py: parts are {', '.join(known)} separated by ---; got {unknown or 'none'}")
    status = 0
    with one_default_group():
        for name, *args in parts:
            start = time.perf_counter()
            rc = known[name](args)
            if dist.get_rank() == 0:
                print(f"release_run: {name} exit {rc} in {time.perf_counter() - start:.1f}s", flush=True)
            status |= int(rc != 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
