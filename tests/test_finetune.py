"""Prompt tuning: a random tiny CLIP learns real base classes well above chance; regulated and ProGrad steps."""

import pytest
import torch

from gram_plugin import GradientRegulator, PromptInit
from gram_plugin.backbones import tiny_openclip
from gram_plugin.cache import FeatureCache
from gram_plugin.data import default_dataset, split_train_test, subsample_classes
from gram_plugin.finetune import evaluate, evaluate_base_new, harmonic_mean, tune
from gram_plugin.models import PromptedCLIP


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    bb = tiny_openclip(0)
    ds = FeatureCache(tmp_path_factory.mktemp("fc"), progress=False).attach(bb, default_dataset(bb.preprocess))
    train, test = split_train_test(ds, 0.5, seed=0)
    return bb, {p: (subsample_classes(train, p), subsample_classes(test, p)) for p in ("base", "new")}


def test_random_backbone_fits_real_base_classes_above_chance(setup):
    bb, d = setup
    base_train, base_test = d["base"]
    model = PromptedCLIP(bb, mode="coop", ctx_init="a photo of a")
    before = evaluate(model, base_test)
    hist = tune(model, base_train, epochs=40, lr=0.01, batch_size=16, optimizer="adam", seed=0, progress=False)
    after_train, after_test = evaluate(model, base_train), evaluate(model, base_test)
    chance = 1 / len(base_train.classnames)  # 0.2: five base classes
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert after_train >= chance + 0.25, (before, after_train)
    assert after_test >= chance + 0.2, (before, after_test)  # held-out images of the same classes


def test_regulated_step_equals_regulator_of_gradient(setup):
    bb, d = setup
    base_train, _ = d["base"]
    model = PromptedCLIP(bb, mode="coop")
    reg = GradientRegulator.for_module(model, init_gain=0.5)
    with torch.no_grad():
        for p in reg.parameters():
            p.add_(0.05 * torch.randn_like(p))
    init = PromptInit.from_module(model)
    init.regulator_state = dict(reg.state_dict())
    init.metadata["regulator_config"] = reg.to_config()
    start = model.ctx.detach().clone()
    # reference: one plain SGD step on the regulated gradient of the same batch
    sub = base_train.subset(range(len(base_train)))
    ref = PromptedCLIP(bb, mode="coop")
    ref.set_classnames(sub.classnames)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(sub), generator=g).tolist()
    batch = sub.batch(idx)
    loss = torch.nn.functional.cross_entropy(ref.logits(batch), batch["labels"])
    (grad,) = torch.autograd.grad(loss, [ref.ctx])
    expected = start - 0.1 * reg("ctx", grad).detach()
    tune(model, sub, epochs=1, lr=0.1, batch_size=len(sub), init=init, optimizer="sgd", seed=0, progress=False)
    torch.testing.assert_close(model.ctx.detach(), expected, rtol=1e-4, atol=1e-6)
    # and without the regulator the step is the raw gradient
    plain = PromptedCLIP(bb, mode="coop")
    tune(plain, sub, epochs=1, lr=0.1, batch_size=len(sub), init=init, use_regulator=False, seed=0, progress=False)
    torch.testing.assert_close(plain.ctx.detach(), start - 0.1 * grad, rtol=1e-4, atol=1e-6)


def test_prograd_and_base_new_eval(setup):
    bb, d = setup
    model = PromptedCLIP(bb, mode="coop")
    hist = tune(model, d["base"][0], epochs=2, lr=0.01, optimizer="adam", prograd_lambda=1.0, progress=False,
                evaluate_fn=lambda: evaluate_base_new(model, d["base"][1], d["new"][1]))
    assert {"base", "new", "H", "train_loss"} <= set(hist[-1])
    assert hist[-1]["H"] == pytest.approx(harmonic_mean(hist[-1]["base"], hist[-1]["new"]))
    assert harmonic_mean(0.5, 0.25) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="ProGrad needs a text prompt"):
        tune(PromptedCLIP(bb, mode="vpt"), d["base"][0], epochs=1, prograd_lambda=1.0, progress=False)
