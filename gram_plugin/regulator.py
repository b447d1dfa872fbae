"""GRAM's gradient-regulating function (Li et al., ICCV 2023, eq. 5-6).

For a gradient g of a prompt tensor::

    gamma = tanh(W_g g + b_g),  beta = tanh(W_b g + b_b),  R(g) = gamma * g + beta   (elementwise)

Axis choice: the linear maps act on the LAST dimension of the gradient (the embedding width D for
context vectors and visual prompt tokens) and are shared across the other dimensions (tokens,
classes, layers). That keeps a head at 2 * (D*D + D) parameters (D=512: 0.5M) however many tokens
there are, and it lets one head serve prompts of any length. ``rank=r`` replaces each D x D map by
U V with U: D x r, V: r x D (2 * 2 * D * r parameters). ``share_by_width=True`` uses one head for
all prompt tensors of the same width (e.g. every VPT layer).

Scale: with ``scale="absolute"`` (eq. 5-6 as written) gamma and beta see the raw gradient. Prompt
gradients are small (~5e-3 per entry with CLIP-sized logits), so W g is negligible next to the biases:
the head degenerates into a constant gain plus a constant drift tanh(b_b) that meta-training grows
until it outweighs the gradient (benchmarks/RESULTS.md, "GRAM vs MAML"). ``scale="relative"`` (the
default) feeds the maps the gradient divided by its root mean square s and scales beta by s::

    u = g / s,  R(g) = tanh(W_g u + b_g) * g + tanh(W_b u + b_b) * s

so R(c g) = c R(g) for c > 0: the regulator reads the gradient's direction, its output scales with
the gradient (a zero gradient stays zero, to ~1e-15), and it is unaffected by loss scaling or the logit scale.

Initialisation: W = 0 (full rank) or V = 0 (low rank), b_b = 0 and b_g = atanh(init_gain), so at
the start R(g) = init_gain * g -- plain gradient descent with a slightly smaller step -- and
meta-training moves away from it only as far as the query loss asks.

The regulator computes in float32 (float64 for float64 gradients) whatever the dtype of the
gradient and returns that dtype.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .errors import PromptInitError
from .marking import prompt_parameters


def regulator_config_problems(config: Any, prompts: Mapping[str, torch.Tensor], regulator_state: Mapping) -> list[str]:
    """Every way an init's ``regulator_config`` disagrees with the prompt tensors it regulates (checked before
    any regulator is built: a config claiming a 30000-wide head would otherwise allocate gigabytes).

    A head for one of the file's prompt tensors must be as wide as it (the regulator acts on the last
    dimension; a head for another name is the applying code's business: ``wrap`` renames and checks it);
    regulator tensors need a config. The option values and the tensors' own layout against the config
    are checked by ``GradientRegulator.init_problems``.
    """
    if config is None:
        return ["it holds regulator tensors but no 'regulator_config' to build the regulator from"] if regulator_state else []
    if not regulator_state:
        return []  # a config without tensors is ignored (no regulator), as before
    shapes = config.get("shapes") if isinstance(config, Mapping) else None
    if not isinstance(shapes, Mapping) or not shapes:
        return ["'regulator_config' needs a non-empty 'shapes' mapping"]
    problems = []
    for name, shape in shapes.items():
        ok = isinstance(shape, (list, tuple)) and shape and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
        if not ok:
            problems.append(f"regulator head {name!r}: its shape must be a list of positive integers, got {shape!r}")
        elif name in prompts and (prompts[name].dim() == 0 or shape[-1] != prompts[name].shape[-1]):
            problems.append(f"regulator head {name!r} is {shape[-1]} wide (shape {list(shape)}), the prompt {name} "
                            f"is {tuple(prompts[name].shape)}")
    return problems


def _head_key(name: str) -> str:
    # ModuleDict keys may not contain "."
    return name.replace(".", "__")


class _LinearMap(nn.Module):
    def __init__(self, width: int, rank: int | None, generator: torch.Generator | None = None):
        super().__init__()
        if rank is None:
            self.weight = nn.Parameter(torch.zeros(width, width))
            self.u = self.v = None
        else:
            self.weight = None
            # u random, v zero: the product starts at zero but both factors receive gradients
            self.u = nn.Parameter(torch.randn(width, rank, generator=generator) / math.sqrt(width))
            self.v = nn.Parameter(torch.zeros(rank, width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        if self.weight is not None:
            return x @ self.weight.to(dt).t() + self.bias.to(dt)
        return (x @ self.v.to(dt).t()) @ self.u.to(dt).t() + self.bias.to(dt)


class _Head(nn.Module):
    def __init__(self, width: int, rank: int | None, init_gain: float, generator: torch.Generator | None = None):
        super().__init__()
        self.width = width
        self.gamma = _LinearMap(width, rank, generator)
        self.beta = _LinearMap(width, rank, generator)
        with torch.no_grad():
            self.gamma.bias.fill_(math.atanh(init_gain))

    def gain_and_shift(self, x: torch.Tensor, relative: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma and the term added to gamma * x (beta, times rms(x) when ``relative``), for rows x."""
        if relative:
            # eps keeps s > 0 and its derivative finite for an all-zero gradient
            s = torch.sqrt(x.pow(2).mean() + 1e-30)
            u = x / s
        else:
            s, u = 1.0, x
        return torch.tanh(self.gamma(u)), torch.tanh(self.beta(u)) * s

    def forward(self, g: torch.Tensor, relative: bool) -> torch.Tensor:
        x = g.reshape(-1, self.width)
        gamma, shift = self.gain_and_shift(x, relative)
        return (gamma * x + shift).reshape(g.shape)


class GradientRegulator(nn.Module):
    """One regulating head per prompt parameter (or per width), applied as ``R(name, grad)``.

    Args:
        shapes: ``{param_name: shape}`` of the prompt parameters to regulate.
        share_by_width: one head per distinct last-dimension width instead of one per parameter.
        rank: low-rank factorisation of the linear maps (``None`` = full D x D).
        init_gain: gamma at initialisation (W = 0), in (0, 1).
        scale: ``"relative"`` (maps read g / rms(g), beta scaled by rms(g)) or ``"absolute"`` (eq. 5-6
            as written); see the module docstring.
        seed: seeds the random factor of low-rank heads (the full-rank init is deterministic).
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        share_by_width: bool = False,
        rank: int | None = None,
        init_gain: float = 0.9,
        seed: int = 0,
        scale: str = "relative",
    ):
        super().__init__()
        if not shapes:
            raise ValueError("GradientRegulator needs at least one prompt parameter shape")
        if not 0.0 < init_gain < 1.0:
            raise ValueError(f"init_gain must lie in (0, 1) (it is tanh of a bias), got {init_gain}")
        if scale not in ("relative", "absolute"):
            raise ValueError(f"scale must be 'relative' or 'absolute', got {scale!r}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1 or None, got {rank}")
        self.shapes = {n: tuple(int(s) for s in shape) for n, shape in shapes.items()}
        for n, s in self.shapes.items():
            if len(s) == 0:
                raise ValueError(f"cannot regulate scalar parameter {n}: it has no last dimension")
        self.share_by_width = share_by_width
        self.rank = rank
        self.init_gain = init_gain
        self.seed = seed
        self.scale = scale
        generator = torch.Generator().manual_seed(seed)
        self.heads = nn.ModuleDict()
        for name, shape in self.shapes.items():
            key = self._key(name)
            if key not in self.heads:
                self.heads[key] = _Head(shape[-1], rank, init_gain, generator)

    def _key(self, name: str) -> str:
        return f"width_{self.shapes[name][-1]}" if self.share_by_width else _head_key(name)

    @classmethod
    def for_module(cls, module: nn.Module, **kwargs) -> "GradientRegulator":
        """A regulator for every marked prompt parameter of ``module``."""
        return cls({n: p.shape for n, p in prompt_parameters(module).items()}, **kwargs)

    def to_config(self) -> dict:
        """The constructor arguments, as saved in an init's ``regulator_config`` (JSON-safe)."""
        return {
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "share_by_width": self.share_by_width,
            "rank": self.rank,
            "init_gain": self.init_gain,
            "seed": self.seed,
            "scale": self.scale,
        }

    @classmethod
    def from_config(cls, config: Mapping) -> "GradientRegulator":
        """Inverse of :meth:`to_config`; a missing option takes the constructor's default."""
        if not config or "shapes" not in config:
            raise ValueError("regulator config needs 'shapes'")
        options = ("share_by_width", "rank", "init_gain", "seed", "scale")
        return cls(config["shapes"], **{k: config[k] for k in options if k in config})

    @classmethod
    def init_problems(cls, init) -> list[str]:
        """Every way the regulator saved in ``init`` does not fit (empty when it does or when there is none).

        Its config against the prompt tensors (:func:`regulator_config_problems`), the option values,
        and the tensors' names and shapes against the regulator the config describes, which is laid out
        on the meta device: nothing is allocated, whatever size the config claims.
        """
        if not init.regulator_state:
            return []
        problems = regulator_config_problems(init.regulator_config, init.tensors, init.regulator_state)
        if problems:
            return problems
        try:
            with torch.device("meta"):
                layout = {k: tuple(v.shape) for k, v in cls.from_config(init.regulator_config).state_dict().items()}
        except (TypeError, ValueError) as e:
            return [f"its regulator_config is invalid: {e}"]
        state = init.regulator_state
        missing = sorted(set(layout) - set(state))
        if missing:
            problems.append(f"regulator tensors missing for its config: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        extra = sorted(set(state) - set(layout))
        if extra:
            problems.append(f"regulator tensors its config has no place for: {extra[:4]}{' ...' if len(extra) > 4 else ''}")
        problems += [f"regulator tensor {k} is {tuple(state[k].shape)}, its config makes it {layout[k]}"
                     for k in sorted(set(layout) & set(state)) if tuple(state[k].shape) != layout[k]]
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            problems.append(f"the regulator holds non-finite values (NaN or Inf) in {bad}: it is unusable")
        return problems

    @classmethod
    def from_init(cls, init) -> "GradientRegulator | None":
        """The regulator saved with a ``PromptInit`` (its config and weights), or ``None`` if it has none.

        Raises ``PromptInitError`` listing :meth:`init_problems` before anything is allocated.
        """
        if not init.regulator_state:
            return None
        problems = cls.init_problems(init)
        if problems:
            where = f"init file {init.source}" if init.source else "the init"
            raise PromptInitError(f"{where}: its regulator does not fit: " + "; ".join(problems))
        reg = cls.from_config(init.regulator_config)
        reg.load_state_dict(init.regulator_state)
        return reg

    def has_head(self, name: str) -> bool:
        """Whether the regulator regulates the parameter ``name``."""
        return name in self.shapes

    def fit_problems(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """Why this regulator cannot regulate tensors of these ``{name: shape}`` (empty: it can).

        A head acts on the last dimension, so that width must equal the tensor's (a regulator
        learned on another backbone has other widths). The other dimensions may differ: the maps
        are shared across tokens, classes and layers, so a regulator learned with another number of
        context tokens (n_ctx) or without CSC's class dimension regulates each row as it would have.
        Names the regulator has no head for are not a problem (their gradients pass through).
        """
        problems = []
        for name, shape in shapes.items():
            mine = self.shapes.get(name)
            if mine is not None and tuple(shape)[-1:] != mine[-1:]:
                problems.append(f"{name}: the regulator's head takes width {mine[-1]} (learned on shape {mine}), "
                                f"the tensor has width {tuple(shape)[-1] if len(shape) else None} (shape {tuple(shape)})")
        return problems

    def renamed(self, mapping: Mapping[str, str]) -> "GradientRegulator":
        """A copy whose head for ``old`` answers to ``mapping[old]`` (e.g. the standalone model's
        ``ctx`` to CoOp's ``prompt_learner.ctx``); names not in ``mapping`` keep theirs. The head
        key format (``heads.<name with . as __>.``, or ``heads.width_<D>.``) is this class's own."""
        mapping = {o: n for o, n in mapping.items() if o in self.shapes and o != n}
        if not mapping:
            return self
        shapes = {mapping.get(n, n): s for n, s in self.shapes.items()}
        if len(shapes) != len(self.shapes):
            raise ValueError(f"renaming {mapping} would give two regulator heads the same name")
        out = type(self).from_config({**self.to_config(), "shapes": shapes})
        prefixes = {f"heads.{self._key(o)}.": f"heads.{out._key(mapping.get(o, o))}." for o in self.shapes}
        state = {}
        for k, v in self.state_dict().items():
            old = next(p for p in prefixes if k.startswith(p))
            state[prefixes[old] + k[len(old):]] = v
        out.load_state_dict(state)
        ref = next(self.parameters())
        return out.to(device=ref.device, dtype=ref.dtype)

    def forward(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The regulated gradient of prompt ``name``: its head applied to each row, same shape and dtype.

        Raises:
            KeyError: the regulator has no head for ``name``.
            ValueError: the gradient's last dimension is not the head's width.
        """
        if name not in self.shapes:
            raise KeyError(f"GradientRegulator has no head for {name!r}; it regulates {list(self.shapes)}")
        if tuple(grad.shape[-1:]) != self.shapes[name][-1:]:
            raise ValueError(f"gradient of {name} has shape {tuple(grad.shape)}, regulator expects {self.shapes[name]}")
        head = self.heads[self._key(name)]
        ref = head.gamma.bias
        # float32 at least (fp16/bf16 gradients are upcast); float64 stays float64 (exact tests)
        compute = torch.promote_types(grad.dtype, torch.float32)
        out = head(grad.to(device=ref.device, dtype=compute), self.scale == "relative")
        return out.to(device=grad.device, dtype=grad.dtype)

    def regulate(self, grads: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """Regulate every gradient the regulator has a head for; others (and ``None``) pass through.

        The one regulate path: meta-training's inner steps call it, and the ``regulate`` transform
        (:func:`gram_plugin.transforms.regulate`) that fine-tuning installs is this method."""
        return {n: (self(n, g) if g is not None and self.has_head(n) else g) for n, g in grads.items()}
