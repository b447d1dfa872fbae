"""Meta-training's progress bar moves with every task, not only at the end of an outer step, so a
long first step (MaPLe at 224 px on a CPU: minutes) already shows a rate and the time left."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gram_plugin import MetaConfig, MetaPromptTrainer, Task


class Tasks:
    def sample(self, g):
        x = torch.randn(6, 3, generator=g)
        return Task((x[:3], x[:3].sum(1, keepdim=True)), (x[3:], x[3:].sum(1, keepdim=True)))


def test_the_bar_advances_by_each_tasks_share_of_a_step(monkeypatch):
    import tqdm.auto

    positions = []

    class Recording(tqdm.auto.tqdm):
        def update(self, n=1):
            out = super().update(n)
            positions.append(self.n)
            return out

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    cfg = MetaConfig(inner_lr=0.1, inner_steps=1, outer_lr=0.01, meta_batch_size=4, steps=2, seed=0, progress=True)
    trainer = MetaPromptTrainer(lambda p, b: F.mse_loss(b[0] @ p["w"].t(), b[1]), {"w": torch.zeros(1, 3)}, config=cfg)
    trainer.fit(Tasks())
    assert positions == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])


def test_accumulate_gradients_reports_the_tasks_of_each_backward():
    cfg = MetaConfig(inner_lr=0.1, inner_steps=1, meta_batch_size=3, steps=1, seed=0, progress=False)
    trainer = MetaPromptTrainer(lambda p, b: F.mse_loss(b[0] @ p["w"].t(), b[1]), {"w": torch.zeros(1, 3)}, config=cfg)
    done = []
    g = torch.Generator().manual_seed(0)
    trainer.outer_step([Tasks().sample(g) for _ in range(3)], on_tasks_done=done.append)
    assert sum(done) == 3 and all(k >= 1 for k in done)
