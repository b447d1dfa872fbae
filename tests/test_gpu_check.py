"""benchmarks/gpu_check.py's dry run: without CUDA every part runs on the CPU, quickly, and reports.

The GPU figures themselves come from running the script on a GPU (benchmarks/README.md); this test
keeps the script working between such runs (the fixtures and APIs it drives change under it).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU run benchmarks/gpu_check.sh itself")
def test_dry_run_on_cpu_runs_every_part_and_writes_its_summary(tmp_path):
    # dist is left out: its gloo check is tests/test_distributed.py, and spawning costs ~10 s here
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--parts", "amp,fp16,meta_step",
                           "--out", str(tmp_path), "--budget", "240"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["environment"]["cuda"] is False
    results = report["results"]
    assert {p: r["status"] for p, r in results.items()} == {"amp": "PASS", "fp16": "PASS", "meta_step": "PASS"}
    amp = results["amp"]["figures"]
    assert amp["grad_scale"] > 1 and amp["seen_vs_unscaled_rel_err"] < 1e-2 < amp["seen_vs_scaled_rel_err"]
    assert amp["inf_step"]["scale_after"] == amp["grad_scale"] / 2 and amp["inf_step"]["hook_steps"] == 1
    assert set(results["fp16"]["figures"]) == {"MaPLe", "PromptSRC"}
    assert set(results["meta_step"]["figures"]["per_k"]) == {"1", "2"}
    assert "| amp | PASS |" in (tmp_path / "gpu_check.md").read_text()
