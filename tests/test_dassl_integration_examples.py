"""Every yaml config under examples/ drives its real upstream trainer, the way a fork runs it.

Each config is run by the upstream repository's own ``train.py`` ``main`` (``setup_cfg`` with the
dataset config, the example config and command-line opts, ``build_trainer``, ``train()``), with the
two lines a fork adds (examples/coop_fork/README.md): ``add_gram_cfg(cfg)`` at the end of its
``extend_cfg`` and ``wrap(trainer)`` after ``build_trainer``. The config's settings are used as
written (PREC fp16, prompt depths, ``cfg.GRAM.*``) except what makes it a small CPU run on the
shared Caltech101 (tests/fixtures/upstream.py: tiny random CLIP, ``INPUT.SIZE 32``, 1 shot of the
base classes, one epoch, no test pass), a batch size of 4 (so each config takes several steps),
and ``GRAM.INIT``: a config that names an init file gets one made for the tiny trainer's prompt
tensors. CoCoOp, MaPLe and PromptSRC read an 8-class Caltech101 with 2 shots (``SMALL_DATA``: slow
on CPU in fp16). The tiny CLIP has 2 layers, so prompt depths beyond 2 create prompts no layer uses (they get
no gradient), as in upstream with a shallower backbone.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import pytest
import torch

from fixtures.hand import random_regulator
from fixtures.upstream import SMALL_RUN, caltech_folder, import_dassl, init_file, upstream, weights_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

dassl = import_dassl()

import gram_plugin.adapters  # noqa: E402
from gram_plugin.adapters import add_gram_cfg, adapter_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIGS = sorted((REPO / "examples").glob("*/configs/trainers/*/*.yaml"))
# trainer -> (classes, shots): 8 Caltech101 classes (4 base) where upstream is slow on CPU: MaPLe's
# 512/768-wide fp16 towers, CoCoOp's text encoder run per image, PromptSRC's 60-template class features
SMALL_DATA = {"MaPLe": (8, "2"), "CoCoOp": (8, "2"), "PromptSRC": (8, "2")}


def test_the_examples_have_configs():
    assert len(EXAMPLE_CONFIGS) >= 7, EXAMPLE_CONFIGS


@pytest.fixture(scope="module")
def caltech(caltech_root, tmp_path_factory):
    folders = {}

    def get(n_classes=None):
        if n_classes not in folders:
            folders[n_classes] = caltech_folder(caltech_root, tmp_path_factory.mktemp(f"caltech_{n_classes or 'all'}"), n_classes)
        return folders[n_classes]

    return get


def fork_args(up, config, data_root, out, opts):
    """What the fork's argparse hands main() for `python train.py --root ... --config-file ... OPTS`."""
    return Namespace(
        root=str(data_root), output_dir=str(out), resume="", seed=1, source_domains=None, target_domains=None,
        transforms=None, trainer=up.name, backbone="", head="", config_file=str(config),
        dataset_config_file=str(up.root / "configs/datasets/caltech101.yaml"), model_dir="", load_epoch=None,
        eval_only=False, no_train=False, opts=list(opts),
    )


@pytest.mark.parametrize("config", EXAMPLE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_example_config_drives_its_real_trainer(config, caltech, weights_dir, tmp_path, monkeypatch):
    from dassl.engine import build_trainer
    from yacs.config import CfgNode

    trainer_name = config.parent.name
    with upstream(trainer_name, monkeypatch, weights_dir) as up:
        n_classes, shots = SMALL_DATA.get(trainer_name, (None, "1"))
        data_root = caltech(n_classes)
        opts = [*SMALL_RUN, "DATASET.NUM_SHOTS", shots, "DATALOADER.TRAIN_X.BATCH_SIZE", "4"]
        gram = CfgNode.load_cfg(config.read_text())["GRAM"]
        assert gram["ENABLED"], f"{config}: an example config that does not enable GRAM"

        # the fork: add_gram_cfg at the end of extend_cfg, wrap(trainer) after build_trainer
        extend_cfg = up.train.extend_cfg
        monkeypatch.setattr(up.train, "extend_cfg", lambda cfg: (extend_cfg(cfg), add_gram_cfg(cfg)))
        init_path = tmp_path / "init.safetensors"
        if gram["INIT"]:  # the config names an init file: GRAM.INIT points at one made for this trainer
            opts += ["GRAM.INIT", str(init_path)]
        built, seen, init = [], [], {}

        def build_and_wrap(cfg):
            trainer = build_trainer(cfg)
            params = adapter_for(trainer).prompt_parameters()
            if cfg.GRAM.INIT:  # written now, before wrap reads it: its shapes are the built trainer's
                g = torch.Generator().manual_seed(11)
                init.update({n: (0.05 * torch.randn(p.shape, generator=g)).to(p.dtype) for n, p in params.items()})
                init_file(init, random_regulator({n: tuple(p.shape) for n, p in params.items()}, seed=2)).save(init_path)
            built.append((trainer, gram_plugin.adapters.wrap(trainer)))

            def record_first_prompts(module, args):  # the prompts the first step starts from
                if not seen:
                    seen.append({n: p.detach().clone() for n, p in params.items()})

            trainer.model.register_forward_pre_hook(record_first_prompts)
            return trainer

        monkeypatch.setattr(up.train, "build_trainer", build_and_wrap)
        monkeypatch.setattr(up.train, "collect_env_info", lambda: "(not collected in the test)")

        up.train.main(fork_args(up, config, data_root, tmp_path / "out", opts))

        (trainer, handle), = built
        n_steps = len(trainer.train_loader_x)
        assert n_steps >= 2
        assert handle.enabled and handle.hooks, handle
        assert handle.hooks[0].steps == n_steps  # every step of the epoch regulated
        assert (handle.regulator is not None) == bool(init), handle  # REGULATOR "init": the one saved with the init
        if gram.get("PROGRAD"):
            assert "forward_backward" in trainer.__dict__  # ProGrad's wrapper installed
        if init:
            assert sorted(handle.init_names) == sorted(init)
            for n, t in init.items():
                assert torch.equal(seen[0][n], t), n  # training started from the init
        assert (tmp_path / "out").is_dir() and any((tmp_path / "out").rglob("model.pth.tar-1"))  # save_model ran
