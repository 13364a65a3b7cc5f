"""`megatron-agg compare` end to end (short runs): the hooked Megatron path and the FSDP path
agree, the plain path does not, the PNG is a real image, and a wrong scaling fails the command."""

import json
import os
import shutil
import struct
import subprocess
import sys

from conftest import REPO, SUMMARY, free_port


def compare(tmp_path, *extra):
    exe = shutil.which("megatron-agg") or os.path.join(os.path.dirname(sys.executable), "megatron-agg")
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore")
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
