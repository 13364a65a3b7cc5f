"""Megatron-Bridge: ``megatron_agg.bridge.BridgeForwardStep`` inside Bridge's real training loop.

The end-to-end test runs ``scripts/run_bridge_e2e.sh`` (Bridge 0.6.2's ``pretrain`` on 4 CPU ranks,
TP2×DP2, PP2×DP2, CP2×DP2 with packed sequences, every mode of the deferred hook, and the control:
Bridge's own ``masked_next_token_loss``, which must miss; the adapter without ``configure(cfg)``, which
every rank must refuse before any gradient) when the Bridge venv exists
(``${MEGATRON_AGG_CACHE:-~/.cache/megatron_agg}/venvs/bridge-0.6.2``; ``scripts/run_bridge_e2e.sh
--prepare`` builds it), else it is skipped — or fails, with ``MEGATRON_AGG_REQUIRE_BRIDGE=1``. What the
runner stands in for, and why (none of it on the loss path), is in ``tests/support/bridge_run.py``'s
docstring: a stand-in ``transformer_engine.pytorch`` only while ``megatron.bridge.peft.lora_layers`` is
imported; empty ``nvidia_resiliency_ext.inprocess``, ``datasets``, ``megatron.energon``; TE's
``thd_get_partitioned_indices`` written out from its documented layout; the CPU shim.

The other tests check the adapter's refusals in this environment, without Bridge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_agg.bridge import BridgeForwardStep

from conftest import REPO, SUMMARY

CACHE = Path(os.environ.get("MEGATRON_AGG_CACHE", Path.home() / ".cache" / "megatron_agg"))
VENV = CACHE / "venvs" / "bridge-0.6.2"
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
LAYOUTS = ("tp2-dp2", "pp2-dp2", "cp2-dp2")


def _venv_ready() -> bool:
    stamp = VENV / ".megatron_agg_stamp"
    return (VENV / "bin" / "python").exists() and stamp.exists() and "megatron-bridge==0.6.2" in stamp.read_text()


def test_configure_sets_calculate_per_token_loss_on_the_provider_or_its_transformer():
    provider = SimpleNamespace(calculate_per_token_loss=False)
    cfg = SimpleNamespace(model=provider)
    assert BridgeForwardStep("token-mean").configure(cfg) is cfg and provider.calculate_per_token_loss
    transformer = SimpleNamespace(calculate_per_token_loss=False)
    BridgeForwardStep("seq-mean-token-mean").configure(SimpleNamespace(model=SimpleNamespace(transformer=transformer)))
    assert transformer.calculate_per_token_loss
    with pytest.raises(ValueError, match="GPT provider"):
        BridgeForwardStep("token-mean").configure(SimpleNamespace(model=SimpleNamespace()))


def test_refusals_before_any_gradient():
    with pytest.raises(ValueError, match="cp_layout"):
        BridgeForwardStep("token-mean", cp_layout="per-row")
    with pytest.raises(ValueError, match="prompt-mean"):
        BridgeForwardStep("prompt-mean")
    with pytest.raises(ValueError, match="return_schedule_plan"):
        BridgeForwardStep("token-mean")(None, iter([]), None, return_schedule_plan=True)
    # Bridge's GPT default, calculate_per_token_loss=False (configure() not called): refused before the batch is read
    with pytest.raises(ValueError, match=r"configure\(cfg\)"):
        BridgeForwardStep("token-mean")(None, iter([]), SimpleNamespace(calculate_per_token_loss=False))


def test_without_bridge_the_error_names_the_package():
    try:
        import megatron.bridge  # noqa: F401
    except ImportError:
        from megatron_agg.bridge import _bridge

        with pytest.raises(ImportError, match="megatron-bridge"):
            _bridge()
    else:
        pytest.skip("Megatron-Bridge is importable here")


def test_a_distillation_model_is_refused():
    class DistillationModel:  # ModelOpt's class name; the adapter checks the name (no ModelOpt import)
        pass

    with pytest.raises(ValueError, match="distillation"):
        BridgeForwardStep._refuse_distillation(SimpleNamespace(module=DistillationModel()))


@pytest.mark.e2e
@pytest.mark.skipif(not _venv_ready() and not os.environ.get("MEGATRON_AGG_REQUIRE_BRIDGE"),
                    reason=f"no Megatron-Bridge 0.6.2 venv at {VENV} (bash scripts/run_bridge_e2e.sh --prepare "
                           "builds it; needs network once)")
def test_bridge_pretrain_end_to_end(tmp_path):
    """Skipped without the Bridge venv, unless MEGATRON_AGG_REQUIRE_BRIDGE=1 (then the script builds it)."""
    env = dict(os.environ, MEGATRON_AGG_OUT=str(tmp_path), MEGATRON_AGG_CACHE=str(CACHE))
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "run_bridge_e2e.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=2400)
    log = (tmp_path / "e2e.log").read_text() if (tmp_path / "e2e.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + log[-4000:]
    results = json.loads((tmp_path / "summary.json").read_text())["results"]
    exact = {(r["run"], r["mode"]) for r in results if r["kind"] == "exact" and r["passed"]}
    assert exact == {(layout, mode) for layout in LAYOUTS for mode in MODES}
    for r in results:
        if r["kind"] == "exact":
            assert r["grad_err"] <= 1e-5 and r["loss_err"] <= 1e-5 and min(r["other_modes"].values()) >= 1e-3  # the data tells modes apart
            # every step after the first follows Bridge's evaluate() (forward only, no_grad) through its hook,
            # whose validation loss is the definition's over the evaluated micro-batches
            assert r["step"] == 0 or (r["evaluated_before"] > 0 and r["eval_err"] <= 1e-5 and r["eval_apart"] >= 1e-3), r
    controls = [r for r in results if r["kind"] == "control"]
    assert len(controls) == 1 and controls[0]["grad_err"] >= 1e-3 and controls[0]["explained"] <= 1e-5
    assert controls[0]["loss_err"] <= 1e-5  # Bridge logs the exact token mean while its gradient is not
    refusals = [r for r in results if r["kind"] == "refusal"]  # configure() not called: every rank, no gradient
    assert len(refusals) == 1 and refusals[0]["refused_ranks"] == 4 and refusals[0]["finalize_calls"] == 0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("bridge e2e ")]
    SUMMARY.append(f"Megatron-Bridge 0.6.2 e2e (real pretrain): {len(exact)} layout×mode exact, max grad err "
                   f"{max(r['grad_err'] for r in results if r['kind'] == 'exact'):.1e}, control misses by "
                   f"{controls[0]['grad_err']:.1e}; " + "; ".join(line.split(" — ")[0] for line in lines))
