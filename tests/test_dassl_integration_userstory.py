"""The user story on the real upstream trainers: meta-train an init through your own trainer with
the README's command, then the README's three lines, verbatim, in a CoOp fork.

* README.md's "Three lines in a CoOp fork": its ``gram-plugin meta-train --dassl-config`` command run
  from the CoOp checkout (plus the options of a small run), then its python block executed as written
  against the real CoOp trainer, and the fork's own ``load_model`` reading the trained prompt back;
* the same command through the real PromptSRC trainer, its init loaded with ``wrap`` and trained;
* ``wrap`` is all-or-nothing: every refused call leaves the built trainer untouched.

What the tests replace in the upstream code path (the CLIP weights, CUDA, Dassl's torch >= 2.6
breakages) is listed in tests/fixtures/upstream.py; skipped unless the ``GRAM_*_ROOT`` variables
are set, an error when they are set and the code does not import.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from fixtures.hand import random_regulator
from fixtures.upstream import (  # noqa: F401  (coop, weights_dir: fixtures)
    SMALL_RUN, caltech_folder, coop, first_batch, import_dassl, init_file, make_cfg, upstream, weights_dir,
)

pytestmark = pytest.mark.integration

dassl = import_dassl()

import gram_plugin.adapters  # noqa: E402
from gram_plugin import PromptInit  # noqa: E402
from gram_plugin.adapters import adapter_for, wrap  # noqa: E402
from gram_plugin.cli import main as gram_plugin_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# trainer -> (upstream config, batch size); CoOp's vit_b16_ctxv1 has CTX_INIT "a photo of a": ctx (4, 64)
CONFIGS = {
    "CoOp": ("vit_b16_ctxv1.yaml", "8"),
    "PromptSRC": ("vit_b16_c2_ep20_batch4_4+4ctx.yaml", "4"),
}
DEPTHS = {"PromptSRC": ["TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2", "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2"]}


@pytest.fixture(scope="module")
def data_root(caltech_root, tmp_path_factory):
    return caltech_folder(caltech_root, tmp_path_factory.mktemp("caltech"))


@pytest.fixture(scope="module")
def data_16_classes(caltech_root, tmp_path_factory):
    # PromptSRC builds its class features from 60 templates through an fp16 CLIP, slow on CPU
    return caltech_folder(caltech_root, tmp_path_factory.mktemp("caltech16"), 16)


def story_cfg(up, data_root, out, prec=None, opts=()):
    """The upstream config as a small run; ``prec`` None keeps the config's own PREC (fp16)."""
    config, batch = CONFIGS[up.name]
    return make_cfg(up, data_root, out, config, [
        *([f"TRAINER.{up.node}.PREC", prec] if prec else []), "DATALOADER.TRAIN_X.BATCH_SIZE", batch,
        *DEPTHS.get(up.name, []), *opts,
    ])


def readme_walkthrough() -> tuple[str, str]:
    """README.md's "Three lines in a CoOp fork": its meta-train command and its python block, as written."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Three lines in a CoOp fork", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)```", section, re.S)
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert command and block, "README.md's 'Three lines in a CoOp fork' lacks its bash command or its python block"
    return command.group(1), block.group(1)


# the command's options for a small run (appended: argparse keeps the last value of an option)
SMALL_META = ["--shots", "2", "--n-way", "4", "--k-support", "1", "--k-query", "1", "--meta-steps", "2",
              "--meta-batch-size", "2", "--checkpoint-every", "1", "--quiet"]


def meta_train_command(argv, out, data_root, opts=()):
    """Run ``gram-plugin ...`` in this process (the upstream fixture's patches apply) from the fork's root,
    into the run folder ``out``; returns the init it wrote there."""
    assert argv[0] == "gram-plugin", argv
    options = [*argv[1:], "--out", str(out), *SMALL_META]
    trailing = [*SMALL_RUN, "OUTPUT_DIR", str(Path(out).parent / "meta_output"), *opts]
    options = [str(data_root) if a == "$DATA" else a for a in options]
    rc = gram_plugin_cli([*options, *trailing])
    assert rc == 0, f"gram-plugin {' '.join(options)} exited {rc}"
    assert (Path(out) / "config.yaml").is_file() and (Path(out) / "meta" / "checkpoint.safetensors").is_file()
    return PromptInit.load(Path(out) / "init.safetensors")


def test_readme_walkthrough_on_real_coop(coop, data_root, tmp_path, monkeypatch):
    """README's command, then README's block executed as written in the folder holding the init the
    command wrote: training starts from that init, every step is regulated by the regulator saved
    with it, and the fork's own load_model reads the trained prompt back."""
    from dassl.engine import build_trainer

    command, code = readme_walkthrough()
    assert "build_trainer(cfg)" in code and "trainer.train()" in code
    argv = shlex.split(command.replace("\\\n", " "))
    assert "--dassl-config" in argv and "--out" in argv, command
    run = argv[argv.index("--out") + 1]
    assert f'init="{run}/init.safetensors"' in code, "the README's python block loads the init its command writes"
    monkeypatch.chdir(coop.root)  # the command runs from the fork's root (its train.py, configs/)
    init = meta_train_command(argv, tmp_path / run, data_root)
    assert list(init.tensors) == ["prompt_learner.ctx"] and init.regulator_state

    cfg = story_cfg(coop, data_root, tmp_path / "out")
    assert cfg.TRAINER.COOP.PREC == "fp16"  # the config as a user runs it
    monkeypatch.chdir(tmp_path)
    seen, handles = [], []

    def build_and_watch(cfg):  # the fork's build_trainer, plus a record of the ctx each forward sees
        trainer = build_trainer(cfg)
        trainer.model.register_forward_pre_hook(lambda m, a: seen.append(m.prompt_learner.ctx.detach().clone()) and None)
        return trainer

    real_wrap = gram_plugin.adapters.wrap  # watched, so the test can see the handle the README discards
    monkeypatch.setattr(gram_plugin.adapters, "wrap", lambda *a, **k: handles.append(real_wrap(*a, **k)) or handles[-1])
    namespace = {"build_trainer": build_and_watch, "cfg": cfg}
    exec(compile(code, "README.md (Three lines in a CoOp fork)", "exec"), namespace)

    trainer = namespace["trainer"]
    (handle,) = handles
    n_batches = len(trainer.train_loader_x)
    assert len(seen) == n_batches > 1
    assert torch.equal(seen[0], init.tensors["prompt_learner.ctx"].half())  # training started from the command's init
    assert handle.hooks[0].steps == n_batches  # every step regulated
    state = handle.regulator.state_dict()
    assert set(state) == set(init.regulator_state)
    for k, v in init.regulator_state.items():  # by the regulator saved with the init
        assert torch.equal(state[k], v), k
    trained = trainer.model.prompt_learner.ctx.detach().clone()
    assert not torch.equal(trained, seen[0])

    fresh = build_trainer(story_cfg(coop, data_root, tmp_path / "fresh"))
    fresh.load_model(str(tmp_path / "out"), epoch=1)
    assert torch.equal(fresh.model.prompt_learner.ctx.detach(), trained)


def test_wrap_is_all_or_nothing_on_real_coop(coop, data_root, tmp_path):
    """Every refused wrap leaves the trainer as built: prompts, optimiser hooks, forward_backward."""
    from dassl.engine import build_trainer

    trainer = build_trainer(story_cfg(coop, data_root, tmp_path / "out"))
    ctx = trainer.model.prompt_learner.ctx
    built = ctx.detach().clone()
    hooks_before = len(trainer.optim._optimizer_step_pre_hooks)

    good = 0.3 * torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    init_file({"prompt_learner.ctx": torch.zeros(16, 64)}, random_regulator({"prompt_learner.ctx": (16, 64)})).save(tmp_path / "wrong_shape.safetensors")
    init_file({"prompt_learner.ctx": good}, random_regulator({"prompt_learner.other": (4, 64)})).save(tmp_path / "other_reg.safetensors")
    init_file({"prompt_learner.ctx": good}).save(tmp_path / "no_reg.safetensors")
    init_file({"prompt_learner.ctx": good}, random_regulator({"prompt_learner.ctx": (4, 64)})).save(tmp_path / "good.safetensors")
    refused = {
        "an init of another shape": dict(init=tmp_path / "wrong_shape.safetensors"),
        "a regulator saved for another tensor": dict(init=tmp_path / "other_reg.safetensors"),
        "regulator=True with an init that holds none": dict(init=tmp_path / "no_reg.safetensors", regulator=True),
        "a missing init file": dict(init=tmp_path / "missing.safetensors"),
        "a prompt name the trainer lacks": dict(init=tmp_path / "no_reg.safetensors", params=["prompt_learner.nope"]),
        "ProGrad on a trainer whose teacher cannot be built": dict(init=tmp_path / "wrong_shape.safetensors", prograd=1.0),
    }
    for what, kwargs in refused.items():
        with pytest.raises((ValueError, TypeError, FileNotFoundError)):
            wrap(trainer, **kwargs)
        assert torch.equal(ctx.detach(), built), what
        assert len(trainer.optim._optimizer_step_pre_hooks) == hooks_before, what
        assert "forward_backward" not in trainer.__dict__, what
        assert trainer.optim.param_groups[0]["params"][0] is ctx, what

    # and a good wrap still works on the same trainer afterwards
    handle = wrap(trainer, init=tmp_path / "good.safetensors", regulator=True)
    assert torch.equal(ctx.detach(), good.to(ctx.dtype))
    trainer.forward_backward(first_batch(trainer))
    assert handle.hooks[0].steps == 1


def test_meta_train_command_through_real_promptsrc_then_wrap(data_16_classes, tmp_path, monkeypatch, weights_dir):
    """The README's command pointed at PromptSRC's config (all its prompt tensors meta-learned, its
    frozen zero-shot encoder left alone), the init loaded by the fp16 trainer with wrap and trained."""
    from dassl.engine import build_trainer

    with upstream("PromptSRC", monkeypatch, weights_dir) as up:
        monkeypatch.chdir(up.root)
        argv = ["gram-plugin", "meta-train", "--dassl-config", f"configs/trainers/PromptSRC/{CONFIGS['PromptSRC'][0]}",
                "--dataset-config", "configs/datasets/caltech101.yaml", "--trainer", "PromptSRC", "--root", "$DATA",
                "--out", "gram_run"]
        init = meta_train_command(argv, tmp_path / "gram_run", data_16_classes, DEPTHS["PromptSRC"])

        tuned = build_trainer(story_cfg(up, data_16_classes, tmp_path / "tune", opts=["DATASET.NUM_SHOTS", "2"]))
        params = adapter_for(tuned).prompt_parameters()
        assert list(init.tensors) == list(params) and init.regulator_state
        assert not any("ZS_image_encoder" in n for n in init.tensors)
        handle = wrap(tuned, init=tmp_path / "gram_run" / "init.safetensors", regulator=True)
        assert sorted(handle.init_names) == sorted(params)
        for n, p in params.items():
            assert torch.equal(p.detach(), init.tensors[n].to(p.dtype)), n
        tuned.train()
        assert handle.hooks[0].steps == len(tuned.train_loader_x) > 1
