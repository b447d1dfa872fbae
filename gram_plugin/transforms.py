"""Pure gradient transforms on ``{name: grad}`` dictionaries, composable with :func:`chain`.

In the style of optax: each factory returns a small function object; applying it never mutates its
input and returns a new dictionary. ``None`` gradients (parameters that got no gradient this step)
pass through untouched. Arithmetic runs in float32 and each result is cast back to the dtype of the
gradient it replaces, so fp16/bf16 trainers get the dtype they gave.

Transforms that need more than the gradient take it as a keyword argument, as optax passes extra
arguments: ProGrad's general-knowledge gradient arrives as ``general_grads=`` (computed with
:func:`general_knowledge_gradients`); :func:`chain` hands every keyword to every transform and each
one takes what it uses.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol

import torch
import torch.nn.functional as F

Grads = Mapping[str, Optional[torch.Tensor]]


class GradientTransform(Protocol):
    """``(grads, **extra) -> new grads``: never mutates ``grads``; takes the keywords it uses."""

    def __call__(self, grads: Grads, **extra: Any) -> dict[str, Optional[torch.Tensor]]:
        ...


class Regulator(Protocol):
    """What :func:`regulate` needs: ``regulate({name: grad}) -> {name: grad}``
    (:meth:`gram_plugin.regulator.GradientRegulator.regulate`)."""

    def regulate(self, grads: Grads) -> dict[str, Optional[torch.Tensor]]:
        """The regulated gradients, by parameter name (``None`` stays ``None``)."""
        ...


class _Named:
    """A callable with a readable repr (shows up in logs and error messages)."""

    def __init__(self, fn: Callable, text: str):
        self._fn, self._text = fn, text

    def __call__(self, grads: Grads, **extra: Any):
        return self._fn(grads, **extra)

    def __repr__(self) -> str:
        return self._text


def identity() -> GradientTransform:
    """The gradients unchanged (a new dictionary)."""
    return _Named(lambda grads, **extra: dict(grads), "identity()")


def chain(*transforms: GradientTransform) -> GradientTransform:
    """Apply ``transforms`` left to right: ``chain(prograd(1.0), regulate(R))``. Every keyword
    argument (e.g. ``general_grads=``) is passed to every transform."""

    def apply(grads, **extra):
        out = dict(grads)
        for t in transforms:
            out = t(out, **extra)
        return out

    return _Named(apply, "chain(" + ", ".join(map(repr, transforms)) + ")")


def regulate(regulator: Regulator) -> GradientTransform:
    """GRAM's gradient regulation (Li et al., ICCV 2023, eq. 5-6): g -> gamma(g) * g + beta(g).

    ``regulator``: a :class:`~gram_plugin.regulator.GradientRegulator`; its ``regulate`` is the one
    implementation (also what meta-training's inner steps call): parameters it has no head for, and
    ``None`` gradients, pass through unchanged. Differentiable in the regulator's parameters (that
    is how meta-training learns it).
    """
    if not callable(getattr(regulator, "regulate", None)):
        raise TypeError(f"regulate needs a GradientRegulator (an object with .regulate(grads)), got {type(regulator).__name__}")
    return _Named(lambda grads, **extra: regulator.regulate(grads), f"regulate({type(regulator).__name__})")


#: ProGrad leaves a tensor's G_d alone when ||G_g|| < PROGRAD_MIN_RELATIVE_NORM * ||G_d|| (see :func:`prograd`)
PROGRAD_MIN_RELATIVE_NORM = 1e-3


def general_knowledge_gradients(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                params: Mapping[str, torch.Tensor], retain_graph: bool = False) -> dict:
    """ProGrad's G_g: ``{name: d KL(p_teacher || p_student) / d param}`` (``None`` where unused).

    KL between the softmax of the zero-shot ``teacher_logits`` and of the prompted
    ``student_logits`` (temperature 1, averaged over the batch, computed in float32); its gradient
    equals that of ProGrad's published ``kl_loss`` (which differs by the teacher's entropy only).
    ``retain_graph=True`` keeps the student's graph for the task loss's own backward. No ``.grad``
    is touched (``torch.autograd.grad``). The result is what :func:`prograd` takes as ``general_grads``.
    """
    kl = F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.detach().float(), dim=-1),
                  reduction="batchmean", log_target=True)
    names = list(params)
    grads = torch.autograd.grad(kl, [params[n] for n in names], retain_graph=retain_graph, allow_unused=True)
    return {n: (None if g is None else g.detach()) for n, g in zip(names, grads)}


def prograd(lam: float = 1.0, min_relative_norm: float = PROGRAD_MIN_RELATIVE_NORM) -> GradientTransform:
    """ProGrad (Zhu et al., ICCV 2023): drop the part of the task gradient that fights the zero-shot model.

    Per parameter tensor, with G_d the task (cross-entropy) gradient and G_g the gradient of
    KL(p_zero-shot || p_prompted), passed as the keyword argument ``general_grads``
    (:func:`general_knowledge_gradients`)::

        G = G_d - lam * (G_d . G_g / ||G_g||^2) * G_g   if G_d . G_g < 0
        G = G_d                                         otherwise

    As in the published code the rule is applied tensor by tensor. Guarded here: a tensor whose
    G_g is missing, non-finite, or shorter than ``min_relative_norm * ||G_d||`` keeps G_d. The
    projection removes ``|G_d| cos(G_d, G_g)`` whatever the length of G_g, so a G_g that is only
    rounding noise -- the prompted model still equals the zero-shot one, as at the first step
    from a hand-crafted context, where ||G_g|| / ||G_d|| is 1e-8 to 1e-7 in float32 -- would remove a
    random part of G_d. The default 1e-3 is the relative rounding of fp16 logits (the trainers'
    default precision): below it the two predictions agree to within rounding and G_g carries no
    direction. ``min_relative_norm=0`` guards only an exactly zero G_g.
    """
    if lam < 0:
        raise ValueError(f"prograd: lam must be >= 0, got {lam}")
    if not (min_relative_norm >= 0 and min_relative_norm < float("inf")):
        raise ValueError(f"prograd: min_relative_norm must be a finite number >= 0, got {min_relative_norm}")

    def apply(grads, general_grads: Optional[Mapping] = None, **extra):
        general = general_grads
        if general is None:
            raise KeyError(
                "prograd needs the general-knowledge gradients as the keyword argument general_grads= "
                "(gram_plugin.transforms.general_knowledge_gradients; wrap(trainer, prograd=...) supplies them)"
            )
        out = {}
        for name, gd in grads.items():
            gg = general.get(name)
            if gd is None or gg is None:
                out[name] = gd
                continue
            d, g = gd.float(), gg.to(device=gd.device, dtype=torch.float32)
            dot = torch.sum(d * g)
            norm_sq = torch.sum(g * g)
            floor = min_relative_norm**2 * torch.sum(d * d)
            if not torch.isfinite(norm_sq) or norm_sq <= 0 or norm_sq < floor or dot >= 0:
                out[name] = gd
                continue
            out[name] = (d - lam * (dot / norm_sq) * g).to(gd.dtype)
        return out

    extra = "" if min_relative_norm == PROGRAD_MIN_RELATIVE_NORM else f", min_relative_norm={min_relative_norm}"
    return _Named(apply, f"prograd(lam={lam}{extra})")


def global_norm(grads: Grads) -> torch.Tensor:
    """L2 norm of all non-None gradients taken together (float32)."""
    sq = [torch.sum(g.float() ** 2) for g in grads.values() if g is not None]
    if not sq:
        return torch.zeros(())
    return torch.sqrt(torch.stack([s.to(sq[0].device) for s in sq]).sum())


def clip_meta(gamma: float = 5.0) -> GradientTransform:
    """Meta-gradient clipping (Kim & Ok, "Generalizable Meta Prompt Learning"): G * gamma / max(||G||, gamma).

    ||G|| is the global L2 norm over every tensor, so the direction is kept and the norm never
    exceeds ``gamma``. When differentiated through (it is not, in our outer loop), the factor is
    constant below the threshold and 1/||G|| above it; the kink sits at ||G|| = gamma.
    """
    if not gamma > 0:
        raise ValueError(f"clip_meta: gamma must be > 0, got {gamma}")

    def apply(grads, **extra):
        norm = global_norm(grads)
        scale = gamma / torch.clamp(norm, min=gamma)
        return {n: (None if g is None else (g.float() * scale.to(g.device)).to(g.dtype)) for n, g in grads.items()}

    return _Named(apply, f"clip_meta(gamma={gamma})")
