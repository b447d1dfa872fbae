"""Image-caption corpora: an image folder + a captions file, read and checked once.

Three captions formats are read (the format is told from the file's content):

* **Flickr** (Flickr8k / Flickr30k dumps): ``<image>#<k>\\t<caption>`` lines; ``<image>`` is a file
  name in the image folder.
* **COCO** captions JSON: ``{"images": [{"id", "file_name"}, ...], "annotations": [{"image_id",
  "caption"}, ...]}``; ``file_name`` is in the image folder.
* **CC3M-style list**: ``<image path>\\t<caption>`` lines, the path relative to the corpus folder
  (subfolders allowed, no URLs). An image named on several lines has several captions.

Where things are: ``read_corpus(ROOT)`` with ROOT a folder finds its captions file (``captions.txt``,
``captions.tsv``, ``captions.json``, ``captions*.json``, ``annotations/captions*.json``, ``.gz``
allowed for the text formats) and its image folder (``ROOT/images`` if it exists, else ROOT);
ROOT may also be the captions file itself (the corpus folder is then the file's folder), and
``captions=`` / ``images=`` name either explicitly.

Images are numbered in the order their first caption appears; that index is the item index of a
CHC hierarchy built from :meth:`Corpus.caption_image_ids`, of :meth:`Corpus.dataset` and of the
corpus features (:func:`gram_plugin.chc.corpus_features`).

Every problem is one :class:`CorpusError` naming the file and what to change: missing images (a
count and examples; ``skip_missing=True`` leaves their captions out), caption lines without an
image, empty captions, captions of unknown COCO images, paths that leave the corpus folder, an image
folder without images. Images in the folder that no caption names are not an error (a folder may
hold more): they are counted in :attr:`Corpus.unused_images` and a warning names a few.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..paths import IMAGE_EXTS
from .config import CHCError

if TYPE_CHECKING:
    from ..data import ImageDataset

FORMATS = ("flickr", "coco", "cc3m")
CAPTION_FILE_NAMES = ("captions.txt", "captions.tsv", "captions.json", "captions.txt.gz", "captions.tsv.gz")
_FLICKR_KEY = re.compile(r"#\d+$")
EXAMPLES = 5  # how many file names an error or warning quotes


class CorpusError(CHCError):
    """An image-caption corpus that cannot be read as given (the message names the file and the fix)."""


@dataclass
class Corpus:
    """An image-caption corpus: captions, the image each belongs to, and the image files.

    Attributes:
        root: the corpus folder (CC3M-style paths are relative to it).
        captions_file, image_dir: where the captions and the images were read from.
        format: ``"flickr"``, ``"coco"`` or ``"cc3m"``.
        captions: every caption, in file order (captions of skipped images left out).
        caption_image: for each caption, the index of its image in ``image_paths``.
        image_paths: absolute path of each image (index = item index).
        image_names: each image as the captions file names it.
        missing_images: names of images the file names but the folder lacks (``skip_missing=True``).
        unused_images: image files in ``image_dir`` that no caption names (relative paths).
    """

    root: Path
    captions_file: Path
    image_dir: Path
    format: str
    captions: list[str]
    caption_image: list[int]
    image_paths: list[str]
    image_names: list[str]
    missing_images: list[str] = field(default_factory=list)
    unused_images: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def caption_image_ids(self) -> list[str]:
        """One id per caption (its image's name): ``build_hierarchy``'s ``image_ids``."""
        return [self.image_names[i] for i in self.caption_image]

    def captions_of(self, image: int) -> list[str]:
        return [c for c, i in zip(self.captions, self.caption_image) if i == image]

    def dataset(self, transform: Callable | None = None, name: str | None = None) -> ImageDataset:
        """The corpus images as an :class:`~gram_plugin.data.ImageDataset` (one class, label 0), index = item
        index: what :class:`~gram_plugin.cache.FeatureCache` encodes and task sources load images from."""
        from ..data import ImageDataset, Item  # torch: read_corpus itself runs before it is imported

        return ImageDataset([Item(p, 0) for p in self.image_paths], ["image"], transform,
                            name or f"corpus-{self.root.name}")

    def first_images(self, n: int) -> "Corpus":
        """The corpus cut to its first ``n`` images and their captions (quick runs, tests)."""
        if not (isinstance(n, int) and n >= 1):
            raise CorpusError(f"first_images needs an integer >= 1, got {n!r}")
        keep = [k for k, i in enumerate(self.caption_image) if i < n]
        return Corpus(self.root, self.captions_file, self.image_dir, self.format, [self.captions[k] for k in keep],
                      [self.caption_image[k] for k in keep], self.image_paths[:n], self.image_names[:n],
                      list(self.missing_images), list(self.unused_images))

    def without_images(self, drop: Sequence[int]) -> "Corpus":
        """This corpus without the given image indices and their captions (images renumbered in order)."""
        drop = set(drop)
        new_index, paths, names = {}, [], []
        for i, (p, n) in enumerate(zip(self.image_paths, self.image_names)):
            if i not in drop:
                new_index[i] = len(paths)
                paths.append(p)
                names.append(n)
        keep = [k for k, i in enumerate(self.caption_image) if i in new_index]
        return Corpus(self.root, self.captions_file, self.image_dir, self.format, [self.captions[k] for k in keep],
                      [new_index[self.caption_image[k]] for k in keep], paths, names,
                      list(self.missing_images), list(self.unused_images))

    def without_unreadable(self) -> tuple["Corpus", list[str]]:
        """This corpus minus the images PIL cannot decode in full (and their captions); (corpus, their paths)."""
        _, bad = self.dataset().without_unreadable()
        if not bad:
            return self, []
        bad_set = set(bad)
        return self.without_images([i for i, p in enumerate(self.image_paths) if p in bad_set]), bad

    def describe(self) -> dict:
        """What was read, for logs and the hierarchy's metadata (JSON-able)."""
        return {"root": str(self.root), "captions_file": str(self.captions_file), "image_dir": str(self.image_dir),
                "format": self.format, "n_images": len(self), "n_captions": self.n_captions,
                "missing_images": len(self.missing_images), "unused_images": len(self.unused_images)}


# --------------------------------------------------------------------------------------------- finding files


def _find_captions_file(root: Path) -> Path:
    found = [root / n for n in CAPTION_FILE_NAMES if (root / n).is_file()]
    if not found:
        found = sorted(root.glob("captions*.json")) + sorted((root / "annotations").glob("captions*.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise CorpusError(f"corpus folder {root} holds no captions file ({', '.join(CAPTION_FILE_NAMES)}, "
                          "captions*.json or annotations/captions*.json): name it with captions= (--captions)")
    raise CorpusError(f"corpus folder {root} holds several captions files ({', '.join(p.name for p in found)}): "
                      "name one with captions= (--captions)")


def _resolve_paths(path, captions, images) -> tuple[Path, Path, Path]:
    """(corpus root, captions file, image folder) from what the caller gave."""
    if path is None and captions is None:
        raise CorpusError("read_corpus needs a corpus folder or a captions file")
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise CorpusError(f"corpus {path} does not exist (give a folder with a captions file and images, "
                              "or the captions file itself)")
        if path.is_dir():
            root = path
            captions_file = Path(captions) if captions is not None else _find_captions_file(root)
        else:
            if captions is not None:
                raise CorpusError(f"corpus {path} is a file: it is the captions file, so captions= must not be given too")
            captions_file, root = path, path.parent
    else:
        captions_file = Path(captions)
        root = captions_file.parent
    if not captions_file.is_file():
        raise CorpusError(f"captions file {captions_file} does not exist")
    if images is not None:
        image_dir = Path(images)
        if not image_dir.is_dir():
            raise CorpusError(f"image folder {image_dir} does not exist (images= / --images)")
    else:
        image_dir = root / "images" if (root / "images").is_dir() else root
    return root, captions_file, image_dir


# --------------------------------------------------------------------------------------------- parsing


def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise CorpusError(f"captions file {path} is not UTF-8 text ({e})") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise CorpusError(f"captions file {path} cannot be read ({e})") from None


def _parse_tab_lines(path: Path, text: str) -> tuple[str, list[tuple[str, str]]]:
    """(format, [(image name, caption)]) of a Flickr or CC3M-style file."""
    pairs, kinds = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise CorpusError(f"{path}:{n}: a caption without an image (no tab); every line must be "
                              f"'<image>#<k><TAB><caption>' (Flickr) or '<image path><TAB><caption>' (CC3M-style): "
                              f"{line[:80]!r}")
        image, _, caption = line.partition("\t")
        image, caption = image.strip(), caption.strip()
        if not image:
            raise CorpusError(f"{path}:{n}: a caption without an image (empty image field)")
        if not caption:
            raise CorpusError(f"{path}:{n}: image {image!r} has an empty caption")
        if "\t" in caption:
            raise CorpusError(f"{path}:{n}: more than one tab; a line is one '<image><TAB><caption>' record")
        flickr = bool(_FLICKR_KEY.search(image))
        kinds.add(flickr)
        if len(kinds) > 1:
            raise CorpusError(f"{path}:{n}: mixes Flickr keys ('<image>#<k>') with plain image paths; use one style")
        if "://" in image:
            raise CorpusError(f"{path}:{n}: {image!r} is a URL; download the images and list their paths "
                              "relative to the corpus folder")
        pairs.append((_FLICKR_KEY.sub("", image) if flickr else image, caption))
    if not pairs:
        raise CorpusError(f"captions file {path} holds no captions")
    return ("flickr" if kinds == {True} else "cc3m"), pairs


def _parse_coco(path: Path, text: str) -> list[tuple[str, str]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"captions file {path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(doc.get("annotations"), list):
        raise CorpusError(f"{path} is not a COCO captions file: it needs lists 'images' ({{id, file_name}}) and "
                          "'annotations' ({image_id, caption})")
    files = {}
    for k, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise CorpusError(f"{path}: images[{k}] needs an 'id' and a 'file_name'")
        files[im["id"]] = im["file_name"]
    pairs, unknown = [], []
    for k, a in enumerate(doc["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise CorpusError(f"{path}: annotations[{k}] needs an 'image_id' and a 'caption'")
        if a["image_id"] not in files:
            unknown.append(a["image_id"])
            continue
        if not a["caption"].strip():
            raise CorpusError(f"{path}: annotations[{k}] (image {files[a['image_id']]!r}) has an empty caption")
        pairs.append((files[a["image_id"]], a["caption"].strip()))
    if unknown:
        raise CorpusError(f"{path}: {len(unknown)} captions name image ids that 'images' does not list "
                          f"(e.g. {unknown[:EXAMPLES]}): captions without images")
    if not pairs:
        raise CorpusError(f"captions file {path} holds no captions")
    return pairs


def _list_images(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def read_corpus(path: str | os.PathLike | None = None, *, captions: str | os.PathLike | None = None,
                images: str | os.PathLike | None = None, skip_missing: bool = False) -> Corpus:
    """Read and check an image-caption corpus (see the module docstring for the formats and layout).

    Args:
        path: the corpus folder, or its captions file.
        captions: the captions file, when the folder holds none or several (or without ``path``).
        images: the image folder (default ``<corpus>/images`` if it exists, else the corpus folder);
            CC3M-style paths are always relative to the corpus folder.
        skip_missing: leave out the captions of images the folder lacks (listed in
            ``missing_images``) instead of failing.

    Raises:
        CorpusError: a missing / unreadable / malformed file, captions without images, missing
            images (count and examples), an image path outside the corpus folder.
    """
    root, captions_file, image_dir = _resolve_paths(path, captions, images)
    text = _read_text(captions_file)
    if text.lstrip().startswith("{"):
        fmt, pairs = "coco", _parse_coco(captions_file, text)
    else:
        fmt, pairs = _parse_tab_lines(captions_file, text)
    # lexical paths (no symlink resolution): a corpus of symlinked images is fine, "../x" is not
    base = Path(os.path.abspath(root if fmt == "cc3m" else image_dir))

    index: dict[str, int] = {}
    for name, _ in pairs:
        index.setdefault(name, len(index))
    names = list(index)
    resolved, missing, outside = [], [], []
    for name in names:
        p = Path(os.path.normpath(base / name))
        if Path(name).is_absolute() or (p != base and base not in p.parents):
            outside.append(name)
        elif not p.is_file():
            missing.append(name)
        resolved.append(p)
    if outside:
        raise CorpusError(f"{captions_file}: {len(outside)} image paths leave the corpus folder {base} "
                          f"(e.g. {outside[:EXAMPLES]}); paths must be relative to it")
    if missing and (not skip_missing or len(missing) == len(names)):
        where = f"{base}" + (" (CC3M-style paths are relative to the corpus folder)" if fmt == "cc3m" else "")
        fix = ("check the image folder (images= / --images)" if len(missing) == len(names)
               else "add them, or pass skip_missing=True (--skip-missing) to leave their captions out")
        raise CorpusError(f"{captions_file}: {len(missing)} of {len(names)} images it names are missing from "
                          f"{where} (e.g. {missing[:EXAMPLES]}); {fix}")
    missing_set = set(missing)
    keep = [n for n in names if n not in missing_set]
    new_index = {n: k for k, n in enumerate(keep)}
    kept_pairs = [(n, c) for n, c in pairs if n in new_index]
    corpus = Corpus(root=root, captions_file=captions_file, image_dir=image_dir, format=fmt,
                    captions=[c for _, c in kept_pairs], caption_image=[new_index[n] for n, _ in kept_pairs],
                    image_paths=[str(resolved[index[n]]) for n in keep], image_names=keep, missing_images=missing)
    if missing:
        warnings.warn(f"{captions_file}: left out {len(missing)} missing images and their captions "
                      f"(e.g. {missing[:EXAMPLES]})")
    named = set(corpus.image_paths)
    unused = [p for p in _list_images(base, recursive=fmt == "cc3m") if str(p) not in named]
    corpus.unused_images = [str(p.relative_to(base)) for p in unused]
    if unused:
        warnings.warn(f"{base}: {len(unused)} images have no caption in {captions_file.name} and are not part of "
                      f"the corpus (e.g. {corpus.unused_images[:EXAMPLES]})")
    return corpus
