"""The benchmark commands of docs/BENCHMARKS.md keep working (short runs)."""

import json
import subprocess
import sys

from conftest import REPO, torchrun


def test_bench_step_runs_and_counts_the_hooks_collectives(tmp_path):
    """One asynchronous all-reduce of the totals, plus the end-of-step check's two small ones
    (over DP×CP and over the model-parallel group: both of size 2 in TP2×DP2 and PP2×DP2)."""
    out = tmp_path / "step.json"
    proc = torchrun(4, [str(REPO / "benchmarks" / "bench_step.py"), "--steps", "2", "--warmup", "1", "--out", str(out)],
                    timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for layout in report["layouts"]:
        assert layout["paths"]["hooked"]["hook_collectives_per_step"] == 1 + 2
        assert layout["paths"]["plain-2-tuple"]["hook_collectives_per_step"] == 0
    assert "hooked-sync" in report["layouts"][1]["paths"]


def test_hook_cost_and_soak_run(tmp_path):
    cost = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_hook_cost.py"), "--repeats", "1",
                           "--out", str(cost)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(cost.read_text())["rows"]) == 12
    soak = tmp_path / "soak.json"
    proc = torchrun(2, [str(REPO / "benchmarks" / "soak.py"), "--steps", "20", "--window", "10", "--out", str(soak)],
                    timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(soak.read_text())["windows"]) == 2
