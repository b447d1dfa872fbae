"""Opt-in fixes for Dassl (KaiyangZhou/Dassl.pytorch, 2022) on modern torch (>= 2.6).

Two breakages users hit today, both fixed by one call before ``build_trainer(cfg)``::

    from gram_plugin.adapters.compat import patch_dassl
    patch_dassl()

1. Warm-up schedulers: ``_BaseWarmupScheduler.__init__`` passes ``verbose`` positionally to
   ``LRScheduler.__init__(optimizer, last_epoch)``, which no longer takes it ->
   ``TypeError: LRScheduler.__init__() takes from 2 to 3 positional arguments but 4 were given``
   for every config with ``OPTIM.WARMUP_EPOCH > 0`` (all CoOp/CoCoOp configs).
2. Checkpoints: the warm-up scheduler's ``state_dict()`` holds its successor scheduler *object*, so
   the checkpoint is a pickle of live objects; ``torch.load`` (``weights_only=True`` by default
   since torch 2.6) refuses it and ``load_model`` / ``resume`` fail. The patch stores the
   successor's ``state_dict`` instead (plain tensors and numbers), and ``load_checkpoint`` loads
   with ``weights_only=True`` explicitly on every torch version. Checkpoints written by unpatched
   Dassl still hold the object; they load only with ``patch_dassl(allow_pickle=True)`` -- do that
   only for files you wrote yourself (unpickling runs code).

Two more things the forks' own code does that stop users, fixed by the same call:

3. CLIP weights: every fork's ``load_clip_to_cpu(cfg)`` downloads OpenAI's checkpoint with the
   vendored ``clip._download`` (and checks its SHA-256). ``patch_dassl`` makes that loader honour
   ``cfg.GRAM.CLIP_WEIGHTS`` (:func:`gram_plugin.adapters.add_gram_cfg`): a local file (OpenAI's
   ``.pt`` as downloaded, or a CLIP state dict) or ``random`` (a seeded random CLIP built with the
   fork's own ``clip.model.CLIP``, for smoke runs: :func:`random_clip_file`); everything after the
   download (``torch.jit.load`` / ``torch.load``, ``build_model``, the dtype conversion) is the
   fork's code. A failed download becomes one :class:`ClipWeightsError` saying what was being
   downloaded and how to give a local file.
4. ``.cuda()``: VPT and PromptSRC call it unconditionally, so on a machine without a GPU they stop
   with "Found no NVIDIA driver". Where CUDA is not available, ``patch_dassl`` makes
   ``Tensor.cuda`` / ``Module.cuda`` return the CPU tensor / module (on a GPU machine nothing changes).

Nothing is changed unless ``patch_dassl`` is called; calling it twice is harmless.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import http.client
import inspect
import io
import os
import socket
import sys
import urllib.error
from pathlib import Path

import torch

from gram_plugin.errors import GramPluginError

_PATCHED_MARK = "_gram_plugin_patched"


def _patch_warmup_schedulers() -> bool:
    from dassl.optim import lr_scheduler as L

    base = L._BaseWarmupScheduler
    if getattr(base, _PATCHED_MARK, False):
        return False
    parent = base.__mro__[1]
    takes_verbose = "verbose" in inspect.signature(parent.__init__).parameters

    def __init__(self, optimizer, successor, warmup_epoch, last_epoch=-1, verbose=False):
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        if takes_verbose:
            parent.__init__(self, optimizer, last_epoch, verbose)
        else:
            parent.__init__(self, optimizer, last_epoch)

    def state_dict(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "successor")}
        state["successor"] = self.successor.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state = dict(state_dict)
        successor = state.pop("successor", None)
        if successor is not None and not isinstance(successor, dict):  # an old, object-holding checkpoint
            successor = successor.state_dict()
        self.__dict__.update(state)
        if successor is not None:
            self.successor.load_state_dict(successor)

    base.__init__ = __init__
    base.state_dict = state_dict
    base.load_state_dict = load_state_dict
    setattr(base, _PATCHED_MARK, True)
    return True


def _patch_load_checkpoint(allow_pickle: bool) -> int:
    from dassl.utils import torchtools

    original = getattr(torchtools.load_checkpoint, "__wrapped__", torchtools.load_checkpoint)

    def load_checkpoint(fpath):
        if fpath is None:
            raise ValueError("File path is None")
        map_location = None if torch.cuda.is_available() else "cpu"
        try:
            return torch.load(fpath, map_location=map_location, weights_only=True)
        except Exception as e:
            if allow_pickle:
                return torch.load(fpath, map_location=map_location, weights_only=False)
            raise RuntimeError(
                f"cannot load {fpath} with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0]}). "
                "It was probably written by Dassl without patch_dassl() (its scheduler state holds live "
                "objects). If you wrote this file yourself, call patch_dassl(allow_pickle=True)."
            ) from None

    load_checkpoint.__wrapped__ = original
    load_checkpoint.__doc__ = original.__doc__
    # trainers import it by name (``from dassl.utils import load_checkpoint``): replace every reference
    current = torchtools.load_checkpoint
    replaced = 0
    for mod in list(sys.modules.values()):
        for attr in ("load_checkpoint",):
            if getattr(mod, attr, None) in (original, current):
                setattr(mod, attr, load_checkpoint)
                replaced += 1
    return replaced


# -- CLIP weights ---------------------------------------------------------------------------------
RANDOM_CLIP = "random"
# a small CLIP: embed dim, layers (vision and text) and width; heads = width // 64 as clip.build_model derives them
RANDOM_CLIP_SHAPE = {"embed_dim": 32, "layers": 2, "width": 64}
# the prompt-free CLIP the forks' CLIP class builds when it takes design details (MaPLe's repository, PromptSRC's)
_PLAIN_DESIGN = {"trainer": "IVLP", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0}
_NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException)
_OFFLINE_HELP = (
    "Without internet, give a local file: the option GRAM.CLIP_WEIGHTS /path/to/{file} (train.py KEY VALUE "
    "options or the yaml; gram-plugin meta-train --dassl-config ... --clip-weights FILE), or put OpenAI's {file} "
    "into {root} (checked against its SHA-256). For a smoke run without pretrained weights: GRAM.CLIP_WEIGHTS "
    "random (a seeded random CLIP: accuracies mean nothing). See examples/coop_fork/README.md, 'CLIP weights'."
)
# the cfg of the load_clip_to_cpu call in progress (its GRAM.CLIP_WEIGHTS decides what _download returns)
_LOADING = contextvars.ContextVar("gram_plugin_clip_loading", default=None)
_SAY_WEIGHTS = contextvars.ContextVar("gram_plugin_say_clip_weights", default=True)


@contextlib.contextmanager
def clip_weights_already_said():
    """Within it, a CLIP load that ``GRAM.CLIP_WEIGHTS`` redirects prints no "CLIP weights: ..." line: for a caller
    that loads the CLIP the trainer has just loaded (and named) once more, e.g. its prompt-free copy."""
    token = _SAY_WEIGHTS.set(False)
    try:
        yield
    finally:
        _SAY_WEIGHTS.reset(token)


class ClipWeightsError(GramPluginError, RuntimeError):
    """The CLIP weights a Dassl trainer loads cannot be had: the download failed, or
    ``GRAM.CLIP_WEIGHTS`` names no file / an unusable random CLIP."""


def random_clip_file(clip_model_module, resolution: int, text_width: int = 64, vision_width: int = 64,
                     folder: str | os.PathLike | None = None) -> Path:
    """A seeded random CLIP checkpoint (a state dict saved with ``torch.save``, as the forks' loader reads it)
    made with the fork's own ``clip.model.CLIP``: 2 + 2 layers, ``resolution`` px images (patches of 16
    px, 8 below 64 px), the given text / vision widths (``clip.build_model`` derives heads as width // 64).

    The same arguments give the same weights (seed 0, drawn without touching the caller's RNG), so a
    training run and a later evaluation of it build the same CLIP. Cached in ``folder`` (default
    ``$GRAM_CLIP_CACHE`` or ~/.cache/gram-plugin/clip), keyed by the shape and the CLIP class's source.

    Raises:
        ClipWeightsError: the resolution is not a multiple of the patch size, or a width not of 64.
    """
    patch = 16 if resolution >= 64 else 8
    problems = []
    if resolution < 8 or resolution % patch:
        problems.append(f"the image size {resolution} px is not a multiple of the random CLIP's {patch} px patches "
                        f"(set INPUT.SIZE to e.g. (32, 32) or (224, 224))")
    problems += [f"a {what} width of {w} is not a positive multiple of 64" for what, w in
                 (("text", text_width), ("vision", vision_width)) if w < 64 or w % 64]
    if problems:
        raise ClipWeightsError("GRAM.CLIP_WEIGHTS random: " + "; ".join(problems))
    shape = dict(RANDOM_CLIP_SHAPE, resolution=resolution, patch=patch, text_width=text_width, vision_width=vision_width)
    source = inspect.getsource(clip_model_module.CLIP).encode()
    key = hashlib.sha256(repr(sorted(shape.items())).encode() + source).hexdigest()[:16]
    folder = Path(folder or os.environ.get("GRAM_CLIP_CACHE") or Path.home() / ".cache" / "gram-plugin" / "clip")
    path = folder / f"random_clip_{resolution}px_{text_width}x{vision_width}_{key}.pt"
    if path.is_file():
        return path
    args = [shape["embed_dim"], resolution, shape["layers"], vision_width, patch, 77, 49408,
            text_width, text_width // 64, shape["layers"]]
    if "design_details" in inspect.signature(clip_model_module.CLIP).parameters:
        args.append(_PLAIN_DESIGN)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = clip_model_module.CLIP(*args)
    clip_model_module.convert_weights(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    from gram_plugin.safeio import atomic_write_bytes

    return atomic_write_bytes(path, buffer.getvalue())


def _option(cfg) -> str:
    gram = getattr(cfg, "GRAM", None)
    return str(getattr(gram, "CLIP_WEIGHTS", "") or "").strip()


def _random_widths(cfg) -> tuple[int, int]:
    """(text, vision) widths for a random CLIP of the cfg's trainer: the adapter's ``clip_widths``
    where its prompt learner hard-codes them (MaPLe), else the small default."""
    default = (RANDOM_CLIP_SHAPE["width"], RANDOM_CLIP_SHAPE["width"])
    try:
        from dassl.engine import TRAINER_REGISTRY

        from .base import adapter_class

        widths = getattr(adapter_class(TRAINER_REGISTRY.get(cfg.TRAINER.NAME)), "clip_widths", None)
    except Exception:  # an unregistered trainer, no adapter: the default shape
        return default
    return tuple(widths) if widths else default


def _weights_for(cfg, download_module) -> str:
    """The file ``load_clip_to_cpu(cfg)`` should read for ``GRAM.CLIP_WEIGHTS``."""
    option = _option(cfg)
    if option == RANDOM_CLIP:
        model_module = sys.modules[download_module.build_model.__module__]
        text_width, vision_width = _random_widths(cfg)
        path = random_clip_file(model_module, int(cfg.INPUT.SIZE[0]), text_width, vision_width)
        if _SAY_WEIGHTS.get():
            print(f"CLIP weights: a random CLIP (GRAM.CLIP_WEIGHTS random; {int(cfg.INPUT.SIZE[0])} px, widths "
                  f"{text_width}/{vision_width}, seed 0): a smoke run, its accuracies mean nothing ({path})")
        return str(path)
    path = Path(option).expanduser()
    if not path.is_file():
        raise ClipWeightsError(f"GRAM.CLIP_WEIGHTS {option}: " + ("is a folder, not a file" if path.is_dir() else "no such file")
                               + " (a CLIP checkpoint: OpenAI's .pt as downloaded, or a CLIP state dict; or 'random')")
    if _SAY_WEIGHTS.get():
        print(f"CLIP weights: {path.resolve()} (GRAM.CLIP_WEIGHTS)")
    return str(path.resolve())


def _wrap_download(original, module):
    def _download(url, *args, **kwargs):
        cfg = _LOADING.get()
        if cfg is not None and _option(cfg):
            return _weights_for(cfg, module)
        try:
            return original(url, *args, **kwargs)
        except _NETWORK_ERRORS as e:
            file = os.path.basename(url)
            root = args[0] if args else kwargs.get("root", "~/.cache/clip")
            backbone = next((k for k, v in getattr(module, "_MODELS", {}).items() if v == url), file)
            raise ClipWeightsError(
                f"the CLIP weights for {backbone} were being downloaded from {url} (to {os.path.join(root, file)}) "
                f"and the download failed: {e}. " + _OFFLINE_HELP.format(file=file, root=root)
            ) from None

    _download.__wrapped__ = original
    _download._gram_plugin_patched = True
    return _download


def _wrap_loader(original):
    def load_clip_to_cpu(cfg, *args, **kwargs):
        token = _LOADING.set(cfg)
        try:
            return original(cfg, *args, **kwargs)
        finally:
            _LOADING.reset(token)

    load_clip_to_cpu.__wrapped__ = original
    load_clip_to_cpu.__doc__ = original.__doc__
    load_clip_to_cpu._gram_plugin_patched = True
    return load_clip_to_cpu


def _patch_clip_loading() -> int:
    """Wrap the vendored ``clip._download`` and every ``load_clip_to_cpu`` already imported (the
    fork's ``train.py`` imports its trainers before ``main`` runs); returns how many were wrapped."""
    wrapped = 0
    for mod in list(sys.modules.values()):
        attrs = getattr(mod, "__dict__", None)
        if not attrs:
            continue
        download = attrs.get("_download")
        if callable(download) and isinstance(attrs.get("_MODELS"), dict) and not getattr(download, _PATCHED_MARK, False):
            mod._download = _wrap_download(download, mod)
            wrapped += 1
        loader = attrs.get("load_clip_to_cpu")
        if callable(loader) and not getattr(loader, _PATCHED_MARK, False):
            mod.load_clip_to_cpu = _wrap_loader(loader)
            wrapped += 1
    return wrapped


# -- .cuda() without a GPU ------------------------------------------------------------------------------
def _patch_cuda_calls() -> bool:
    """Where CUDA is unavailable, ``.cuda()`` on tensors and modules returns them unchanged (on the CPU)."""
    if torch.cuda.is_available() or getattr(torch.Tensor.cuda, _PATCHED_MARK, False):
        return False

    def tensor_cuda(self, *args, **kwargs):
        return self

    def module_cuda(self, *args, **kwargs):
        return self

    for f in (tensor_cuda, module_cuda):
        setattr(f, _PATCHED_MARK, True)
    torch.Tensor.cuda = tensor_cuda
    torch.nn.Module.cuda = module_cuda
    return True


def patch_dassl(schedulers: bool = True, checkpoints: bool = True, allow_pickle: bool = False,
                clip_weights: bool = True, cuda_on_cpu: bool = True) -> dict:
    """Apply the fixes; returns what was done (for logs). Call after importing dassl and the trainers
    (the fork's ``train.py`` imports them at the top) and before ``build_trainer(cfg)``.

    Args:
        schedulers, checkpoints, allow_pickle: fixes 1 and 2 of the module docstring.
        clip_weights: fix 3 (``GRAM.CLIP_WEIGHTS``, the download error).
        cuda_on_cpu: fix 4 (only where CUDA is not available).

    Raises:
        ImportError: dassl is not importable.
    """
    try:
        import dassl  # noqa: F401
    except ImportError as e:
        raise ImportError("patch_dassl: dassl is not importable (install Dassl.pytorch first)") from e
    done = {}
    if schedulers:
        done["warmup_schedulers"] = _patch_warmup_schedulers()
    if checkpoints:
        done["load_checkpoint_references"] = _patch_load_checkpoint(allow_pickle)
    if clip_weights:
        done["clip_loaders"] = _patch_clip_loading()
    if cuda_on_cpu:
        done["cuda_calls_on_cpu"] = _patch_cuda_calls()
    return done
