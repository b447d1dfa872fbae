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

Nothing is changed unless ``patch_dassl`` is called; calling it twice is harmless.
"""

from __future__ import annotations

import inspect
import sys

import torch

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


def patch_dassl(schedulers: bool = True, checkpoints: bool = True, allow_pickle: bool = False) -> dict:
    """Apply the fixes; returns what was done (for logs). Call after importing dassl and the trainers."""
    try:
        import dassl  # noqa: F401
    except ImportError as e:
        raise ImportError("patch_dassl: dassl is not importable (install Dassl.pytorch first)") from e
    done = {}
    if schedulers:
        done["warmup_schedulers"] = _patch_warmup_schedulers()
    if checkpoints:
        done["load_checkpoint_references"] = _patch_load_checkpoint(allow_pickle)
    return done
