"""The README's main job: the example training run, hooked versus the exact reference."""

import re

from conftest import torchrun


def test_example_tp2_dp2_is_exact_and_clips_the_true_gradient():
    proc = torchrun(4, ["examples/train_tiny_gpt.py", "--tp", "2", "--steps", "3"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.e+-]+)", proc.stdout, re.M)
    assert len(rows) == 3, proc.stdout
    for _, hooked, ref, norm, ref_norm, err in rows:
        assert abs(float(hooked) - float(ref)) <= 1e-5 * float(ref)
        assert abs(float(norm) - float(ref_norm)) <= 1e-5 * float(ref_norm)
        assert float(err) <= 1e-5
    assert "EXACT" in proc.stdout


def test_example_pp2_vpp2_dp2_seq_mean_token_sum_norm():
    proc = torchrun(4, ["examples/train_tiny_gpt.py", "--tp", "1", "--pp", "2", "--vpp", "2", "--steps", "2",
                        "--loss-agg-mode", "seq-mean-token-sum-norm", "--exclude-fully-masked-seqs",
                        "--loss-return", "2-tuple"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "EXACT" in proc.stdout


def test_grpo_example_is_exact_with_two_terms_under_one_collective():
    proc = torchrun(4, ["examples/grpo_step.py", "--tp", "2", "--steps", "2"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("max grad err vs reference") == 2 and "EXACT" in proc.stdout


def test_grpo_example_with_pipeline_parallelism():
    proc = torchrun(4, ["examples/grpo_step.py", "--tp", "1", "--pp", "2", "--steps", "1"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "EXACT" in proc.stdout
