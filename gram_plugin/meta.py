"""The meta-training run loop: :class:`MetaPromptTrainer` drives :class:`~gram_plugin.metastep.MetaStep`.

The algorithm (inner adaptation, outer gradient) lives in :mod:`gram_plugin.metastep`; this module
owns everything around it: the outer optimisers (Adam on theta with lr lambda1, on phi with
lambda2), meta-gradient clipping (``clip_gamma``: MAML + meta-gradient clipping, Kim & Ok), what
happens on a non-finite step, the distributed all-reduce, progress, logs, checkpoints and resume.

Distributed: under an initialised ``torch.distributed`` group every rank draws the same meta-batch
(same generator), computes its share of the tasks, and the meta-gradients are all-reduced, so the
result equals the single-process run up to float summation order.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .errors import GramPluginError
from .interrupts import StopRequest, stop_after_step
from .config import MetaConfig  # defined torch-free (the CLI checks it before importing torch); exported here
from .metabatch import BatchedMetaStep, supports_batching
from .metastep import LossFn, MetaStep, StepStats, module_loss, nonfinite_names
from .prompts import PromptInit, prompt_parameters
from .regulator import GradientRegulator
from .safeio import CheckpointError, keep_previous, load_tensors, locked_dir, save_tensors
from .tasks import Task, TaskSource
from .transforms import clip_meta, global_norm

__all__ = ["MetaConfig", "MetaPromptTrainer", "MetaTrainingError", "MetaTrainingInterrupted", "module_loss", "LossFn",
           "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.safetensors"
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.safetensors"  # the one before, kept as a fallback
CHECKPOINT_KIND = "meta-checkpoint"


# options that change what a resumed run computes (steps, logging and the memory / speed switches do not)
_RESUME_MUST_MATCH = ("inner_lr", "inner_steps", "outer_lr", "regulator_lr", "meta_batch_size", "first_order",
                      "clip_gamma")


def _batch_size(batch: Any) -> int | None:
    """How many examples a batch holds, where its form says so (``{"labels": ...}``, a tensor, a tuple of
    tensors); ``None`` for a form the run loop cannot read (the loss function's business)."""
    if isinstance(batch, Mapping):
        first = batch.get("labels", next(iter(batch.values()), None))
    elif isinstance(batch, (tuple, list)):
        first = batch[0] if batch else None
    else:
        first = batch
    if torch.is_tensor(first):
        return int(first.shape[0]) if first.dim() else None
    return len(first) if isinstance(first, (list, tuple)) else None


class MetaTrainingError(GramPluginError, RuntimeError):
    """Meta-training cannot go on (non-finite gradients with on_nonfinite='raise', bad run folder, ...)."""


class MetaTrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped meta-training after the outer step in progress; where the run has a
    ``run_dir`` a checkpoint of that step was saved first, so ``fit(resume=True)`` continues exactly."""


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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

    ``self.meta_step`` is the algorithm (:class:`~gram_plugin.metastep.MetaStep`); this class is
    the loop around it.
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
        self.config = cfg = config or MetaConfig()
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
        batched = cfg.batch_tasks and supports_batching(loss_fn)
        step_cls = BatchedMetaStep if batched else MetaStep
        # a loss without a batched form runs task by task anyway: one backward per task then holds one
        # task's graph at a time (not the meta-batch's) and lets the progress bar move with each task
        self.meta_step = step_cls(loss_fn, regulator, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps,
                                  first_order=cfg.first_order, checkpoint_inner=cfg.checkpoint_inner,
                                  track_alignment=cfg.track_alignment,
                                  tasks_per_backward=cfg.meta_batch_size if batched else 1)
        self.theta_opt = torch.optim.Adam(list(self.params.values()), lr=cfg.outer_lr)
        self.phi_opt = torch.optim.Adam(regulator.parameters(), lr=cfg.regulator_lr) if regulator is not None else None
        self._clip = clip_meta(cfg.clip_gamma) if cfg.clip_gamma else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.metadata = dict(metadata or {})
        self.tensorboard = tensorboard
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.skipped_steps: list[int] = []
        self.history: list[dict] = []
        self._last_tasks: list[Task] = []  # the last meta-batch: the final update is checked on it
        self._interrupt = StopRequest()  # Ctrl-C during fit: stop after the step in progress

    # -- the algorithm, through the meta-step --------------------------------------------------
    def adapt(self, params: Mapping[str, torch.Tensor], support: Any, steps: int | None = None,
              create_graph: bool | None = None) -> "OrderedDict[str, torch.Tensor]":
        """k regulated inner steps from ``params`` on ``support``; returns the fast weights."""
        adapted = self.meta_step.adapt(params, support, steps=steps, create_graph=create_graph)
        if adapted.nonfinite is not None:
            raise MetaTrainingError(adapted.nonfinite)
        return adapted.fast

    def task_losses(self, task: Task) -> dict:
        """Forward one task: adapted query loss (in the graph) and diagnostics."""
        out = self.meta_step.task_loss(self.params, task)
        if out.nonfinite is not None:
            raise MetaTrainingError(out.nonfinite)
        d = {"query_loss": out.query_loss, "support_loss": out.support_loss}
        d.update({k: v for k, v in (("align_raw", out.align_raw), ("align_regulated", out.align_regulated)) if v is not None})
        return d

    @torch.no_grad()
    def evaluate(self, tasks: list[Task], steps: int | None = None) -> dict:
        """Mean query loss before and after adaptation (no meta-update)."""
        return self.meta_step.evaluate(self.params, tasks, steps=steps)

    # -- one outer step ----------------------------------------------------------------------
    def _zero_grad(self) -> None:
        self.theta_opt.zero_grad(set_to_none=True)
        if self.phi_opt is not None:
            self.phi_opt.zero_grad(set_to_none=True)

    def _phi_grads(self) -> dict:
        return {k: p.grad for k, p in self.regulator.named_parameters()} if self.regulator is not None else {}

    def outer_step(self, tasks: list[Task], on_tasks_done: Callable[[int], None] | None = None) -> dict:
        """One meta-update from a meta-batch of tasks (this rank's share under torch.distributed);
        ``on_tasks_done(k)`` is told as this rank's tasks are done (the progress bar)."""
        cfg = self.config
        rank, world = _dist_info()
        self._zero_grad()
        n = len(tasks)
        stats = self.meta_step.accumulate_gradients(self.params, tasks[rank::world], scale=1.0 / n,
                                                    on_tasks_done=on_tasks_done)
        nonfinite = stats.nonfinite
        if world > 1:
            stats = self._all_reduce(stats)  # every rank learns if any rank saw a non-finite value
            if stats.nonfinite and nonfinite is None:
                nonfinite = "non-finite inner gradient on another rank"
        grads_theta = {name: p.grad for name, p in self.params.items()}
        if nonfinite is None:
            bad = nonfinite_names(grads_theta) + [f"regulator.{k}" for k in nonfinite_names(self._phi_grads())]
            if bad or not math.isfinite(stats.meta_loss):
                nonfinite = f"non-finite meta-gradient in {bad or 'meta-loss'}"
        step = self.step + 1
        record = {
            "step": step,
            "meta_loss": stats.meta_loss / n,
            "support_loss": stats.support_loss / n,
            "grad_norm_theta": float(global_norm(grads_theta)),
            "skipped": 0,
        }
        if self.regulator is not None:
            record["grad_norm_phi"] = float(global_norm(self._phi_grads()))
        if cfg.track_alignment:
            record["align_raw"] = stats.align_raw / n
            if self.regulator is not None:
                record["align_regulated"] = stats.align_regulated / n
        if nonfinite is not None:
            if cfg.on_nonfinite == "raise":
                raise MetaTrainingError(f"outer step {step}: {nonfinite} (set on_nonfinite='skip' to drop such steps)")
            self._zero_grad()
            self.skipped_steps.append(step)
            self.step = step
            record.update(skipped=1, meta_loss=float("nan"), support_loss=float("nan"))
            return record
        if self._clip is not None:
            self._clip_in_place(self.params)
            if self.regulator is not None:
                self._clip_in_place(OrderedDict(self.regulator.named_parameters()))
        self.theta_opt.step()
        if self.phi_opt is not None:
            self.phi_opt.step()
        # a finite gradient can still step to Inf (a huge outer lr, float16 prompts): never go on from there,
        # whatever on_nonfinite says (the optimisers have moved; there is no step to skip)
        broken = self._nonfinite_state()
        if broken:
            raise MetaTrainingError(f"outer step {step}: the update made {broken} non-finite; lower outer_lr / "
                                    "regulator_lr (or use float32 prompts): nothing from this step was saved")
        self.step = step
        return record

    def _nonfinite_state(self) -> list[str]:
        """Prompt tensors (and ``regulator.<key>``) holding a NaN or an infinity."""
        reg = {f"regulator.{k}": v for k, v in self.regulator.state_dict().items()} if self.regulator is not None else {}
        return nonfinite_names(self.params) + nonfinite_names(reg)

    def _clip_in_place(self, named: Mapping[str, torch.Tensor]) -> None:
        clipped = self._clip({k: p.grad for k, p in named.items()})
        for k, p in named.items():
            if p.grad is not None:
                p.grad.copy_(clipped[k])

    def _all_reduce(self, stats: StepStats) -> StepStats:
        import torch.distributed as dist

        for p in self.meta_step.meta_parameters(self.params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        keys = ("meta_loss", "support_loss", "align_raw", "align_regulated")
        # on the prompts' device: an NCCL-only process group cannot all-reduce CPU tensors
        device = next(iter(self.params.values())).device
        t = torch.tensor([getattr(stats, k) for k in keys] + [float(stats.nonfinite is not None)],
                         dtype=torch.float64, device=device)
        dist.all_reduce(t)
        values = t.tolist()
        reduced = StepStats(**dict(zip(keys, values[:-1])), tasks=stats.tasks)
        reduced.nonfinite = stats.nonfinite or ("on another rank" if values[-1] else None)
        return reduced

    # -- the loop ----------------------------------------------------------------------------
    def sample_meta_batch(self, source: TaskSource) -> list[Task]:
        """``meta_batch_size`` tasks from ``source``; a task with an empty support or query set is an error
        (its loss would be NaN, and the step blamed on a non-finite loss)."""
        tasks = [source.sample(self.generator) for _ in range(self.config.meta_batch_size)]
        for i, task in enumerate(tasks):
            for part in ("support", "query"):
                if _batch_size(getattr(task, part)) == 0:
                    raise MetaTrainingError(
                        f"outer step {self.step + 1}: task {i} of the meta-batch has an empty {part} set "
                        f"(task source {type(source).__name__}: {task.info or 'no task info'})")
        self._last_tasks = tasks
        return tasks

    def fit(
        self,
        source: TaskSource,
        steps: int | None = None,
        resume: bool | str | os.PathLike = False,
        callback: Callable[[dict], None] | None = None,
    ) -> PromptInit:
        """Meta-train for ``steps`` outer steps (default ``config.steps``) and return the init.

        ``resume=True`` continues from ``run_dir/checkpoint.safetensors`` if it exists (falling back
        to the previous checkpoint if that one is damaged; a path may be given instead); the run
        then ends exactly where an uninterrupted run would. While it runs, ``run_dir`` is locked:
        a second run on the same folder fails at once.
        """
        total = self.config.steps if steps is None else steps
        if not isinstance(source, TaskSource):
            raise TypeError(f"task source {type(source).__name__} has no sample(generator) method")
        rank, _ = _dist_info()
        writes = self.run_dir is not None and rank == 0
        if writes:
            self._check_run_dir()
        with locked_dir(self.run_dir) if writes else contextlib.nullcontext():
            if resume:
                self._resume(resume, total)
            bad = nonfinite_names(self.params)
            if bad:
                raise MetaTrainingError(f"the prompt init holds non-finite values (NaN or Inf) in {bad}: "
                                        "meta-training cannot start from it")
            # a distributed run's ranks could stop at different steps: Ctrl-C stops them at once
            with stop_after_step(enabled=_dist_info()[1] == 1) as self._interrupt:
                self._loop(source, total, rank, callback)
            if self.skipped_steps and len(self.skipped_steps) >= self.step:
                raise MetaTrainingError(
                    f"all {self.step} outer steps were non-finite and skipped: nothing was learned "
                    "(check the init and the learning rates); no init exported")
            self._check_last_update()
            if writes:
                self.save_checkpoint()
        return self.export(source)

    def _loop(self, source: TaskSource, total: int, rank: int, callback) -> None:
        cfg = self.config
        logger = _RunLogger(self.run_dir, self.tensorboard, resume_step=self.step) if (self.run_dir and rank == 0) else None
        if logger is not None and self.step and not self.history:
            self.history = logger.previous_records()  # a resumed run's history is the whole run's, not this call's
        bar = None
        if cfg.progress and rank == 0:
            from tqdm.auto import tqdm

            # advances by each task's share of a step, so the rate and the time left show after the
            # first task instead of after a whole (possibly minutes-long) outer step
            bar = tqdm(total=total, initial=self.step, desc="meta-train", unit="step", dynamic_ncols=True,
                       bar_format="{l_bar}{bar}| {n:.2f}/{total} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        try:
            while self.step < total:
                t0 = time.perf_counter()
                tasks = self.sample_meta_batch(source)
                mine = max(1, len(tasks[rank::_dist_info()[1]]))
                record = self.outer_step(tasks, on_tasks_done=None if bar is None else (lambda k: bar.update(k / mine)))
                record["seconds"] = time.perf_counter() - t0
                self.history.append(record)
                if logger is not None and (self.step % cfg.log_every == 0 or self.step == total):
                    logger.write(record)
                if callback is not None:
                    callback(record)
                if bar is not None:
                    bar.n = self.step  # whole steps again (no float drift; a skipped step counts too)
                    bar.set_postfix(meta_loss=f"{record['meta_loss']:.4f}")
                if self.run_dir is not None and rank == 0 and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self._interrupt.requested:
                    self._stop(rank)
        finally:
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()

    def _stop(self, rank: int) -> None:
        where = "nothing was saved (no run_dir)"
        if self.run_dir is not None and rank == 0:
            if self._nonfinite_state():
                where = "no checkpoint saved (the prompts are not finite)"
            else:
                where = f"checkpoint {self.save_checkpoint()} saved; resume continues from it exactly"
        raise MetaTrainingInterrupted(f"meta-training interrupted after outer step {self.step}: {where}")

    @torch.no_grad()
    def _check_last_update(self) -> None:
        """The last update is checked as the next step would check it: the loss at the learned prompts.

        Each step checks the gradient at the prompts it starts from, so without this the last update
        (``--outer-lr 1e30 --meta-steps 1``) would be exported unchecked. One forward on the support
        set of the last meta-batch's first task; the task generator is not touched. Raises
        ``MetaTrainingError`` when that loss is not finite.
        """
        tasks = self._last_tasks
        if not tasks:  # nothing ran in this call (a finished run resumed): its checkpoint was checked
            return
        if self.skipped_steps and self.skipped_steps[-1] == self.step:
            return  # on_nonfinite='skip' dropped the last step: no update to check, and its tasks are the bad ones
        loss = self.loss_fn(self.params, tasks[0].support)
        value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        if not math.isfinite(value):
            raise MetaTrainingError(
                f"outer step {self.step}: the update made the prompts unusable: the loss at them is {value} "
                "(they hold finite but huge values?); lower outer_lr / regulator_lr: no init exported")

    def _resume(self, resume: bool | str | os.PathLike, total: int) -> None:
        if not isinstance(resume, bool):
            path = Path(resume)
            if not path.exists():
                raise FileNotFoundError(f"checkpoint {path} does not exist")
            candidates = [path]
        elif self.run_dir is None:
            raise ValueError("resume=True needs run_dir (or pass the checkpoint path)")
        else:
            candidates = [p for p in (self.run_dir / CHECKPOINT_NAME, self.run_dir / PREVIOUS_CHECKPOINT_NAME) if p.exists()]
        failures = []
        for path in candidates:
            try:
                self.load_checkpoint(path, total=total, check_options=True)
            except CheckpointError as e:
                failures.append(str(e))
                continue
            if failures:
                warnings.warn(f"{failures[0]}; resumed from the previous checkpoint {path} (step {self.step})")
            return
        if failures:
            raise CheckpointError("no usable checkpoint to resume from: " + " | ".join(failures))

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

    # -- checkpoints -------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-probe"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            raise MetaTrainingError(f"run folder {self.run_dir} is not writable: {e}") from None
        need = 4 * sum(p.numel() * 4 for p in self.meta_step.meta_parameters(self.params)) + (1 << 20)
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
        """Atomic (temp file + rename); the checkpoint it replaces stays as ``checkpoint.prev.safetensors``."""
        path = Path(path) if path is not None else self.run_dir / CHECKPOINT_NAME
        broken = self._nonfinite_state()
        if broken:
            raise MetaTrainingError(f"the prompts hold non-finite values (NaN or Inf) in {broken}: no checkpoint "
                                    f"written to {path}")
        if path.exists() and path.name == CHECKPOINT_NAME:
            keep_previous(path, path.with_name(PREVIOUS_CHECKPOINT_NAME))
        tensors, meta = self.state_tensors()
        return save_tensors(path, tensors, meta, kind=CHECKPOINT_KIND)

    def load_checkpoint(self, path: str | os.PathLike, total: int | None = None, check_options: bool = False) -> None:
        """Restore theta, phi, both Adam states, the task generator and the step counter.

        Everything is checked before anything is changed (checksums of the tensors and of the metadata,
        names, shapes, finite values); every problem is named in one ``CheckpointError``. With
        ``total``, a step beyond it is an error too; with ``check_options`` (as ``fit(resume=...)``
        does), so are options that would change the result (``inner_lr``, ``outer_lr``, ...) and an
        optimiser lr other than this trainer's.
        """
        tensors, meta = load_tensors(path, what="meta-training checkpoint", error=CheckpointError, kind=CHECKPOINT_KIND)
        problems = self._checkpoint_problems(tensors, meta, total)
        if check_options:
            problems += self._option_problems(meta)
        if problems:
            raise CheckpointError(f"checkpoint {path} is incomplete or invalid: " + "; ".join(problems))
        opt_states = {}
        for tag, opt in (("opt_theta", self.theta_opt), ("opt_phi", self.phi_opt)):
            if opt is not None:
                state = {int(idx): {k: tensors[f"{tag}/{idx}/{k}"] for k in keys}
                         for idx, keys in meta[tag]["state_keys"].items()}
                opt_states[tag] = (opt, {"state": state, "param_groups": meta[tag]["param_groups"]})
        try:  # optimiser states first: they are the last thing that can still refuse
            backup = {tag: opt.state_dict() for tag, (opt, _) in opt_states.items()}
            for tag, (opt, sd) in opt_states.items():
                opt.load_state_dict(sd)
        except (ValueError, KeyError, TypeError) as e:
            for tag, (opt, _) in opt_states.items():
                opt.load_state_dict(backup[tag])
            raise CheckpointError(f"checkpoint {path}: optimiser state does not fit this trainer: {e}") from None
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"theta/{n}"])
        if self.regulator is not None:
            self.regulator.load_state_dict({k[len("phi/"):]: v for k, v in tensors.items() if k.startswith("phi/")})
        self.generator.set_state(tensors["rng/generator"])
        self.step = meta["step"]
        self.skipped_steps = list(meta.get("skipped_steps", []))

    def _checkpoint_problems(self, tensors: dict, meta: dict, total: int | None) -> list[str]:
        problems = []
        step = meta.get("step")
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            problems.append(f"'step' must be a whole number >= 0, got {step!r}")
        elif total is not None and step > total:
            problems.append(f"it is at step {step}, beyond this run's {total} steps")
        skipped = meta.get("skipped_steps", [])
        if not (isinstance(skipped, list) and all(isinstance(s, int) for s in skipped)):
            problems.append(f"'skipped_steps' must be a list of step numbers, got {skipped!r}")
        names = {k[len("theta/"):] for k in tensors if k.startswith("theta/")}
        if names != set(self.params):
            problems.append(f"it holds prompts {sorted(names)}, the trainer has {sorted(self.params)}")
        else:
            problems += [f"shape of {n}: {tuple(tensors[f'theta/{n}'].shape)} vs {tuple(p.shape)}"
                         for n, p in self.params.items() if tensors[f"theta/{n}"].shape != p.shape]
        if self.regulator is not None:
            phi = {k[len("phi/"):]: v for k, v in tensors.items() if k.startswith("phi/")}
            want = self.regulator.state_dict()
            if not phi:
                problems.append("it has no regulator state (phi/...)")
            elif set(phi) != set(want) or any(phi[k].shape != want[k].shape for k in want):
                problems.append("its regulator state does not match this trainer's regulator (other heads or shapes)")
        for tag, opt in (("opt_theta", self.theta_opt), ("opt_phi", self.phi_opt)):
            if opt is None:
                continue
            saved = meta.get(tag)
            if not (isinstance(saved, dict) and isinstance(saved.get("state_keys"), dict) and "param_groups" in saved):
                problems.append(f"it has no optimiser state {tag!r}")
                continue
            missing = [f"{tag}/{idx}/{k}" for idx, keys in saved["state_keys"].items() for k in keys
                       if f"{tag}/{idx}/{k}" not in tensors]
            if missing:
                problems.append(f"optimiser tensors missing: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if "rng/generator" not in tensors:
            problems.append("its task-sampler RNG state (rng/generator) is missing")
        broken = nonfinite_names({k: v for k, v in tensors.items() if v.is_floating_point()})
        if broken:
            problems.append(f"it holds non-finite values (NaN or Inf) in {broken[:5]}{' ...' if len(broken) > 5 else ''}")
        return problems

    def _option_problems(self, meta: dict) -> list[str]:
        """Options the checkpoint was written with that would change the result if resumed under others."""
        problems = []
        saved = meta.get("config")
        if not isinstance(saved, dict):
            return ["its options ('config') are missing"]
        mine = asdict(self.config)
        for key in _RESUME_MUST_MATCH:
            if key in saved and saved[key] != mine[key]:
                problems.append(f"it was written with {key} {saved[key]!r} where this trainer has {mine[key]!r}")
        for tag, opt, lr in (("opt_theta", self.theta_opt, self.config.outer_lr),
                             ("opt_phi", self.phi_opt, self.config.regulator_lr)):
            groups = meta.get(tag, {}).get("param_groups") if isinstance(meta.get(tag), dict) else None
            if opt is None or not isinstance(groups, list):
                continue
            lrs = sorted({g.get("lr") for g in groups if isinstance(g, dict)}, key=repr)
            if lrs != [lr]:
                problems.append(f"its optimiser {tag!r} lr {lrs[0] if len(lrs) == 1 else lrs!r} differs from "
                                f"this trainer's {lr!r}")
        return problems


class _RunLogger:
    """CSV log (``log.csv``, rows after a resumed step dropped) and optional TensorBoard events."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0):
        self.path = run_dir / "log.csv"
        rows = []
        if self.path.exists() and resume_step > 0:
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.previous = rows
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

    def previous_records(self) -> list[dict]:
        """The rows kept from before a resume, as the records ``outer_step`` returned (numbers, not text)."""
        out = []
        for row in self.previous:
            rec = {}
            for k, v in row.items():
                if v in (None, ""):
                    continue
                rec[k] = int(v) if k in ("step", "skipped") else float(v)
            out.append(rec)
        return out

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
