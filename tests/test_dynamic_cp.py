"""Dynamic (hybrid) context parallelism: ``DeferredLossHook`` with ``token-mean``/``token-sum`` through
Megatron's own hybrid-CP data routing, scheduler, schedule and finalize on 4 CPU ranks
(``tests/support/dynamic_cp_run.py``: what runs and what the test stands in for)."""

import json

from conftest import REPO, SUMMARY, torchrun


def test_token_means_are_exact_under_megatrons_hybrid_context_parallel_schedule(tmp_path):
    out = tmp_path / "dynamic_cp.json"
    proc = torchrun(4, [str(REPO / "tests" / "support" / "dynamic_cp_run.py"), "--json", str(out)], timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("dynamic cp:")]
    assert proc.returncode == 0 and out.exists(), "\n".join(lines) + proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == [], report
    cases = {r["case"]: r for r in report["results"]}
    exact = [r for r in report["results"] if not r["control"] and "max_grad_rel_err" in r]
    controls = [r for r in report["results"] if r["control"]]
    assert len(exact) == 3 and all(r["max_grad_rel_err"] < 1e-5 for r in exact), exact
    assert len(controls) == 2 and all(r["max_grad_rel_err"] > 1e-2 for r in controls), controls
    assert cases["seq-mean-token-mean refused at install"]["ranks_refusing"] == 4
    # Megatron's scheduler ran sub-samples on partner groups of 1, 2 and 4 ranks
    assert all(r["partner_sizes_rank0"] == [1, 2, 4] for r in exact), exact
    SUMMARY.append("dynamic cp: token-mean, token-sum and two token-mean terms exact through Megatron's hybrid-CP "
                   f"schedule (max grad err {max(r['max_grad_rel_err'] for r in exact):.1e}, partner groups of 1, 2 "
                   "and 4 ranks); 2 controls miss; seq-mean refused on every rank")
