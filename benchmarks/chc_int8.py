"""Does CHC's topic structure survive an int8 caption encoder? (issue 17, item 2)

    python3 benchmarks/chc_int8.py --out /tmp/chc-int8 [--limit N] [--fp32-cache DIR]

1. Exports the sentence-transformers encoder (all-MiniLM-L6-v2, offline copy) to ONNX (TorchScript
   exporter) and quantises its weights to int8 with ONNX Runtime's ``quantize_dynamic``; encodes
   with ONNX Runtime the way sentence-transformers does (mean pooling over the attention mask, L2
   normalisation).
2. Speed, side by side: float32 sentence-transformers vs int8 ONNX Runtime on the same 4,096
   captions, round-robin, one thread, medians of process CPU time and wall time.
3. Topics: the CHC pipeline (UMAP + HDBSCAN + c-TF-IDF, default CHCConfig) on all captions with the
   float32 and with the int8 embeddings; adjusted Rand index of the caption -> topic assignments
   (noise as its own label), against the pipeline's own seed-to-seed variation (float32 embeddings,
   UMAP seed 0 vs seed 1) as the yardstick; the largest topics' names side by side, each float32
   topic with the int8 topic that holds most of its captions.

Needs ``onnxruntime`` and ``onnx`` (not project dependencies; ``optimum[onnxruntime]`` 2.x is not
used: it pins transformers < 5, which breaks sentence-transformers 6.3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from timing import interleaved, medians  # benchmarks/timing.py (the script's own folder is on sys.path)

CAPTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k-captions.txt.gz"


def export_int8(model_dir: str, out: Path) -> tuple[Path, Path]:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel, AutoTokenizer

    fp32, int8 = out / "minilm.onnx", out / "minilm-int8.onnx"
    if not int8.exists():
        model = AutoModel.from_pretrained(model_dir).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        enc = tok(["a dog runs on the grass", "two children"], padding=True, return_tensors="pt")
        names = ["input_ids", "attention_mask", "token_type_ids"]
        dyn = {n: {0: "batch", 1: "seq"} for n in names} | {"last_hidden_state": {0: "batch", 1: "seq"}}
        class Hidden(torch.nn.Module):  # keyword call: transformers 5 moved BertModel's positional args
            def __init__(self):
                super().__init__()
                self.model = model.requires_grad_(False)

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state

        with torch.no_grad():
            torch.onnx.export(Hidden(), tuple(enc[n] for n in names), str(fp32), input_names=names,
                              output_names=["last_hidden_state"], dynamic_axes=dyn, opset_version=17, dynamo=False)
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return fp32, int8


class OrtEncoder:
    """sentence-transformers' all-MiniLM-L6-v2 pipeline on an ONNX Runtime session."""

    def __init__(self, onnx_path: Path, model_dir: str, threads: int = 1):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.max_len = 256  # sentence-transformers' max_seq_length for this model

    def encode(self, captions, batch_size: int = 256) -> np.ndarray:
        order = np.argsort([-len(c) for c in captions], kind="stable")  # length-sorted batches, as ST does
        out = np.empty((len(captions), 384), dtype=np.float32)
        for s in range(0, len(captions), batch_size):
            idx = order[s:s + batch_size]
            enc = self.tok([captions[i] for i in idx], padding=True, truncation=True, max_length=self.max_len,
                           return_tensors="np")
            feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
            h = self.session.run(["last_hidden_state"], feeds)[0]
            m = feeds["attention_mask"][..., None].astype(np.float32)
            e = (h * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
            out[idx] = e / np.clip(np.linalg.norm(e, axis=1, keepdims=True), 1e-12, None)
        return out


def topic_labels(h) -> np.ndarray:
    labels = np.full(h["n_captions"], -1, dtype=np.int64)
    for t in h["topics"]:
        labels[t["captions"]] = t["id"]
    return labels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/chc-int8")
    p.add_argument("--captions", default=str(CAPTIONS))
    p.add_argument("--limit", type=int, default=0, help="first N captions only (0 = all)")
    p.add_argument("--fp32-cache", default=None, help="embedding cache dir holding the float32 embeddings")
    p.add_argument("--speed-captions", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch
    from sklearn.metrics import adjusted_rand_score

    from gram_plugin import chc

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    t_start = time.strftime("%H:%M:%S", time.gmtime())
    captions, ids = chc.read_captions(args.captions)
    if args.limit:
        captions, ids = captions[:args.limit], (ids[:args.limit] if ids else None)
    model_dir, _ = chc._resolve_model(chc.DEFAULT_MODEL)
    _, int8_path = export_int8(model_dir, out)
    ort_enc = OrtEncoder(int8_path, model_dir, args.threads)

    # -- speed, side by side -------------------------------------------------------------------
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device="cpu")
    sample = captions[:args.speed_captions]
    fns = {"fp32_st": lambda: st.encode(sample, batch_size=256, normalize_embeddings=True, show_progress_bar=False),
           "int8_ort": lambda: ort_enc.encode(sample)}
    wall, cpu = (medians(x) for x in interleaved(fns, args.repeats))
    speed = {k: {"wall_s": wall[k], "cpu_s": cpu[k]} for k in fns}
    speed["int8_speedup_cpu"] = speed["fp32_st"]["cpu_s"] / speed["int8_ort"]["cpu_s"]
    speed["int8_speedup_wall"] = speed["fp32_st"]["wall_s"] / speed["int8_ort"]["wall_s"]
    print(json.dumps({"speed": speed}), flush=True)

    # -- embeddings ----------------------------------------------------------------------------
    t0, c0 = time.perf_counter(), time.process_time()
    emb32 = chc.embed_captions(captions, cache_dir=args.fp32_cache, progress=False)
    fp32_encode = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    t0, c0 = time.perf_counter(), time.process_time()
    emb8 = ort_enc.encode(captions)
    int8_encode = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    cos = (emb32 * emb8).sum(1)
    print(json.dumps({"fp32_encode_all (cache if given)": fp32_encode, "int8_encode_all": int8_encode,
                      "cosine_fp32_int8": {"mean": float(cos.mean()), "min": float(cos.min()),
                                           "p01": float(np.quantile(cos, 0.01))}}), flush=True)

    # -- topics --------------------------------------------------------------------------------
    runs = {}
    for name, emb, seed in (("fp32", emb32, 0), ("fp32_seed1", emb32, 1), ("int8", emb8, 0)):
        cfg = chc.CHCConfig(progress=False, seed=seed)
        t0 = time.perf_counter()
        h = chc.build_hierarchy(captions, image_ids=ids, config=cfg, embeddings=emb)
        runs[name] = h
        print(f"{name}: {h['n_topics']} topics, noise {h['noise']['share']:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    lab = {k: topic_labels(h) for k, h in runs.items()}
    both = (lab["fp32"] >= 0) & (lab["int8"] >= 0)
    both_seed = (lab["fp32"] >= 0) & (lab["fp32_seed1"] >= 0)
    ari = {
        "int8_vs_fp32": adjusted_rand_score(lab["fp32"], lab["int8"]),
        "fp32_seed1_vs_seed0": adjusted_rand_score(lab["fp32"], lab["fp32_seed1"]),
        "int8_vs_fp32_non_noise": adjusted_rand_score(lab["fp32"][both], lab["int8"][both]),
        "fp32_seed1_vs_seed0_non_noise": adjusted_rand_score(lab["fp32"][both_seed], lab["fp32_seed1"][both_seed]),
    }
    side = []
    h32, h8 = runs["fp32"], runs["int8"]
    names8 = {t["id"]: t["name"] for t in h8["topics"]}
    for t in sorted(h32["topics"], key=lambda t: -t["n_captions"])[:20]:
        hits = lab["int8"][t["captions"]]
        hits = hits[hits >= 0]
        if len(hits):
            best = int(np.bincount(hits).argmax())
            share = float((hits == best).sum() / t["n_captions"])
            side.append((t["name"], t["n_captions"], names8[best], round(share, 3)))
        else:
            side.append((t["name"], t["n_captions"], None, 0.0))
    result = {
        "n_captions": len(captions), "threads": args.threads, "speed": speed, "fp32_encode": fp32_encode,
        "int8_encode": int8_encode,
        "cosine_fp32_int8": {"mean": float(cos.mean()), "min": float(cos.min()), "p01": float(np.quantile(cos, 0.01))},
        "topics": {k: h["n_topics"] for k, h in runs.items()},
        "noise_share": {k: round(h["noise"]["share"], 4) for k, h in runs.items()},
        "ari": ari, "largest_fp32_topics_vs_int8": side,
        "load_start": load_start, "load_end": os.getloadavg(), "utc": [t_start, time.strftime("%H:%M:%S", time.gmtime())],
    }
    (out / "chc_int8.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
