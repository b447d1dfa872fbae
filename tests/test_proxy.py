"""ProxyCLIP v1 (MiniLM text tower + small CNN image tower): Backbone protocol, prompts, tiny build determinism."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA_CACHE, SHARED_DATA
from gram_plugin.backbones import proxy
from gram_plugin.backbones.proxy import ProxyCLIP, ProxyError, load_proxy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the build script of the checkout
from build_proxy import BuildConfig, build  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ProxyCLIP(image_size=32, widths=(8, 16, 16, 16)).eval()


def test_protocol_shapes(model):
    ids = model.tokenize(["X X X X dog.", "a photo of a cat."])
    longest = len(model.tokenizer("X X X X dog.")["input_ids"])  # [CLS] x x x x dog . [SEP]
    assert ids.dtype == torch.long and ids.shape == (2, longest) and longest <= proxy.TEXT_LENGTH
    emb = model.embed_tokens(ids)
    assert emb.shape == (2, longest, model.ctx_dim)
    # padding to the longest text of a call does not change a text's features
    alone = model.encode_text(["a photo of a cat."])
    padded = model.encode_text(["a photo of a cat.", "a very much longer caption of a photo of a small cat."])[:1]
    assert torch.allclose(alone, padded, atol=1e-5)
    feats = model.encode_text_embeddings(emb, ids)
    assert feats.shape == (2, model.embed_dim)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)
    img = model.encode_image(torch.randn(3, 3, 32, 32))
    assert img.shape == (3, model.embed_dim)
    assert model.vision_width is None
    assert isinstance(model.weights_id(), str) and model.name
    assert torch.is_tensor(model.logit_scale)
    from PIL import Image

    x = model.preprocess(Image.new("RGB", (50, 40), (120, 30, 200)))
    assert x.shape == (3, 32, 32)


def test_placeholder_tokens_follow_start_token(model):
    ids = model.tokenize(["X X X X sea lion."])[0]
    toks = model.tokenizer.convert_ids_to_tokens(ids[:8].tolist())
    assert toks[:5] == ["[CLS]", "x", "x", "x", "x"]
    assert toks[5:8] == ["sea", "lion", "."]


def test_text_features_equal_sentence_transformers(model):
    """Unprompted captions give the real all-MiniLM-L6-v2 sentence embedding (independent reference)."""
    from sentence_transformers import SentenceTransformer

    texts = ["a photo of a dog.", "an image of a sea lion."]
    st = SentenceTransformer(str(proxy.minilm_dir()), device="cpu")
    ref = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    with torch.no_grad():
        ours = model.encode_text(texts)
    assert torch.allclose(ours, ref.cpu(), atol=1e-5)


def test_inserted_prompts_change_features_and_get_gradients(model):
    ids = model.tokenize(["X X X X dog.", "X X X X cat."])
    base = model.embed_tokens(ids).detach()
    ctx = torch.nn.Parameter(0.02 * torch.randn(4, model.ctx_dim, generator=torch.Generator().manual_seed(1)))
    prompted = torch.cat([base[:, :1], ctx.unsqueeze(0).expand(2, -1, -1), base[:, 5:]], dim=1)
    out = model.encode_text_embeddings(prompted, ids)
    with torch.no_grad():
        plain = model.encode_text_embeddings(base, ids)
    assert (out - plain).abs().max() > 1e-3
    out.sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    # padding positions must not matter: changing them leaves features unchanged
    noisy = prompted.detach().clone()
    pad = ids == model.tokenizer.pad_token_id
    noisy[pad] += 5.0
    with torch.no_grad():
        assert torch.allclose(model.encode_text_embeddings(noisy, ids), out.detach(), atol=1e-5)


def test_bad_inputs_raise_one_clear_error(model):
    with pytest.raises(ProxyError, match="visual prompts"):
        model.encode_image(torch.randn(1, 3, 32, 32), visual_prompts=[torch.zeros(2, 8)])
    with pytest.raises(ProxyError, match="N,3,H,W"):
        model.encode_image(torch.randn(3, 32, 32))
    with pytest.raises(ProxyError, match="list of strings"):
        model.tokenize("a dog")
    with pytest.raises(ProxyError, match="no built proxy"):
        load_proxy("/nonexistent/proxy")


def test_tiny_build_is_deterministic_and_loads(tmp_path, monkeypatch):
    if not (SHARED_DATA / "caltech-101.tar").exists():
        pytest.skip("shared data not available")
    monkeypatch.setenv("GRAM_DATA_CACHE", str(DATA_CACHE))  # archives extracted once for all tests
    cfg = BuildConfig(seed=3, image_size=32, widths=(8, 8, 16, 16), epochs=1, batch_size=8,
                      use_imagenet=False, max_classes=4, max_per_class=4, eval_heldout=False)
    a = build(cfg, tmp_path / "a", data_dir=SHARED_DATA, log=lambda *_: None)
    b = build(cfg, tmp_path / "b", data_dir=SHARED_DATA, log=lambda *_: None)
    card_a = json.loads((a / "card.json").read_text())
    card_b = json.loads((b / "card.json").read_text())
    assert card_a["weights_sha256"] == card_b["weights_sha256"]
    assert card_a["zero_shot_top1"] == card_b["zero_shot_top1"]
    # the split follows the CoOp rule: 4 sorted folders -> 2 base (trained) + 2 new (held out)
    assert card_a["train_sets"][0]["classes"] == ["face", "leopard"]
    assert card_a["eval_sets"]["caltech101/new"]["classes"] == ["motorbike", "accordion"]
    c = build(BuildConfig(**{**cfg.__dict__, "seed": 4}), tmp_path / "c", data_dir=SHARED_DATA, log=lambda *_: None)
    assert json.loads((c / "card.json").read_text())["weights_sha256"] != card_a["weights_sha256"]
    loaded = load_proxy(a)
    assert loaded.weights_id() == load_proxy(b).weights_id() != load_proxy(c).weights_id()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.encode_image(x), load_proxy(b).encode_image(x))


def test_train_mode_keeps_frozen_towers_in_eval(model):
    model.train()
    assert not model.training and not model.visual.training and not model.text.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), model.encode_image(x))


def test_prompted_clip_runs_on_the_proxy(model):
    """The project's PromptedCLIP (CoOp mode) builds its prompts on the proxy; gradients reach only the context."""
    models = pytest.importorskip("gram_plugin.models")
    pc = models.PromptedCLIP(model, mode="coop", n_ctx=4, ctx_init="a photo of a", classnames=["dog", "sea lion", "cat"])
    batch = {"images": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 2]), "classnames": ["dog", "sea lion", "cat"]}
    logits = pc.logits(batch)
    assert logits.shape == (2, 3)
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    grads = {n: p.grad for n, p in pc.named_parameters() if p.grad is not None}
    assert grads and all("visual" not in n and "text." not in n for n in grads)
    # "a photo of a" as init reproduces the handcrafted caption's features exactly
    with torch.no_grad():
        ref = model.encode_text(["a photo of a dog.", "a photo of a sea lion.", "a photo of a cat."])
        assert torch.allclose(torch.nn.functional.normalize(pc.text_features(), dim=-1), ref, atol=1e-5)


def test_shipped_proxy_is_the_default_build_and_classifies_real_images():
    """The package ships the default build (card = BuildConfig() defaults), and its zero-shot prompt
    classifies the embedded real Caltech images far above chance (weights really are the trained ones)."""
    from dataclasses import asdict

    from gram_plugin.data import default_dataset
    from gram_plugin.finetune import evaluate
    from gram_plugin.models import PromptedCLIP

    shipped = load_proxy()
    assert json.loads(json.dumps(asdict(BuildConfig()))) == shipped.card["config"]
    assert shipped.weights_id().endswith(shipped.card["weights_sha256"][:16])
    ds = default_dataset(shipped.preprocess)
    acc = evaluate(PromptedCLIP(shipped, ctx_init="a photo of a"), ds)
    assert acc > 3 * (1 / len(ds.classnames)), acc
