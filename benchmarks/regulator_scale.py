"""How large is GRAM's additive term beta next to the gradient it regulates? (diagnostic for RESULTS.md)

    python benchmarks/regulator_scale.py [relative|absolute]

Meta-trains a GRAM init + regulator on the proxy (5-way tasks from Caltech101 base training images,
the settings of benchmarks/protocols.py) and, on one fixed support set, prints the prompt gradient g,
the regulator's gamma and beta, and cos(g, R(g)) after 0, 1, 5 and 10 outer steps.
"""

import sys
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
import protocols as P
from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer
from gram_plugin.data import NWayKShotTasks
from gram_plugin.proxy import load_proxy, load_caltech, shared_data_dir
bb = load_proxy()
tr, _, _, _ = load_caltech(shared_data_dir(), 32, 0)
src = NWayKShotTasks(P.featurize(bb, tr), 5, 4, 8)
m = P.new_model(bb, 1)
reg = GradientRegulator.for_module(m, scale=sys.argv[1] if len(sys.argv) > 1 else "relative")
t = MetaPromptTrainer(m.meta_loss_fn(), m, regulator=reg, config=MetaConfig(inner_lr=0.05, inner_steps=2, outer_lr=0.01, regulator_lr=0.01, meta_batch_size=2, steps=10, clip_gamma=5.0, seed=1, progress=False))
task = src.sample(torch.Generator().manual_seed(5))
def probe(tag):
    loss = t.loss_fn(t.params, task.support)
    g = torch.autograd.grad(loss, list(t.params.values()))[0]
    with torch.no_grad():
        r = reg.regulate({"ctx": g})["ctx"]
        head = reg.heads[reg._key("ctx")]
        x = g.reshape(-1, g.shape[-1])
        s = x.pow(2).mean().sqrt() if reg.scale == "relative" else torch.tensor(1.0)
        gamma = torch.tanh(head.gamma(x / s)); beta = s * torch.tanh(head.beta(x / s))  # beta as added to g
    cos = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0)
    print(f"{tag}: |g|={g.norm():.2e} mean|g|={g.abs().mean():.2e} mean gamma={gamma.mean():.3f} mean|beta|={beta.abs().mean():.2e} |R(g)|={r.norm():.2e} cos(g,R(g))={cos:.3f}", flush=True)
probe("init")
for s in (1, 5, 10):
    t.fit(src, steps=s); probe(f"after {s} outer steps")
