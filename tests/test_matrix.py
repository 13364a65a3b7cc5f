"""The gradient-equivalence matrix under torchrun (gloo, CPU): the proof of the core claims.

Each world size of each suite runs :mod:`harness.matrix` in one launch (shared by the items of
that world): ``core`` (DP × TP × PP × VPP on 1, 2 and 4 ranks) and ``cp`` (context parallelism ×
DP × TP, with one PP layout, each unpacked (TP × CP: packed only) and with packed sequences, the packed rows cut over CP
per document and, where cp > 1, as a whole: ``cp_layout="per-row"``, Megatron-LM's
inter-document masking; 2 and 4 ranks), with the test attention of ``tests/support``. Specs and
Megatron paths are covered pairwise on each layout (the argument is in
:mod:`harness.matrix`, "Pairwise coverage"): every path with a token mean and a sequence mean,
every spec with a rotating path, the full product on the layouts of ``FULL_PRODUCT``.

pytest sees one item per suite × world × layout × packing (``-k "cp-world4-dp2-tp1-pp1-cp2"``
runs one launch with that layout only) and names the failing spec, path and control. A
configuration passes when every rank's gradients equal the single-process reference to 1e-5
relative, the hook's global loss and its ``[sum, count]`` reports equal the reference loss, the
per-micro-batch path made no host sync (``forbid_host_sync``) and the hook issued exactly one
collective (none where it computes no loss or has one DP rank). Negative controls on every layout
must fail the comparison where they are expected to (totals counted locally × dp, Megatron's plain
per-micro-batch mean, ×cp left in, groups counted per rank, a term's denominator from the default
mask, metrics as a mean of local means, ...).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Dict, List, Tuple

import pytest

from megatron_agg import AggMode
from harness.matrix import (CONTROLS, CP_CONTROLS, LOSS_SPECS, SUITES, VARIANTS, packings_of, runs_in_suite)

from conftest import REPO, SUMMARY, torchrun

SUITE_NAMES = ("core", "cp")
CP_SPEC = ["--layer-spec", str(REPO / "tests" / "support" / "cp_attention.py") + ":layer_spec"]
PACKINGS = {"core": ("unpacked",), "cp": ("unpacked", "packed", "packed-per-row")}
PACKING_ARG = {"core": "off", "cp": "all"}
CONTROLS_OF = {"core": CONTROLS, "cp": CONTROLS + CP_CONTROLS}
ITEMS = [(suite, world, layout.name(world), packing)
         for suite in SUITE_NAMES for world in sorted(SUITES[suite]) for layout in SUITES[suite][world]
         for packing in packings_of(layout, PACKINGS[suite])]
#: (suite, world) -> the results of its launch (rows of every layout it ran).
_LAUNCHES: Dict[Tuple[str, int], List[dict]] = {}


def _factors(layout: str) -> dict:
    f = dict(re.findall(r"([a-z]+)(\d+)", layout))
    return {"dp": int(f["dp"]), "tp": int(f["tp"]), "pp": int(f["pp"]), "vpp": int(f.get("vpp", 0)), "cp": int(f.get("cp", 1))}


def _launch(request, suite: str, world: int, tmp_path_factory) -> List[dict]:
    """Run (once per session) the launch of ``suite`` on ``world`` ranks with the layouts whose items
    this session selected."""
    key = (suite, world)
    if key not in _LAUNCHES:
        selected = sorted({item.callspec.params["layout"] for item in request.session.items
                           if getattr(item, "callspec", None) is not None
                           and item.callspec.params.get("suite") == suite and item.callspec.params.get("world") == world})
        out = tmp_path_factory.mktemp("matrix") / f"matrix-{suite}-{world}.json"
        proc = torchrun(world, ["-m", "harness.matrix", "--suite", suite, "--out", str(out),
                                "--packing", PACKING_ARG[suite], "--layouts", ",".join(selected),
                                *(CP_SPEC if suite == "cp" else [])])
        tail = "\n".join(proc.stdout.splitlines()[-15:]) + "\n" + "\n".join(proc.stderr.splitlines()[-30:])
        assert out.exists(), f"the {suite} launch on {world} ranks did not finish (exit {proc.returncode}):\n{tail}"
        results = json.loads(out.read_text())["results"]
        _LAUNCHES[key] = results
        n_controls = sum(1 for r in results if r["control"])
        SUMMARY.append(
            f"{suite} world {world}: {len(results) - n_controls} exact configurations and {n_controls} controls on "
            f"{selected}; max grad error {max(r['grad_err'] for r in results if r['expect_pass']):.1e}")
        assert proc.returncode == 0 or any(not r["passed"] for r in results), tail
    return _LAUNCHES[key]


@pytest.mark.parametrize("suite,world,layout,packing", ITEMS, ids=[f"{s}-world{w}-{l}-{p}" for s, w, l, p in ITEMS])
def test_matrix(request, tmp_path_factory, suite, world, layout, packing):
    rows = [r for r in _launch(request, suite, world, tmp_path_factory)
            if r["layout"] == layout and r["packing"] == packing]
    assert rows, f"the launch ran nothing on {layout} ({packing})"
    failed = [f"{r['variant']} / {r['spec']}" + (f" / control {r['control']}" if r["control"] else "")
              + f": grad_err={r['grad_err']:.2e} loss_err={r['loss_err']:.1e} report_err={r['report_err']:.1e} "
              f"metric_err={r.get('metric_err', 0.0):.1e} collectives_ok={r['collectives_ok']} "
              f"expected {'exact' if r['expect_pass'] else 'a miss'}"
              for r in rows if not r["passed"]]
    assert not failed, f"{len(failed)} of {len(rows)} configurations failed on {layout} ({packing}):\n" + "\n".join(failed[:30])
    # every control of the suite ran here, and where it must miss it missed clearly
    for control in CONTROLS_OF[suite]:
        mine = [r for r in rows if r["control"] == control.name]
        assert len(mine) == (1 if packing in control.packings else 0), (control.name, len(mine))
        for r in mine:
            if not r["expect_pass"]:
                assert max(r["grad_err"], r.get("metric_err", 0.0)) > 1e-3, r
    f = _factors(layout)
    missed = {r["control"] for r in rows if r["control"] and not r["expect_pass"]}
    # every control that must miss on this layout did (groups straddle ranks where dp > 1, the CP
    # controls where cp > 1, the issue-13 and plain-Megatron ones everywhere): the comparison can fail
    must_miss = {c.name for c in CONTROLS_OF[suite] if packing in c.packings and not c.expect_pass(f["dp"], f["cp"])}
    assert must_miss and must_miss <= missed, (must_miss, missed)
    assert "plain-token-sum-2-tuple" in must_miss or packing == "packed-per-row"


def _coverage(suite: str) -> tuple:
    runs = [(suite, w) for w in sorted(SUITES[suite])]
    if not all(k in _LAUNCHES for k in runs) or any(
            {l.name(w) for l in SUITES[suite][w]} - {r["layout"] for r in _LAUNCHES[(suite, w)]} for _, w in runs):
        pytest.skip(f"needs every {suite} layout of test_matrix in this session")
    seen = defaultdict(set)
    total = 0
    for key in runs:
        for r in _LAUNCHES[key]:
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
    _assert_covered(seen, specs, {"cp": {1, 2}, "dp": {1, 2}, "tp": {1, 2}, "pp": {1, 2},
                                  "packing": {"unpacked", "packed", "packed-per-row"},
                                  "variant": {v.name for v in VARIANTS}}, "cp")
    SUMMARY.append(f"cp total: {total} exact configurations over {len(specs)} loss specs × "
                   f"{len(VARIANTS)} Megatron paths; CP×DP×TP×packing (per document and per row) factors all appear with every mode")
