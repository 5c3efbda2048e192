#!/usr/bin/env python3
"""Redraw a sweep's figures from disk alone (no W&B), e.g. after a cluster sweep.

    .venv/bin/python scripts/plot_sweep.py outputs/multirun/<sweep>          # -> <sweep>/figures/
    .venv/bin/python scripts/plot_sweep.py SWEEP --csv      # also rewrite SWEEP/results.csv
    .venv/bin/python scripts/plot_sweep.py outputs/published/<name>/results.csv --out /tmp/figs

SWEEP is a sweep dir (its results.jsonl records, or its results.csv when it holds no records),
a results.csv or a results.jsonl, of one sweep (a dir of several is refused). The figures are
the close-out's (hstu_exp.report.figures), each written to a temporary name and renamed. Exit
status 0; 1 when there is nothing to draw or a file cannot be written; 2 on bad input (one
line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _venv  # noqa: F401,E402  (source tree on the path; re-run under .venv if needed)

from hstu_exp.report.compare import OneLineParser  # noqa: E402

PROG = "plot_sweep.py"


def main(argv=None) -> int:
    p = OneLineParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("sweep", type=Path, help="sweep dir, results.csv or results.jsonl")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="figures dir (default: figures/ beside the records or the CSV)",
    )
    p.add_argument(
        "--csv",
        action="store_true",
        help="also write results.csv from the records (a sweep dir with records)",
    )
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    args = p.parse_args(argv)

    from hstu_exp.report.aggregate import (
        SweepError,
        format_headline,
        headline,
        load_sweep,
        one_sweep,
        require,
        write_csv,
        write_jsonl,
    )
    from hstu_exp.report.console import print_summary
    from hstu_exp.report.figures import draw_all
    from hstu_exp.tracking.records import FileWriteError, record_files

    try:
        df = load_sweep(args.sweep)
        require(df, ["workload", "median_ms"], args.sweep, "the figures need them")
        one_sweep(df, args.sweep, "draw")
    except SweepError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    root = args.sweep if args.sweep.is_dir() else args.sweep.parent
    if df.attrs.get("torn_note"):
        print(f"{PROG}: {df.attrs['torn_note']}", file=sys.stderr)
    try:
        if args.csv:
            if not (args.sweep.is_dir() and record_files(args.sweep)):
                print(
                    f"{PROG}: error: --csv needs a sweep dir with results.jsonl records", file=sys.stderr
                )
                return 2
            print(f"table: {write_csv(df, root)}, {write_jsonl(df, root).name}")
        if not args.quiet:
            print_summary(df.to_dict("records"))
            print(format_headline(headline(df)))
        out = args.out or root / "figures"
        figures = draw_all(df, out)
    except FileWriteError as exc:
        print(f"{PROG}: error: {exc.path}: {exc.reason}", file=sys.stderr)
        return 1
    if not figures:
        print(f"{PROG}: error: no ok records to draw in {args.sweep}", file=sys.stderr)
        return 1
    for name, path in sorted(figures.items()):
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
