"""``gram-plugin compare DIR_A DIR_B``: does B beat A on your data? Two methods' Dassl base-to-new runs,
paired by seed (:mod:`gram_plugin.adapters.dassl_results`)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare two methods' Dassl base-to-new runs seed by seed (base / new / H, paired t)",
        description="Reads every log.txt under DIR_A and DIR_B (CoOp's layout: "
                    ".../train_base/<dataset>/shots_N/<trainer>/<cfg>/seedK/log.txt, with the new-class runs at the "
                    "same path under test_new/), pairs the two methods by seed and prints base / new / H per seed, "
                    "mean and sd, and B - A: mean ± sd, the paired t statistic and how many seeds improved.")
    p.add_argument("a", metavar="DIR_A", help="the first method's folder, e.g. "
                   "output/base2new/train_base/caltech101/shots_16/CoOp/vit_b16_ctxv1")
    p.add_argument("b", metavar="DIR_B", help="the second method's folder (the same seeds)")
    p.add_argument("--plot", metavar="FILE", default=None, help="also draw each seed's A -> B (a PNG; needs matplotlib)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    """Print the comparison (and write ``--plot``)."""
    from ..adapters.dassl_results import compare

    result = compare(args.a, args.b)
    print(result.format())
    if args.plot:
        print(f"plot: {result.plot(args.plot)}")
    return 0
