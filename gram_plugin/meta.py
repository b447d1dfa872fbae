"""Bi-level meta-learning of a prompt initialisation, optionally with GRAM's gradient regulator.

For each task t of a meta-batch (support S_t, query Q_t), starting from the shared prompt theta::

    theta'_0 = theta
    theta'_{j+1} = theta'_j - alpha * R_phi(grad L(theta'_j, S_t))        j = 0..k-1
    meta-loss = mean_t L(theta'_k, Q_t)

theta (outer lr lambda1) and phi (lambda2) take an Adam step on the meta-loss. ``first_order``
detaches the inner gradients (FOMAML) but keeps R_phi in the graph, so the regulator still learns.
With ``clip_gamma`` the meta-gradient is clipped to norm gamma before Adam (MAML + meta-gradient
clipping, Kim & Ok). Without a regulator this is plain MAML(+clip).

The inner loop is written with ``torch.autograd.grad`` on the prompt tensors, so any model works
whose loss can be written as ``loss_fn(params, batch)``; :func:`module_loss` builds one for an
``nn.Module`` with marked prompts via ``torch.func.functional_call``.

Distributed: under an initialised ``torch.distributed`` group every rank draws the same meta-batch
(same generator), computes its share of the tasks, and the meta-gradients are all-reduced, so the
result equals the single-process run up to float summation order.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .prompts import PromptInit, prompt_parameters, strip_wrapper_prefix
from .safeio import CheckpointError, load_tensors, save_tensors
from .regulator import GradientRegulator
from .scale import checkpointed_grad
from .tasks import Task, TaskSource
from .transforms import clip_meta, global_norm

LossFn = Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_KIND = "meta-checkpoint"


class MetaTrainingError(RuntimeError):
    """Meta-training cannot go on (non-finite gradients with on_nonfinite='raise', bad run folder, ...)."""


@dataclass
class MetaConfig:
    """Hyper-parameters of :class:`MetaPromptTrainer` (defaults follow the MAML+clipping paper where it gives one)."""

    inner_lr: float = 0.025 / 6  # alpha: inner-loop step size
    inner_steps: int = 4  # k: inner steps per task
    outer_lr: float = 1e-3  # lambda1: Adam lr of the prompt init theta
    regulator_lr: float = 1e-3  # lambda2: Adam lr of the regulator phi
    meta_batch_size: int = 4  # tasks per outer step
    steps: int = 200  # outer steps
    first_order: bool = False  # FOMAML: no second-order terms (the regulator still learns)
    clip_gamma: float | None = None  # meta-gradient clipping threshold (paper: 5.0); None = off
    seed: int = 0
    on_nonfinite: str = "raise"  # "raise": stop with the step number; "skip": drop the step and count it
    checkpoint_every: int = 0  # outer steps between checkpoints (0 = only at the end when run_dir is set)
    log_every: int = 1
    track_alignment: bool = False  # log cos(support grad, query grad) at theta, raw and regulated (GRAM Fig. 3b)
    # Memory: keep no inner-step graph; the meta-backward recomputes each step (see gram_plugin.scale).
    # Only acts in second order (first order keeps no inner graph anyway).
    checkpoint_inner: bool = False
    progress: bool = True

    def __post_init__(self):
        problems = []
        for name in ("inner_lr", "outer_lr", "regulator_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                problems.append(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("inner_steps", "meta_batch_size", "steps", "log_every"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                problems.append(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0):
            problems.append(f"checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")
        if self.clip_gamma is not None and not (math.isfinite(self.clip_gamma) and self.clip_gamma > 0):
            problems.append(f"clip_gamma must be > 0 or None, got {self.clip_gamma!r}")
        if self.on_nonfinite not in ("raise", "skip"):
            problems.append(f"on_nonfinite must be 'raise' or 'skip', got {self.on_nonfinite!r}")
        if problems:
            raise ValueError("invalid MetaConfig: " + "; ".join(problems))


def module_loss(module: nn.Module, loss_on_batch: Callable[[nn.Module, Any], torch.Tensor]) -> LossFn:
    """Turn ``loss_on_batch(module, batch)`` into ``loss_fn(params, batch)``.

    The module's marked prompt parameters are replaced by ``params`` for the duration of the call
    (``torch.func.functional_call``), so fast weights of the inner loop flow through the module's
    own forward code, whatever it is.
    """
    real_names = {strip_wrapper_prefix(n): n for n, _ in module.named_parameters()}

    class _Call(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, batch):
            return loss_on_batch(self.inner, batch)

    wrapper = _Call()

    def loss_fn(params: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        mapped = {"inner." + real_names[n]: t for n, t in params.items()}
        return torch.func.functional_call(wrapper, mapped, (batch,), strict=False, tie_weights=False)

    return loss_fn


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _cosine(a: Mapping[str, torch.Tensor | None], b: Mapping[str, torch.Tensor | None]) -> float:
    num, na, nb = 0.0, 0.0, 0.0
    for n, x in a.items():
        y = b.get(n)
        if x is None or y is None:
            continue
        x, y = x.detach().double(), y.detach().double()
        num += float((x * y).sum())
        na += float((x * x).sum())
        nb += float((y * y).sum())
    return num / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")


class MetaPromptTrainer:
    """Meta-learn a prompt initialisation theta (and a :class:`GradientRegulator` phi).

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` where ``params`` maps prompt names to tensors.
        params: the prompt tensors to meta-learn: an ``nn.Module`` with marked prompts (its
            parameters are updated in place) or a ``{name: tensor}`` mapping (copied to leaves).
        regulator: a ``GradientRegulator`` to learn jointly (GRAM), or ``None`` (MAML).
        config: :class:`MetaConfig`.
        run_dir: where checkpoints and logs go (CSV ``log.csv``; ``tensorboard=True`` for TB events).
        metadata: extra ``PromptInit`` metadata (backbone, n_ctx, ...).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: nn.Module | Mapping[str, torch.Tensor],
        regulator: GradientRegulator | None = None,
        config: MetaConfig | None = None,
        run_dir: str | os.PathLike | None = None,
        metadata: Mapping[str, Any] | None = None,
        tensorboard: bool = False,
    ):
        self.config = config or MetaConfig()
        self.loss_fn = loss_fn
        if isinstance(params, nn.Module):
            self.params: "OrderedDict[str, torch.Tensor]" = prompt_parameters(params)
        else:
            if not params:
                raise ValueError("MetaPromptTrainer needs at least one prompt tensor")
            self.params = OrderedDict(
                (n, nn.Parameter(t.detach().clone())) for n, t in params.items()
            )
        bad = [n for n, p in self.params.items() if not p.is_floating_point()]
        if bad:
            raise ValueError(f"prompt tensors must be floating point: {bad}")
        for p in self.params.values():
            p.requires_grad_(True)
        self.regulator = regulator
        if regulator is not None:
            unknown = [n for n in regulator.shapes if n not in self.params]
            if unknown:
                raise ValueError(f"regulator has heads for parameters that are not meta-learned: {unknown}")
        self.theta_opt = torch.optim.Adam(list(self.params.values()), lr=self.config.outer_lr)
        self.phi_opt = (
            torch.optim.Adam(regulator.parameters(), lr=self.config.regulator_lr) if regulator is not None else None
        )
        self._clip = clip_meta(self.config.clip_gamma) if self.config.clip_gamma else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.metadata = dict(metadata or {})
        self.tensorboard = tensorboard
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.step = 0
        self.skipped_steps: list[int] = []
        self.history: list[dict] = []

    # -- the inner loop ----------------------------------------------------------------------
    def _attention_context(self, create_graph: bool):
        # Fused attention kernels have no double backward; the math kernel does.
        if not create_graph:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)

    def adapt(
        self,
        params: Mapping[str, torch.Tensor],
        support: Any,
        steps: int | None = None,
        create_graph: bool | None = None,
        _first: dict | None = None,
    ) -> "OrderedDict[str, torch.Tensor]":
        """k regulated inner steps from ``params`` on ``support``; returns the fast weights.

        ``create_graph`` defaults to ``not first_order``. With a regulator the result is always
        differentiable in phi.
        """
        cfg = self.config
        steps = cfg.inner_steps if steps is None else steps
        create_graph = (not cfg.first_order) if create_graph is None else create_graph
        fast = OrderedDict(params)
        for j in range(steps):
            if create_graph and cfg.checkpoint_inner:
                loss, grads = checkpointed_grad(self.loss_fn, fast, support)
                grads = OrderedDict((n, grads[n]) for n in fast)
            else:
                loss = self.loss_fn(fast, support)
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph, allow_unused=True)
                grads = OrderedDict(zip(fast.keys(), grads))
            bad = [n for n, g in grads.items() if g is not None and not torch.isfinite(g).all()]
            if bad or not torch.isfinite(loss):
                raise _NonFinite(f"inner step {j}: non-finite support loss/gradient in {bad or 'loss'}")
            if _first is not None and j == 0:
                _first["loss"] = loss.detach()
                _first["grads"] = {n: (None if g is None else g.detach()) for n, g in grads.items()}
            if self.regulator is not None:
                grads = self.regulator.regulate(grads)
                if _first is not None and j == 0:
                    _first["regulated"] = {n: (None if g is None else g.detach()) for n, g in grads.items()}
            fast = OrderedDict(
                (n, p if grads[n] is None else p - cfg.inner_lr * grads[n]) for n, p in fast.items()
            )
        return fast

    def task_losses(self, task: Task) -> dict:
        """Forward one task: adapted query loss (in the graph) and diagnostics."""
        cfg = self.config
        first: dict = {}
        with self._attention_context(not cfg.first_order):
            fast = self.adapt(self.params, task.support, _first=first)
        # The query loss is differentiated once only, so it may use the fused attention kernels.
        query_loss = self.loss_fn(fast, task.query)
        out = {"query_loss": query_loss, "support_loss": first.get("loss")}
        if cfg.track_alignment:
            q = self.loss_fn(self.params, task.query)
            gq = torch.autograd.grad(q, list(self.params.values()), allow_unused=True)
            gq = dict(zip(self.params.keys(), gq))
            out["align_raw"] = _cosine(first["grads"], gq)
            if "regulated" in first:
                out["align_regulated"] = _cosine(first["regulated"], gq)
        return out

    # -- the outer loop ----------------------------------------------------------------------
    def _meta_parameters(self) -> list[torch.Tensor]:
        ps = list(self.params.values())
        if self.regulator is not None:
            ps += list(self.regulator.parameters())
        return ps

    def outer_step(self, tasks: list[Task]) -> dict:
        """One meta-update from a meta-batch of tasks (this rank's share under torch.distributed)."""
        cfg = self.config
        rank, world = _dist_info()
        self.theta_opt.zero_grad(set_to_none=True)
        if self.phi_opt is not None:
            self.phi_opt.zero_grad(set_to_none=True)
        n = len(tasks)
        sums = {"meta_loss": 0.0, "support_loss": 0.0, "align_raw": 0.0, "align_regulated": 0.0, "nonfinite": 0.0}
        nonfinite = None
        for i in range(rank, n, world):
            try:
                out = self.task_losses(tasks[i])
            except _NonFinite as e:
                nonfinite = f"task {i}: {e}"
                sums["nonfinite"] = 1.0
                break
            # backward per task: the graph of one task is freed before the next is built
            (out["query_loss"] / n).backward()
            sums["meta_loss"] += float(out["query_loss"].detach())
            sums["support_loss"] += float(out["support_loss"]) if out["support_loss"] is not None else 0.0
            for k in ("align_raw", "align_regulated"):
                if k in out:
                    sums[k] += out[k]
        if world > 1:
            self._all_reduce(sums)  # every rank learns if any rank saw a non-finite value
            if sums["nonfinite"] and nonfinite is None:
                nonfinite = "non-finite inner gradient on another rank"
        grads_theta = {name: p.grad for name, p in self.params.items()}
        if nonfinite is None:
            bad = [k for k, g in grads_theta.items() if g is not None and not torch.isfinite(g).all()]
            if self.regulator is not None:
                bad += [f"regulator.{k}" for k, p in self.regulator.named_parameters()
                        if p.grad is not None and not torch.isfinite(p.grad).all()]
            if bad or not math.isfinite(sums["meta_loss"]):
                nonfinite = f"non-finite meta-gradient in {bad or 'meta-loss'}"
        record = {
            "step": self.step + 1,
            "meta_loss": sums["meta_loss"] / n,
            "support_loss": sums["support_loss"] / n,
            "grad_norm_theta": float(global_norm(grads_theta)),
            "skipped": 0,
        }
        if self.regulator is not None:
            record["grad_norm_phi"] = float(global_norm({k: p.grad for k, p in self.regulator.named_parameters()}))
        if cfg.track_alignment:
            record["align_raw"] = sums["align_raw"] / n
            if self.regulator is not None:
                record["align_regulated"] = sums["align_regulated"] / n
        if nonfinite is not None:
            msg = f"outer step {self.step + 1}: {nonfinite}"
            if cfg.on_nonfinite == "raise":
                raise MetaTrainingError(msg + " (set on_nonfinite='skip' to drop such steps)")
            self.skipped_steps.append(self.step + 1)
            record["skipped"] = 1
            self.theta_opt.zero_grad(set_to_none=True)
            if self.phi_opt is not None:
                self.phi_opt.zero_grad(set_to_none=True)
            self.step += 1
            return record
        if self._clip is not None:
            self._clip_in_place(self.params)
            if self.regulator is not None:
                self._clip_in_place(OrderedDict(self.regulator.named_parameters()))
        self.theta_opt.step()
        if self.phi_opt is not None:
            self.phi_opt.step()
        self.step += 1
        return record

    def _clip_in_place(self, named: Mapping[str, torch.Tensor]) -> None:
        clipped = self._clip({k: p.grad for k, p in named.items()})
        for k, p in named.items():
            if p.grad is not None:
                p.grad.copy_(clipped[k])

    def _all_reduce(self, sums: dict) -> None:
        import torch.distributed as dist

        for p in self._meta_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        keys = sorted(sums)
        # on the prompts' device: an NCCL-only process group cannot all-reduce CPU tensors
        device = next(iter(self.params.values())).device
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        for k, v in zip(keys, t.tolist()):
            sums[k] = v

    def sample_meta_batch(self, source: TaskSource) -> list[Task]:
        return [source.sample(self.generator) for _ in range(self.config.meta_batch_size)]

    def fit(
        self,
        source: TaskSource,
        steps: int | None = None,
        resume: bool | str | os.PathLike = False,
        callback: Callable[[dict], None] | None = None,
    ) -> PromptInit:
        """Meta-train for ``steps`` outer steps (default ``config.steps``) and return the init.

        ``resume=True`` continues from ``run_dir/checkpoint.safetensors`` if it exists (a path may
        be given instead); the run then ends exactly where an uninterrupted run would.
        """
        cfg = self.config
        total = cfg.steps if steps is None else steps
        if not isinstance(source, TaskSource):
            raise TypeError(f"task source {type(source).__name__} has no sample(generator) method")
        rank, _ = _dist_info()
        if self.run_dir is not None and rank == 0:
            self._check_run_dir()
        if resume:
            path = Path(resume) if not isinstance(resume, bool) else (self.run_dir / CHECKPOINT_NAME if self.run_dir else None)
            if path is None:
                raise ValueError("resume=True needs run_dir (or pass the checkpoint path)")
            if path.exists():
                self.load_checkpoint(path)
            elif not isinstance(resume, bool):
                raise FileNotFoundError(f"checkpoint {path} does not exist")
        logger = _RunLogger(self.run_dir, self.tensorboard, resume_step=self.step) if (self.run_dir and rank == 0) else None
        bar = None
        if cfg.progress and rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc="meta-train", unit="step", dynamic_ncols=True)
        try:
            while self.step < total:
                t0 = time.perf_counter()
                record = self.outer_step(self.sample_meta_batch(source))
                record["seconds"] = time.perf_counter() - t0
                self.history.append(record)
                if logger is not None and (self.step % cfg.log_every == 0 or self.step == total):
                    logger.write(record)
                if callback is not None:
                    callback(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(meta_loss=f"{record['meta_loss']:.4f}")
                if self.run_dir is not None and rank == 0 and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()
        if self.run_dir is not None and rank == 0:
            self.save_checkpoint()
        return self.export(source)

    # -- results -----------------------------------------------------------------------------
    def export(self, source: Any = None) -> PromptInit:
        cfg = self.config
        method = "gram" if self.regulator is not None else ("maml-clip" if cfg.clip_gamma else "maml")
        meta = {
            "method": method,
            "meta_config": asdict(cfg),
            "meta_steps": self.step,
            "skipped_steps": list(self.skipped_steps),
            **self.metadata,
        }
        describe = getattr(source, "describe", None)
        if callable(describe):
            meta.setdefault("source_tasks", describe())
        init = PromptInit(OrderedDict((n, p.detach().clone()) for n, p in self.params.items()), meta)
        if self.regulator is not None:
            init.regulator_state = {k: v.detach().clone() for k, v in self.regulator.state_dict().items()}
            init.metadata["regulator_config"] = self.regulator.to_config()
        return init

    @torch.no_grad()
    def evaluate(self, tasks: list[Task], steps: int | None = None) -> dict:
        """Mean query loss before and after adaptation (no meta-update)."""
        pre, post = [], []
        for task in tasks:
            pre.append(float(self.loss_fn(self.params, task.query)))
            with torch.enable_grad():
                fast = self.adapt(self.params, task.support, steps=steps, create_graph=False)
            post.append(float(self.loss_fn({n: t.detach() for n, t in fast.items()}, task.query)))
        return {"query_loss_before": sum(pre) / len(pre), "query_loss_after": sum(post) / len(post)}

    # -- checkpoints -------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-probe"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            raise MetaTrainingError(f"run folder {self.run_dir} is not writable: {e}") from None
        need = 4 * sum(p.numel() * 4 for p in self._meta_parameters()) + (1 << 20)
        free = shutil.disk_usage(self.run_dir).free
        if free < need:
            raise MetaTrainingError(f"run folder {self.run_dir}: {free} bytes free, checkpoints need about {need}")

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {}
        for n, p in self.params.items():
            tensors[f"theta/{n}"] = p.detach()
        if self.regulator is not None:
            for k, v in self.regulator.state_dict().items():
                tensors[f"phi/{k}"] = v
        meta: dict = {"step": self.step, "skipped_steps": self.skipped_steps, "config": asdict(self.config)}
        for tag, opt in (("opt_theta", self.theta_opt), ("opt_phi", self.phi_opt)):
            if opt is None:
                continue
            sd = opt.state_dict()
            meta[tag] = {"param_groups": sd["param_groups"], "state_keys": {}}
            for idx, st in sd["state"].items():
                meta[tag]["state_keys"][str(idx)] = sorted(st)
                for key, val in st.items():
                    tensors[f"{tag}/{idx}/{key}"] = torch.as_tensor(val)
        tensors["rng/generator"] = self.generator.get_state()
        return tensors, meta

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Atomic (temp file + rename): an interrupted write never replaces a good checkpoint."""
        path = Path(path) if path is not None else self.run_dir / CHECKPOINT_NAME
        tensors, meta = self.state_tensors()
        save_tensors(path, tensors, meta, kind=CHECKPOINT_KIND)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        tensors, meta = load_tensors(path, what="meta-training checkpoint", error=CheckpointError, kind=CHECKPOINT_KIND)
        if meta.get("kind") != CHECKPOINT_KIND:
            raise CheckpointError(f"{path} is not a gram-plugin meta-training checkpoint")
        names = {k[len("theta/"):] for k in tensors if k.startswith("theta/")}
        if names != set(self.params):
            raise MetaTrainingError(f"checkpoint {path} holds prompts {sorted(names)}, trainer has {sorted(self.params)}")
        with torch.no_grad():
            for n, p in self.params.items():
                if tensors[f"theta/{n}"].shape != p.shape:
                    raise MetaTrainingError(f"checkpoint {path}: shape of {n} differs")
                p.copy_(tensors[f"theta/{n}"])
        if self.regulator is not None:
            phi = {k[len("phi/"):]: v for k, v in tensors.items() if k.startswith("phi/")}
            if not phi:
                raise MetaTrainingError(f"checkpoint {path} has no regulator state")
            self.regulator.load_state_dict(phi)
        for tag, opt in (("opt_theta", self.theta_opt), ("opt_phi", self.phi_opt)):
            if opt is None or tag not in meta:
                continue
            state = {}
            for idx, keys in meta[tag]["state_keys"].items():
                state[int(idx)] = {k: tensors[f"{tag}/{idx}/{k}"] for k in keys}
            opt.load_state_dict({"state": state, "param_groups": meta[tag]["param_groups"]})
        self.generator.set_state(tensors["rng/generator"])
        self.step = int(meta["step"])
        self.skipped_steps = list(meta.get("skipped_steps", []))


class _NonFinite(Exception):
    pass


class _RunLogger:
    """CSV log (``log.csv``, rows after a resumed step dropped) and optional TensorBoard events."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0):
        self.path = run_dir / "log.csv"
        rows = []
        if self.path.exists() and resume_step > 0:
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.fields: list[str] | None = list(rows[0].keys()) if rows else None
        self.file = open(self.path, "w", newline="")
        self.writer = None
        if self.fields:
            self.writer = csv.DictWriter(self.file, fieldnames=self.fields, extrasaction="ignore")
            self.writer.writeheader()
            self.writer.writerows(rows)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if self.writer is None:
            self.fields = list(record.keys())
            self.writer = csv.DictWriter(self.file, fieldnames=self.fields, extrasaction="ignore")
            self.writer.writeheader()
        self.writer.writerow(record)
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"meta/{k}", v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
