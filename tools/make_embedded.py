"""Rebuild the embedded default dataset (gram_plugin/assets/caltech10) from ../shared/data/caltech-101.tar
(a build script of the checkout, not part of the installed package):

    python3 tools/make_embedded.py /path/to/extracted/caltech-101/101_ObjectCategories

10 Caltech101 classes x 24 images (the first 24 file names of each class, sorted), resized so the
longer side is 64 px, JPEG quality 85. Licence of the source images: CC BY 4.0 (Caltech101).
"""

import json
import sys
from pathlib import Path

from PIL import Image

CLASSES = ["airplanes", "Motorbikes", "Faces", "Leopards", "watch", "car_side", "ketch", "chandelier", "sunflower", "pizza"]
PER_CLASS = 24
SIZE = 64


def main(src: str) -> None:
    src_root = Path(src)
    out = Path(__file__).resolve().parents[1] / "gram_plugin" / "assets" / "caltech10"  # package data
    manifest = {"source": "Caltech101 (CC BY 4.0), ../shared/data/caltech-101.tar", "longer_side_px": SIZE, "files": {}}
    for c in CLASSES:
        files = sorted(p for p in (src_root / c).iterdir() if p.suffix.lower() == ".jpg")[:PER_CLASS]
        (out / c).mkdir(parents=True, exist_ok=True)
        for p in files:
            with Image.open(p) as im:
                im = im.convert("RGB")
                im.thumbnail((SIZE, SIZE), Image.BICUBIC)
                im.save(out / c / p.name, quality=85)
        manifest["files"][c] = [p.name for p in files]
    (out.parent / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
