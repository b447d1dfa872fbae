"""BatchedMetaStep: a meta-batch through one text forward equals the per-task loop (float64).

Model: PromptedCLIP (CoOp context) on the tiny random open_clip CLIP in float64, tasks with
different class lists and class counts, image side as features. Checked: every task's query
loss, the support losses, and the second-order (and first-order) meta-gradients with respect to
the prompt init and the regulator, against MetaStep's per-task loop.
"""

import gc

import pytest
import torch

from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer, Task
from gram_plugin.backbones import tiny_openclip
from gram_plugin import metabatch
from gram_plugin.metabatch import BatchedMetaStep
from gram_plugin.metastep import MetaStep
from gram_plugin.models import PromptedCLIP

NAMES = ["cat", "dog", "sea turtle", "pizza", "airplane", "ketch", "watch", "golden retriever", "violin"]


def make_problem(seed=0, n_tasks=3):
    torch.manual_seed(seed)
    model = PromptedCLIP(tiny_openclip(seed), "coop", n_ctx=3, ctx_init=None).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.ctx.normal_(0, 0.5, generator=g)  # far from zero: large, distinct gradients per task
    tasks = []
    for t in range(n_tasks):
        n_cls = 3 + t % 2  # different class counts in one meta-batch
        cls = [NAMES[i] for i in torch.randperm(len(NAMES), generator=g)[:n_cls].tolist()]

        def batch(n):
            return {"features": torch.randn(n, model.backbone.embed_dim, generator=g, dtype=torch.float64),
                    "labels": torch.arange(n) % n_cls, "classnames": cls}

        tasks.append(Task(batch(2 * n_cls), batch(3 * n_cls)))
    reg = GradientRegulator({"ctx": tuple(model.ctx.shape)}, init_gain=0.8).double()
    with torch.no_grad():
        for p in reg.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model, tasks, reg


def meta_grads(step_cls, model, tasks, reg, k, first_order, checkpoint_inner=False):
    params = {"ctx": model.ctx}
    step = step_cls(model.meta_loss_fn(), reg, inner_lr=0.3, inner_steps=k, first_order=first_order,
                    tasks_per_backward=len(tasks), checkpoint_inner=checkpoint_inner)
    model.ctx.grad = None
    reg.zero_grad(set_to_none=True)
    stats = step.accumulate_gradients(params, tasks)
    outs = step.task_losses(params, tasks)
    losses = [float(o.query_loss.detach()) for o in outs], [float(o.support_loss) for o in outs]
    grads = [model.ctx.grad.clone()] + [p.grad.clone() for p in reg.parameters()]
    return stats, losses, grads


@pytest.mark.parametrize("k,first_order", [(1, False), (2, False), (3, False), (2, True)])
def test_batched_meta_step_equals_the_per_task_loop(k, first_order):
    model, tasks, reg = make_problem()
    ref_stats, ref_losses, ref_grads = meta_grads(MetaStep, model, tasks, reg, k, first_order)
    stats, losses, grads = meta_grads(BatchedMetaStep, model, tasks, reg, k, first_order)
    assert stats.tasks == ref_stats.tasks == len(tasks)
    assert stats.meta_loss == pytest.approx(ref_stats.meta_loss, rel=1e-12)
    assert losses[0] == pytest.approx(ref_losses[0], rel=1e-12)  # per-task query losses
    assert losses[1] == pytest.approx(ref_losses[1], rel=1e-12)  # per-task support losses
    assert len(set(losses[0])) == len(tasks)  # the tasks really differ
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)
    assert float(grads[0].norm()) > 1e-3 and float(grads[1].norm()) > 1e-3  # theta and phi both get gradient


def test_second_order_terms_are_present_in_the_batched_meta_gradient():
    model, tasks, reg = make_problem()
    _, _, second = meta_grads(BatchedMetaStep, model, tasks, reg, 2, False)
    _, _, first = meta_grads(BatchedMetaStep, model, tasks, reg, 2, True)
    assert not torch.allclose(second[0], first[0], rtol=1e-6, atol=1e-9)


def test_batched_losses_leave_the_models_class_names_alone_and_match_loss():
    model, tasks, _ = make_problem()
    model.set_classnames(["x", "y"])
    with torch.no_grad():
        losses = model.batched_losses([{"ctx": model.ctx}] * len(tasks), [t.query for t in tasks])
        assert model.classnames == ["x", "y"]
        for loss, task in zip(losses, tasks):
            assert float(loss) == pytest.approx(float(model.loss(task.query)), rel=1e-12)


def test_a_non_finite_task_is_named_as_in_the_loop():
    model, tasks, reg = make_problem()
    tasks[1].support["features"][0, 0] = float("nan")
    step = BatchedMetaStep(model.meta_loss_fn(), reg, inner_lr=0.3, inner_steps=2, tasks_per_backward=3)
    ref = MetaStep(model.meta_loss_fn(), reg, inner_lr=0.3, inner_steps=2, tasks_per_backward=3)
    params = {"ctx": model.ctx}
    assert step.accumulate_gradients(params, tasks).nonfinite == ref.accumulate_gradients(params, tasks).nonfinite
    assert "task 1: inner step 0" in step.accumulate_gradients(params, tasks).nonfinite


def test_trainer_batches_tasks_when_asked_and_learns_the_same_init():
    results = []
    for batch_tasks in (False, True):
        model, tasks, reg = make_problem()
        cfg = MetaConfig(inner_lr=0.3, inner_steps=2, meta_batch_size=3, steps=2, progress=False, batch_tasks=batch_tasks)
        trainer = MetaPromptTrainer(model.meta_loss_fn(), model, regulator=reg, config=cfg)
        assert isinstance(trainer.meta_step, BatchedMetaStep) == batch_tasks
        for _ in range(2):
            trainer.outer_step(tasks)
        results.append((model.ctx.detach().clone(), [p.detach().clone() for p in reg.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-13)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_batched_losses_on_a_tokenizer_that_pads_per_call():
    """The proxies' MiniLM pads to the longest text of a call: tasks whose class prompts tokenize
    to different lengths still stack (this raised a size mismatch on the default backbone)."""
    from gram_plugin.backbones.proxy import load_proxy

    torch.set_num_threads(1)
    model = PromptedCLIP(load_proxy(), "coop", n_ctx=4, ctx_init="a photo of a")
    bb = model.backbone
    short, long = ["cat", "dog"], ["golden retriever", "sea turtle", "grand piano"]
    assert bb.tokenize(["X X X X cat."]).shape[1] != bb.tokenize(["X X X X golden retriever."]).shape[1]
    g = torch.Generator().manual_seed(0)
    batches = [{"features": torch.randn(4, bb.embed_dim, generator=g), "labels": torch.tensor([0, 1, 1, 0]),
                "classnames": cls} for cls in (short, long)]
    batches[1]["labels"] = torch.tensor([0, 1, 2, 2])
    params = {"ctx": model.ctx}
    batched = model.batched_losses([params, params], batches)
    loss_fn = model.meta_loss_fn()
    for b, loss in zip(batches, batched):
        assert float(loss.detach()) == pytest.approx(float(loss_fn(params, b).detach()), rel=1e-5)


# -- memory: checkpoint_inner on the batched step (issue 26) -------------------------------------------------
@pytest.mark.parametrize("k,checkpoint_inner,budget,kept", [
    (3, True, 0.5, 0), (3, "auto", 1e-12, 1), (3, "auto", 1e12, 3), (1, "auto", 1e-12, 1), (2, False, 1e-12, 2)])
def test_batched_step_with_recomputed_inner_steps_equals_the_per_task_loop(k, checkpoint_inner, budget, kept, monkeypatch):
    """Every memory setting gives the per-task loop's losses and second-order meta-gradients; "auto" keeps
    as many inner graphs as its budget (GRAPH_BUDGET x the model's weights) allows, at least one."""
    monkeypatch.setattr(metabatch, "GRAPH_BUDGET", budget)
    model, tasks, reg = make_problem()
    ref_stats, ref_losses, ref_grads = meta_grads(MetaStep, model, tasks, reg, k, False)
    step = BatchedMetaStep(model.meta_loss_fn(), reg, inner_lr=0.3, inner_steps=k, tasks_per_backward=len(tasks),
                           checkpoint_inner=checkpoint_inner)
    model.ctx.grad = None
    reg.zero_grad(set_to_none=True)
    stats = step.accumulate_gradients({"ctx": model.ctx}, tasks)
    assert step.last_kept_steps == kept
    assert stats.meta_loss == pytest.approx(ref_stats.meta_loss, rel=1e-12)
    assert stats.support_loss == pytest.approx(ref_stats.support_loss, rel=1e-12)
    for g, r in zip([model.ctx.grad] + [p.grad for p in reg.parameters()], ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)


def graph_bytes(checkpoint_inner, monkeypatch, budget=1e-12, k=3):
    """Bytes autograd holds for the meta-backward after a batched meta-batch's forward (query losses built)."""
    monkeypatch.setattr(metabatch, "GRAPH_BUDGET", budget)
    model, tasks, reg = make_problem()
    step = BatchedMetaStep(model.meta_loss_fn(), reg, inner_lr=0.3, inner_steps=k, tasks_per_backward=len(tasks),
                           checkpoint_inner=checkpoint_inner)
    saved = metabatch.SavedBytes()
    with saved.hooks():
        outs = step.task_losses({"ctx": model.ctx}, tasks)
    assert all(o.query_loss is not None for o in outs)
    return saved.alive


def test_auto_keeps_less_graph_when_the_budget_is_small(monkeypatch):
    every = graph_bytes(False, monkeypatch)
    auto_small = graph_bytes("auto", monkeypatch)
    auto_large = graph_bytes("auto", monkeypatch, budget=1e12)
    recompute_all = graph_bytes(True, monkeypatch)
    assert auto_large == every  # budget not reached: every inner graph kept, as before
    assert recompute_all < auto_small < 0.6 * every  # one of three inner graphs kept (+ the query's)


def test_the_estimate_is_one_inner_steps_graph(monkeypatch):
    """kept_steps is given the first inner step's graph: 1/k of what the k kept graphs hold beyond the query's."""
    seen = []
    monkeypatch.setattr(BatchedMetaStep, "kept_steps", lambda self, nbytes: seen.append(nbytes) or self.inner_steps)
    k1, k3 = graph_bytes("auto", monkeypatch, budget=1e12, k=1), graph_bytes("auto", monkeypatch, budget=1e12, k=3)
    assert len(seen) == 1  # k = 1: nothing to decide, no estimate taken
    assert seen[0] == pytest.approx((k3 - k1) / 2, rel=0.1)


def test_meta_config_defaults_to_auto_and_names_a_bad_setting():
    from gram_plugin.config import ConfigError

    assert MetaConfig().checkpoint_inner == "auto" and MetaConfig().batch_tasks
    with pytest.raises(ConfigError, match="checkpoint_inner"):
        MetaConfig(checkpoint_inner="yes")
    with pytest.raises(ValueError, match="checkpoint_inner"):
        MetaStep(lambda p, b: 0, checkpoint_inner="sometimes")


@pytest.mark.parametrize("budget", [1e-12, 1e12])
def test_nothing_of_the_graphs_outlives_the_meta_backward(budget, monkeypatch):
    """The measurement of "auto" holds no reference cycle: after the meta-backward every saved tensor is freed
    (a pack hook returning the tensor itself kept the measured step's graph alive for ever)."""
    monkeypatch.setattr(metabatch, "GRAPH_BUDGET", budget)
    model, tasks, reg = make_problem()
    step = BatchedMetaStep(model.meta_loss_fn(), reg, inner_lr=0.3, inner_steps=3, tasks_per_backward=len(tasks),
                           checkpoint_inner="auto")
    saved = metabatch.SavedBytes()
    with saved.hooks():
        step.accumulate_gradients({"ctx": model.ctx}, tasks)
        outs = step.task_losses({"ctx": model.ctx}, tasks)  # a forward whose graphs are dropped unused
    assert saved.alive > 0
    del outs
    gc.collect()
    assert saved.refs and saved.alive == 0
