"""The gradient-equivalence matrix under torchrun (gloo, CPU): the proof of the core claims.

Each world size of each suite runs :mod:`harness.matrix` in one launch: ``core``
(DP × TP × PP × VPP) and ``cp`` (context parallelism × DP × TP, with one PP layout, each
unpacked and with packed sequences, the packed rows cut over CP per document and, where cp > 1, as
a whole (``cp_layout="per-row"``, Megatron-LM's inter-document masking; world sizes 2 and 4), with
the test attention of ``tests/support``). A
configuration passes when every rank's gradients equal the single-process reference to 1e-5
relative, the hook's global loss and its ``[sum, count]`` reports equal the reference loss, the
per-micro-batch path made no host sync (the harness runs it under ``forbid_host_sync``) and the
hook issued exactly one collective (none where it computes no loss or has one DP rank).
Negative controls in the same launches must fail the comparison. The specs of issue 13
(``token-sum``, ``prompt-mean`` with global and per-rank group ids, a term over a mask of its own,
exact metrics) run with every Megatron path on every core layout and with three paths in the cp
suite (:data:`harness.matrix.EXTENDED_IN`); their controls (groups counted per rank,
a term's denominator counted from the default mask, metrics as a mean of local means) fail.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest

from megatron_agg import AggMode
from harness.matrix import (CONTROLS, CP_CONTROLS, LOSS_SPECS, SUITES, VARIANTS, packings_of,
                                        runs_in_suite)

from conftest import REPO, SUMMARY, torchrun

RUNS = [(suite, world) for suite in ("core", "cp") for world in sorted(SUITES[suite])]
CP_SPEC = ["--layer-spec", str(REPO / "tests" / "support" / "cp_attention.py") + ":layer_spec"]
#: The packings each launch runs (world 8, the slowest launch, leaves the per-row cut to 2 and 4).
PACKINGS = {("core", w): ("unpacked",) for w in SUITES["core"]}
PACKINGS.update({("cp", w): ("unpacked", "packed", "packed-per-row") if w <= 4 else ("unpacked", "packed")
                 for w in SUITES["cp"]})
PACKING_ARG = {("unpacked",): "off", ("unpacked", "packed"): "both", ("unpacked", "packed", "packed-per-row"): "all"}
CONTROLS_OF = {"core": CONTROLS, "cp": CONTROLS + CP_CONTROLS}
_RESULTS: dict = {}


def _factors(layout: str) -> dict:
    f = dict(re.findall(r"([a-z]+)(\d+)", layout))
    return {"dp": int(f["dp"]), "tp": int(f["tp"]), "pp": int(f["pp"]), "vpp": int(f.get("vpp", 0)), "cp": int(f.get("cp", 1))}


@pytest.mark.parametrize("suite,world", RUNS, ids=[f"{s}-world{w}" for s, w in RUNS])
def test_matrix(suite, world, tmp_path):
    out = tmp_path / f"matrix-{suite}-{world}.json"
    packings = PACKINGS[(suite, world)]
    proc = torchrun(world, ["-m", "harness.matrix", "--suite", suite, "--out", str(out),
                            "--packing", PACKING_ARG[packings], *(CP_SPEC if suite == "cp" else [])])
    tail = "\n".join(proc.stdout.splitlines()[-15:]) + "\n" + "\n".join(proc.stderr.splitlines()[-30:])
    assert out.exists(), f"the matrix did not finish (exit {proc.returncode}):\n{tail}"
    results = json.loads(out.read_text())["results"]
    _RESULTS[(suite, world)] = results
    failed = [r for r in results if not r["passed"]]
    assert not failed, "failed configurations:\n" + "\n".join(json.dumps(r) for r in failed[:20])
    assert proc.returncode == 0, tail
    n_controls = sum(1 for r in results if r["control"])
    layouts = sorted({r["layout"] + ("" if r["packing"] == "unpacked" else "+" + r["packing"]) for r in results})
    SUMMARY.append(
        f"{suite} world {world}: {len(results) - n_controls} exact configurations and {n_controls} "
        f"negative/positive controls on {layouts}; max grad error "
        f"{max(r['grad_err'] for r in results if r['expect_pass']):.1e}"
    )
    misses = defaultdict(list)
    for r in results:
        if r["control"] and not r["expect_pass"]:
            misses[r["control"]].append(max(r["grad_err"], r.get("metric_err", 0.0)))
    SUMMARY.append(f"{suite} world {world} controls (smallest miss): "
                   + ", ".join(f"{name} {min(v):.1e}" for name, v in sorted(misses.items())))
    # each control ran on every layout and behaved as expected: the comparison can fail
    for control in CONTROLS_OF[suite]:
        rows = [r for r in results if r["control"] == control.name]
        expected = sum(1 for layout in SUITES[suite][world] for p in packings_of(layout, packings) if p in control.packings)
        assert len(rows) == expected, (control.name, len(rows), expected)
        for r in rows:
            if not r["expect_pass"]:
                assert max(r["grad_err"], r.get("metric_err", 0.0)) > 1e-3, r
    # the issue-13 controls really failed where they must (groups straddle ranks where dp > 1)
    failing = {r["control"] for r in results if r["control"] and not r["expect_pass"]}
    assert {"hook-term-mask-counted-from-the-default-mask", "metrics-mean-of-local-means",
            "plain-token-sum-2-tuple"} <= failing
    if any(_factors(r["layout"])["dp"] > 1 for r in results):
        assert "hook-prompt-groups-counted-per-rank" in failing
    if suite == "cp":  # the CP controls really did fail where CP > 1
        failing = {r["control"] for r in results if r["control"] and not r["expect_pass"] and _factors(r["layout"])["cp"] > 1}
        assert {c.name for c in CP_CONTROLS if set(c.packings) & set(packings)} <= failing


def _coverage(suite: str) -> tuple:
    runs = [k for k in RUNS if k[0] == suite]
    if not all(k in _RESULTS for k in runs):
        pytest.skip(f"needs every {suite} test_matrix run of this session")
    seen = defaultdict(set)
    total = 0
    for key in runs:
        for r in _RESULTS[key]:
            if r["control"]:
                continue
            total += 1
            for factor, value in _factors(r["layout"]).items():
                seen[(r["spec"], factor)].add(value)
            seen[(r["spec"], "variant")].add(r["variant"])
            seen[(r["spec"], "packing")].add(r["packing"])
    specs = {s.name for s in LOSS_SPECS}
    for mode in AggMode:  # every mode, with and without exclude_fully_masked_seqs (token-sum has none)
        assert mode.value in specs and (mode is AggMode.TOKEN_SUM or mode.value + "+excl" in specs)
    return seen, specs, total


def _assert_covered(seen, specs, required, suite):
    by_name = {s.name: s for s in LOSS_SPECS}
    for spec in specs:
        for key, values in required.items():
            if key == "variant":  # the deferred mode runs the single-denominator specs only
                values = {v.name for v in VARIANTS if runs_in_suite(suite, v, by_name[spec])}
            assert values <= seen[(spec, key)], (spec, key, seen[(spec, key)])


def test_every_core_factor_appears_with_every_mode():
    seen, specs, total = _coverage("core")
    _assert_covered(seen, specs, {"dp": {1, 2, 4}, "tp": {1, 2}, "pp": {1, 2}, "vpp": {0, 2},
                                  "variant": {v.name for v in VARIANTS}}, "core")
    SUMMARY.append(f"core total: {total} exact configurations over {len(specs)} loss specs × "
                   f"{len(VARIANTS)} Megatron paths; DP×TP×PP×VPP factors all appear with every mode")


def test_every_cp_factor_appears_with_every_mode():
    seen, specs, total = _coverage("cp")
    _assert_covered(seen, specs, {"cp": {1, 2}, "dp": {1, 2}, "tp": {1, 2}, "pp": {1, 2}, "packing": {"unpacked", "packed", "packed-per-row"},
                                  "variant": {v.name for v in VARIANTS}}, "cp")
    SUMMARY.append(f"cp total: {total} exact configurations over {len(specs)} loss specs × "
                   f"{len(VARIANTS)} Megatron paths; CP×DP×TP×packing (per document and per row) factors all appear with every mode")
