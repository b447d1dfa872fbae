"""gpu_check's parts on the REAL upstream CoOp trainer (issue 26): what the README's three lines cost.

Dassl's ``build_trainer`` builds KaiyangZhou/CoOp's trainer from CoOp's own ``vit_b16_ctxv1.yaml``
(ViT-B/16, CTX_INIT "a photo of a", batch 32, SGD) on Caltech101 images; its CLIP is a random one of
ViT-B/16's dimensions made by CoOp's own ``clip.model.CLIP`` (no pretrained weights offline) and
loaded by CoOp's own ``load_clip_to_cpu`` (tests/fixtures/upstream.py says what is replaced and why).
Only public entry points of gram-plugin are used: ``wrap`` (the README's three lines) and the CLI.

``coop_fp16`` / ``coop_amp`` (PREC fp16 / amp; one process each): three trainers built from the same
config and seed, side by side on the device:

  plain      the trainer as built
  regulated  ``wrap(trainer, init=..., regulator=True)``
  prograd    ``wrap(trainer, init=..., regulator=True, prograd=1.0)``

The init holds a prompt of the trainer's shape and a fresh ``GradientRegulator`` (the timing does not
depend on what was learned). Every variant takes ``trainer.forward_backward`` on the same prefetched
batches, round-robin (plain, regulated, prograd, plain, ...): ``--warmup`` rounds, then ``--iters``
timed rounds, each call synchronised (``torch.cuda.synchronize``) before and after. Reported per
variant: median / quartiles of ms per iteration, the ratio to plain, every loss finite, the prompt
moved; memory on CUDA: the trainer's resident allocation (model, optimiser state, the wrap's teacher;
``memory_allocated`` after building it and wrapping, minus before) plus the largest transient of one
iteration (``max_memory_allocated`` during it minus ``memory_allocated`` before it) = the peak that
trainer alone would reach.

``coop_meta_train``: ``gram-plugin meta-train --dassl-config <CoOp's vit_b16_ctxv1.yaml> ...`` on the
same fork, data and CLIP, in-process through the CLI's entry point (setup.py's console script), for a
few outer steps at the command's default task sizes: seconds per step (its run folder's log.csv), wall
time of the command, peak CUDA memory, finite meta-losses, the init written.

Without CUDA (the dry run of tests/test_gpu_check.py): the same code on the CPU with CoOp's tiny test
CLIP, 32 px images, a batch of 4, a few iterations; the figures are meaningless there (and upstream's
``torch.cuda.amp`` turns itself off on the CPU, so amp runs float32).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# clip.model.CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
#                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)
VIT_B16_CLIP = (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)
CONFIG = "vit_b16_ctxv1.yaml"  # the README's meta-train command uses it too
VARIANTS = ("plain", "regulated", "prograd")
TARGETS = {"regulated": 1.05, "prograd": 1.35, "memory": 1.05}  # x the plain iteration / plain peak


def sizes(cuda: bool) -> dict:
    """Run sizes: the real ones on a GPU, tiny ones for the CPU dry run (same code path)."""
    if cuda:
        return {"clip": VIT_B16_CLIP, "input": 224, "batch": 32, "shots": 16, "workers": 8, "warmup": 10, "iters": 30,
                "classes": "all", "meta_steps": 3, "meta_args": []}
    # CPU: fp16 matrix products are slow there, so the dry run takes the 50 base classes
    return {"clip": None, "input": 32, "batch": 4, "shots": 1, "workers": 0, "warmup": 1, "iters": 2, "classes": "base",
            "meta_steps": 2, "meta_args": ["--inner-steps", "1", "--meta-batch-size", "2", "--n-way", "3", "--k-support", "1",
                                           "--k-query", "1"]}


@contextlib.contextmanager
def coop_repo(cuda: bool, workdir: Path):
    """The CoOp checkout (GRAM_COOP_ROOT) imported as tests/fixtures/upstream.py does, with CoOp's CLIP
    loader on a random checkpoint of ViT-B/16's dimensions (CPU: the tests' tiny one)."""
    import pytest

    from fixtures.upstream import upstream

    if not os.environ.get("GRAM_COOP_ROOT"):
        raise RuntimeError("GRAM_COOP_ROOT is not set: the CoOp parts need the KaiyangZhou/CoOp checkout "
                           "(benchmarks/gpu_check.sh unpacks it; here: eval \"$(cat .venv/upstream.env)\")")
    mp = pytest.MonkeyPatch()
    try:
        with upstream("CoOp", mp, workdir / "clip_weights", clip_shape=sizes(cuda)["clip"], stub_cuda=not cuda) as up:
            yield up
    finally:
        mp.undo()


def data_root(caltech: str, workdir: Path) -> Path:
    """A private dataset root linking to the extracted Caltech101 (CoOp writes split files next to it)."""
    from fixtures.upstream import caltech_folder

    dest = workdir / "coop_data"
    if (dest / "caltech-101").exists():
        return dest
    if not (Path(caltech) / "caltech-101" / "101_ObjectCategories").is_dir():
        raise RuntimeError(f"--caltech {caltech}: no caltech-101/101_ObjectCategories there (extract "
                           "/work/shared/data/caltech-101.tar into it; gpu_check.sh does)")
    return caltech_folder(Path(caltech), dest)


def trainer_cfg(up, root: Path, out: Path, prec: str, cuda: bool):
    from fixtures.upstream import make_cfg

    s = sizes(cuda)
    size = f"({s['input']}, {s['input']})"
    return make_cfg(up, root, out, CONFIG, [
        "TRAINER.COOP.PREC", prec, "USE_CUDA", str(cuda), "INPUT.SIZE", size, "DATASET.NUM_SHOTS", str(s["shots"]),
        "DATASET.SUBSAMPLE_CLASSES", s["classes"], "DATALOADER.TRAIN_X.BATCH_SIZE", str(s["batch"]),
        "DATALOADER.NUM_WORKERS", str(s["workers"]),
    ])


def _sync(cuda):
    if cuda:
        import torch

        torch.cuda.synchronize()


def _allocated(cuda):
    import torch

    _sync(cuda)
    return torch.cuda.memory_allocated() if cuda else 0


def make_init(trainer, path: Path) -> Path:
    """A PromptInit of the trainer's prompt (its current values) and a fresh GradientRegulator over it."""
    from fixtures.upstream import init_file
    from gram_plugin import GradientRegulator

    ctx = trainer.model.prompt_learner.ctx
    name = "prompt_learner.ctx"
    init_file({name: ctx.detach().cpu()}, GradientRegulator({name: tuple(ctx.shape)})).save(path)
    return path


def prefetch(trainer, n: int) -> list:
    """``n`` training batches from the trainer's own loader (on the host), so the timing leaves the
    image decoding out and every variant sees the same batches."""
    batches = []
    while len(batches) < n:
        for batch in trainer.train_loader_x:
            batches.append(batch)
            if len(batches) == n:
                break
    return batches


def _write(path, result):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


def part_coop(args, prec: str) -> dict:
    """The three variants round-robin on one precision; writes partial results to ``args.result``."""
    import torch
    from dassl.engine import build_trainer
    from dassl.utils import set_random_seed

    from gram_plugin.adapters import wrap

    cuda = args.device == "cuda"
    s = sizes(cuda)
    work = Path(args.workdir)
    out = {"prec": prec, "config": CONFIG, "clip": "ViT-B/16 dims (random)" if cuda else "tiny (dry run)",
           "batch": s["batch"], "input": s["input"], "warmup": s["warmup"], "iters": s["iters"], "variants": {}}
    with coop_repo(cuda, work) as up:
        root = data_root(args.caltech, work)
        trainers = {}
        init_path = None
        for v in VARIANTS:
            rec = out["variants"][v] = {}
            try:
                before = _allocated(cuda)
                t0 = time.perf_counter()
                set_random_seed(1)
                trainer = build_trainer(trainer_cfg(up, root, work / f"coop_{prec}_{v}", prec, cuda))
                if init_path is None:
                    init_path = make_init(trainer, work / f"init_{prec}.safetensors")
                if v == "regulated":
                    wrap(trainer, init=init_path, regulator=True)
                elif v == "prograd":
                    wrap(trainer, init=init_path, regulator=True, prograd=1.0)
                rec["build_s"] = time.perf_counter() - t0
                rec["resident_mib"] = (_allocated(cuda) - before) / 2**20 if cuda else None
                rec["ctx_dtype"] = str(trainer.model.prompt_learner.ctx.dtype).replace("torch.", "")
                trainers[v] = trainer
            except Exception as e:  # noqa: BLE001  (one variant failing must not stop the others)
                rec["error"] = f"{type(e).__name__}: {e}"[:1500]
        _write(args.result, {"status": "PARTIAL", "figures": out})
        if "plain" not in trainers:
            raise RuntimeError(f"the plain trainer did not build: {out['variants']['plain'].get('error')}")
        batches = prefetch(trainers["plain"], s["warmup"] + s["iters"])
        out["classes"] = trainers["plain"].dm.num_classes
        p0 = {}
        for v, trainer in trainers.items():
            trainer.set_model_mode("train")
            trainer.batch_idx, trainer.num_batches = 0, 10**9  # mid-epoch: no lr update inside the timing
            p0[v] = trainer.model.prompt_learner.ctx.detach().clone()
            out["variants"][v].update(ms=[], loss=[], transient_mib=0.0)
        for i, batch in enumerate(batches):
            timed = i >= s["warmup"]
            for v, trainer in list(trainers.items()):
                rec = out["variants"][v]
                try:
                    base = _allocated(cuda)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    summary = trainer.forward_backward(batch)
                    _sync(cuda)
                    ms = 1000 * (time.perf_counter() - t0)
                    if cuda:
                        rec["transient_mib"] = max(rec["transient_mib"], (torch.cuda.max_memory_allocated() - base) / 2**20)
                    rec["loss"].append(float(summary["loss"]))
                    if timed:
                        rec["ms"].append(ms)
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"iteration {i}: {type(e).__name__}: {e}"[:1500]
                    del trainers[v]
            if timed and (i - s["warmup"]) % 10 == 9:
                _write(args.result, {"status": "PARTIAL", "figures": summarise(out, p0, trainers, cuda)})
        return summarise(out, p0, trainers, cuda)


def summarise(out: dict, p0: dict, trainers: dict, cuda: bool) -> dict:
    """Medians, ratios to plain, finiteness and the targets (on CUDA only: the dry run's figures mean nothing)."""
    for v, rec in out["variants"].items():
        ms = rec.get("ms") or []
        if ms:
            q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
            rec.update(median_ms=statistics.median(ms), q1_ms=q[0], q3_ms=q[2], n=len(ms))
        if rec.get("loss"):
            rec["losses_finite"] = all(math.isfinite(x) for x in rec["loss"])
            rec["loss_first_last"] = [rec["loss"][0], rec["loss"][-1]]
        if v in trainers and v in p0:
            ctx = trainers[v].model.prompt_learner.ctx.detach()
            rec["prompt_moved"] = bool((ctx != p0[v]).any())
            if "plain" in trainers:  # same init and batches: a difference is the wrap's step acting
                plain_ctx = trainers["plain"].model.prompt_learner.ctx.detach()
                rec["prompt_vs_plain_max_abs"] = float((ctx.float() - plain_ctx.float()).abs().max())
        if cuda and rec.get("resident_mib") is not None:
            rec["peak_mib"] = rec["resident_mib"] + rec.get("transient_mib", 0.0)
    plain = out["variants"].get("plain", {})
    targets = {}
    for v in ("regulated", "prograd"):
        rec = out["variants"].get(v, {})
        if rec.get("median_ms") and plain.get("median_ms"):
            rec["time_vs_plain"] = rec["median_ms"] / plain["median_ms"]
            if cuda:
                targets[f"{v} time <= {TARGETS[v]}x plain"] = rec["time_vs_plain"] <= TARGETS[v]
        if rec.get("peak_mib") and plain.get("peak_mib"):
            rec["peak_vs_plain"] = rec["peak_mib"] / plain["peak_mib"]
            targets[f"{v} peak memory <= {TARGETS['memory']}x plain"] = rec["peak_vs_plain"] <= TARGETS["memory"]
    out["targets"] = targets if cuda else "not evaluated: dry run on the CPU"
    return out


def check_coop(figures: dict) -> None:
    """What makes a coop part FAIL (a missed target does not: it is a figure)."""
    for v in VARIANTS:
        rec = figures["variants"].get(v, {})
        if rec.get("error"):
            raise AssertionError(f"{v}: {rec['error']}")
        if not rec.get("losses_finite"):
            raise AssertionError(f"{v}: a non-finite loss ({rec.get('loss')})")
        if not rec.get("prompt_moved"):
            raise AssertionError(f"{v}: the prompt did not move in {len(rec.get('loss', []))} iterations")


# ---------------------------------------------------------------------------------------------
def cli_entry():
    """The ``gram-plugin`` console script's function, read from setup.py (the CLI moves; this follows it)."""
    import importlib

    m = re.search(r"gram-plugin\s*=\s*([\w.]+):(\w+)", (ROOT / "setup.py").read_text())
    if not m:
        raise RuntimeError("setup.py declares no gram-plugin console script")
    return getattr(importlib.import_module(m.group(1)), m.group(2))


def meta_train_argv(up, root: Path, run: Path, cuda: bool) -> list[str]:
    """The README's meta-train command on CoOp's own configs, at the run's sizes (``run``: its run folder)."""
    s = sizes(cuda)
    return ["meta-train", "--dassl-config", str(up.root / "configs/trainers/CoOp" / CONFIG),
            "--dataset-config", str(up.root / "configs/datasets/caltech101.yaml"), "--trainer", "CoOp",
            "--fork", str(up.root), "--root", str(root), "--out", str(run),
            "--meta-steps", str(s["meta_steps"]), "--checkpoint-every", "0", "--quiet", *s["meta_args"],
            "USE_CUDA", str(cuda), "INPUT.SIZE", f"({s['input']}, {s['input']})", "DATALOADER.NUM_WORKERS", str(s["workers"])]


def part_coop_meta_train(args) -> dict:
    import csv

    import torch

    from gram_plugin import PromptInit

    cuda = args.device == "cuda"
    work = Path(args.workdir)
    run = work / "meta_run"  # the run folder: RUN/init.safetensors, RUN/meta/log.csv
    with coop_repo(cuda, work) as up:
        root = data_root(args.caltech, work)
        argv = meta_train_argv(up, root, run, cuda)
        print("gram-plugin " + " ".join(argv), flush=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        rc = cli_entry()(argv)
        wall = time.perf_counter() - t0
    if rc != 0:
        raise AssertionError(f"gram-plugin meta-train exited with status {rc}")
    with open(run / "meta" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    seconds = [float(r["seconds"]) for r in rows]
    losses = [float(r["meta_loss"]) for r in rows]
    init = PromptInit.load(run / "init.safetensors")
    figures = {"argv": argv, "wall_s": wall, "steps": len(rows), "seconds_per_step": seconds,
               "last_step_s": seconds[-1] if seconds else None, "meta_losses": losses,
               "losses_finite": all(math.isfinite(x) for x in losses), "init_tensors": {n: list(t.shape) for n, t in init.tensors.items()},
               "init_has_regulator": bool(init.regulator_state)}
    if cuda:
        figures["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if not figures["losses_finite"] or len(rows) != sizes(cuda)["meta_steps"] or not init.regulator_state:
        raise AssertionError(f"meta-train: {len(rows)} steps logged, losses {losses}, regulator saved: {bool(init.regulator_state)}")
    return figures


def markdown_rows(results: dict) -> list[str]:
    """gpu_check.md's table of the coop parts."""
    lines = []
    for part in ("coop_fp16", "coop_amp"):
        fig = (results.get(part) or {}).get("figures")
        if not fig:
            continue
        if not lines:
            lines += ["", "| prec | variant | median ms / iter (q1-q3) | x plain | peak MiB (resident + transient) | x plain | losses finite | prompt moved |",
                      "|---|---|---|---|---|---|---|---|"]
        for v, r in fig["variants"].items():
            if r.get("error"):
                lines.append(f"| {fig['prec']} | {v} | error: {r['error'][:200]} | | | | | |")
                continue
            med = f"{r['median_ms']:.1f} ({r['q1_ms']:.1f}-{r['q3_ms']:.1f})" if r.get("median_ms") else "-"
            peak = (f"{r['peak_mib']:.0f} ({r['resident_mib']:.0f} + {r['transient_mib']:.0f})" if r.get("peak_mib") else "-")
            ratio = {k: "1.000" if v == "plain" else (f"{r[k]:.3f}" if k in r else "-") for k in ("time_vs_plain", "peak_vs_plain")}
            lines.append(f"| {fig['prec']} | {v} | {med} | {ratio['time_vs_plain']} | {peak} | {ratio['peak_vs_plain']} | "
                         f"{r.get('losses_finite')} | {r.get('prompt_moved')} |")
        lines.append(f"| {fig['prec']} | targets | {fig.get('targets')} | | | | | |")
    mt = (results.get("coop_meta_train") or {}).get("figures")
    if mt:
        lines += ["", f"meta-train --dassl-config: {mt['steps']} steps, seconds per step {[round(x, 2) for x in mt['seconds_per_step']]}, "
                      f"wall {mt['wall_s']:.1f} s, peak {mt.get('peak_mib', float('nan')):.0f} MiB, meta-losses {[round(x, 4) for x in mt['meta_losses']]}"]
    return lines


if __name__ == "__main__":
    sys.exit("run through benchmarks/gpu_check.py --parts coop_fp16,coop_amp,coop_meta_train")
