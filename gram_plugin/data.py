"""Labelled image data for the standalone path: folders, CoOp layouts, few-shot sampling, task sources.

Batches follow the shared convention: ``{"images": (N,3,H,W)}`` or ``{"features": (N,D)}``, plus
``"labels"`` (N,) in ``[0, n_classes)`` and ``"classnames"`` (index = label).
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import GramPluginError
from .paths import IMAGE_EXTS, MISSING_DATA_ROOT, data_spec_problem
from .tasks import Task

CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")  # CoOp's Caltech101 drops these two folders
CALTECH_RENAME = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


class DataError(GramPluginError, ValueError):
    """A dataset or task request that cannot be met."""


@dataclass(frozen=True)
class Item:
    """One image of a dataset: its file path and its class index (into the dataset's classnames)."""

    path: str
    label: int


class ImageDataset:
    """A list of (path, label) items with class names; loads and transforms images on access.

    Optionally backed by precomputed features (``with_features``), in which case batches carry
    ``"features"`` instead of ``"images"``.
    """

    def __init__(self, items: Sequence[Item], classnames: Sequence[str], transform: Callable | None = None, name: str = "dataset"):
        self.items = list(items)
        self.classnames = list(classnames)
        self.transform = transform
        self.name = name
        self.features: torch.Tensor | None = None
        bad = [it for it in self.items if not 0 <= it.label < len(self.classnames)]
        if bad:
            raise DataError(f"{name}: {len(bad)} items have labels outside [0, {len(self.classnames)})")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> torch.Tensor:
        """The class index of every item, in item order (a long tensor)."""
        return torch.tensor([it.label for it in self.items], dtype=torch.long)

    @property
    def paths(self) -> list[str]:
        """The image file path of every item, in item order."""
        return [it.path for it in self.items]

    def load_image(self, i: int) -> torch.Tensor:
        """Image ``i`` read as RGB and passed through the dataset's transform.

        Raises:
            DataError: no transform is set, or the file cannot be read (the message names it and
                offers ``--skip-unreadable`` / :meth:`without_unreadable`).
        """
        if self.transform is None:
            raise DataError(f"{self.name}: no transform set (pass the backbone's preprocess)")
        path = self.items[i].path
        try:
            with _open_image(path) as im:
                return self.transform(im.convert("RGB"))
        except _unreadable_errors() as e:  # evaluated only when something was raised
            raise DataError(f"{self.name}: cannot read image {path} ({_why_unreadable(e)}); pass --skip-unreadable "
                            "(or ImageDataset.without_unreadable()) to leave such images out") from None

    def without_unreadable(self) -> tuple["ImageDataset", list[str]]:
        """This dataset minus the images PIL cannot decode in full (or that are oversized: PIL's
        decompression-bomb limit); returns (dataset, their paths)."""
        keep, bad = [], []
        for i, it in enumerate(self.items):
            try:
                with _open_image(it.path) as im:
                    im.load()  # decodes every byte: catches truncated files that open() accepts
                keep.append(i)
            except _unreadable_errors():
                bad.append(it.path)
        return (self.subset(keep) if bad else self), bad

    def with_transform(self, transform: Callable) -> "ImageDataset":
        """The same items with another transform (cached features are kept)."""
        ds = ImageDataset(self.items, self.classnames, transform, self.name)
        ds.features = self.features
        return ds

    def with_features(self, features: torch.Tensor) -> "ImageDataset":
        """The same items with precomputed image features (one row per item), used instead of the images.

        Raises:
            DataError: the number of rows differs from the number of items.
        """
        if features.shape[0] != len(self):
            raise DataError(f"{self.name}: {features.shape[0]} feature rows for {len(self)} items")
        ds = ImageDataset(self.items, self.classnames, self.transform, self.name)
        ds.features = features
        return ds

    def subset(self, indices: Sequence[int], classnames: Sequence[str] | None = None, relabel: dict[int, int] | None = None) -> "ImageDataset":
        """The items at ``indices`` (features too, when set).

        Args:
            indices: item positions, in the order wanted.
            classnames: the subset's class names (default: this dataset's).
            relabel: old class index -> new one, when ``classnames`` is a new list.
        """
        idx = list(indices)
        items = [self.items[i] for i in idx]
        if relabel is not None:
            items = [Item(it.path, relabel[it.label]) for it in items]
        ds = ImageDataset(items, classnames if classnames is not None else self.classnames, self.transform, self.name)
        if self.features is not None:
            ds.features = self.features[idx]
        return ds

    def batch(self, indices: Sequence[int] | None = None, labels: torch.Tensor | None = None,
              classnames: Sequence[str] | None = None) -> dict:
        """A standard batch of the given items (all by default); labels/classnames may be remapped."""
        idx = list(range(len(self))) if indices is None else list(indices)
        out: dict = {}
        if self.features is not None:
            out["features"] = self.features[idx]
        else:
            out["images"] = torch.stack([self.load_image(i) for i in idx]) if idx else torch.empty(0)
        out["labels"] = labels if labels is not None else torch.tensor([self.items[i].label for i in idx], dtype=torch.long)
        out["classnames"] = list(classnames if classnames is not None else self.classnames)
        return out

    def indices_by_class(self) -> dict[int, list[int]]:
        """Class index -> the positions of its items, in item order (classes without items are absent)."""
        by: dict[int, list[int]] = {}
        for i, it in enumerate(self.items):
            by.setdefault(it.label, []).append(i)
        return by


def _open_image(path: str):
    from PIL import Image

    return Image.open(path)


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file it cannot decode: UnidentifiedImageError (an OSError), truncated data, and
    DecompressionBombError for an image over its pixel limit (e.g. 20000 x 20000), which is none of the others."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _why_unreadable(e: BaseException) -> str:
    import re

    m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(e))
    if m:
        return (f"{int(m.group(1)):,} pixels, over PIL's limit of {int(m.group(2)):,}: an oversized image or a "
                "decompression bomb")
    return str(e)


# -- layouts ---------------------------------------------------------------------------------------
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _is_utf8(name: str) -> bool:
    # undecodable bytes in a file name arrive as lone surrogates (PEP 383), which cannot be encoded
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def image_folder(root: str | os.PathLike, transform: Callable | None = None, ignored: Sequence[str] = (),
                 rename: dict[str, str] | None = None, name: str | None = None) -> ImageDataset:
    """``root/<class>/*.jpg`` -> dataset; classes sorted by folder name, label = sorted index."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(MISSING_DATA_ROOT["folder"].format(root=root))
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in ignored)
    if not folders:
        raise DataError(f"image folder {root} has no class sub-folders")
    undecodable = [os.fsencode(c) for c in folders if not _is_utf8(c)]
    if undecodable:
        raise DataError(f"class folder names under {root} are not valid UTF-8 (class names must be text): "
                        f"{undecodable}; rename them")
    images = {c: _images_in(root / c) for c in folders}
    _warn_empty(root, [c for c in folders if not images[c]])
    rename = rename or {}
    names = {c: rename.get(c, c).replace("_", " ") for c in folders}
    nameless = [c for c in folders if not names[c].strip()]
    if nameless:
        warnings.warn(f"image folder {root}: class folders whose name is empty once '_' become spaces are left "
                      f"out: {nameless}", stacklevel=2)
    classes = [c for c in folders if images[c] and names[c].strip()]
    items = [Item(str(p), label) for label, c in enumerate(classes) for p in images[c]]
    if not items:
        raise DataError(f"image folder {root} has no images ({', '.join(IMAGE_EXTS)})")
    return ImageDataset(items, [names[c] for c in classes], transform, name or root.name)


def _warn_empty(root: Path, empty: list[str]) -> None:
    if empty:
        warnings.warn(f"image folder {root}: {len(empty)} class folders hold no images and are left out: {empty}",
                      stacklevel=3)


def caltech101(root: str | os.PathLike, transform: Callable | None = None) -> ImageDataset:
    """CoOp's Caltech101: ``root/[caltech-101/]101_ObjectCategories``, without BACKGROUND_Google and Faces_easy."""
    root = Path(root)
    for cand in (root, root / "caltech-101", root / "101_ObjectCategories", root / "caltech-101" / "101_ObjectCategories"):
        if cand.name == "101_ObjectCategories" and cand.is_dir():
            return image_folder(cand, transform, ignored=CALTECH_IGNORED, rename=CALTECH_RENAME, name="caltech101")
    raise DataError(MISSING_DATA_ROOT["caltech101"].format(root=root))


def imagenet(root: str | os.PathLike, split: str = "train", transform: Callable | None = None) -> ImageDataset:
    """CoOp's ImageNet layout: ``root/[imagenet/]classnames.txt`` + ``images/{train,val}/<wnid>/``."""
    root = Path(root)
    if not (root / "classnames.txt").exists() and (root / "imagenet" / "classnames.txt").exists():
        root = root / "imagenet"
    names_file = root / "classnames.txt"
    if not names_file.exists():
        raise DataError(MISSING_DATA_ROOT["imagenet"].format(root=root))
    wnid_to_name = {}
    for n, raw in enumerate(names_file.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{names_file} is not UTF-8 text (line {n}: {e.reason} at byte {e.start}: {raw!r}); "
                            "save it as UTF-8") from None
        if line.strip():
            wnid, _, cname = line.strip().partition(" ")
            wnid_to_name[wnid] = cname.strip()
    folder = root / "images" / split
    if not folder.is_dir():
        raise DataError(f"no images/{split} folder under {root}")
    wnids = sorted(d.name for d in folder.iterdir() if d.is_dir())
    missing = [w for w in wnids if w not in wnid_to_name]
    if missing:
        raise DataError(f"classnames.txt has no name for {missing[:5]}")
    images = {w: _images_in(folder / w) for w in wnids}
    _warn_empty(folder, [w for w in wnids if not images[w]])
    nameless = [w for w in wnids if not wnid_to_name[w]]
    if nameless:
        warnings.warn(f"{names_file} gives no name for {len(nameless)} classes, left out: {nameless}", stacklevel=2)
    wnids = [w for w in wnids if images[w] and wnid_to_name[w]]
    items = [Item(str(p), label) for label, w in enumerate(wnids) for p in images[w]]
    return ImageDataset(items, [wnid_to_name[w] for w in wnids], transform, f"imagenet-{split}")


def load_dataset(spec: str, transform: Callable | None = None) -> ImageDataset:
    """``caltech101:ROOT``, ``imagenet:ROOT``, ``folder:ROOT``, ``default`` (the embedded set) or a folder path."""
    if spec == "default":
        return default_dataset(transform)
    problem = data_spec_problem(spec)  # the CLI's plan asks the same before torch is imported
    if problem:
        raise DataError(problem)
    kind, _, root = spec.partition(":")
    if kind == "caltech101":
        return caltech101(root, transform)
    if kind == "imagenet":
        return imagenet(root, "train", transform)
    if kind == "folder":
        return image_folder(root, transform)
    return image_folder(spec, transform)


def default_dataset(transform: Callable | None = None) -> ImageDataset:
    """The small real image set embedded in the package (``gram_plugin/assets/caltech10``)."""
    root = Path(__file__).parent / "assets" / "caltech10"
    return image_folder(root, transform, rename=CALTECH_RENAME, name="caltech10-embedded")


# -- splits and few-shot -----------------------------------------------------------------------------
def subsample_classes(dataset: ImageDataset, subsample: str = "all") -> ImageDataset:
    """CoOp's ``subsample_classes``: sorted labels, first ``ceil(n/2)`` are base, rest new; relabelled from 0.

    Raises ``DataError`` (with the class counts) when either side would have fewer than 2 classes.
    """
    if subsample not in ("all", "base", "new"):
        raise DataError(f"subsample must be 'all', 'base' or 'new', got {subsample!r}")
    if subsample == "all":
        return dataset
    labels = sorted(set(it.label for it in dataset.items))
    m = math.ceil(len(labels) / 2)
    problem = base_new_problem(dataset)
    if problem:
        raise DataError(problem)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}
    idx = [i for i, it in enumerate(dataset.items) if it.label in relabel]
    names = [dataset.classnames[y] for y in selected]
    return dataset.subset(idx, names, relabel)


def base_new_problem(dataset: ImageDataset) -> str | None:
    """Why ``dataset`` cannot be split into base and new classes (CoOp's rule), or ``None``.

    Each side needs at least 2 classes: on a 1-class side every prediction is right, and base / new /
    H would report 100 %.
    """
    n = len(set(it.label for it in dataset.items))
    base = math.ceil(n / 2)
    if base < 2 or n - base < 2:
        return (f"{dataset.name}: its {n} class{'es' if n != 1 else ''} split into {base} base and {n - base} new; "
                "base-to-new evaluation needs at least 2 classes on each side (4 in all): a 1-class side scores 100 % "
                "whatever the prompt")
    return None


def split_train_test(dataset: ImageDataset, test_fraction: float = 0.5, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Per-class random split (each class keeps at least one image on each side when it has two)."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label, idx in sorted(dataset.indices_by_class().items()):
        perm = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
        n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1) if len(idx) > 1 else 0
        test += perm[:n_test]
        train += perm[n_test:]
    return dataset.subset(sorted(train)), dataset.subset(sorted(test))


def few_shot(dataset: ImageDataset, shots: int, seed: int = 0) -> ImageDataset:
    """K images per class drawn with ``seed`` (CoOp's generate_fewshot_dataset); error if a class has fewer."""
    if shots < 1:
        raise DataError(f"shots must be >= 1, got {shots}")
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for label, idx in sorted(dataset.indices_by_class().items()):
        if len(idx) < shots:
            raise DataError(f"class {dataset.classnames[label]!r} has {len(idx)} images, fewer than {shots} shots")
        chosen += [idx[i] for i in torch.randperm(len(idx), generator=g)[:shots].tolist()]
    return dataset.subset(sorted(chosen))


# -- task sources ------------------------------------------------------------------------------------
def _check_task(support: dict, query: dict, n_classes: int) -> None:
    if n_classes < 2:
        raise DataError(f"a task needs at least 2 classes, got {n_classes}")
    if len(support["labels"]) == 0:
        raise DataError("task has an empty support set")
    if len(query["labels"]) == 0:
        raise DataError("task has an empty query set")


class NWayKShotTasks:
    """N-way tasks from class subsets: ``k_support`` + ``k_query`` images of each of ``n_way`` random classes.

    Labels are remapped to ``[0, n_way)`` and ``classnames`` lists the task's classes.
    """

    def __init__(self, dataset: ImageDataset, n_way: int, k_support: int, k_query: int):
        self.dataset, self.n_way, self.k_support, self.k_query = dataset, n_way, k_support, k_query
        self.by_class = dataset.indices_by_class()
        if n_way < 2:
            raise DataError(f"a task needs at least 2 classes, n_way={n_way}")
        if k_support < 1 or k_query < 1:
            raise DataError(f"k_support and k_query must be >= 1 (empty support/query), got {k_support}, {k_query}")
        need = k_support + k_query
        eligible = [c for c, idx in self.by_class.items() if len(idx) >= need]
        if len(eligible) < n_way:
            raise DataError(f"{dataset.name}: only {len(eligible)} classes have >= {need} images; {n_way}-way tasks need {n_way}")
        self.eligible = sorted(eligible)

    def sample(self, generator: torch.Generator) -> Task:
        """A task: ``n_way`` eligible classes, ``k_support`` + ``k_query`` distinct images of each (seeded by ``generator``)."""
        pick = torch.randperm(len(self.eligible), generator=generator)[: self.n_way].tolist()
        classes = [self.eligible[i] for i in pick]
        s_idx, q_idx, s_lab, q_lab = [], [], [], []
        for new, c in enumerate(classes):
            idx = self.by_class[c]
            perm = torch.randperm(len(idx), generator=generator).tolist()
            s_idx += [idx[i] for i in perm[: self.k_support]]
            q_idx += [idx[i] for i in perm[self.k_support : self.k_support + self.k_query]]
            s_lab += [new] * self.k_support
            q_lab += [new] * self.k_query
        names = [self.dataset.classnames[c] for c in classes]
        support = self.dataset.batch(s_idx, torch.tensor(s_lab), names)
        query = self.dataset.batch(q_idx, torch.tensor(q_lab), names)
        _check_task(support, query, len(names))
        return Task(support, query, {"classes": names, "dataset": self.dataset.name})

    def describe(self) -> dict:
        """The task source's settings, recorded in the init's metadata."""
        return {"kind": "n-way-k-shot", "dataset": self.dataset.name, "n_way": self.n_way,
                "k_support": self.k_support, "k_query": self.k_query}


class PerDatasetTasks:
    """MAML+clipping tasks: one task = one dataset's few-shot set, all its classes.

    ``shots`` (N=16) images per class are drawn; ``k_support`` (K=5) of each class form the
    support set and the other ``shots - k_support`` the query set. With several datasets, each
    task picks one dataset at random.
    """

    def __init__(self, datasets: ImageDataset | Sequence[ImageDataset], shots: int = 16, k_support: int = 5):
        self.datasets = [datasets] if isinstance(datasets, ImageDataset) else list(datasets)
        if not self.datasets:
            raise DataError("PerDatasetTasks needs at least one dataset")
        if not 1 <= k_support < shots:
            raise DataError(f"need 1 <= k_support < shots (non-empty support and query), got K={k_support}, N={shots}")
        self.shots, self.k_support = shots, k_support
        for ds in self.datasets:
            by = ds.indices_by_class()
            if len(by) < 2:
                raise DataError(f"{ds.name}: a task needs at least 2 classes, dataset has {len(by)}")
            short = {ds.classnames[c]: len(i) for c, i in by.items() if len(i) < shots}
            if short:
                raise DataError(f"{ds.name}: classes with fewer than {shots} shots: {dict(list(short.items())[:5])}")

    def sample(self, generator: torch.Generator) -> Task:
        """A task from one dataset picked at random: ``shots`` images of every class, the first ``k_support`` as support."""
        d = int(torch.randint(len(self.datasets), (1,), generator=generator))
        ds = self.datasets[d]
        s_idx, q_idx = [], []
        for c, idx in sorted(ds.indices_by_class().items()):
            perm = torch.randperm(len(idx), generator=generator)[: self.shots].tolist()
            s_idx += [idx[i] for i in perm[: self.k_support]]
            q_idx += [idx[i] for i in perm[self.k_support :]]
        support, query = ds.batch(s_idx), ds.batch(q_idx)
        _check_task(support, query, len(ds.classnames))
        return Task(support, query, {"dataset": ds.name, "classes": list(ds.classnames)})

    def describe(self) -> dict:
        """The task source's settings, recorded in the init's metadata."""
        return {"kind": "per-dataset", "datasets": [d.name for d in self.datasets], "shots": self.shots,
                "k_support": self.k_support}


# -- the shared real data sets (benchmarks, tests) ----------------------------------------------------
def shared_data_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder holding the shared archives (caltech-101.tar, imagenet-mini.tar, hymenoptera.tar,
    fashion-mnist-subset.npz): ``path`` if given, else ``$GRAM_SHARED_DATA``."""
    chosen = path if path is not None else os.environ.get("GRAM_SHARED_DATA")
    if not chosen:
        raise DataError("no shared data folder (the archives caltech-101.tar, imagenet-mini.tar, ...): pass its "
                        "path or set GRAM_SHARED_DATA=/path/to/it")
    folder = Path(chosen)
    if not folder.is_dir():
        raise DataError(f"shared data folder {folder} does not exist")
    return folder


def data_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where archives are extracted: ``path``, else ``$GRAM_DATA_CACHE``, else ~/.cache/gram-plugin/data."""
    return Path(path or os.environ.get("GRAM_DATA_CACHE") or Path.home() / ".cache" / "gram-plugin" / "data")


def extract_archive(archive: str, data_dir: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """Extract ``<shared data>/<archive>`` once into ``<cache>/<archive stem>``; return that folder."""
    import tarfile

    src = shared_data_dir(data_dir) / archive
    if not src.is_file():
        raise DataError(f"no {archive} in {src.parent}")
    dest = data_cache_dir(cache_dir) / archive.replace(".tar", "")
    marker = dest / ".extracted"
    if not marker.exists():
        fresh = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(src) as tf:
                tf.extractall(dest, filter="data")  # refuses ../ paths, absolute paths, links out, devices
        except BaseException as e:
            if fresh:  # a half-extracted folder without its marker would be extracted again anyway
                shutil.rmtree(dest, ignore_errors=True)
            if isinstance(e, tarfile.FilterError):
                raise DataError(f"archive {src} is unsafe (a member would land outside its folder, or is a link or "
                                f"device): {e}; nothing was written outside {dest}") from None
            if isinstance(e, tarfile.TarError):
                raise DataError(f"archive {src} is damaged or not a tar file: {e}") from None
            raise
        marker.touch()
    return dest


def fashion_mnist(part: str = "test", data_dir=None, cache_dir=None, transform: Callable | None = None) -> ImageDataset:
    """The Fashion-MNIST subset's ``train`` (300 per class) or ``test`` (100 per class) images, written
    once as PNG files (28 px grey) so they load like any image folder; label order = the dataset's."""
    import numpy as np

    if part not in ("train", "test"):
        raise DataError(f"part must be 'train' or 'test', got {part!r}")
    src = shared_data_dir(data_dir) / "fashion-mnist-subset.npz"
    if not src.is_file():
        raise DataError(f"no fashion-mnist-subset.npz in {src.parent}")
    arrays = np.load(src, allow_pickle=False)
    names = [str(c).lower().replace("/", " or ") for c in arrays["classnames"]]
    x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
    folder = data_cache_dir(cache_dir) / "fashion-mnist-subset" / part
    paths = [folder / f"{i:05d}.png" for i in range(len(y))]
    if not (folder / ".written").exists():
        from PIL import Image

        folder.mkdir(parents=True, exist_ok=True)
        for img, p in zip(x, paths):
            Image.fromarray(img).save(p)
        (folder / ".written").touch()
    items = [Item(str(p), int(label)) for p, label in zip(paths, y)]
    return ImageDataset(items, names, transform, f"fashion-mnist-{part}")


def combined(a: ImageDataset, b: ImageDataset, name: str) -> ImageDataset:
    """The items of ``a`` then ``b`` as one dataset called ``name`` (``a``'s transform).

    Raises:
        DataError: the two parts have different class lists.
    """
    if a.classnames != b.classnames:
        raise DataError(f"{name}: the parts have different classes")
    return ImageDataset(a.items + b.items, a.classnames, a.transform, name)


def benchmark_sets(transform=None, data_dir=None, cache_dir=None, split_seed: int = 0,
                   attach: Callable[[ImageDataset], ImageDataset] | None = None,
                   targets: Sequence[str] = ("caltech101", "imagenet-mini", "fashion-mnist")) -> dict:
    """The shared real sets as the benchmarks use them: ``{target: {"base_train", "base_test", "new_test"}}``
    for caltech101, imagenet-mini (train + val images) and fashion-mnist, and ``"cross"``: whole test
    sets (fashion-mnist, hymenoptera = ants/bees, imagenet-mini). Caltech101 and ImageNet-mini are split
    50/50 per class (``split_train_test(seed=split_seed)``), then base/new by the CoOp rule;
    Fashion-MNIST keeps its own train/test parts. ``attach`` (e.g. ``FeatureCache(dir).attach`` bound to a
    backbone) runs once per whole dataset before splitting, so every part carries its features. Only the
    base-to-new ``targets`` asked for are built (Fashion-MNIST's 3,000 training images are skipped
    unless it is one)."""
    attach = attach or (lambda ds: ds)
    cal = caltech101(extract_archive("caltech-101.tar", data_dir, cache_dir), transform)
    inet_root = extract_archive("imagenet-mini.tar", data_dir, cache_dir)
    inet = combined(imagenet(inet_root, "train", transform), imagenet(inet_root, "val", transform), "imagenet-mini")
    cal, inet = attach(cal), attach(inet)
    hym_root = extract_archive("hymenoptera.tar", data_dir, cache_dir) / "hymenoptera"
    rename = {"ants": "ant", "bees": "bee"}
    hym = attach(combined(image_folder(hym_root / "train", transform, rename=rename),
                          image_folder(hym_root / "val", transform, rename=rename), "hymenoptera"))
    fm_test = attach(fashion_mnist("test", data_dir, cache_dir, transform))
    out = {}
    for name, ds in (("caltech101", cal), ("imagenet-mini", inet)):
        train, test = split_train_test(ds, 0.5, split_seed)
        out[name] = {"base_train": subsample_classes(train, "base"), "base_test": subsample_classes(test, "base"),
                     "new_test": subsample_classes(test, "new")}
    if "fashion-mnist" in targets:
        fm_train = attach(fashion_mnist("train", data_dir, cache_dir, transform))
        out["fashion-mnist"] = {"base_train": subsample_classes(fm_train, "base"),
                                "base_test": subsample_classes(fm_test, "base"),
                                "new_test": subsample_classes(fm_test, "new")}
    out["cross"] = {"fashion-mnist": fm_test, "hymenoptera": hym,
                    "imagenet-mini": split_train_test(inet, 0.5, split_seed)[1]}
    return out
