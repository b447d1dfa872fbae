"""Reading CHC's inputs: caption files (Flickr / COCO dumps, one caption per line) and image-feature files."""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .config import CHCError

if TYPE_CHECKING:
    import torch

_ID_SUFFIX = re.compile(r"#\d+$")


def read_captions(path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """Read ``<image>#<k>\\t<caption>`` lines (Flickr8k / COCO dumps) or one caption per line.

    Returns (captions, image ids or None). ``.gz`` files are read transparently. A line with more
    than one tab (a caption that swallowed the next record) is split back into its records.
    """
    path = Path(path)
    if not path.is_file():
        raise CHCError(f"captions file {path} does not exist")
    try:
        return _read_captions(path)
    except UnicodeDecodeError as e:
        raise CHCError(f"captions file {path} is not UTF-8 text ({e.reason} at byte {e.start} of a block: "
                       f"{e.object[max(0, e.start - 20):e.end + 20]!r}); save it as UTF-8") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a .gz name on plain text, or a cut-off download
        raise CHCError(f"captions file {path} is not a gzip file, or a truncated one ({e}); "
                       "name a plain text file without .gz") from None


def _read_captions(path: Path) -> tuple[list[str], list[str] | None]:
    opener = gzip.open if path.suffix == ".gz" else open
    captions: list[str] = []
    ids: list[str] = []
    tabbed = None
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            has_tab = "\t" in line
            if tabbed is None:
                tabbed = has_tab
            if has_tab != tabbed:
                raise CHCError(f"{path}:{n}: mixes '<image>\\t<caption>' lines with plain caption lines")
            if not tabbed:
                captions.append(line.strip())
                continue
            parts = line.split("\t")
            # "id\tcap id2\tcap2": the middle fields end with the next record's id.
            image = parts[0]
            for k, part in enumerate(parts[1:], 1):
                if k < len(parts) - 1:
                    text, _, next_image = part.rpartition(" ")
                else:
                    text, next_image = part, None
                captions.append(text.strip())
                ids.append(_ID_SUFFIX.sub("", image.strip()))
                image = next_image
    if not captions:
        raise CHCError(f"captions file {path} holds no captions")
    return captions, (ids if tabbed else None)


def load_image_features(path: str | os.PathLike, image_ids: Sequence[str] | None) -> torch.Tensor:
    """Image features aligned with ``image_ids`` (the images in order of first appearance).

    ``.safetensors``: tensor ``features`` (n, d); if metadata ``image_ids`` (a JSON list) is present
    the rows are re-ordered to match. ``.npy``: rows already in that order.
    """
    path = Path(path)
    if not path.is_file():
        raise CHCError(f"image features file {path} does not exist")
    import torch  # here, not at the top: the CLI reads the captions before torch is imported

    order = None
    if path.suffix == ".npy":
        feats = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if "features" not in f.keys():
                raise CHCError(f"{path} has no tensor named 'features' (found {sorted(f.keys())})")
            feats = f.get_tensor("features")
            raw = (f.metadata() or {}).get("image_ids")
        order = json.loads(raw) if raw else None
    else:
        raise CHCError(f"image features must be .npy or .safetensors, got {path.name}")
    if feats.ndim != 2:
        raise CHCError(f"image features must be a 2-d (n_images, dim) array, got shape {tuple(feats.shape)}")
    if order is not None and image_ids is not None:
        index = {k: i for i, k in enumerate(order)}
        missing = [k for k in image_ids if k not in index]
        if missing:
            raise CHCError(f"{len(missing)} images have no features in {path} (first: {missing[0]!r})")
        feats = feats[[index[k] for k in image_ids]]
    return feats.float()
