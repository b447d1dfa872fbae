"""PromptSRC (Khattak et al., ICCV 2023; muzairkhattak/PromptSRC ``trainers/promptsrc.py``).

IVLP's layout (:mod:`.ivlp`: text ``ctx``, visual and text ``VPT_shallow`` per block) plus
self-regularisation: a frozen, prompt-free zero-shot image encoder
``prompt_learner.ZS_image_encoder`` *inside* the prompt learner (requires_grad False -- the adapter
selects by ``requires_grad``, so it is never regulated, meta-learned or overwritten by an init),
fixed text embeddings ``prompt_learner.fixed_embeddings`` (mean over templates of the frozen text
features; a plain attribute, not saved), the loss CE + L1 text + L1 image + KL(logits || zero-shot
logits), and Gaussian prompt aggregation (GPA) over epochs. The regulated step acts on the gradient of
that whole loss at ``optim.step()``; GPA then averages the regulated weights (it reads and finally
loads ``model.state_dict()``, which copies into the same parameter objects, so the hooks stay valid).

ProGrad: PromptSRC already holds a zero-shot teacher (:class:`PromptSRCTeacher`),
``logit_scale * norm(ZS_image_encoder(x)) @ norm(fixed_embeddings).T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import AdapterError, ZeroShotTeacher, register_adapter, trainer_module
from .ivlp import IVLPAdapter


def encoder_dtype(encoder) -> torch.dtype:
    """The dtype a CLIP image encoder computes in: its patch embedding's (``conv1``), as CLIP's own
    ``dtype`` property reads it (``convert_weights`` leaves embeddings and LayerNorms float32)."""
    conv = getattr(encoder, "conv1", None)
    if conv is not None and getattr(conv, "weight", None) is not None:
        return conv.weight.dtype
    return next(encoder.parameters()).dtype


def _inputs_to_own_dtype(module, args):
    dtype = encoder_dtype(module)
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


class PromptSRCTeacher(ZeroShotTeacher):
    """PromptSRC's own zero-shot CLIP: its frozen ``ZS_image_encoder`` and ``fixed_embeddings``."""

    @torch.no_grad()
    def logits(self, images):
        pl = self.model.prompt_learner
        # in the encoder's own dtype: upstream keeps it fp16 even when the trainer runs fp32
        return self.cosine_logits(pl.ZS_image_encoder(images.type(encoder_dtype(pl.ZS_image_encoder))), pl.fixed_embeddings)


@register_adapter("PromptSRC")
class PromptSRCAdapter(IVLPAdapter):
    """PromptSRC: IVLP's prompts, its self-regularising loss and its own zero-shot teacher."""

    family = "PromptSRC"
    forward_output = "loss_while_training"
    cfg_node = "PROMPTSRC"
    teacher = PromptSRCTeacher
    #: the text templates its fixed embeddings average over (default: the trainer module's
    #: ``IMAGENET_TEMPLATES`` or ``TEMPLATES``)
    templates = None

    def prepare(self) -> None:
        pl = self.model.prompt_learner
        if not hasattr(pl, "ZS_image_encoder") or not hasattr(pl, "fixed_embeddings"):
            raise AdapterError("PromptSRC trainer without prompt_learner.ZS_image_encoder / fixed_embeddings")
        trainable = [n for n, p in pl.ZS_image_encoder.named_parameters() if p.requires_grad]
        if trainable:
            raise AdapterError(
                f"PromptSRC's zero-shot image encoder must stay frozen, but {trainable[:3]} require gradients"
            )

    def method_loss(self, model, images, labels):
        """CE + the self-regularising terms: L1 of the text and image features to the fixed
        embeddings / zero-shot features, and KL of the logits to the zero-shot logits, weighted as
        ``TRAINER.PROMPTSRC.{TEXT,IMAGE}_LOSS_WEIGHT`` (as its ``forward_backward`` does)."""
        pl = model.prompt_learner
        was = pl.training
        pl.training = True  # the forward returns the loss terms only while this flag is set
        # Upstream builds the frozen zero-shot encoder in fp16 whatever PREC says and feeds it
        # ``image.type(self.dtype)``: on a float32 trainer that is fp32 images into an fp16 conv, so
        # upstream's own forward fails under PREC fp32. Feed the teacher in its own dtype (its
        # features then meet ``fixed_embeddings.half()`` as upstream expects); a no-op under fp16.
        cast = pl.ZS_image_encoder.register_forward_pre_hook(_inputs_to_own_dtype)
        try:
            ce, text_f, fixed, zs_image, image_f, zs_logits, logits = model(images, labels)
        finally:
            pl.training = was
            cast.remove()
        node = self.node
        l_text = F.l1_loss(text_f, fixed.to(text_f.dtype)) * float(node.TEXT_LOSS_WEIGHT)
        l_image = F.l1_loss(image_f, zs_image.to(image_f.dtype)) * float(node.IMAGE_LOSS_WEIGHT)
        l_logits = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(zs_logits.to(logits.dtype), 1), reduction="sum", log_target=True) / logits.numel()
        return ce + (l_logits + l_text + l_image)

    def frozen_clip(self):
        # its load_clip_to_cpu(cfg, zero_shot_model=True) builds the prompt-free CLIP
        return trainer_module(self.trainer).load_clip_to_cpu(self.trainer.cfg, True).float().eval()

    def text_templates(self) -> list:
        if self.templates is not None:
            return list(self.templates)
        module = trainer_module(self.trainer)
        for name in ("IMAGENET_TEMPLATES", "TEMPLATES"):
            if hasattr(module, name):
                return list(getattr(module, name))
        raise AdapterError("PromptSRC: pass templates=[...] (the text templates its fixed embeddings average over)")

    def class_buffers(self) -> dict:
        return {**super().class_buffers(), "fixed_embeddings": self.model.prompt_learner.fixed_embeddings}

    @torch.no_grad()
    def build_class_buffers(self, classnames, clip_model, tokenize) -> dict:
        names = [c.replace("_", " ") for c in classnames]
        feats = [clip_model.encode_text(tokenize([t.replace("{}", n) for n in names])).float() for t in self.text_templates()]
        device = next(self.model.parameters()).device
        return {**super().build_class_buffers(classnames, clip_model, tokenize),
                "fixed_embeddings": torch.stack(feats, dim=1).mean(dim=1).to(device)}

    def use_class_buffers(self, state: dict) -> None:
        super().use_class_buffers(state)
        self.model.prompt_learner.fixed_embeddings = state["fixed_embeddings"]
        self.model.n_cls = state["n_cls"]
