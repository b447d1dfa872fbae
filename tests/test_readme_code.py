"""The Python code blocks of README.md and examples/coop_fork/README.md run as written.

Each block is extracted from the Markdown and executed against the fixture trainers
(tests/fixtures/dassl_like.py: Dassl's TrainerX and CoOp on a tiny CLIP) with what its prose
assumes already there: the fork's ``cfg`` and ``build_trainer``; the init files the blocks load
(made by meta-training through the fixture trainer, as step 2 of the walk-through does with the
real one); for the core-API block a ``model`` with a prompt learner and a ``task_source``. A block
preceded by ``<!-- alternatives -->`` holds one alternative per line (after its import lines); each
runs on a fresh trainer.
After running, the test checks what the block promises (the init swapped in, the hooks installed,
the trainer trained, the functions the fork calls defined and working).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_clip
from fixtures import dassl_like
from gram_plugin import PromptInit
from test_adapters_coop import fake_dassl  # noqa: F401  (fixture: a Dassl stand-in for patch_dassl)

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- (?P<tag>[\w-]+) -->\n)?```python\n(?P<code>.*?)```", re.S)
INIT_LITERAL = re.compile(r"""init=["']([^"']+\.safetensors)["']""")


def python_blocks(path: Path) -> list[tuple[str, str, str]]:
    text = path.read_text(encoding="utf-8")
    out = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append((f"{path.relative_to(REPO)}:{line}", m.group("tag") or "", m.group("code")))
    return out


BLOCKS = python_blocks(REPO / "README.md") + python_blocks(REPO / "examples" / "coop_fork" / "README.md")


def test_the_readmes_have_the_blocks_this_test_runs():
    where = [b[0].split(":")[0] for b in BLOCKS]
    assert where.count("README.md") >= 2 and where.count("examples/coop_fork/README.md") >= 3


class ForkCoOp(dassl_like.CoOp):
    """The fixture CoOp plus the ``train()`` a built Dassl trainer has (a short epoch)."""

    def train(self):
        self.num_batches = 2
        for self.batch_idx in range(self.num_batches):
            self.forward_backward(dassl_like.make_batch(seed=self.batch_idx))


def fork_cfg(enabled=False, init=""):
    cfg = dassl_like.make_cfg(ctx_init="a photo of a", gram={"ENABLED": enabled, "INIT": init})
    return cfg


def make_init(path: Path) -> None:
    """A GRAM init for the fixture trainer, meta-trained through it (tiny run)."""
    from torchvision import transforms as T

    from gram_plugin.adapters.meta import meta_train
    from gram_plugin.data import NWayKShotTasks, default_dataset, subsample_classes
    from gram_plugin.meta import MetaConfig

    trainer = ForkCoOp(fork_cfg(), dassl_like.CLASSNAMES, lambda: make_tiny_clip(0))
    data = subsample_classes(default_dataset(T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])), "base")
    config = MetaConfig(steps=1, meta_batch_size=1, inner_steps=1, inner_lr=0.05, progress=False)
    init = meta_train(trainer, NWayKShotTasks(data, 2, 1, 1), config, clip_model=make_tiny_clip(0),
                      tokenize=dassl_like.tokenize, regulator=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    init.save(path)


def random_tasks(n_cls=5, n=4):
    from gram_plugin.tasks import FixedTasks, Task

    def batch(seed):
        b = dassl_like.make_batch(n=n, seed=seed, n_cls=n_cls)
        return {"images": b["img"], "labels": b["label"]}

    return FixedTasks([Task(batch(2 * i), batch(2 * i + 1)) for i in range(3)])


@pytest.fixture
def dassl_for_patch(request):
    if importlib.util.find_spec("dassl") is not None:
        return None
    return request.getfixturevalue("fake_dassl")


@pytest.mark.parametrize("where,tag,code", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_readme_block_runs_as_written(where, tag, code, tmp_path, monkeypatch, dassl_for_patch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    inits = sorted(set(INIT_LITERAL.findall(code)))
    for name in inits:
        make_init(tmp_path / name)
    built = []

    def build_trainer(cfg):
        trainer = ForkCoOp(cfg, dassl_like.CLASSNAMES, lambda: make_tiny_clip(0))
        built.append(trainer)
        return trainer

    namespace = {
        "__name__": "readme_block",
        "build_trainer": build_trainer,
        "cfg": fork_cfg(),
        "F": F,
        "model": build_trainer(fork_cfg()).model,
        "task_source": random_tasks(),
    }
    lines = [code]
    if tag == "alternatives":  # import lines are shared; every other line is one alternative
        imports = [ln for ln in code.splitlines() if ln.startswith(("from ", "import "))]
        lines = ["\n".join(imports + [ln]) for ln in code.splitlines() if ln.strip() and ln not in imports]
    for snippet in lines:
        namespace["trainer"] = build_trainer(fork_cfg())
        exec(compile(snippet, where, "exec"), namespace)
        if "wrap(" in snippet and "def main" not in snippet:  # a wrap call: the init is in and steps are hooked
            trainer = namespace["trainer"] if tag == "alternatives" else built[-1]
            handle = trainer._gram_wrap
            trained = "trainer.train()" in snippet
            ctx = trainer.model.prompt_learner.ctx.detach()
            if inits:
                init_ctx = PromptInit.load(tmp_path / inits[0]).tensors["prompt_learner.ctx"]
                assert handle.init_names == ["prompt_learner.ctx"]
                assert torch.equal(ctx, init_ctx) != trained  # swapped in; moved by training
            if "regulator=None" in snippet:
                assert handle.regulator is None and not handle.hooks
            else:
                assert handle.regulator is not None
                assert [h.steps for h in handle.hooks] == [2 if trained else 0]

    if "def extend_cfg" in code:  # the fork's train.py: call what the fork calls
        init_path = tmp_path / "inits" / "fork.safetensors"
        make_init(init_path)
        cfg = dassl_like.make_cfg(ctx_init="a photo of a")
        namespace["extend_cfg"](cfg)
        assert cfg.GRAM.ENABLED is False and cfg.GRAM.INIT == ""
        cfg.GRAM.ENABLED, cfg.GRAM.INIT = True, str(init_path)
        namespace["setup_cfg"] = lambda args: cfg
        namespace["main"](None)
        trainer = built[-1]
        assert trainer.cfg is cfg and trainer._gram_wrap.hooks
        assert torch.equal(trainer.model.prompt_learner.ctx.detach(),
                           PromptInit.load(init_path).tensors["prompt_learner.ctx"])
    if "MetaPromptTrainer(" in code:
        assert PromptInit.load(tmp_path / "gram_init.safetensors").metadata["meta_steps"] == 200
        assert (tmp_path / "runs" / "meta" / "checkpoint.safetensors").exists()
    if "patch_dassl()" in code:
        assert getattr(sys.modules["dassl.optim.lr_scheduler"]._BaseWarmupScheduler, "_gram_plugin_patched", False)
