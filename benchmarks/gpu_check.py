"""GPU check (issues 17, 26): what only a CUDA device can show, in one short run.

Parts, each in its own subprocess with a timeout (a crash or hang in one does not stop the others),
in this order (the most wanted first: when the time budget runs out, the last ones are skipped):

  coop_fp16, coop_amp, coop_meta_train
            the REAL upstream CoOp trainer (Dassl build_trainer, CoOp's vit_b16_ctxv1.yaml, a random
            CLIP of ViT-B/16 dimensions, Caltech101, batch 32) plain vs the README's three lines with a
            regulator vs + ProGrad, under PREC fp16 and amp: ms per iteration, peak memory, finite
            losses; and one timed ``gram-plugin meta-train --dassl-config`` run (benchmarks/gpu_check_coop.py)
  chc       CHC's GPU stages at CC3M scale: the library's caption encoder on 200,000 real captions (MiniLM
            architecture, random weights) and the sampled path's neighbour search (benchmarks/gpu_check_chc.py)

  amp       PREC amp with GradScaler on the CoOp replica (tests/fixtures/dassl_like.py), wrapped with a
            random regulator: the regulator sees the *unscaled* gradient (a spy step pre-hook
            registered before wrap's), the step equals the CPU reference of the regulated SGD step,
            and a step whose gradient is inf stays skipped (prompt unchanged, hook not run, scale halved)
  fp16      PREC fp16 on the MaPLe and PromptSRC replicas (tests/fixtures/dassl_vpt_family.py):
            prompt dtypes kept (fp16 ctx, float32 compound / VPT prompts), finite, and the step equals
            the CPU reference of the regulated SGD step within fp16 rounding
  meta_step bench_meta_step.py at ViT-B/16 text-tower size (open_clip ViT-B-16, random weights),
            16 classes, 4 tasks, k = 1..4, second order: time and peak CUDA memory of MetaPromptTrainer
            (meta2: per-task loop, meta2b: batched meta-step holding every inner graph, metad: the
            default MetaConfig) vs `higher` (higher2) vs the plain steps it unrolls (plain)
  dist      task-parallel meta-training, 2 processes on the one GPU with NCCL, against the same run
            in one process (float64); NCCL refuses two ranks on one device, which is then reported as
            SKIP with NCCL's reason, and the same check runs with gloo on the CUDA tensors instead

Without CUDA (a dry run) every part runs on the CPU, quickly: the coop parts with CoOp's tiny test CLIP
at 32 px, amp with CPU bfloat16 autocast, fp16 on the CPU, meta_step on a tiny CLIP (``--model tiny``),
dist with gloo only; the figures are meaningless there.

Usage, from the repo root (on the device: ``bash benchmarks/gpu_check.sh``, which installs first)::

    python3 benchmarks/gpu_check.py [--parts coop_fp16,...] [--out DIR] [--budget 400] [--caltech DIR]

The coop parts need GRAM_COOP_ROOT (the CoOp checkout), ``dassl`` importable and ``--caltech``: the folder
holding ``caltech-101/101_ObjectCategories`` (gpu_check.sh sets all three up on the GPU box).
Writes ``gpu_check.json`` (figures and each part's log tail) and ``gpu_check.md`` into ``$OUT`` / ``--out``
after every part (a run cut short keeps what finished; a part that timed out keeps the partial figures
it had written); prints PASS / FAIL / SKIP per part with its figures; exit status 1 if any part failed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "tests", ROOT / "benchmarks", ROOT):  # fixtures.* / conftest; bench_meta_step; the project
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


def _project_importable():
    """Import the project from this checkout without installing it: a GPU box without network cannot
    build an editable install (setuptools' fallback fetches build dependencies). ``adapters/`` installs
    as ``gram_plugin.adapters`` (setup.py's package_dir); without an install, map it by hand."""
    import importlib.util

    try:
        if importlib.util.find_spec("gram_plugin.adapters") is not None:
            return
    except ModuleNotFoundError:
        pass
    import gram_plugin

    spec = importlib.util.spec_from_file_location("gram_plugin.adapters", ROOT / "adapters" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "adapters")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gram_plugin.adapters"] = module
    spec.loader.exec_module(module)
    gram_plugin.adapters = module


_project_importable()

PARTS = ("coop_fp16", "coop_amp", "coop_meta_train", "chc", "meta_step", "amp", "fp16", "dist")
TIMEOUT_S = {"coop_fp16": 100, "coop_amp": 100, "coop_meta_train": 120, "chc": 90, "meta_step": 150, "amp": 60, "fp16": 90,
             "dist": 90}


class CheckFailed(AssertionError):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def device_name():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# helpers shared by the fixture parts
def on_device(trainer_cls, device):
    """The fixture trainer class, built on ``device``: Dassl's TrainerX sets ``self.device`` to the CPU
    and then calls ``check_cfg`` before ``build_model``; this subclass points it at ``device`` there."""

    class OnDevice(trainer_cls):
        def check_cfg(self, cfg):
            super().check_cfg(cfg)
            self.device = device

    OnDevice.__name__ = OnDevice.__qualname__ = trainer_cls.__name__
    return OnDevice




def reference_sgd_step(p0, grad, reg_cpu, name, lr, wd, dtype=None):
    """Dassl's first SGD step (momentum buffer = gradient) on the regulated gradient, on the CPU in
    float32: the device-independent reference of what the wrapped trainer's step must produce."""
    import torch

    with torch.no_grad():
        r = reg_cpu(name, grad.detach().float().cpu())
        if dtype is not None:  # the hook writes the regulated gradient back in the parameter's dtype
            r = r.to(dtype).float()
        return p0.detach().float().cpu() - lr * (r + wd * p0.detach().float().cpu())


def rel_err(a, b):
    import torch

    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
def part_amp(args):
    import torch
    import torch.nn.functional as F

    from conftest import make_tiny_clip
    from fixtures.dassl_like import CLASSNAMES, CoOp, _amp_context, make_batch, make_cfg
    from fixtures.hand import random_regulator
    from gram_plugin.adapters import wrap

    dev = torch.device(args.device)
    cfg = make_cfg(n_ctx=4, prec="amp")
    trainer = on_device(CoOp, dev)(cfg, CLASSNAMES, lambda: make_tiny_clip(0))
    check(isinstance(trainer.scaler, torch.amp.GradScaler), "the trainer has no GradScaler")
    ctx = trainer.model.prompt_learner.ctx
    check(ctx.device.type == dev.type, f"ctx is on {ctx.device}, not {dev}")
    name = "prompt_learner.ctx"
    reg = random_regulator({name: tuple(ctx.shape)})
    reg_cpu = copy.deepcopy(reg)
    seen = []
    # registered before wrap's hook, so it sees exactly the gradient the regulator is given
    trainer.optim.register_step_pre_hook(lambda opt, a, k: seen.append(ctx.grad.detach().clone()))
    handle = wrap(trainer, regulator=reg)

    # GradScaler starts at 2**16; if the scaled fp16 backward overflows it skips the step and halves
    # the scale (as in any amp run): go on until one step is taken, checking the skipped ones stayed skipped
    overflow_skips = 0
    for attempt in range(24):
        batch = make_batch(seed=attempt)
        img, label = batch["img"].to(dev), batch["label"].to(dev)
        p0 = ctx.detach().clone()
        with _amp_context(dev):
            loss = F.cross_entropy(trainer.model(img), label)
        (g_unscaled,) = torch.autograd.grad(loss, [ctx])  # no scaler: the unscaled gradient
        scale = trainer.scaler.get_scale()
        trainer.forward_backward(batch)
        if seen:
            break
        check(torch.equal(ctx.detach(), p0), "the prompt moved on a step GradScaler skipped")
        overflow_skips += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    check(trainer.scaler.get_scale() == scale, "the scale changed after a finite step")
    check(scale > 1, f"GradScaler scale {scale}: the loss was not scaled")
    check(len(seen) == 1 and handle.hooks[0].steps == 1, f"step hooks ran {len(seen)} / {handle.hooks[0].steps} times, expected 1")
    err_unscaled = rel_err(seen[0], g_unscaled)
    err_scaled = rel_err(seen[0], g_unscaled * scale)
    check(err_unscaled < 1e-2, f"the regulator saw a gradient {err_unscaled:.3g} (relative) away from the unscaled one")
    expected = reference_sgd_step(p0, seen[0], reg_cpu, name, cfg.OPTIM.LR, cfg.OPTIM.WEIGHT_DECAY)
    step_err = float((ctx.detach().float().cpu() - expected).abs().max())
    check(step_err < 1e-6, f"step differs from the CPU reference of the regulated SGD step by {step_err:.3g}")
    moved = float((ctx.detach().cpu() - p0.cpu()).abs().max())
    check(moved > 0, "the prompt did not move")

    # inf gradient: GradScaler finds it, skips optimizer.step, so no hook runs and nothing moves
    p1 = ctx.detach().clone()
    h = ctx.register_hook(lambda grad: grad * float("inf"))
    trainer.forward_backward(make_batch(seed=50))
    h.remove()
    scale_after = trainer.scaler.get_scale()
    inf_step = {"prompt_unchanged": True, "hook_steps": handle.hooks[0].steps, "scale_after": scale_after}
    check(torch.equal(ctx.detach(), p1), "the prompt moved on an inf step")
    check(handle.hooks[0].steps == 1 and len(seen) == 1, "a step hook ran on the inf step")
    check(scale_after == scale / 2, f"scale {scale} -> {scale_after}, expected halved")

    # a few more finite steps: time per wrapped amp step
    n = 5 if dev.type == "cuda" else 2
    t0 = time.perf_counter()
    for s in range(n):
        trainer.forward_backward(make_batch(seed=100 + s))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {
        "autocast_dtype": "float16" if dev.type == "cuda" else "bfloat16",
        "grad_scale": scale,
        "steps_skipped_for_overflow_before_the_first": overflow_skips,
        "seen_vs_unscaled_rel_err": err_unscaled,
        "seen_vs_scaled_rel_err": err_scaled,
        "step_vs_cpu_reference_max_abs": step_err,
        "prompt_moved_max_abs": moved,
        "inf_step": inf_step,
        "hook_steps_after_timing": handle.hooks[0].steps,
        "wrapped_amp_step_ms": 1000 * (time.perf_counter() - t0) / n,
    }


def part_fp16(args):
    import torch

    from conftest import make_tiny_clip
    from fixtures.dassl_vpt_family import CLASSNAMES, TRAINERS, make_batch, make_cfg
    from fixtures.hand import random_regulator
    from gram_plugin.adapters import adapter_for, wrap

    dev = torch.device(args.device)
    out = {}
    for method in ("MaPLe", "PromptSRC"):
        cfg = make_cfg(trainer=method, prec="fp16")
        trainer = on_device(TRAINERS[method], dev)(cfg, CLASSNAMES, lambda: make_tiny_clip(0))
        params = adapter_for(trainer).prompt_parameters()
        dtypes = {n: p.dtype for n, p in params.items()}
        check(dtypes["prompt_learner.ctx"] == torch.float16, f"{method}: ctx is {dtypes['prompt_learner.ctx']}, not fp16")
        check(all(p.device.type == dev.type for p in params.values()), f"{method}: prompts not on {dev}")
        reg = random_regulator({n: tuple(p.shape) for n, p in params.items()})
        reg_cpu = copy.deepcopy(reg)
        handle = wrap(trainer, regulator=reg)
        batch = make_batch(seed=0)
        names = list(params)
        p0 = {n: params[n].detach().clone() for n in names}
        loss = trainer.compute_loss(batch["img"].to(dev), batch["label"].to(dev))
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        check(all(torch.isfinite(g).all() for g in grads), f"{method}: non-finite fp16 gradient")
        trainer.forward_backward(batch)
        errs = {}
        for n, gr in zip(names, grads):
            p = params[n]
            check(p.dtype == dtypes[n], f"{method}: {n} changed dtype to {p.dtype}")
            check(bool(torch.isfinite(p).all()), f"{method}: {n} is not finite after the step")
            expected = reference_sgd_step(p0[n], gr, reg_cpu, n, cfg.OPTIM.LR, cfg.OPTIM.WEIGHT_DECAY, dtype=gr.dtype)
            errs[n] = float((p.detach().float().cpu() - expected).abs().max())
        worst = max(errs.values())
        check(worst < 2e-3, f"{method}: step differs from the CPU reference by {worst:.3g} ({errs})")
        check(any(not torch.equal(params[n].detach(), p0[n]) for n in names), f"{method}: no prompt moved")
        check(handle.hooks[0].steps == 1, f"{method}: hook ran {handle.hooks[0].steps} times")
        out[method] = {
            "loss": float(loss),
            "dtypes": {n: str(d).replace("torch.", "") for n, d in dtypes.items()},
            "step_vs_cpu_reference_max_abs": worst,
        }
    return out


META_VARIANTS = ("plain", "meta2", "meta2b", "metad", "higher2")


def part_meta_step(args):
    import torch

    import bench_meta_step

    cuda = args.device == "cuda"
    ks = (1, 2, 3, 4) if cuda else (1, 2)
    out = {"model": "ViT-B-16" if cuda else "tiny", "classes": 16 if cuda else 3, "tasks": 4 if cuda else 2, "per_k": {}}
    path = Path(args.workdir) / "meta_step.json"
    argv = ["--device", args.device, "--model", out["model"], "--classes", str(out["classes"]), "--k", ",".join(map(str, ks)),
            "--tasks", str(out["tasks"]), "--repeats", "3" if cuda else "1", "--threads", str(min(8, os.cpu_count() or 1)) if cuda else "1",
            "--variants", ",".join(META_VARIANTS), "--json", str(path)]
    if not cuda:
        argv.append("--no-memory")  # the CPU memory figure needs fresh subprocesses: not for a dry run
    print("bench_meta_step.py " + " ".join(argv), flush=True)
    bench_meta_step.main(argv)
    targets = {}
    for k, res in json.loads(path.read_text())["per_k"].items():
        med = res["median"]
        check(all(v > 0 and v == v for v in med.values()), f"k={k}: bad timings {med}")
        row = {"median_s": med, "ratios": res["ratios"], "kept_graphs": res["kept_graphs"]}
        if res["peak_bytes"]:
            row["peak_mib"] = {v: b / 2**20 for v, b in res["peak_bytes"].items()}
            mem = res["ratios"].get("metad/higher2 peak memory")
            targets[f"k={k}: default <= 0.5x higher's peak memory"] = mem is not None and mem <= 0.5
        speed = res["ratios"].get("higher2/metad time (speed-up)")
        targets[f"k={k}: default >= 2x higher's speed"] = speed is not None and speed >= 2.0
        out["per_k"][k] = row
    out["targets"] = targets if cuda else "not evaluated: dry run on the CPU"
    if cuda:
        out["device_name"] = torch.cuda.get_device_name(0)
    return out


# ---------------------------------------------------------------------------------------------
# dist: tests/test_distributed.py's check, on the device's tensors
def _dist_run(rank, world, port, out_dir, backend, device):
    import datetime as dt

    import torch
    import torch.distributed as dist

    from gram_plugin.prompts import save_tensors

    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=dt.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        calls = []
        trainer = _dist_trainer(device, calls)
        trainer.fit(_DeviceSource(device))
        state = _state(trainer)
        state["query_calls"] = torch.tensor(sum(1 for n in calls if n == 12))
        state["meta_loss"] = torch.tensor([r["meta_loss"] for r in trainer.history], dtype=torch.float64)
        save_tensors(f"{out_dir}/rank{rank}.safetensors", state, {"rank": rank})
    finally:
        dist.destroy_process_group()


def _dist_trainer(device, calls):
    import test_distributed as td

    trainer = td.make_trainer(calls)
    for p in trainer.params.values():
        p.data = p.data.to(device)
    if trainer.regulator is not None:
        trainer.regulator.to(device)
    return trainer


class _DeviceSource:
    """tests/test_distributed.py's task source, with the task tensors moved to ``device``."""

    def __init__(self, device):
        import test_distributed as td

        self.inner, self.device = td.RandomClassification(), device

    def sample(self, g):
        from gram_plugin import Task

        t = self.inner.sample(g)
        return Task(tuple(x.to(self.device) for x in t.support), tuple(x.to(self.device) for x in t.query))


def _state(trainer):
    tensors, _ = trainer.state_tensors()
    return {k: v.detach().cpu().clone() for k, v in tensors.items() if not k.startswith("rng/")}


def _dist_compare(expected, single_losses, states):
    import torch

    worst = 0.0
    for rank, state in enumerate(states):
        check(int(state.pop("query_calls")) == 3 * 2, f"rank {rank} did not do exactly its half of the tasks")
        torch.testing.assert_close(state.pop("meta_loss"), single_losses, rtol=1e-12, atol=1e-12)
        check(set(state) == set(expected), f"rank {rank}: state keys differ")
        for k, v in expected.items():
            torch.testing.assert_close(state[k], v, rtol=1e-9, atol=1e-12, msg=f"rank {rank}: {k} differs")
            worst = max(worst, float((state[k].double() - v.double()).abs().max()))
    return worst


DIST_TIMEOUT_S = {"nccl": 50, "gloo": 60}


def spawn_with_timeout(fn, args, nprocs, timeout):
    """``torch.multiprocessing.spawn`` that kills the workers after ``timeout`` seconds instead of
    waiting for ever (a collective that never completes must not hang the check)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=2):  # raises ProcessRaisedException / ProcessExitedException
        if time.monotonic() > deadline:
            for proc in context.processes:
                if proc.is_alive():
                    proc.kill()
            raise TimeoutError(f"workers still running after {timeout} s (killed)")


def part_dist(args):
    import socket
    import tempfile

    import torch
    import torch.distributed as dist

    from gram_plugin.prompts import load_tensors

    check(dist.is_available(), "torch.distributed is not built")
    dev = args.device
    calls = []
    single = _dist_trainer(dev, calls)
    single.fit(_DeviceSource(dev))
    expected = _state(single)
    single_losses = torch.tensor([r["meta_loss"] for r in single.history], dtype=torch.float64)
    check(not torch.allclose(expected["theta/ctx"], _state(_dist_trainer("cpu", None))["theta/ctx"]),
          "the single-process run did not move the init")

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    out = {"device": dev}
    backends = (["nccl"] if dev == "cuda" else []) + ["gloo"]
    for backend in backends:
        if backend == "nccl" and not dist.is_nccl_available():
            out["nccl"] = {"status": "SKIP", "reason": "NCCL is not built into this torch"}
            continue
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            try:
                spawn_with_timeout(_dist_run, (2, free_port(), d, backend, dev), nprocs=2, timeout=DIST_TIMEOUT_S[backend])
            except Exception as e:  # noqa: BLE001  (the worker's error is the figure here)
                msg = str(e).strip().splitlines()
                reason = next((line for line in msg if "Duplicate GPU" in line or "NCCL" in line or "Error" in line), msg[-1] if msg else repr(e))
                if backend == "nccl":
                    out["nccl"] = {"status": "SKIP", "reason": f"2 NCCL ranks on one GPU failed: {reason.strip()[:400]}"}
                    continue
                raise
            states = [load_tensors(Path(d) / f"rank{r}.safetensors")[0] for r in range(2)]
            worst = _dist_compare(expected, single_losses, states)
            out[backend] = {"status": "PASS", "max_abs_diff_vs_single_process": worst, "wall_s": time.perf_counter() - t0,
                            "tensors": "cuda" if dev == "cuda" else "cpu"}
    if dev != "cuda":
        out["nccl"] = {"status": "SKIP", "reason": "no CUDA device"}
    out["summary_status"] = "PASS" if out.get("nccl", {}).get("status") == "PASS" else "SKIP"
    return out


def _coop_part(prec):
    def run(args):
        import gpu_check_coop

        figures = gpu_check_coop.part_coop(args, prec)
        try:
            gpu_check_coop.check_coop(figures)
        except AssertionError as e:
            raise CheckFailed(str(e)) from None
        return figures

    return run


def _coop_meta_train(args):
    import gpu_check_coop

    try:
        return gpu_check_coop.part_coop_meta_train(args)
    except AssertionError as e:
        raise CheckFailed(str(e)) from None


def _chc(args):
    import gpu_check_chc

    return gpu_check_chc.part_chc(args)


PART_FNS = {"coop_fp16": _coop_part("fp16"), "coop_amp": _coop_part("amp"), "coop_meta_train": _coop_meta_train, "chc": _chc,
            "amp": part_amp, "fp16": part_fp16, "meta_step": part_meta_step, "dist": part_dist}


# ---------------------------------------------------------------------------------------------
def run_part_here(args):
    """Child process: run one part, write {status, figures | reason} to --result."""
    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        figures = PART_FNS[args.part](args)
        status = "PASS"
        if args.part == "dist":
            status = "PASS" if figures.get("nccl", {}).get("status") == "PASS" else "SKIP"
        result = {"status": status, "figures": figures}
        if status == "SKIP":
            result["reason"] = figures["nccl"]["reason"] + " (gloo on the same tensors: " + figures.get("gloo", {}).get("status", "not run") + ")"
    except CheckFailed as e:
        result = {"status": "FAIL", "reason": str(e)}
    except Exception as e:  # noqa: BLE001
        result = {"status": "FAIL", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    if "figures" not in result and Path(args.result).exists():  # what the part had written before failing
        result["figures"] = json.loads(Path(args.result).read_text()).get("figures")
    result["seconds"] = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    return 0


def environment():
    import torch

    env = {"utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda_version=torch.version.cuda)
        try:
            env["nccl"] = str(torch.cuda.nccl.version())
        except Exception as e:  # noqa: BLE001
            env["nccl"] = f"unknown ({type(e).__name__})"
    try:
        env["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001  (no git on the device is fine)
        env["commit"] = None
    for mod in ("open_clip", "higher", "yacs"):
        try:
            env[mod] = __import__(mod).__version__ if hasattr(__import__(mod), "__version__") else "present"
        except Exception as e:  # noqa: BLE001
            env[mod] = f"missing ({type(e).__name__})"
    return env


def markdown(env, results):
    lines = [f"# gpu_check ({env['utc']} UTC)", "",
             f"device: {env.get('gpu', 'no CUDA (dry run on the CPU)')}; torch {env['torch']}; "
             f"cuda {env.get('cuda_version')}; python {env['python']}; commit {env.get('commit')}", "",
             "| part | status | seconds | reason |", "|---|---|---|---|"]
    for part, r in results.items():
        lines.append(f"| {part} | {r['status']} | {r.get('seconds', 0):.1f} | {r.get('reason', '')} |")
    import gpu_check_chc
    import gpu_check_coop

    lines += gpu_check_coop.markdown_rows(results) + gpu_check_chc.markdown_rows(results)
    ms = results.get("meta_step", {}).get("figures")
    if ms:
        nan = float("nan")
        lines += ["", f"meta_step: {ms['model']} text tower, {ms['classes']} classes, {ms['tasks']} tasks, second order "
                      "(metad = MetaConfig's default; kept = inner graphs the batched step kept)", "",
                  "| k | " + " | ".join(f"{v} s" for v in META_VARIANTS) + " | higher2 / meta2b | higher2 / metad | peak MiB "
                  + " / ".join(META_VARIANTS) + " | meta2b / higher2 mem | metad / higher2 mem | kept (metad) |",
                  "|---|" + "---|" * (len(META_VARIANTS) + 6)]
        for k, row in ms["per_k"].items():
            m, r, pk = row["median_s"], row["ratios"], row.get("peak_mib", {})
            lines.append(f"| {k} | " + " | ".join(f"{m.get(v, nan):.4f}" for v in META_VARIANTS)
                         + f" | {r.get('higher2/meta2b time (speed-up)', nan):.2f} | {r.get('higher2/metad time (speed-up)', nan):.2f} | "
                         + (" / ".join(f"{pk.get(v, nan):.0f}" for v in META_VARIANTS) if pk else "-")
                         + f" | {r.get('meta2b/higher2 peak memory', nan):.3f} | {r.get('metad/higher2 peak memory', nan):.3f} | "
                         f"{row['kept_graphs'].get('metad')} |")
        lines.append(f"\nmeta_step targets: {ms.get('targets')}")
    lines += ["", "```json", json.dumps({p: r.get("figures") for p, r in results.items()}, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def write_report(out: Path, env: dict, results: dict, start: float) -> None:
    env["loadavg_end"] = os.getloadavg()
    env["total_s"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps({"environment": env, "results": results}, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(env, results))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_check")
    p.add_argument("--budget", type=float, default=400.0, help="seconds for all parts together")
    p.add_argument("--caltech", default=os.environ.get("GRAM_CALTECH_ROOT", str(Path.home() / ".cache/gram-plugin-tests/caltech-101")),
                   help="folder holding caltech-101/101_ObjectCategories (the coop parts)")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        return run_part_here(args)

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # per-part logs and results stay out of $OUT: the device returns at most 8 files from it, so it gets
    # gpu_check.json (with every part's log tail) and gpu_check.md only
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    env = environment()
    device = "cuda" if env["cuda"] else "cpu"
    print(f"gpu_check: device {env.get('gpu', 'none: DRY RUN on the CPU')}, torch {env['torch']}, out {out}", flush=True)
    results = {}
    for part in [x for x in args.parts.split(",") if x]:
        if part not in PART_FNS:
            raise SystemExit(f"unknown part {part!r}; parts: {', '.join(PARTS)}")
        left = args.budget - (time.perf_counter() - start)
        # the timeouts are the GPU's; a dry run on a shared CPU gets four times as long (same budget)
        timeout = min(TIMEOUT_S[part] * (1 if device == "cuda" else 4), left)
        if timeout < 10:
            results[part] = {"status": "SKIP", "reason": f"time budget ({args.budget:.0f} s) used up"}
            print(f"[SKIP] {part}: {results[part]['reason']}", flush=True)
            continue
        res_file, log_file = work / f"{part}.result.json", work / f"{part}.log"
        cmd = [sys.executable, __file__, "--part", part, "--result", str(res_file), "--device", device, "--workdir", str(work),
               "--caltech", args.caltech]
        t0 = time.perf_counter()
        with open(log_file, "w") as log:
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT,
                                      env=dict(os.environ, PYTHONUNBUFFERED="1"))
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if res_file.exists():
            results[part] = json.loads(res_file.read_text())
            if rc == "timeout":  # the partial figures the part had written, kept
                results[part].update(status="FAIL", reason=f"timed out after {timeout:.0f} s (partial figures kept)")
        elif rc == "timeout":
            results[part] = {"status": "FAIL", "reason": f"timed out after {timeout:.0f} s"}
        else:
            tail = log_file.read_text()[-600:]
            results[part] = {"status": "FAIL", "reason": f"exit status {rc} without a result; log tail: {tail}"}
        results[part].setdefault("seconds", time.perf_counter() - t0)
        results[part]["log_tail"] = log_file.read_text(errors="replace")[-3000:]
        r = results[part]
        print(f"[{r['status']}] {part} ({r['seconds']:.1f} s)" + (f": {r['reason']}" if r.get("reason") else ""), flush=True)
        if r.get("figures"):
            print(json.dumps(r["figures"], indent=1, default=str), flush=True)
        if r.get("traceback"):
            print(r["traceback"], flush=True)
        elif r["status"] == "FAIL":
            print(r["log_tail"], flush=True)
        write_report(out, env, results, start)  # after every part: a run cut short keeps what finished
    write_report(out, env, results, start)
    print("\n" + markdown(env, results).split("```json")[0], flush=True)
    statuses = {r["status"] for r in results.values()}
    print(f"gpu_check: {'FAIL' if 'FAIL' in statuses else 'OK'} in {env['total_s']:.0f} s; "
          + ", ".join(f"{k} {v['status']}" for k, v in results.items()), flush=True)
    return 1 if "FAIL" in statuses else 0


if __name__ == "__main__":
    sys.exit(main())
