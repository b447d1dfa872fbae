"""Zero-shot top-1 of ProxyCLIP v2 on the shared real data sets (the figures of benchmarks/PROXY.md).

    GRAM_SHARED_DATA=/work/shared/data python benchmarks/proxy_zero_shot.py --out /tmp/proxy-zs

Image features come from the library's FeatureCache (the frozen image tower runs once per image).
Splits (the same as benchmarks/protocols.py): Caltech101 and ImageNet-mini (train+val images) are
split 50/50 per class with ``data.split_train_test(seed=0)``, then base/new by the CoOp rule
(sorted classes, first half base); accuracies are on the test halves. Fashion-MNIST: its test part,
base = labels 0-4. Ants/bees: all 397 images.

Also measured here, on Caltech101 base classes' TRAIN half only (no test image chooses anything):
the logit scale (the one minimising zero-shot cross-entropy), and the optional learned map
(a 384x384 linear map on the ConSE embedding, identity init, trained with cross-entropy against the
base classes' text features), reported with and without on base and held-out new classes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gram_plugin.cache import FeatureCache
from gram_plugin.backbones.proxy_v2 import ProxyCLIPv2, imagenet_classnames
from gram_plugin import data as D


def top1(features, labels, text) -> float:
    return 100.0 * float((features @ text.t()).argmax(1).eq(labels).float().mean())


def accuracy(backbone, ds, classes=None) -> float:
    """Zero-shot top-1 (%) with the 4-template ensemble; ``classes``: only images of these labels."""
    text = backbone.class_text_features(ds.classnames)
    feats, labels = ds.features, ds.labels
    if classes is not None:
        keep = torch.isin(labels, torch.tensor(classes))
        feats, labels = feats[keep], labels[keep]
    return top1(F.normalize(feats, dim=-1), labels, text)


def fit_logit_scale(backbone, train) -> float:
    """The scale s minimising the zero-shot cross-entropy of s * cos on ``train`` (a 1-D grid)."""
    text = backbone.class_text_features(train.classnames)
    cos = F.normalize(train.features, dim=-1) @ text.t()
    grid = [5, 10, 15, 20, 25, 30, 40, 50, 75, 100]
    losses = {s: float(F.cross_entropy(s * cos, train.labels)) for s in grid}
    return min(losses, key=losses.get), losses


def learned_map(backbone, train, epochs: int = 30, lr: float = 1e-3, seed: int = 0):
    """A 384x384 linear map on the ConSE embedding (identity init) fitted on base-class training images."""
    torch.manual_seed(seed)
    dim = train.features.shape[1]
    lin = torch.nn.Linear(dim, dim)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(dim))
        lin.bias.zero_()
    text = backbone.class_text_features(train.classnames)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    x, y = train.features, train.labels
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            logits = float(backbone.logit_scale) * F.normalize(lin(x[idx]), dim=-1) @ text.t()
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return lin.eval()


@torch.no_grad()
def head_top1(bb, dataset) -> float:
    """Top-1 (%) of the image tower's own 1,000-way ImageNet head on an ImageNet-layout dataset whose
    item paths end in <wnid>/<file> (checks the weights and the TF-style preprocessing)."""
    from timm.data import ImageNetInfo

    index = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    targets = torch.tensor([index[Path(it.path).parent.name] for it in dataset.items])
    preds = []
    for s in range(0, len(dataset), 64):
        images = torch.stack([dataset.load_image(i) for i in range(s, min(s + 64, len(dataset)))])
        preds.append(bb.imagenet_logits(images).argmax(-1))
    return 100.0 * float((torch.cat(preds) == targets).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", default=None, help="shared data folder (default: $GRAM_SHARED_DATA)")
    p.add_argument("--cache-dir", default=None, help="extraction folder (default: $GRAM_DATA_CACHE)")
    p.add_argument("--feature-cache", type=Path, default=Path.home() / ".cache" / "gram-plugin" / "features")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--head", action="store_true", help="also the Lite0 ImageNet head's top-1 on all ImageNet-mini images")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bb = ProxyCLIPv2()
    cache = FeatureCache(args.feature_cache)
    sets = D.benchmark_sets(bb.preprocess, args.data_dir, args.cache_dir, attach=lambda ds: cache.attach(bb, ds),
                              targets=("caltech101", "imagenet-mini"))
    seconds_features = time.perf_counter() - t0
    cal, inet = sets["caltech101"], sets["imagenet-mini"]
    inet_names = {n.lower() for n in imagenet_classnames()}
    non_imagenet = [i for i, n in enumerate(cal["new_test"].classnames) if n.lower() not in inet_names]
    res = {
        "caltech101/base": accuracy(bb, cal["base_test"]),
        "caltech101/new": accuracy(bb, cal["new_test"]),
        "caltech101/new, names not ImageNet-1k labels": accuracy(bb, cal["new_test"], non_imagenet),
        "imagenet-mini/base": accuracy(bb, inet["base_test"]),
        "imagenet-mini/new": accuracy(bb, inet["new_test"]),
        "hymenoptera (ants/bees)": accuracy(bb, sets["cross"]["hymenoptera"]),
        "fashion-mnist (test)": accuracy(bb, sets["cross"]["fashion-mnist"]),
    }
    sizes = {
        "caltech101/base": (len(cal["base_test"]), len(cal["base_test"].classnames)),
        "caltech101/new": (len(cal["new_test"]), len(cal["new_test"].classnames)),
        "caltech101/new, names not ImageNet-1k labels": (
            int(torch.isin(cal["new_test"].labels, torch.tensor(non_imagenet)).sum()), len(non_imagenet)),
        "imagenet-mini/base": (len(inet["base_test"]), len(inet["base_test"].classnames)),
        "imagenet-mini/new": (len(inet["new_test"]), len(inet["new_test"].classnames)),
        "hymenoptera (ants/bees)": (len(sets["cross"]["hymenoptera"]), 2),
        "fashion-mnist (test)": (len(sets["cross"]["fashion-mnist"]), 10),
    }
    scale, scale_losses = fit_logit_scale(bb, cal["base_train"])
    lin = learned_map(bb, cal["base_train"])
    with torch.no_grad():
        mapped = {k: cal[k].with_features(lin(cal[k].features)) for k in ("base_test", "new_test")}
        inet_mapped = {k: inet[k].with_features(lin(inet[k].features)) for k in ("base_test", "new_test")}
    learned = {"caltech101/base": accuracy(bb, mapped["base_test"]), "caltech101/new": accuracy(bb, mapped["new_test"]),
               "imagenet-mini/base": accuracy(bb, inet_mapped["base_test"]),
               "imagenet-mini/new": accuracy(bb, inet_mapped["new_test"])}
    report = {"backbone": bb.weights_id(), "zero_shot_top1": res, "images_classes": sizes,
              "chance": {k: 100.0 / c for k, (_, c) in sizes.items()},
              "caltech_new_not_imagenet": [cal["new_test"].classnames[i] for i in non_imagenet],
              "caltech_new_imagenet": [n for i, n in enumerate(cal["new_test"].classnames) if i not in non_imagenet],
              "logit_scale_fit_on_caltech_base_train": {"best": scale, "loss": scale_losses},
              "learned_map_trained_on_caltech_base_train": learned,
              "seconds": {"features": seconds_features, "total": time.perf_counter() - t0}}
    if args.head:
        root = D.extract_archive("imagenet-mini.tar", args.data_dir, args.cache_dir)
        inet_all = D.combined(D.imagenet(root, "train", bb.preprocess), D.imagenet(root, "val", bb.preprocess), "in")
        report["lite0_head_top1_imagenet_mini_all"] = head_top1(bb, inet_all)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "proxy_zero_shot.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
