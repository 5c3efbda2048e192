"""`hstu-exp-wandb SWEEP_OR_CSV`: a recorded sweep -> W&B runs, offline by default.

Any sweep that has records (a sweep dir, its results.csv or results.jsonl, a copy from a GPU box
without W&B, `outputs/published/*/`) becomes the same runs a live sweep logs: one run per point
that ran and a summary run, with the same stable ids, so importing twice, or importing a sweep
that also logged live, updates runs instead of adding them. Runs are written under
`<dir>/wandb-import/`; `wandb sync` uploads them (docs/wandb.md).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

from hstu_exp.report.aggregate import CSV_FILE, SweepError, headline, load_sweep, one_sweep, require
from hstu_exp.report.labels import serve_labels
from hstu_exp.tracking import wandb_sink

IMPORT_DIR = "wandb-import"
# Without these a record cannot become a run that says what ran and how fast.
REQUIRED = ["status", "workload", "model", "batch_size", "median_ms"]
INT_KEYS = [
    "batch_size",
    "total_history",
    "new_history",
    "num_candidates",
    "page_size",
    "cpu_cores",
    "point",
    "iterations",
    "num_layers",
    "hidden",
    "num_heads",
    "head_dim",
    "max_history",
    "warmup",
    "iters",
    "min_samples",
    "input_sets",
    "seed",
]
BOOL_KEYS = ["valid", "verify", "throttled", "power_capped", "git_dirty", "autotune"]


def _clean(row: dict) -> dict:
    """A table row as the runner wrote it: no NaN placeholders, ints and bools restored (a CSV
    column with gaps reads 1 as 1.0 and True as 'True')."""
    out = {}
    for k, v in row.items():
        if hasattr(v, "item") and not hasattr(v, "__len__"):
            v = v.item()
        if k != "samples_ms" and (v is None or (isinstance(v, float) and math.isnan(v))):
            continue
        if k in INT_KEYS and isinstance(v, float) and v.is_integer():
            v = int(v)
        if k in BOOL_KEYS and isinstance(v, str) and v.lower() in ("true", "false"):
            v = v.lower() == "true"
        out[k] = v
    if not isinstance(out.get("samples_ms"), (list, tuple)):
        samples = out.pop("samples_ms", None)
        if hasattr(samples, "tolist"):
            out["samples_ms"] = samples.tolist()
    return out


def _sweep_dir(source: Path) -> Path:
    return source if source.is_dir() else source.parent


def import_sweep(
    source: Path, *, logger: dict, out_dir: Path, group: str, id_group: Optional[str] = None
) -> dict:
    """Logs every point that ran and the summary run; returns counts. Stops at the first W&B
    failure (wandb_sink prints the one warning line)."""
    df = load_sweep(source)
    require(df, REQUIRED, source, "needed for W&B runs")
    one_sweep(df, source, "import")
    if df.attrs.get("torn_note"):
        print(f"[hstu-exp] {source}: {df.attrs['torn_note']}", flush=True)
    root = Path(out_dir) / IMPORT_DIR
    written, skipped = 0, 0
    for i, row in enumerate(df.to_dict("records")):
        record = _clean(row)
        if record.get("status") == "skipped":
            skipped += 1
            continue
        point = record.get("point", i)
        if (
            wandb_sink.log_point(
                record,
                logger=logger,
                job_dir=root / str(point),
                group=group,
                cfg=None,
                sweep_dir=root,
                id_group=id_group,
            )
            is None
        ):
            if wandb_sink.disabled_reason(root):
                return {"points": written, "skipped": skipped, "summary": False, "failed": True}
        else:
            written += 1
    sweep = _sweep_dir(source)
    images = {p.stem: p for p in sorted((sweep / "figures").glob("*.png"))}
    csv = source if source.suffix == ".csv" else sweep / CSV_FILE
    summary = wandb_sink.log_summary(
        df,
        logger=logger,
        sweep_dir=root,
        group=group,
        images=images,
        labels=serve_labels,
        headline=headline(df),
        csv=csv if csv.is_file() else None,
        grid_dir=sweep,
        id_group=id_group,
    )
    return {
        "points": written,
        "skipped": skipped,
        "summary": summary is not None,
        "failed": summary is None and wandb_sink.effective_mode(logger) != "disabled",
    }


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="hstu-exp-wandb",
        description="Replay a recorded sweep (a sweep dir, results.csv or results.jsonl) into "
        "W&B runs: one per point that ran, and a summary run.",
    )
    p.add_argument("source", help="sweep dir, results.csv or results.jsonl")
    p.add_argument(
        "--mode",
        choices=wandb_sink.MODES,
        default="offline",
        help="offline (default; upload later with `wandb sync`), online, disabled. "
        "WANDB_MODE in the environment wins, as for hstu-exp",
    )
    p.add_argument("--project", default="hstu-exp")
    p.add_argument("--entity", default=None)
    p.add_argument("--group", default=None, help="W&B group (default: the sweep's dir name)")
    p.add_argument("--tags", nargs="*", default=[], help="tags added to every run")
    p.add_argument(
        "--dir",
        default=None,
        help=f"where the runs go (default: the sweep dir); they land in DIR/{IMPORT_DIR}/",
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=wandb_sink.DEFAULT_TIMEOUT_S,
        help="online: seconds W&B may take to start or finish a run",
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    source = Path(args.source).expanduser().resolve()
    sweep = _sweep_dir(source)
    out_dir = Path(args.dir).expanduser().resolve() if args.dir else sweep
    logger = {
        "name": "wandb",
        "project": args.project,
        "entity": args.entity,
        "mode": args.mode,
        "tags": args.tags,
        "timeout_s": args.timeout_s,
        "imported": True,
    }
    if args.timeout_s <= 0:
        print(
            f"hstu-exp-wandb: error: --timeout-s={args.timeout_s:g}: must be positive", file=sys.stderr
        )
        sys.exit(2)
    try:
        done = import_sweep(
            source, logger=logger, out_dir=out_dir, group=args.group or sweep.name, id_group=sweep.name
        )
    except SweepError as exc:
        print(f"hstu-exp-wandb: error: {exc}", file=sys.stderr)
        sys.exit(2)
    root = out_dir / IMPORT_DIR
    print(
        f"[hstu-exp] W&B: {done['points']} point runs"
        f"{' and a summary run' if done['summary'] else ''} in {root} "
        f"({done['skipped']} skipped points listed in the summary, not logged)",
        flush=True,
    )
    if wandb_sink.effective_mode(logger) == "offline" and done["points"] + done["summary"]:
        print(f"[hstu-exp] upload: {wandb_sink.sync_command(root)}", flush=True)
    if done["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
