"""`megatron-agg compare` end to end (short runs): the hooked Megatron path and the FSDP path
agree, the plain path does not, the PNG is a real image, and a wrong scaling fails the command."""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, SUMMARY, free_port


def compare(tmp_path, *extra, env=None):
    exe = shutil.which("megatron-agg") or os.path.join(os.path.dirname(sys.executable), "megatron-agg")
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore") if env is None else env
    return subprocess.run([exe, "compare", "--nproc", "4", "--steps", "2", "--out", str(tmp_path), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_compare_agrees_plots_and_shows_the_plain_path_off(tmp_path):
    proc = compare(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "AGREE: megatron+hook vs fsdp+hook" in proc.stdout
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["agree"] and len(report["steps"]) == 2
    assert report["max_rel_grad_diff"]["megatron+hook"] <= 1e-5
    assert report["max_rel_grad_diff"]["megatron-plain"] > 1e-2
    png = (tmp_path / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 600 and height > 200
    import matplotlib.image

    assert matplotlib.image.imread(str(tmp_path / "compare.png")).shape[:2] == (height, width)
    SUMMARY.append(f"compare: megatron+hook vs fsdp+hook {report['max_rel_grad_diff']['megatron+hook']:.1e}, "
                   f"megatron-plain vs fsdp+hook {report['max_rel_grad_diff']['megatron-plain']:.1e}")


def test_compare_fails_on_a_wrong_scaling(tmp_path):
    proc = compare(tmp_path, "--inject-bug", "local-denominator", "--no-plot")
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "DISAGREE" in proc.stdout


# --- Megatron's wrappers and features: the hooked Megatron path still matches the FSDP2 path ----------

def agrees(tmp_path, *extra):
    """Run compare with ``extra`` (2 steps, no plot); assert AGREE and return compare.json."""
    proc = compare(tmp_path, "--no-plot", *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "AGREE: megatron+hook vs fsdp+hook" in proc.stdout
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["agree"] and len(report["steps"]) == 2
    assert report["max_rel_grad_diff"]["megatron+hook"] <= report["tolerance"]
    # the plain path runs under the same set-up and is still off
    assert report["max_rel_grad_diff"]["megatron-plain"] > 1e-2
    return report


def test_compare_agrees_under_torch_fsdp2(tmp_path):
    report = agrees(tmp_path, "--wrapper", "torch-fsdp2")  # tp2 × FSDP2 over dp2
    assert report["megatron_setup"] == {"wrapper": "torch-fsdp2", "fsdp_strategy": None, "sequence_parallel": False,
                                        "distributed_optimizer": False}
    SUMMARY.append(f"compare --wrapper torch-fsdp2: megatron+hook vs fsdp+hook "
                   f"{report['max_rel_grad_diff']['megatron+hook']:.1e}")


def test_compare_agrees_under_megatron_fsdp(tmp_path):
    report = agrees(tmp_path, "--wrapper", "megatron-fsdp", "--tp", "1")  # dp4, default strategy optim_grads
    assert report["megatron_setup"] == {"wrapper": "megatron-fsdp", "fsdp_strategy": "optim_grads",
                                        "sequence_parallel": False, "distributed_optimizer": True}
    assert report["args"]["lr"] == 0.01  # the distributed optimizer steps with Adam
    SUMMARY.append(f"compare --wrapper megatron-fsdp: megatron+hook vs fsdp+hook "
                   f"{report['max_rel_grad_diff']['megatron+hook']:.1e}")


def test_compare_agrees_with_sequence_parallel_and_the_distributed_optimizer(tmp_path):
    report = agrees(tmp_path, "--tp", "2", "--sequence-parallel", "--distributed-optimizer")
    assert report["megatron_setup"] == {"wrapper": "ddp", "fsdp_strategy": None, "sequence_parallel": True,
                                        "distributed_optimizer": True}
    SUMMARY.append(f"compare --sequence-parallel --distributed-optimizer: megatron+hook vs fsdp+hook "
                   f"{report['max_rel_grad_diff']['megatron+hook']:.1e}")


def test_compare_fails_on_a_wrong_scaling_under_torch_fsdp2(tmp_path):
    proc = compare(tmp_path, "--nproc", "2", "--tp", "1", "--wrapper", "torch-fsdp2",
                   "--inject-bug", "local-denominator", "--no-plot")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DISAGREE" in proc.stdout
    assert json.loads((tmp_path / "compare.json").read_text())["max_rel_grad_diff"]["megatron+hook"] > 1e-2


def test_a_refusal_by_the_hook_is_one_line_and_exit_2(capsys, monkeypatch):
    from megatron_agg.megatron.averaging import LossReturn
    from megatron_agg.compare import _refused_by_megatron_agg

    monkeypatch.setenv("LOCAL_RANK", "0")
    try:
        LossReturn.parse("bogus")  # a ValueError raised by megatron_agg itself
    except ValueError as exc:
        with pytest.raises(SystemExit) as exit_info:
            _refused_by_megatron_agg(exc)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-agg compare: error: LossHook refused this set-up: Unknown loss_return 'bogus'")
    assert err.count("\n") == 1
    try:
        int("x")  # not megatron_agg's: left to the caller (it re-raises)
    except ValueError as exc:
        assert _refused_by_megatron_agg(exc) is None


# --- a bad command line: one line and exit 2, before any worker starts ---------------------------------

ERROR = "megatron-agg compare: error: "


def refused(tmp_path, *extra, env=None):
    """Run compare's command line in this process (the console script's ``main``) with a bad command
    line; assert one error line, exit 2, and no worker started. ``env`` replaces the environment."""
    import contextlib
    import io

    from megatron_agg import cli

    def no_workers(cmd, env):
        raise AssertionError(f"compare started workers for a bad command line: {cmd}")

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        mp.setattr(cli, "_run_workers", no_workers)
        for name in list(os.environ):
            mp.delenv(name)
        for name, value in (env if env is not None else dict(os.environ, MASTER_PORT=str(free_port()))).items():
            if name != "RANK":
                mp.setenv(name, value)
        try:
            code = cli.main(["compare", "--nproc", "4", "--steps", "2", "--out", str(tmp_path), *extra])
        except SystemExit as exc:  # argparse
            code = exc.code
    assert code == 2, err.getvalue()[-3000:]
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), err.getvalue()
    assert out.getvalue() == "" and not list(tmp_path.rglob("compare-workers.log"))
    return lines[0][len(ERROR):]


@pytest.mark.parametrize("args", [["--tp", "3"], ["--tol", "nan"]])
def test_the_console_script_refuses_a_bad_command_line_in_one_line_and_exit_2(tmp_path, args):
    """The real console script (a subprocess), quickly: the rest of this section calls its main()."""
    start = time.monotonic()
    proc = compare(tmp_path, *args)
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), proc.stderr
    assert lines[0][len(ERROR):] == refused(tmp_path, *args)
    # no worker ran: nothing on stdout (rank 0 prints the header), no workers' log, and quick
    assert proc.stdout == "" and not list(tmp_path.rglob("compare-workers.log"))
    assert seconds < 30, f"{seconds:.1f} s: a worker was started?"


@pytest.mark.parametrize("args,message", [
    (["--tp", "3"], "--nproc 4 is not divisible by tp·pp = 3·1 = 3; pass --tp and --pp whose product divides 4"),
    (["--nproc", "3", "--tp", "1"], "compare splits its ragged batch over 1, 2 or 4 ranks (FSDP uses all of them), "
                                    "got --nproc 3; use 1, 2 or 4 ranks"),
    (["--nproc", "0"], "--nproc must be a positive integer, got 0; pass e.g. --nproc 4"),
    (["--tp", "0"], "--tp must be a positive integer, got 0"),
    (["--pp", "-1"], "--pp must be a positive integer, got -1"),
    (["--vpp", "0"], "--vpp must be a positive integer"),
    (["--steps", "0"], "--steps must be at least 1, got 0; pass e.g. --steps 8"),
    (["--tol", "0"], "--tol must be a positive finite number"),
    (["--tol", "nan"], "--tol must be a positive finite number"),
    (["--lr", "inf"], "--lr must be a finite number, got inf; pass e.g. --lr 1.0"),
    (["--clip-grad", "nan"], "--clip-grad must be a positive finite number"),
    (["--clip-grad", "0"], "--clip-grad must be a positive finite number"),
    (["--vpp", "2"], "--vpp needs pipeline parallelism (--pp 2 or more), got --vpp 2 with --pp 1"),
    (["--tp", "1", "--pp", "2", "--vpp", "4"], "the test model's 4 layers must split evenly over pp·vpp model "
                                               "chunks, got --pp 2 --vpp 4 (8 chunks)"),
    (["--tp", "1", "--pp", "4", "--vpp", "1"], "micro-batch count to be a multiple of --pp"),
    (["--loss-scale-factor", "16"], "--loss-scale-factor only applies to --loss-agg-mode seq-mean-token-sum-norm, "
                                    "got it with --loss-agg-mode seq-mean-token-mean"),
    (["--loss-agg-mode", "seq-mean-token-sum-norm", "--loss-scale-factor", "0"],
     "--loss-scale-factor must be a positive finite number"),
    (["--seed", str(2 ** 64)], "--seed must keep seed·1000 + step within torch's seed range"),
    (["--tp", "1", "--pp", "2", "--wrapper", "torch-fsdp2"],
     "--wrapper torch-fsdp2 takes no pipeline parallelism (Megatron-LM asserts it), got --pp 2"),
    (["--tp", "1", "--pp", "2", "--wrapper", "megatron-fsdp"], "--wrapper megatron-fsdp takes no pipeline parallelism"),
    (["--fsdp-strategy", "optim"], "--fsdp-strategy is Megatron-FSDP's sharding strategy, got --fsdp-strategy optim "
                                   "with --wrapper ddp; add --wrapper megatron-fsdp or drop --fsdp-strategy"),
    (["--wrapper", "torch-fsdp2", "--fsdp-strategy", "no_shard"], "with --wrapper torch-fsdp2"),
    (["--tp", "1", "--sequence-parallel"], "--sequence-parallel splits the sequence over the tensor-parallel ranks "
                                           "and needs --tp 2 or more, got --tp 1"),
    (["--wrapper", "torch-fsdp2", "--distributed-optimizer"],
     "--wrapper torch-fsdp2 does not take Megatron's distributed optimizer"),
])
def test_compare_refuses_a_bad_command_line_up_front(tmp_path, args, message):
    assert message in refused(tmp_path, *args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
def test_compare_refuses_cuda_without_a_gpu(tmp_path):
    assert "--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False" in \
        refused(tmp_path, "--device", "cuda")


def test_compare_refuses_an_out_folder_it_cannot_write(tmp_path):
    (tmp_path / "a-file").write_text("")
    message = refused(tmp_path, "--out", str(tmp_path / "a-file" / "out"))
    assert message.startswith(f"--out must be a folder compare can create, got {tmp_path / 'a-file' / 'out'} (")
    assert message.endswith("pass a writable folder with --out")
    message = refused(tmp_path, "--out", str(tmp_path / "a-file"))
    assert "--out must be a folder for compare.json and compare.png" in message and "which is a file" in message
    for empty in ("", " "):  # not the current folder
        assert "--out must name a folder for compare.json and compare.png, got" in refused(tmp_path, "--out", empty)


def test_compare_creates_its_out_folder_up_front(tmp_path):
    out = tmp_path / "new" / "folder"
    refused(tmp_path, "--out", str(out), "--steps", "0")  # the folder is checked after the arguments
    assert not out.exists()
    # valid arguments but a busy port: the folder was created and test-written (and left empty) first
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = dict(os.environ, MASTER_PORT=str(busy.getsockname()[1]), PYTHONWARNINGS="ignore")
        refused(tmp_path, "--out", str(out), env=env)
    assert out.is_dir() and not list(out.iterdir())


def test_compare_refuses_a_busy_master_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, MASTER_PORT=str(port), PYTHONWARNINGS="ignore")
        message = refused(tmp_path, env=env)
    assert message == f"port {port} on 127.0.0.1 is in use; set MASTER_PORT to a free port or unset it"


@pytest.mark.parametrize("value,message", [
    ("", "MASTER_PORT is set but empty; set MASTER_PORT to a free port or unset it"),
    ("http", "MASTER_PORT must be a port number in 1..65535, got 'http'"),
    ("70000", "MASTER_PORT must be a port number in 1..65535, got '70000'"),
])
def test_compare_refuses_a_bad_master_port(tmp_path, value, message):
    assert message in refused(tmp_path, env=dict(os.environ, MASTER_PORT=value, PYTHONWARNINGS="ignore"))


def test_without_master_port_compare_picks_a_free_one():
    from megatron_agg.compare.checks import master_port

    port = master_port({})
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free
    assert port != 29561


def test_a_failing_worker_gives_one_line_and_a_log(tmp_path):
    # gloo cannot find the interface: every rank fails in init_process_group (after the rendezvous
    # on the automatically chosen port: MASTER_PORT is unset)
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env.update(GLOO_SOCKET_IFNAME="no-such-interface", PYTHONWARNINGS="ignore")
    proc = compare(tmp_path, "--nproc", "2", "--tp", "1", "--steps", "1", env=env)
    assert proc.returncode not in (0, 2), proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    log = tmp_path / "compare-workers.log"
    assert lines[0].startswith("megatron-agg compare: a worker failed (exit 1): RuntimeError: ")
    assert "no-such-interface" in lines[0] and lines[0].endswith(f"; the workers' whole stderr is in {log}")
    assert "Traceback" in log.read_text() and "no-such-interface" in log.read_text()


TORCHRUN_STDERR = """\
Traceback (most recent call last):
Traceback (most recent call last):
  File "/x/megatron_agg/compare.py", line 98, in run
  File "/x/megatron_agg/compare.py", line 98, in run
    build()
      build()
 ^^^^^^^^^^^^^^ValueError: rank 1 broke
ValueError: rank 0 broke
E1125 03:55:49.277000 3737 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 0
Traceback (most recent call last):
  File "/x/torch/distributed/run.py", line 1032, in <module>
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 3739)
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


@pytest.mark.parametrize("disagree", [False, True])
def test_worker_failures_are_summed_up_and_a_disagreement_is_not_one(tmp_path, monkeypatch, capsys, disagree):
    from megatron_agg import cli

    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setattr(cli, "_run_workers", lambda cmd, env: (1, TORCHRUN_STDERR, disagree))
    assert cli.main(["compare", "--nproc", "2", "--tp", "1", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (tmp_path / "compare-workers.log").read_text() == TORCHRUN_STDERR
    if disagree:  # the DISAGREE verdict on stdout says it all; torchrun's report stays in the log
        assert err == ""
    else:
        assert err == ("megatron-agg compare: a worker failed (exit 1): ValueError: rank 0 broke; "
                       f"the workers' whole stderr is in {tmp_path / 'compare-workers.log'}\n")
