"""Multirun close-out: records of the whole sweep dir -> results.csv, figures, summary W&B run.

It reads records from disk, so it works the same when the points ran elsewhere (Slurm)."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf


def _fail(path, cause) -> None:
    """One line naming the file and the cause, then exit 1 (Hydra lets SystemExit through)."""
    print(f"hstu-exp: error: close-out: {path}: {cause}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def close_out(sweep_dir: Path, *, logger=None) -> dict:
    """Table, results.csv, the sweep-level results.jsonl and the figures, each written to a
    temporary name and renamed; SystemExit(1) with one line when any of them cannot be written."""
    from hstu_exp.report.aggregate import (
        format_headline,
        headline,
        load,
        write_csv,
        write_jsonl,
        write_speedups,
    )
    from hstu_exp.report.console import print_summary
    from hstu_exp.report.figures import draw_all
    from hstu_exp.tracking.records import FileWriteError

    sweep_dir = Path(sweep_dir)
    df = load(sweep_dir)
    if df.empty:
        print(f"[hstu-exp] no records under {sweep_dir}", flush=True)
        return {}
    print_summary(df.to_dict("records"))
    speed = headline(df)
    if len(speed):
        print(format_headline(speed), flush=True)
    if df.attrs.get("torn_note"):
        print(f"[hstu-exp] {df.attrs['torn_note']}", flush=True)
    try:
        csv = write_csv(df, sweep_dir)
        jsonl = write_jsonl(df, sweep_dir)
        if len(speed):
            write_speedups(speed, sweep_dir)
        figures = draw_all(df, sweep_dir / "figures")
    except FileWriteError as exc:
        _fail(exc.path, exc.reason)
    except OSError as exc:  # noqa: BLE001 - anything else the disk says: still one line
        _fail(exc.filename or sweep_dir, exc.strerror or exc)
    print(
        f"[hstu-exp] {csv}, {jsonl.name} (with samples)\n[hstu-exp] figures: "
        f"{', '.join(sorted(figures)) or 'none'} in {sweep_dir / 'figures'}",
        flush=True,
    )
    if logger and logger.get("name") == "wandb":
        from hstu_exp.report.labels import serve_labels
        from hstu_exp.tracking.wandb_sink import effective_mode, log_summary, sync_command

        run = log_summary(
            df,
            logger=logger,
            sweep_dir=sweep_dir,
            group=sweep_dir.name,
            images=figures,
            labels=serve_labels,
            headline=speed,
            csv=csv,
        )
        if run and effective_mode(logger) == "offline":  # say where the runs are, and how
            print(
                f"[hstu-exp] W&B: offline runs in {sweep_dir}/*/wandb and {sweep_dir}/wandb; "
                f"upload: {sync_command(sweep_dir)}",
                flush=True,
            )
    return {"csv": csv, "figures": figures, "records": len(df)}


class CloseOut(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        logger = OmegaConf.to_container(config.logger, resolve=True) if "logger" in config else None
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            close_out(sweep_dir, logger=logger)
        except Exception as exc:  # noqa: BLE001 - Hydra would only warn, and exit 0
            first = (str(exc).strip().splitlines() or [""])[0]
            _fail(sweep_dir, f"{type(exc).__name__}: {first}; the points' records are on disk")
