"""How large is GRAM's additive term beta next to the gradient it regulates? (diagnostic for RESULTS.md)

    python benchmarks/regulator_scale.py [--scale relative|absolute] [--regulator-lr 0.01] [--steps 50]

Meta-trains a GRAM init + regulator on ProxyCLIP v2 (5-way tasks from Caltech101 base training images,
the settings of benchmarks/protocols.py, whose regulator lr is its outer lr, 0.01) and, on one fixed
support set, prints the prompt gradient g, the regulator's gamma and beta (as added to g), and
cos(g, R(g)) after 0, 1, 5, 10, ... outer steps; then the support/query gradient alignment that
meta-training logged (GRAM Fig. 3b), raw and regulated, over the first and last 10 steps. Training
tasks only: nothing here looks at a test set.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import protocols as P  # noqa: E402
from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer  # noqa: E402
from gram_plugin.backbones import build_backbone  # noqa: E402
from gram_plugin.data import NWayKShotTasks  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=["relative", "absolute"], default="relative")
    p.add_argument("--regulator-lr", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=10, help="outer steps in all")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backbone", default="proxy")
    p.add_argument("--data-dir", default=None, help="shared data folder (default: $GRAM_SHARED_DATA)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--feature-cache", type=Path, default=Path.home() / ".cache" / "gram-plugin" / "features")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    bb = build_backbone(args.backbone)
    src = NWayKShotTasks(P.load_data(bb, args)["caltech101"]["base_train"], 5, 4, 8)
    m = P.new_model(bb, args.seed)
    reg = GradientRegulator.for_module(m, scale=args.scale)
    t = MetaPromptTrainer(m.meta_loss_fn(), m, regulator=reg, config=MetaConfig(
        inner_lr=0.05, inner_steps=2, outer_lr=0.01, regulator_lr=args.regulator_lr, meta_batch_size=2,
        steps=args.steps, clip_gamma=5.0, seed=args.seed, progress=False, track_alignment=True))
    task = src.sample(torch.Generator().manual_seed(5))

    def probe(tag):
        loss = t.loss_fn(t.params, task.support)
        g = torch.autograd.grad(loss, list(t.params.values()))[0]
        with torch.no_grad():
            r = reg.regulate({"ctx": g})["ctx"]
            head = reg.heads[reg._key("ctx")]
            gamma, beta = head.gain_and_shift(g.reshape(-1, g.shape[-1]), reg.scale == "relative")
        cos = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0)
        print(f"{tag}: |g|={g.norm():.2e} mean|g|={g.abs().mean():.2e} mean gamma={gamma.mean():.3f} "
              f"mean|beta|={beta.abs().mean():.2e} |R(g)|={r.norm():.2e} cos(g,R(g))={cos:.3f}", flush=True)

    print(f"scale={args.scale} regulator_lr={args.regulator_lr} steps={args.steps} seed={args.seed}")
    probe("init")
    done = 0
    for s in (1, 5, 10, 25, 50, 100):
        if s > args.steps:
            break
        t.fit(src, steps=s)
        done = s
        probe(f"after {s} outer steps")
    hist = t.history
    n = min(10, len(hist))
    for key in ("align_raw", "align_regulated"):
        first = statistics.mean(h[key] for h in hist[:n])
        last = statistics.mean(h[key] for h in hist[-n:])
        print(f"{key}: first {n} steps {first:.3f}, last {n} steps {last:.3f}")
    print(f"meta loss {hist[0]['meta_loss']:.3f} -> {hist[-1]['meta_loss']:.3f} ({done} steps)")


if __name__ == "__main__":
    main()
