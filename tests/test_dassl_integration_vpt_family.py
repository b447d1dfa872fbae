"""The wrap on the real upstream VPT / IVLP / MaPLe (muzairkhattak/multimodal-prompt-learning) and
PromptSRC (muzairkhattak/PromptSRC) trainers, run by Dassl.pytorch on CPU.

Skipped unless ``GRAM_MPL_ROOT`` / ``GRAM_PROMPTSRC_ROOT`` are set, an error when one is set and the
code does not import. What the tests replace in the upstream code path (the CLIP weights, CUDA,
Dassl's torch >= 2.6 breakages) is listed in tests/fixtures/upstream.py. Here also:

* ``PREC fp16`` (all upstream configs use it; MaPLe and PromptSRC do not run under fp32 as written:
  MaPLe's ``proj.half()`` and PromptSRC's fp16 zero-shot encoder meet fp32 inputs).
* MaPLe's CLIP is 512 (text) / 768 (vision) wide, as its prompt learner hard-codes, and fp16
  matmuls run ~100x slower than fp32 on CPU, so MaPLe reads an 8-class Caltech101 (4 base classes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fixtures.hand import regulate_by_hand
from fixtures.upstream import caltech_folder, import_dassl, make_cfg as upstream_cfg, upstream as upstream_repo, weights_dir  # noqa: F401,E501  (fixture)

pytestmark = pytest.mark.integration

dassl = import_dassl()

from gram_plugin import GradientRegulator, PromptInit  # noqa: E402
from gram_plugin.adapters import adapter_for, wrap  # noqa: E402

# method -> (config file in the repo's configs/trainers/<method>/, extra opts)
METHODS = {
    "VPT": ("vit_b16_c2_ep5_batch4_4.yaml", ["TRAINER.VPT.PROMPT_DEPTH_VISION", "2"]),
    "IVLP": ("vit_b16_c2_ep5_batch4_2+2ctx.yaml", ["TRAINER.IVLP.PROMPT_DEPTH_VISION", "2", "TRAINER.IVLP.PROMPT_DEPTH_TEXT", "2"]),
    "MaPLe": ("vit_b16_c2_ep5_batch4_2ctx.yaml", ["TRAINER.MAPLE.PROMPT_DEPTH", "2"]),
    "PromptSRC": ("vit_b16_c2_ep20_batch4_4+4ctx.yaml",
                  ["TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2", "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2"]),
}
SMALL_DATA_METHODS = {"MaPLe": 8}  # MaPLe's slow fp16 towers (module docstring): 8 classes


@pytest.fixture
def upstream(request, monkeypatch, weights_dir):
    with upstream_repo(request.param, monkeypatch, weights_dir) as up:
        yield up


@pytest.fixture(scope="module")
def caltech_all(caltech_root, tmp_path_factory):
    return caltech_folder(caltech_root, tmp_path_factory.mktemp("mpl_data"))


@pytest.fixture(scope="module")
def caltech_few(caltech_root, tmp_path_factory):
    return {n: caltech_folder(caltech_root, tmp_path_factory.mktemp(f"mpl_data_{n}cls"), n) for n in set(SMALL_DATA_METHODS.values())}


@pytest.fixture
def data_root(upstream, request):
    n = SMALL_DATA_METHODS.get(upstream.name)
    return request.getfixturevalue("caltech_all") if n is None else request.getfixturevalue("caltech_few")[n]


def make_cfg(up, root, out, opts=()):
    config_file, extra = METHODS[up.name]
    return upstream_cfg(up, root, out, config_file, [
        "DATALOADER.TRAIN_X.BATCH_SIZE", "4", f"TRAINER.{up.node}.PREC", "fp16", "OPTIM.WARMUP_CONS_LR", "0.002", *extra, *opts,
    ])


def loss_of(method, trainer, images, labels):
    """The loss each upstream forward_backward differentiates (fp16 branch), recomputed here."""
    model = trainer.model
    if method == "VPT":
        return model(images, labels, training=True)
    if method != "PromptSRC":
        return model(images, labels)
    node = trainer.cfg.TRAINER.PROMPTSRC
    ce, text_f, fixed, zs_image, image_f, zs_logits, logits = model(images, labels)
    return ce + (
        F.kl_div(F.log_softmax(logits, 1), F.log_softmax(zs_logits, 1), reduction="sum", log_target=True) / logits.numel()
        + F.l1_loss(text_f, fixed) * node.TEXT_LOSS_WEIGHT
        + F.l1_loss(image_f, zs_image) * node.IMAGE_LOSS_WEIGHT
    )


@pytest.mark.parametrize("upstream", list(METHODS), indirect=True)
def test_regulated_step_train_loop_and_checkpoint_on_real_trainer(upstream, data_root, tmp_path):
    from dassl.engine import build_trainer

    method = upstream.name
    trainer = build_trainer(make_cfg(upstream, data_root, tmp_path / "out"))
    adapter = adapter_for(trainer)
    params = adapter.prompt_parameters()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(params) == trainable  # every learnable tensor of the method, nothing frozen
    if method == "PromptSRC":
        assert not any("ZS_image_encoder" in n for n in params)

    g = torch.Generator().manual_seed(7)
    init = {n: (0.05 * torch.randn(p.shape, generator=g)).to(p.dtype) for n, p in params.items()}
    reg = GradientRegulator({n: tuple(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for q in reg.parameters():
            q.add_(0.3 * torch.randn(q.shape, generator=g))
    path = PromptInit(init, {"method": method}).save(tmp_path / "init.safetensors")
    handle = wrap(trainer, init=path, regulator=reg)
    assert sorted(handle.init_names) == sorted(params)
    for n, p in params.items():
        assert torch.equal(p.detach(), init[n])

    batch = next(iter(trainer.train_loader_x))
    trainer.batch_idx, trainer.num_batches = 0, len(trainer.train_loader_x) + 1  # no epoch end (GPA) in this step
    images, labels = trainer.parse_batch_train(batch)
    names = list(params)
    grads = torch.autograd.grad(loss_of(method, trainer, images, labels), [params[n] for n in names])
    lr, wd = trainer.optim.param_groups[0]["lr"], trainer.cfg.OPTIM.WEIGHT_DECAY
    expected = {n: init[n].float() - lr * (regulate_by_hand(reg, n, gr).to(gr.dtype).float() + wd * init[n].float()) for n, gr in zip(names, grads)}
    plain = {n: init[n].float() - lr * (gr.float() + wd * init[n].float()) for n, gr in zip(names, grads)}
    trainer.forward_backward(batch)
    for n in names:
        atol = 2e-3 if params[n].dtype == torch.float16 else 1e-7
        assert torch.allclose(params[n].detach().float(), expected[n], atol=atol, rtol=1e-5), n
    assert any(not torch.allclose(params[n].detach().float(), plain[n], atol=1e-7, rtol=1e-5) for n in names if params[n].dtype == torch.float32)

    # the whole upstream epoch loop (PromptSRC: GPA at the epoch end), checkpoint, the trainer's own load_model
    steps = handle.hooks[0].steps
    trainer.train()
    assert handle.hooks[0].steps == steps + len(trainer.train_loader_x)
    trained = {n: p.detach().clone() for n, p in params.items()}
    fresh = build_trainer(make_cfg(upstream, data_root, tmp_path / "fresh"))
    fresh.load_model(str(tmp_path / "out"), epoch=1)
    for n, p in adapter_for(fresh).prompt_parameters().items():
        assert torch.equal(p.detach(), trained[n]), n


@pytest.mark.parametrize("upstream", ["VPT", "IVLP", "PromptSRC"], indirect=True)
def test_meta_train_through_real_trainer_then_wrap_an_fp16_trainer(upstream, data_root, tmp_path):
    """adapters.meta on the upstream trainer (fp32), its class buffers rebuilt with the repo's own
    clip.tokenize (checked against the trainer's buffers), then the init loaded by an fp16 trainer.
    MaPLe is left out: its ``proj.half()`` does not run under fp32 (see the module docstring)."""
    from clip import clip
    from dassl.engine import build_trainer
    from torchvision import transforms as T

    from gram_plugin.adapters.meta import meta_train
    from gram_plugin.data import ImageDataset, Item, NWayKShotTasks
    from gram_plugin.meta import MetaConfig

    method = upstream.name
    node = upstream.node
    cfg = make_cfg(upstream, data_root, tmp_path / "meta", [f"TRAINER.{node}.PREC", "fp32", "DATASET.NUM_SHOTS", "2"])
    trainer = build_trainer(cfg)
    module = upstream.module
    if method == "PromptSRC":
        # upstream builds the frozen zero-shot encoder in fp16 whatever PREC says (its own fp32 forward
        # fails on it); meta_train runs it in that dtype, so it is left as built
        assert trainer.model.prompt_learner.ZS_image_encoder.conv1.weight.dtype == torch.float16
        clip_model = module.load_clip_to_cpu(cfg, True).float()
    else:
        clip_model = module.load_clip_to_cpu(cfg).float()
    tf = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)])
    ds = trainer.dm.dataset
    tasks = NWayKShotTasks(ImageDataset([Item(x.impath, x.label) for x in ds.train_x], ds.classnames, tf), 2, 1, 1)
    config = MetaConfig(steps=1, meta_batch_size=1, inner_steps=1, inner_lr=0.05, outer_lr=0.01, clip_gamma=5.0, progress=False)
    init = meta_train(trainer, tasks, config, clip_model=clip_model, tokenize=clip.tokenize, regulator=True)
    params = adapter_for(trainer).prompt_parameters()
    assert list(init.tensors) == list(params)
    assert any(not torch.equal(init.tensors[n], p.detach()) for n, p in params.items())

    fp16 = build_trainer(make_cfg(upstream, data_root, tmp_path / "tune"))
    handle = wrap(fp16, init=init)
    assert sorted(handle.init_names) == sorted(params)
    for n, p in adapter_for(fp16).prompt_parameters().items():
        assert torch.equal(p.detach(), init.tensors[n].to(p.dtype)), n
    batch = next(iter(fp16.train_loader_x))
    fp16.batch_idx, fp16.num_batches = 0, len(fp16.train_loader_x) + 1
    fp16.forward_backward(batch)
    assert handle.hooks[0].steps == 1


@pytest.mark.parametrize("prec", ["fp32", "amp"])
@pytest.mark.parametrize("upstream", ["IVLP"], indirect=True)
def test_ivlp_fp32_and_amp_paths_take_the_regulated_step(upstream, prec, data_root, tmp_path, monkeypatch):
    """The other two precision paths on a VPT-family trainer whose fp32 / amp branches run as written
    (VPT's and PromptSRC's amp branches do not, MaPLe's proj.half() needs fp16: module docstring).
    amp: a CPU GradScaler and float16 autocast in place of torch.cuda.amp's, which disable themselves
    without a GPU; the regulator sees the unscaled gradients."""
    from dassl.engine import build_trainer

    if prec == "amp":
        monkeypatch.setattr(upstream.module, "GradScaler", lambda *a, **k: torch.amp.GradScaler("cpu", init_scale=2.0**10))
        monkeypatch.setattr(upstream.module, "autocast", lambda *a, **k: torch.autocast("cpu", dtype=torch.float16))
    trainer = build_trainer(make_cfg(upstream, data_root, tmp_path / "out", [f"TRAINER.{upstream.node}.PREC", prec]))
    params = adapter_for(trainer).prompt_parameters()
    assert all(p.dtype == torch.float32 for p in params.values())
    g = torch.Generator().manual_seed(3)
    init = {n: 0.05 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    reg = GradientRegulator({n: tuple(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for q in reg.parameters():
            q.add_(0.3 * torch.randn(q.shape, generator=g))
    handle = wrap(trainer, init=PromptInit(init, {"method": "IVLP"}), regulator=reg)

    batch = next(iter(trainer.train_loader_x))
    trainer.batch_idx, trainer.num_batches = 0, len(trainer.train_loader_x) + 1
    images, labels = trainer.parse_batch_train(batch)
    names = list(params)
    if prec == "amp":  # the scaler's arithmetic: fp16 gradients of the scaled loss, unscaled in float32
        with upstream.module.autocast():
            loss = loss_of("IVLP", trainer, images, labels)
        grads = [gr / 2.0**10 for gr in torch.autograd.grad(loss * 2.0**10, [params[n] for n in names])]
    else:
        grads = torch.autograd.grad(loss_of("IVLP", trainer, images, labels), [params[n] for n in names])
    lr, wd = trainer.optim.param_groups[0]["lr"], trainer.cfg.OPTIM.WEIGHT_DECAY
    trainer.forward_backward(batch)
    assert handle.hooks[0].steps == 1
    for n, gr in zip(names, grads):
        expected = init[n] - lr * (regulate_by_hand(reg, n, gr) + wd * init[n])
        assert torch.allclose(params[n].detach(), expected, rtol=1e-5, atol=1e-7), n
    n0, g0 = names[0], grads[0]
    assert not torch.allclose(params[n0].detach(), init[n0] - lr * (g0 + wd * init[n0]), rtol=1e-5, atol=1e-7)
