"""Choosing K from a sweep, on the command line: ``python -m deltanmf.select_k SWEEP_DIR``.

Writes ``k_selection.csv`` and ``k_selection.png`` into the sweep directory and prints the
suggested K (and K_case) with the reason; the rules are :mod:`deltanmf.tl.select_k`'s.
"""
from __future__ import annotations

import argparse
import sys

from .errors import InputError
from .tl import select_k as rules
from .tl.select_k import GAIN_TOLERANCE, MARGIN, select_k


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m deltanmf.select_k SWEEP_DIR [--margin M] [--gain-tolerance T]``."""
    parser = argparse.ArgumentParser(prog="python -m deltanmf.select_k", description=rules.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a multirun directory, e.g. outputs/multirun/<date>/<time>")
    parser.add_argument("--margin", type=float, default=MARGIN,
                        help=f"K rule: the largest K whose stability is within this of the best (default {MARGIN})")
    parser.add_argument("--gain-tolerance", type=float, default=GAIN_TOLERANCE,
                        help="K_case rule: the smallest K_case whose gain over the null is within this "
                             f"fraction of the largest (default {GAIN_TOLERANCE})")
    args = parser.parse_args(argv)
    try:
        choice = select_k(args.sweep_dir, args.margin, args.gain_tolerance)
    except InputError as err:
        print(f"deltanmf: error: {err}", file=sys.stderr)
        return 2
    print(choice.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
