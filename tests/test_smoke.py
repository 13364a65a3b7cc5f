"""The fast tier's multi-rank smoke: one torchrun launch of real Megatron on 4 CPU ranks.

TP2×DP2, interleaved PP2×VPP2×DP2 and CP2×DP2 (unpacked and packed per document), a token mean and
a sequence mean on every Megatron path (2-tuple, 3-tuple, per-token 3-tuple, average-in-collective,
deferred), each rank's gradients against the single-process reference, and the matrix's negative
controls (totals counted locally × dp, Megatron's plain per-micro-batch mean, ×cp left in, ...) that
must miss. The full proof of the same claims, every spec on every layout, is tests/test_matrix.py.
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO, SUMMARY, torchrun

pytestmark = [pytest.mark.fast, pytest.mark.smoke]  # the full tier skips it: its matrix runs these layouts

SPECS = "token-mean,seq-mean-token-mean"


def test_smoke_launch(tmp_path):
    out = tmp_path / "smoke.json"
    proc = torchrun(4, ["-m", "harness.matrix", "--suite", "smoke", "--out", str(out), "--packing", "both",
                        "--specs", SPECS, "--layer-spec", str(REPO / "tests" / "support" / "cp_attention.py") + ":layer_spec"],
                    timeout=900)
    tail = "\n".join(proc.stdout.splitlines()[-15:]) + "\n" + "\n".join(proc.stderr.splitlines()[-30:])
    assert out.exists(), f"the smoke launch did not finish (exit {proc.returncode}):\n{tail}"
    results = json.loads(out.read_text())["results"]
    failed = [r for r in results if not r["passed"]]
    assert not failed, "failed configurations:\n" + "\n".join(json.dumps(r) for r in failed[:20])
    assert proc.returncode == 0, tail
    exact = [r for r in results if not r["control"]]
    layouts = {r["layout"] + ("" if r["packing"] == "unpacked" else "+" + r["packing"]) for r in exact}
    assert {"dp2-tp2-pp1", "dp2-tp1-pp2-vpp2", "dp2-tp1-pp1-cp2", "dp2-tp1-pp1-cp2+packed"} <= layouts, layouts
    missed = {r["control"] for r in results if r["control"] and not r["expect_pass"]}
    assert {"hook-local-x-dp", "plain-mean-2-tuple", "plain-mean-3-tuple", "hook-2-tuple-cp-uncancelled"} <= missed, missed
    SUMMARY.append(f"smoke: {len(exact)} exact configurations on {sorted(layouts)}; controls that missed: {sorted(missed)}")
