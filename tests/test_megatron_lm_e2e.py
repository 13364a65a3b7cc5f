"""Megatron-LM's real training script (the 0.19 line and main, patched) end to end on 4 CPU ranks.

The end-to-end tests run ``scripts/run_megatron_lm_e2e.sh`` with the version matrix's cached venv
of megatron-core 0.19.2 (the wheel ships ``megatron/training``) and of 0.20.0 (Megatron-LM main,
built from its pinned source) when those exist, and check its ``summary.json``. The other tests
check the launcher's pieces in this environment.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_agg.layout import cp_local_positions, thd_cp_local_positions
from harness import megatron_lm as mlm

from conftest import REPO, SUMMARY

CACHE = Path(os.environ.get("MEGATRON_AGG_CACHE", Path.home() / ".cache" / "megatron_agg"))
STAMPS = {"0.19.2": "megatron-core==0.19.2", "0.20.0": "megatron-lm-main-d98e8a64.tar.gz"}


def _venv_ready(version: str) -> bool:
    venv = CACHE / "venvs" / f"mc-{version}"
    stamp = venv / ".megatron_agg_stamp"
    return (venv / "bin" / "python").exists() and stamp.exists() and STAMPS[version] in stamp.read_text()


def test_cpu_te_split_and_attention_layouts_agree_with_megatron_agg():
    """The launcher's literal per-document split (its stand-in for TE's
    thd_get_partitioned_indices) and per-row split agree with megatron_agg.layout, which the
    hook uses: two independent writings of Megatron's layouts."""
    rng = random.Random(0)
    for cp in (1, 2, 4):
        for _ in range(20):
            lengths = [2 * cp * rng.randint(1, 4) for _ in range(rng.randint(1, 5))]
            cu = [0]
            for n in lengths:
                cu.append(cu[-1] + n)
            for rank in range(cp):
                mine = mlm.per_document_positions(cu, cp, rank)
                theirs = thd_cp_local_positions(torch.tensor(cu), cu[-1], cp, rank).tolist()
                assert mine == theirs
                assert mlm.per_row_positions(cu[-1], cp, rank) == cp_local_positions(cu[-1], cp, rank).tolist()
            assert sorted(p for r in range(cp) for p in mlm.per_document_positions(cu, cp, r)) == list(range(cu[-1]))
    with pytest.raises(ValueError, match="multiple of 2·cp"):
        mlm.per_document_positions([0, 6], 2, 0)


def test_sources_are_the_per_release_paths(tmp_path):
    sources = mlm.resolve_sources()
    assert sources.patch == REPO / "patches" / "megatron-lm" / mlm.RELEASE / "pretrain_gpt.patch"
    assert sources.upstream == REPO / "patches" / "upstream" / "releases" / f"Megatron-LM-{mlm.RELEASE}"
    with pytest.raises(FileNotFoundError, match="missing"):
        mlm.resolve_sources(tmp_path / "empty")


@pytest.mark.skipif(shutil.which("git") is None, reason="git apply needs git")
def test_the_repository_patch_applies_to_the_pinned_release(tmp_path):
    sources = mlm.resolve_sources()
    script = mlm.prepare_script(sources, tmp_path)
    text = script.read_text()
    assert "[megatron_agg]" in text and "--loss-agg-mode" in text
    assert all((tmp_path / name).exists() for name in mlm.UPSTREAM_FILES)


def test_the_runs_cover_every_mode_under_both_cp_layouts():
    runs = mlm.plan_runs(list(mlm.CONFIGS), list(mlm.MODES))
    covered = {(r.config.data, r.mode) for r in runs if not r.control}
    for mode in mlm.MODES:
        for data in ("mock", "sft", "inter-doc"):
            assert (data, mode) in covered
    assert {r.breaker for r in runs if r.control} == set(mlm.CONTROLS)
    for run in runs:
        argv = mlm.megatron_argv(run, 4)
        dp = 4 // (run.config.tp * run.config.pp * run.config.cp)
        gbs, mbs = int(argv[argv.index("--global-batch-size") + 1]), int(argv[argv.index("--micro-batch-size") + 1])
        assert gbs // (mbs * dp) >= 2  # at least two micro-batches per data-parallel rank
        assert ("--loss-agg-mode" in argv) == (run.mode is not None)
        assert ("--calculate-per-token-loss" in argv) == (run.mode is not None)


#: The release lines run end to end: the 0.19.x wheel and Megatron-LM main (megatron-core 0.20.0
#: from its source), each with every mode, pairwise (``--pairwise``: every configuration with a
#: token mean and a sequence mean, the other three modes on one configuration each, rotating), both
#: controls included. Pairs suffice: the patched loss_func equals megatron_agg's for every mode
#: (tests/test_patches.py), so a mode meets a configuration only through its denominator kind.
E2E = {"0.19.2": tuple(mlm.MODES), "0.20.0": tuple(mlm.MODES)}


def test_a_pairwise_plan_covers_every_mode_and_configuration():
    runs = [r for r in mlm.plan_runs(list(mlm.CONFIGS), list(mlm.MODES), pairwise=True) if not r.control]
    assert {r.mode for r in runs} == set(mlm.MODES)
    for config in mlm.CONFIGS:
        assert {r.mode for r in runs if r.config.name == config} >= set(mlm.PAIRWISE_MODES)
    assert len(runs) == len(mlm.CONFIGS) * len(mlm.PAIRWISE_MODES) + len(mlm.MODES) - len(mlm.PAIRWISE_MODES)


@pytest.mark.e2e
@pytest.mark.parametrize("version", list(E2E))
def test_megatron_lm_pretrain_gpt_end_to_end(tmp_path, version):
    """Skipped without the release's venv, but for CI (.ci/run sets MEGATRON_AGG_REQUIRE_E2E=1 after
    building them): there the script builds the venv itself if it is missing."""
    if not _venv_ready(version) and not os.environ.get("MEGATRON_AGG_REQUIRE_E2E"):
        pytest.skip(f"no megatron-core {version} venv under {CACHE / 'venvs'} (created by "
                    "scripts/run_version_matrix.sh --prepare; needs the registry once)")
    modes = E2E[version]
    env = dict(os.environ, MEGATRON_AGG_OUT=str(tmp_path), MEGATRON_AGG_CACHE=str(CACHE),
               MEGATRON_AGG_E2E_VERSION=version)
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "run_megatron_lm_e2e.sh"), "--modes", ",".join(modes),
                           "--pairwise"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    log = (tmp_path / "e2e.log").read_text() if (tmp_path / "e2e.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + log[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    results = summary["results"]
    exact = {(r["config"], r["mode"]) for r in results if not r["control"] and r["exact"]}
    assert exact == {(r.config.name, r.mode) for r in mlm.plan_runs(list(mlm.CONFIGS), list(modes), pairwise=True)
                     if not r.control}
    for r in results:
        if not r["control"]:
            assert r["grad_err"] <= mlm.TOLERANCE and r["loss_err"] <= mlm.TOLERANCE
            # the data tells the modes apart: every other mode's definition is missed
            assert min(r["other_modes"].values()) >= mlm.CONTROL_MARGIN
    controls = {r["breaker"]: r for r in results if r["control"]}
    assert set(controls) == set(mlm.CONTROLS) and all(r["passed"] for r in controls.values())
    own = controls["megatron-own"]
    assert own["grad_err"] >= mlm.CONTROL_MARGIN and own["explained_by_mean_of_means"] <= mlm.TOLERANCE
    # one line per configuration and per control: "megatron-lm e2e <name> [...]: PASS ..."
    lines = [line for line in proc.stdout.splitlines()
             if line.startswith("megatron-lm e2e ") and not line.startswith("megatron-lm e2e:")]
    assert len(lines) == len(mlm.CONFIGS) + len(mlm.CONTROLS), proc.stdout
    SUMMARY.append(f"megatron-lm e2e (megatron-core {version}, real pretrain_gpt.py): {len(results)} runs, "
                   f"{len(exact)} exact, max grad err {max(r['grad_err'] for r in results if not r['control']):.1e}; "
                   + "; ".join(line.split(": ", 1)[0].replace("megatron-lm e2e ", "") + " "
                               + ("PASS" if ": PASS" in line else "FAIL") for line in lines))
