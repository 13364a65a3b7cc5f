"""The gradient-equivalence matrix under torchrun (gloo, CPU): the proof of the core claims.

Each world size runs :mod:`megatron_agg.testing.matrix` (suite ``core``) in one launch. A
configuration passes when every rank's gradients equal the single-process reference to 1e-5
relative, the hook's global loss and its ``[sum, count]`` reports equal the reference loss, the
per-micro-batch path made no host sync (the harness runs it under ``forbid_host_sync``) and the
hook issued exactly one collective (none where it computes no loss or has one DP rank).
Negative controls in the same launches must fail the comparison.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest

from megatron_agg import AggMode
from megatron_agg.testing.matrix import CONTROLS, LOSS_SPECS, SUITES, VARIANTS

from conftest import SUMMARY, torchrun

WORLD_SIZES = sorted(SUITES["core"])
_RESULTS: dict = {}


def _factors(layout: str) -> dict:
    f = dict(re.findall(r"([a-z]+)(\d+)", layout))
    return {"dp": int(f["dp"]), "tp": int(f["tp"]), "pp": int(f["pp"]), "vpp": int(f.get("vpp", 0)), "cp": int(f.get("cp", 1))}


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_matrix(world, tmp_path):
    out = tmp_path / f"matrix-{world}.json"
    proc = torchrun(world, ["-m", "megatron_agg.testing.matrix", "--suite", "core", "--out", str(out)])
    tail = "\n".join(proc.stdout.splitlines()[-15:]) + "\n" + "\n".join(proc.stderr.splitlines()[-30:])
    assert out.exists(), f"the matrix did not finish (exit {proc.returncode}):\n{tail}"
    results = json.loads(out.read_text())["results"]
    _RESULTS[world] = results
    failed = [r for r in results if not r["passed"]]
    assert not failed, "failed configurations:\n" + "\n".join(json.dumps(r) for r in failed[:20])
    assert proc.returncode == 0, tail
    n_controls = sum(1 for r in results if r["control"])
    SUMMARY.append(
        f"world {world}: {len(results) - n_controls} exact configurations and {n_controls} negative/positive "
        f"controls on layouts {sorted({r['layout'] for r in results})}; max grad error "
        f"{max(r['grad_err'] for r in results if r['expect_pass']):.1e}"
    )
    # each control behaved as expected on every layout: the comparison can fail
    for control in CONTROLS:
        rows = [r for r in results if r["control"] == control.name]
        assert len(rows) == len(SUITES["core"][world])
        for r in rows:
            if not r["expect_pass"]:
                assert r["grad_err"] > 1e-3, r


def test_every_factor_appears_with_every_mode():
    if set(_RESULTS) != set(WORLD_SIZES):
        pytest.skip("needs every test_matrix run of this session")
    seen = defaultdict(set)
    total = 0
    for results in _RESULTS.values():
        for r in results:
            if r["control"]:
                continue
            total += 1
            for key, value in _factors(r["layout"]).items():
                seen[(r["spec"], key)].add(value)
            seen[(r["spec"], "variant")].add(r["variant"])
    required = {"dp": {1, 2, 4}, "tp": {1, 2}, "pp": {1, 2}, "vpp": {0, 2}, "variant": {v.name for v in VARIANTS}}
    specs = {s.name for s in LOSS_SPECS}
    for mode in AggMode:  # every mode, with and without exclude_fully_masked_seqs
        assert mode.value in specs and mode.value + "+excl" in specs
    for spec in specs:
        for key, values in required.items():
            assert values <= seen[(spec, key)], (spec, key, seen[(spec, key)])
    SUMMARY.append(f"matrix total: {total} exact configurations over {len(specs)} loss specs × "
                   f"{len(VARIANTS)} Megatron paths; every factor appears with every mode")
