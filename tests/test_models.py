"""PromptedCLIP: shapes, gradients reach only prompts, class-set switching, meta-training through it."""

import pytest
import torch

from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer, Task, prompt_parameters
from gram_plugin.models import PromptedCLIP

NAMES = ["dog", "cat", "car"]


def _batch(n=5, images=True):
    y = torch.arange(n) % 3
    key, val = ("images", torch.randn(n, 3, 32, 32)) if images else ("features", torch.randn(n, 32))
    return {key: val, "labels": y, "classnames": NAMES}


@pytest.mark.parametrize("mode,deep,expected", [
    ("coop", False, ["ctx"]),
    ("vpt", False, ["vpt.0"]),
    ("vpt", True, ["vpt.0", "vpt.1"]),
    ("unigram", True, ["ctx", "vpt.0", "vpt.1"]),
])
def test_gradients_reach_only_prompts(bb, mode, deep, expected):
    m = PromptedCLIP(bb, mode=mode, vpt_deep=deep)
    assert list(prompt_parameters(m)) == expected
    logits = m.logits(_batch())
    assert logits.shape == (5, 3)
    torch.nn.functional.cross_entropy(logits, _batch()["labels"]).backward()
    with_grad = sorted(n for n, p in m.named_parameters() if p.grad is not None)
    assert with_grad == sorted(expected)
    assert all(float(p.grad.abs().sum()) > 0 for p in prompt_parameters(m).values())


def test_ctx_init_from_phrase_and_class_token_at_end(bb):
    m = PromptedCLIP(bb, ctx_init="a photo of a", classnames=NAMES)
    ids = bb.tokenize(["a photo of a dog."])
    torch.testing.assert_close(m.ctx, bb.embed_tokens(ids)[0, 1:5])
    # the prompted text of class 0 is exactly "a photo of a dog." through the frozen tower
    torch.testing.assert_close(m.text_features()[0], bb.clip.encode_text(ids)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="n_ctx=3"):
        PromptedCLIP(bb, n_ctx=3, ctx_init="a photo of a")


def test_set_classnames_switches_tasks(bb):
    m = PromptedCLIP(bb, ctx_init=None)
    assert m.logits({"features": torch.randn(2, 32), "classnames": ["a", "b", "c", "d"]}).shape == (2, 4)
    assert m.logits({"features": torch.randn(2, 32), "classnames": ["x", "y"]}).shape == (2, 2)
    with pytest.raises(ValueError, match="visual prompts"):
        PromptedCLIP(bb, mode="vpt").logits(_batch(images=False))
    with pytest.raises(KeyError, match="images"):
        m.logits({"labels": torch.zeros(1)})


def test_labels_beyond_the_class_names_are_one_clear_error(bb):
    m = PromptedCLIP(bb, ctx_init=None)
    batch = {"features": torch.randn(3, 32), "labels": torch.tensor([0, 1, 3]), "classnames": ["a", "b", "c"]}
    with pytest.raises(ValueError, match="labels run from 0 to 3 but the batch has 3 class names"):
        m.loss(batch)
    batch["labels"] = torch.tensor([0, 1, 2])
    assert torch.isfinite(m.loss(batch))


def test_reused_text_features_give_the_same_logits(bb):
    m = PromptedCLIP(bb, ctx_init=None, classnames=NAMES)
    batch = _batch(images=False)
    torch.testing.assert_close(m.logits(batch, m.text_features()), m.logits(batch), rtol=0, atol=0)


def test_meta_training_second_order_through_model(bb):
    m = PromptedCLIP(bb, mode="coop")
    task = Task(_batch(6, images=False), _batch(6, images=False))
    tr = MetaPromptTrainer(m.meta_loss_fn(), m, regulator=GradientRegulator.for_module(m),
                           config=MetaConfig(inner_steps=2, progress=False))
    out = tr.task_losses(task)
    out["query_loss"].backward()
    assert m.ctx.grad is not None and torch.isfinite(m.ctx.grad).all() and m.ctx.grad.norm() > 0
    before = m.ctx.detach().clone()
    tr.outer_step([task])
    assert not torch.equal(before, m.ctx.detach())


def test_bf16_autocast_forward_backward(bb):
    m = PromptedCLIP(bb, mode="unigram")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.loss(_batch())
    loss.backward()
    assert torch.isfinite(loss) and m.ctx.grad.dtype == torch.float32 and torch.isfinite(m.ctx.grad).all()
    assert m.vpt[0].grad is not None
