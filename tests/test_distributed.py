"""Task-parallel meta-training on torch.distributed (2 CPU processes, gloo) equals the single-process run.

Every rank draws the same meta-batch from the same seeded generator, computes its share of the
tasks and the meta-gradients are all-reduced (gram_plugin.meta). The test runs the same seeded
training once in this process and once in two spawned processes and compares the learned prompt
init, the regulator and the Adam states, and checks that each rank really did only its share.
"""

import socket
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer, Task
from gram_plugin.safeio import load_tensors, save_tensors

DIM, CLASSES = 6, 3
DT = torch.float64  # float64 so that "equal up to summation order" can be checked tightly


class RandomClassification:
    """Tasks from a shared latent rule plus a task-specific shift; all randomness from the generator."""

    def sample(self, g):
        shift = 0.5 * torch.randn(CLASSES, DIM, generator=g, dtype=DT)
        xs, xq = torch.randn(9, DIM, generator=g, dtype=DT), torch.randn(12, DIM, generator=g, dtype=DT)
        ys, yq = (xs @ shift.t()).argmax(-1), (xq @ shift.t()).argmax(-1)
        return Task((xs, ys), (xq, yq))


def nonlinear_loss(params, batch):
    x, y = batch
    logits = torch.tanh(x @ params["ctx"].t()) + (x**2) @ params["vpt"].t()
    return F.cross_entropy(logits, y)


def make_trainer(calls=None):
    g = torch.Generator().manual_seed(7)
    params = OrderedDict(ctx=torch.randn(CLASSES, DIM, generator=g, dtype=DT),
                         vpt=0.3 * torch.randn(CLASSES, DIM, generator=g, dtype=DT))
    reg = GradientRegulator({n: p.shape for n, p in params.items()}, rank=2, seed=3).double()
    cfg = MetaConfig(inner_lr=0.2, inner_steps=2, outer_lr=0.05, regulator_lr=0.02, meta_batch_size=4,
                     steps=3, clip_gamma=5.0, seed=11, progress=False)

    def loss(params, batch):
        if calls is not None:
            calls.append(len(batch[1]))
        return nonlinear_loss(params, batch)

    return MetaPromptTrainer(loss, params, regulator=reg, config=cfg)


def trained_state(trainer):
    tensors, _ = trainer.state_tensors()
    return {k: v.detach().clone() for k, v in tensors.items() if not k.startswith("rng/")}


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        calls = []
        trainer = make_trainer(calls)
        trainer.fit(RandomClassification())
        state = trained_state(trainer)
        # query losses are on 12-example batches: one per task this rank meta-trained on
        state["query_calls"] = torch.tensor(sum(1 for n in calls if n == 12))
        state["meta_loss"] = torch.tensor([r["meta_loss"] for r in trainer.history], dtype=torch.float64)
        save_tensors(f"{out_dir}/rank{rank}.safetensors", state, {"rank": rank})
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_run_equals_single_process(tmp_path):
    calls = []
    single = make_trainer(calls)
    single.fit(RandomClassification())
    expected = trained_state(single)
    assert sum(1 for n in calls if n == 12) == 3 * 4  # 3 steps x 4 tasks in one process

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    states = [load_tensors(tmp_path / f"rank{r}.safetensors")[0] for r in range(2)]
    for rank, state in enumerate(states):
        assert int(state.pop("query_calls")) == 3 * 2, f"rank {rank} did not do exactly its half of the tasks"
        torch.testing.assert_close(
            state.pop("meta_loss"), torch.tensor([r["meta_loss"] for r in single.history], dtype=torch.float64),
            rtol=1e-12, atol=1e-12)
        assert set(state) == set(expected)
        for k, v in expected.items():
            torch.testing.assert_close(state[k], v, rtol=1e-9, atol=1e-12, msg=f"rank {rank}: {k} differs")
    # the learned init really moved, so equality is not the trivial "nothing happened" case
    assert not torch.allclose(expected["theta/ctx"], make_trainer().params["ctx"].detach())
