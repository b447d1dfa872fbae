"""CoOp (Zhou et al., IJCV 2022; KaiyangZhou/CoOp ``trainers/coop.py``).

Layout: ``trainer.model = CustomCLIP`` with ``prompt_learner.ctx`` of shape ``(n_ctx, ctx_dim)``, or
``(n_cls, n_ctx, ctx_dim)`` with ``TRAINER.COOP.CSC``; ``CTX_INIT`` ("a photo of a") sets n_ctx to
its word count. ``register_model("prompt_learner", ...)``; the fp16/fp32 path steps through
``model_backward_and_update``, amp through ``scaler.step(optim)``. Its forward returns the logits,
so ProGrad takes G_g from the trainer's own forward.

Zero-shot teacher for ProGrad (:class:`HandCraftedContextTeacher`): CoOp keeps no token embedding,
but with ``CTX_INIT`` the initial context *is* the embedding of the hand-crafted words, so
``[SOS] + ctx_init + [class].[EOS]`` through the trainer's own frozen text encoder is exactly
zero-shot CLIP on "a photo of a {class}.". The context is captured in ``prepare``, before a
meta-learned init replaces it.
"""

from __future__ import annotations

import torch

from ..base import DasslAdapter, ZeroShotTeacher, register_adapter


class HandCraftedContextTeacher(ZeroShotTeacher):
    """Zero-shot CLIP from a CoOp-style prompt learner whose initial context is ``CTX_INIT``'s words."""

    def prepare(self) -> None:
        pl = self.model.prompt_learner
        node = self.adapter.node
        ctx_init = getattr(node, "CTX_INIT", "") if node is not None else ""
        position = getattr(pl, "class_token_position", "end")
        self._text_features = None
        self._why_not = None
        # the initial context is a hand-crafted prompt only when CTX_INIT gave words
        if ctx_init and pl.ctx.dim() == 2 and position == "end":
            self._hand_ctx = pl.ctx.detach().clone()
        else:
            self._hand_ctx = None
            self._why_not = (
                f"TRAINER.{self.adapter.cfg_node}.CTX_INIT is empty (random context is no zero-shot prompt)"
                if not ctx_init
                else "class-specific or non-'end' context layouts have no single hand-crafted prompt"
            )

    def problem(self):
        if getattr(self, "_hand_ctx", None) is not None:
            return None
        return (
            f"ProGrad on {type(self.adapter.trainer).__name__} needs a zero-shot teacher: "
            f"{getattr(self, '_why_not', None) or 'prepare() was not called'}; set e.g. "
            f"TRAINER.{self.adapter.cfg_node}.CTX_INIT 'a photo of a' or pass wrap(..., teacher=<images -> logits>)"
        )

    @torch.no_grad()
    def _zero_shot_text_features(self) -> torch.Tensor:
        if self._text_features is None:
            model = self.model
            pl = model.prompt_learner
            ctx = self._hand_ctx.to(pl.token_prefix.device, pl.token_prefix.dtype)
            ctx = ctx.unsqueeze(0).expand(pl.n_cls, -1, -1)
            prompts = torch.cat([pl.token_prefix, ctx, pl.token_suffix], dim=1)
            tf = model.text_encoder(prompts, model.tokenized_prompts)
            self._text_features = tf / tf.norm(dim=-1, keepdim=True)
        return self._text_features

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.model.image_encoder(images.type(self.model.dtype)))

    def features_module(self):
        # frozen: the prompted forward's image features are the zero-shot model's
        return self.model.image_encoder

    @torch.no_grad()
    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        problem = self.problem()
        if problem:
            raise NotImplementedError(problem)
        f = features / features.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * f @ self._zero_shot_text_features().t()


@register_adapter("CoOp")
class CoOpAdapter(DasslAdapter):
    """CoOp: ``prompt_learner.ctx``, logits from its own forward, the hand-crafted-context teacher."""

    family = "CoOp"
    forward_output = "logits"
    logits_from_own_forward = True  # forward_backward runs model(image) and gets the logits
    prompt_pattern = r"^prompt_learner\.ctx$"
    init_aliases = {"ctx": "prompt_learner.ctx"}
    cfg_node = "COOP"
    teacher = HandCraftedContextTeacher
