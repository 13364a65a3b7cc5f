"""Shared fixtures: a one-rank gloo world with Megatron on the CPU, and a torchrun launcher."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
SUMMARY: List[str] = []

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: List[str], timeout: float = 1800, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --nproc-per-node nproc <args>`` on loopback, with
    ``tests/`` (the test harness, ``harness``) and the repository on ``PYTHONPATH``."""
    path = [str(REPO / "tests"), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def pytest_terminal_summary(terminalreporter):
    if SUMMARY:
        terminalreporter.section("megatron_agg gradient-equivalence summary")
        for line in SUMMARY:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def one_rank_world():
    """A gloo process group of one rank (initialized once for the session)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    # left alive until the interpreter exits: other session fixtures may still use it


@pytest.fixture
def megatron_cpu(one_rank_world):
    """Megatron on the CPU with model parallel state TP = PP = 1 for the test's duration."""
    from megatron_agg.compare.cpu import cpu_shim
    from megatron_agg.compare.parallel import Layout, model_parallel

    with cpu_shim(), model_parallel(Layout()):
        yield


#: The fast tier (``bash scripts/run_tests.sh --fast``, docs/TESTING.md): these modules in one
#: process each (the core math on simulated data-parallel ranks, the version policy's probe of
#: Megatron's own loss path, every entry point on one rank with real Megatron), plus the one
#: multi-rank launch of ``test_smoke.py``. Modules mark themselves with ``pytestmark`` too.
FAST_MODULES = {
    "test_aggregation.py", "test_modes_terms.py", "test_packing.py", "test_groups_masks_metrics.py",
    "test_hook_single_process.py", "test_deferred.py", "test_shares.py", "test_releases.py",
    "test_wrappers.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in FAST_MODULES:
            item.add_marker(pytest.mark.fast)
