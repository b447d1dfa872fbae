"""Does the meta-learned init carry over to classes it was not meta-trained on? Training data only.

    GRAM_SHARED_DATA=/work/shared/data python benchmarks/meta_init_check.py --out /tmp/meta-init-check

The diagnostic behind RESULTS.md's reading of GRAM / MAML-clip. It repeats base-to-new *inside the
training data* of benchmarks/protocols.py: Caltech101's base classes (50) are split by the same CoOp
rule into 25 "inner-base" classes and 25 "inner-new" classes, and only their TRAINING-half images
are used (no new class of the protocol, no test image). Per seed:

1. MAML-clip and GRAM are meta-trained on N-way tasks from the inner-base classes (the protocol's
   settings, which ``--outer-lr`` etc. can change);
2. each init (the handcrafted "a photo of a", MAML-clip, GRAM) is evaluated zero-shot, then tuned
   with CoOp on ``--shots`` images per inner-base class, and evaluated on the other inner-base
   images and on all inner-new images (base / new / H).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import protocols as P  # noqa: E402
from gram_plugin.backbones import build_backbone  # noqa: E402
from gram_plugin.data import NWayKShotTasks, few_shot, split_train_test, subsample_classes  # noqa: E402
from gram_plugin.finetune import evaluate_base_new, tune  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shots", type=int, default=4)
    P.add_setting_args(p)
    args = p.parse_args(argv)
    args.targets = ["caltech101"]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    bb = build_backbone(args.backbone)
    base_train = P.load_data(bb, args)["caltech101"]["base_train"]  # training half only
    inner_base, inner_new = subsample_classes(base_train, "base"), subsample_classes(base_train, "new")
    tune_pool, held_base = split_train_test(inner_base, 0.5, 0)
    data = {"base_train": tune_pool, "base_test": held_base, "new_test": inner_new}
    source = NWayKShotTasks(tune_pool, args.n_way, args.k_support, args.k_query)
    rows: dict[str, dict[str, list]] = {}
    for seed in args.seeds:
        inits = {"handcrafted": None}
        for key, reg in (("MAML-clip", False), ("GRAM", True)):
            inits[key], hist, secs = P.meta_train(bb, source, args, seed, reg)
            print(f"seed {seed} meta-train {key}: {secs:.0f}s, meta loss {hist[0]['meta_loss']:.3f} -> "
                  f"{hist[-1]['meta_loss']:.3f}", flush=True)
        for name, init in inits.items():
            model = P.new_model(bb, seed)
            if init is not None:
                init.apply_to(model, backbone=bb.name)
            zero = evaluate_base_new(model, data["base_test"], data["new_test"])
            model = P.new_model(bb, seed)
            train = few_shot(data["base_train"], args.shots, seed)
            tune(model, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, init=init,
                 use_regulator=True, seed=seed, progress=False, optimizer=args.optimizer)
            tuned = evaluate_base_new(model, data["base_test"], data["new_test"])
            slot = rows.setdefault(name, {})
            for k in ("base", "new", "H"):
                slot.setdefault(f"init {k}", []).append(100 * zero[k])
                slot.setdefault(f"tuned {k}", []).append(100 * tuned[k])
            print(f"seed {seed} {name:<12} init base {100 * zero['base']:.1f} new {100 * zero['new']:.1f} | tuned base "
                  f"{100 * tuned['base']:.1f} new {100 * tuned['new']:.1f} H {100 * tuned['H']:.1f}", flush=True)
    fmt = lambda xs: f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"  # noqa: E731
    cols = ["init base", "init new", "tuned base", "tuned new", "tuned H"]
    lines = ["| init | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(r[c]) for c in cols) + " |" for name, r in rows.items()]
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "meta_init_check.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items() if k != "out" and not isinstance(v, Path)},
         "rows": rows, "seconds": time.perf_counter() - t0}, indent=1, default=str))
    print(table)
    print(f"{time.perf_counter() - t0:.0f} s; inner-base {len(inner_base.classnames)} classes "
          f"({len(tune_pool)} tuning-pool / {len(held_base)} held images), inner-new {len(inner_new.classnames)} "
          f"classes ({len(inner_new)} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
