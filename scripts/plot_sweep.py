#!/usr/bin/env python3
"""Redraw a sweep's figures from disk alone (no W&B), e.g. after a cluster sweep.

    .venv/bin/python scripts/plot_sweep.py outputs/multirun/<sweep>          # -> <sweep>/figures/
    .venv/bin/python scripts/plot_sweep.py SWEEP --csv      # also rewrite SWEEP/results.csv
    .venv/bin/python scripts/plot_sweep.py outputs/published/<name>/results.csv --out /tmp/figs

SWEEP is a sweep dir (its results.jsonl records, or its results.csv when it holds no records)
or a results.csv file. The figures are the close-out's (hstu_exp.report.figures).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a source tree too


def main(argv=None) -> int:
    from hstu_exp.report.aggregate import write_csv
    from hstu_exp.report.compare import CompareError, load_sweep
    from hstu_exp.report.console import print_summary
    from hstu_exp.report.figures import draw_all
    from hstu_exp.tracking.records import RESULTS_FILE

    p = argparse.ArgumentParser(prog="plot_sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("sweep", type=Path, help="sweep dir or results.csv")
    p.add_argument("--out", type=Path, default=None,
                   help="figures dir (default: figures/ beside the records or the CSV)")
    p.add_argument("--csv", action="store_true",
                   help="also write results.csv from the records (a sweep dir with records)")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    args = p.parse_args(argv)

    try:
        df = load_sweep(args.sweep)
    except CompareError as exc:
        print(f"plot_sweep: error: {exc}", file=sys.stderr)
        return 2
    if df.empty:
        print(f"plot_sweep: error: no records in {args.sweep}", file=sys.stderr)
        return 2
    root = args.sweep if args.sweep.is_dir() else args.sweep.parent
    if args.csv:
        if not (args.sweep.is_dir() and next(args.sweep.rglob(RESULTS_FILE), None)):
            print("plot_sweep: error: --csv needs a sweep dir with results.jsonl records",
                  file=sys.stderr)
            return 2
        print(f"table: {write_csv(df, root)}")
    if not args.quiet:
        print_summary(df.to_dict("records"))
    out = args.out or root / "figures"
    figures = draw_all(df, out)
    if not figures:
        print(f"plot_sweep: no ok records to draw in {args.sweep}", file=sys.stderr)
        return 1
    for name, path in sorted(figures.items()):
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
