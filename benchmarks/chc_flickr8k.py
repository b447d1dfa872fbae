"""CHC on the real Flickr8k captions (text only: no Flickr images here), timed end to end.

    python benchmarks/chc_flickr8k.py [--out /tmp/chc-flickr8k] [extra `gram-plugin chc` flags]

Runs the same code path as `gram-plugin chc` in this process (imports included in the wall time),
then prints cluster count, noise share, the largest topics' words and the per-stage timings.
"""

import sys
import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

CAPTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k-captions.txt.gz"


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/chc-flickr8k")
    p.add_argument("--captions", default=str(CAPTIONS))
    args, extra = p.parse_known_args(argv)
    from gram_plugin.chc import load_hierarchy
    from gram_plugin.cli import main

    out = Path(args.out) / "hierarchy.json"
    rc = main(["chc", "--captions", args.captions, "--out", str(out), "--cache-dir", str(Path(args.out) / "cache"),
               "--overwrite", *extra])
    wall = time.perf_counter() - T0
    if rc:
        return rc
    h = load_hierarchy(out)
    print(json.dumps({"n_captions": h["n_captions"], "n_topics": h["n_topics"],
                      "noise_share": round(h["noise"]["share"], 4), "timings_s": h["timings_s"],
                      "wall_s_incl_imports": round(wall, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
