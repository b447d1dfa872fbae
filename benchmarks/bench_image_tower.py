"""Image-feature throughput of the default backbone's image tower (ProxyCLIP v2: EfficientNet-Lite0 + ConSE).

    python3 benchmarks/bench_image_tower.py [--batch 64] [--repeats 5] [--threads 1] [--onnx]

Variants, side by side (round-robin, medians of process CPU time and wall time), all on the same
batch of real preprocessed 224 px images from the package's embedded data:

  eager           the tower in PyTorch's default (contiguous) memory format under ``torch.no_grad()``
                  (what FeatureCache ran before the tower went channels-last)
  inference       the same under ``torch.inference_mode()``
  channels_last   ``backbone.encode_image`` as shipped (weights and input channels-last), inference mode
  onnx            (``--onnx``) the Lite0 tower exported to ONNX and run by ONNX Runtime (float32), ConSE in torch

Every variant's features are compared to eager's (max abs difference). Prints images/s.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import interleaved, medians  # noqa: E402  (benchmarks/timing.py)


def real_batch(backbone, n):
    from gram_plugin.data import default_dataset

    ds = default_dataset(backbone.preprocess)
    xs = [ds.load_image(i) for i in range(min(n, len(ds)))]
    while len(xs) < n:
        xs = xs + xs[: n - len(xs)]
    return torch.stack(xs)


def variants(bb, images, onnx: bool, threads: int):
    plain = copy.deepcopy(bb.visual).to(memory_format=torch.contiguous_format)
    images = images.contiguous()

    def eager():
        with torch.no_grad():
            return bb.conse(plain(images))

    def inference():
        with torch.inference_mode():
            return bb.conse(plain(images))

    def channels_last():
        with torch.inference_mode():
            return bb.encode_image(images)

    fns = {"eager": eager, "inference": inference, "channels_last": channels_last}
    if onnx:
        import onnxruntime as ort

        path = Path(tempfile.mkdtemp()) / "lite0.onnx"
        torch.onnx.export(plain, (images[:2],), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x_np = images.numpy()

        def onnx_run():
            logits = torch.from_numpy(sess.run(["logits"], {"x": x_np})[0])
            with torch.inference_mode():
                return bb.conse(logits)

        fns["onnx"] = onnx_run
    return fns


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--onnx", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from gram_plugin.backbones.proxy_v2 import ProxyCLIPv2

    load0, t_start = os.getloadavg(), time.strftime("%H:%M:%S", time.gmtime())
    bb = ProxyCLIPv2()
    images = real_batch(bb, args.batch)
    fns = variants(bb, images, args.onnx, args.threads)
    ref = fns["eager"]()
    diffs = {k: float((fn() - ref).abs().max()) for k, fn in fns.items()}  # also the warm-up
    wall, cpu = interleaved(fns, args.repeats)
    med_cpu, med_wall = medians(cpu), medians(wall)
    result = {
        "backbone": bb.name, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
        "images_per_cpu_s": {k: args.batch / v for k, v in med_cpu.items()},
        "images_per_wall_s": {k: args.batch / v for k, v in med_wall.items()},
        "speedup_cpu_vs_eager": {k: med_cpu["eager"] / v for k, v in med_cpu.items()},
        "max_abs_diff_vs_eager": diffs,
        "load": [load0, os.getloadavg()], "utc": [t_start, time.strftime("%H:%M:%S", time.gmtime())],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
