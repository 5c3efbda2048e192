"""Records of a sweep -> one table (results.csv), and speedups between matched records."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from hstu_exp.tracking.records import SWEPT_KEYS, read_records

CSV_FILE = "results.csv"


def load(sweep_dir: Path) -> pd.DataFrame:
    """Every record under the sweep dir; when a point was run again (resume), the newest wins."""
    df = pd.DataFrame(list(read_records(sweep_dir)))
    if df.empty:
        return df
    if "config_key" in df:
        df = df.sort_values("time", kind="stable").drop_duplicates("config_key", keep="last")
    return df.sort_values("point", kind="stable").reset_index(drop=True)


def write_csv(df: pd.DataFrame, sweep_dir: Path) -> Path:
    path = Path(sweep_dir) / CSV_FILE
    df.drop(columns=[c for c in ("samples_ms", "traceback") if c in df]).to_csv(path, index=False)
    return path


def speedups(df: pd.DataFrame, *, key: str, baseline: str, value: str = "median_ms",
             ignore=()) -> pd.DataFrame:
    """Each ok record vs the baseline record that agrees on every swept key but `key` (and the
    keys in `ignore`, e.g. new_history against a full recompute)."""
    ok = df[df["status"] == "ok"] if "status" in df else df
    on = [k for k in SWEPT_KEYS if k in ok and k != key and k not in ignore]
    base = ok[ok[key] == baseline][on + [value]].rename(columns={value: "baseline_" + value})
    other = ok[ok[key] != baseline]
    merged = other.merge(base, on=on, how="inner") if len(base) and len(other) else \
        other.head(0).assign(**{"baseline_" + value: []})
    merged["speedup"] = merged["baseline_" + value] / merged[value]
    return merged


def mode_aggregates(df: pd.DataFrame) -> pd.DataFrame:
    """Per (workload, cache, kernel, graph, mode): points, ok points, median of medians, mean
    floor fraction."""
    keys = [k for k in ("workload", "cache", "kernel", "graph", "mode") if k in df]
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame()
    agg = {"median_ms": "median"}
    if "floor_fraction" in ok:
        agg["floor_fraction"] = "mean"
    out = ok.groupby(keys, dropna=False).agg(agg).reset_index()
    out["points"] = ok.groupby(keys, dropna=False).size().values
    return out
