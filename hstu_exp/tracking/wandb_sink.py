"""Weights & Biases: one run per point, one summary run per sweep.

Offline by default: runs are written under the job (or sweep) dir and `wandb sync <dir>` uploads
them later. Callers write the on-disk record first; a W&B failure here is reported, never raised.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

TABLE_SKIP = ("samples_ms",)


def _init(*, logger: dict, directory: Path, group: str, job_type: str, name: str, config: dict,
          tags: Iterable[str]):
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(mode=logger["mode"], project=logger["project"], entity=logger.get("entity"),
                      dir=str(directory), group=group, job_type=job_type, name=name,
                      config=config, tags=sorted(set(tags)), reinit="finish_previous",
                      settings=wandb.Settings(console="off", silent=True))


def log_point(record: dict, *, logger: dict, job_dir: Path, group: str, name: str, config: dict,
              tags: Iterable[str]) -> Optional[str]:
    """Returns the run's directory, or None with a warning when W&B fails."""
    try:
        import wandb

        run = _init(logger=logger, directory=job_dir, group=group,
                    job_type=str(record.get("workload")), name=name, config=config, tags=tags)
        run.summary.update({k: v for k, v in record.items() if k not in TABLE_SKIP})
        samples = record.get("samples_ms") or []
        if samples:
            run.log({"samples": wandb.Table(columns=["iteration", "latency_ms"],
                                            data=[[i, s] for i, s in enumerate(samples)])})
        run_dir = run.dir
        run.finish()
        return str(Path(run_dir).parent)
    except Exception as exc:  # noqa: BLE001 - the record on disk is what matters
        print(f"[hstu-exp] warning: W&B logging failed ({type(exc).__name__}: {exc}); "
              f"the record is on disk", flush=True)
        return None


def log_summary(table, *, logger: dict, sweep_dir: Path, group: str, images: dict,
                aggregates=None) -> Optional[str]:
    """The sweep's summary run: the full table, every figure, per-mode aggregates."""
    try:
        import wandb

        run = _init(logger=logger, directory=sweep_dir, group=group, job_type="summary",
                    name=f"{group}-summary", config={"sweep_dir": str(sweep_dir)},
                    tags=["summary"])
        payload = {"results": wandb.Table(dataframe=table)}
        payload.update({f"figures/{k}": wandb.Image(str(v)) for k, v in images.items()})
        if aggregates is not None and len(aggregates):
            payload["aggregates"] = wandb.Table(dataframe=aggregates)
        run.log(payload)
        run.summary.update({"points": len(table),
                            "ok": int((table.get("status") == "ok").sum()) if len(table) else 0})
        run_dir = run.dir
        run.finish()
        return str(Path(run_dir).parent)
    except Exception as exc:  # noqa: BLE001
        print(f"[hstu-exp] warning: W&B summary run failed ({type(exc).__name__}: {exc})",
              flush=True)
        return None


def read_offline_run(run_dir: Path) -> dict:
    """Config, summary, group and tags of an offline run, read back from its .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    (path,) = Path(run_dir).glob("run-*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(path))
    out = {"config": {}, "summary": {}, "group": None, "tags": [], "job_type": None, "name": None}
    while (data := store.scan_data()) is not None:
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(group=rec.run.run_group, tags=list(rec.run.tags),
                       job_type=rec.run.job_type, name=rec.run.display_name)
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "summary":
            out["summary"].update({u.key: json.loads(u.value_json)
                                   for u in rec.summary.update if u.key})
    return out
