"""Multirun close-out: records of the whole sweep dir -> results.csv, figures, summary W&B run.

It reads records from disk, so it works the same when the points ran elsewhere (Slurm)."""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf


def close_out(sweep_dir: Path, *, logger=None) -> dict:
    from hstu_exp.report.aggregate import load, write_csv
    from hstu_exp.report.console import print_summary
    from hstu_exp.report.figures import draw_all

    sweep_dir = Path(sweep_dir)
    df = load(sweep_dir)
    if df.empty:
        print(f"[hstu-exp] no records under {sweep_dir}", flush=True)
        return {}
    csv = write_csv(df, sweep_dir)
    figures = draw_all(df, sweep_dir / "figures")
    print_summary(df.to_dict("records"))
    print(f"[hstu-exp] {csv}\n[hstu-exp] figures: {', '.join(sorted(figures)) or 'none'} "
          f"in {sweep_dir / 'figures'}", flush=True)
    if logger and logger.get("name") == "wandb":
        from hstu_exp.report.aggregate import mode_aggregates
        from hstu_exp.tracking.wandb_sink import log_summary

        log_summary(df.drop(columns=[c for c in ("samples_ms", "traceback") if c in df]),
                    logger=logger, sweep_dir=sweep_dir, group=sweep_dir.name, images=figures,
                    aggregates=mode_aggregates(df))
    return {"csv": csv, "figures": figures, "records": len(df)}


class CloseOut(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        logger = OmegaConf.to_container(config.logger, resolve=True) if "logger" in config else None
        close_out(Path(config.hydra.sweep.dir), logger=logger)
