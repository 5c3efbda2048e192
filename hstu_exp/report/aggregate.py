"""Records of a sweep -> one table; loading any recorded sweep; speedups with intervals.

The close-out writes two files into the sweep dir: `results.csv` (one row per point, the newest
record wins, without the raw samples) and a sweep-level `results.jsonl` (the same records with
their samples, so intervals can be computed from the sweep dir or a copy of it alone).
`load_sweep` is the one loader every report and script uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hstu_exp.stats import bootstrap_ratio, intervals_overlap, pass_totals
from hstu_exp.tracking.identity import same_point_key
from hstu_exp.tracking.records import ENV_KEYS, RESULTS_FILE, is_missing, scan_records, write_atomically

CSV_FILE = "results.csv"
# Columns that are text whatever they look like: pandas reads cuda 13.0 as a float, a driver
# 580.159.04 with NaNs as object, and a git sha made of digits as an integer.
# Measured environment numbers and flags stay numbers and booleans.
_TYPED_ENV = (
    "cpu_cores",
    "sm_clock_mhz",
    "sm_clock_max_mhz",
    "mem_clock_mhz",
    "power_w",
    "temperature_c",
    "throttled",
    "power_capped",
    "git_dirty",
)
STRING_COLUMNS = [k for k in ENV_KEYS if k not in _TYPED_ENV] + [
    "reason",
    "error",
    "invalid_reason",
    "headline",
    "config_key",
    "name",
    "sweep",
    "job_dir",
    "time",
    "overrides",
    "throttle_reasons",
]
# Kept in the sweep-level results.jsonl only (lists and the config tree); a results.csv read
# with that file beside it gets them back.
_NOT_IN_CSV = ("samples_ms", "traceback", "config", "repeat_samples_ms")


class SweepError(ValueError):
    """A sweep that cannot be read or lacks what is asked of it; the message is one line."""


def ok(df: pd.DataFrame) -> pd.DataFrame:
    """The ok records (all of them when the table has no status column)."""
    return df[df["status"] == "ok"] if "status" in df else df


def valid_mask(df: pd.DataFrame) -> pd.Series:
    """True where a record was judged valid, False where invalid, NA where not recorded."""
    if "valid" not in df:
        return pd.Series(pd.NA, index=df.index, dtype="boolean")
    v = df["valid"].map(
        lambda x: (
            x
            if isinstance(x, (bool, np.bool_))
            else {"true": True, "false": False}.get(str(x).strip().lower(), pd.NA)
        )
    )
    return v.astype("boolean")


def validity_note(df: pd.DataFrame) -> str:
    """'5 valid, 1 invalid' over the ok records, '' when no record says."""
    v = valid_mask(ok(df))
    if v.isna().all():
        return ""
    note = f"{int((v == True).sum())} valid, {int((v == False).sum())} invalid"  # noqa: E712
    unknown = int(v.isna().sum())
    return note + (f", {unknown} unchecked" if unknown else "")


def require(df: pd.DataFrame, columns, source, what: str = "") -> None:
    missing = [c for c in columns if c not in df]
    if missing:
        raise SweepError(
            f"{source}: missing column(s) {', '.join(missing)}" + (f" ({what})" if what else "")
        )


def one_sweep(df: pd.DataFrame, source, what: str) -> None:
    """Refuses records of several sweeps (a parent dir such as outputs/published): one table, one
    W&B group or one figures dir would silently merge them."""
    sweeps = sorted({str(s) for s in df.get("sweep", []) if isinstance(s, str)})
    if len(sweeps) > 1:
        raise SweepError(
            f"{source}: holds {len(sweeps)} sweeps ({', '.join(sweeps[:4])}"
            f"{', ...' if len(sweeps) > 4 else ''}); {what} each sweep dir alone"
        )


def _as_text(v):
    """A scalar as text; missing values and structures (a list of overrides) as they are."""
    if is_missing(v) or isinstance(v, (list, dict)):
        return v
    return str(v)


def _as_bool(v):
    """A flag as a bool: older sweep files wrote 'True' / 'False' text."""
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    return v


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for c in STRING_COLUMNS:
        if c in df:
            df[c] = df[c].map(_as_text).astype(object)
    for c in _TYPED_ENV:  # older sweep files wrote these as text too
        if c in df:
            numeric = c not in ("throttled", "power_capped", "git_dirty")
            df[c] = (
                pd.to_numeric(df[c], errors="coerce") if numeric else df[c].map(_as_bool).astype(object)
            )
    # Each replaced column is a block of its own: consolidated once here, not by every figure's
    # assign (pandas' "highly fragmented" warning).
    return df.copy()


def _newest_per_point(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    if "config_key" in df:
        by = "time" if "time" in df else None
        df = (df.sort_values(by, kind="stable") if by else df).drop_duplicates("config_key", keep="last")
    return (df.sort_values("point", kind="stable") if "point" in df else df).reset_index(drop=True)


def load(root: Path) -> pd.DataFrame:
    """Every record under a sweep dir, a job dir or one results.jsonl; when a point was run again
    (resume), the newest wins. attrs['torn_note'] says what torn lines were passed over."""
    scan = scan_records(root)
    df = _newest_per_point(_typed(pd.DataFrame(scan.records)))
    df.attrs["torn_note"] = scan.torn_note()
    return df


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={c: str for c in STRING_COLUMNS})
    except pd.errors.EmptyDataError:
        raise SweepError(f"{path}: empty CSV (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SweepError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    df = _typed(df)
    samples = path.with_name(RESULTS_FILE)
    if "config_key" in df and samples.is_file():  # the close-out's sibling file holds the samples
        recs = load(samples)
        for column in ("samples_ms", "config", "repeat_samples_ms"):
            if column in recs and "config_key" in recs:
                by_key = dict(zip(recs["config_key"], recs[column]))
                df[column] = df["config_key"].map(by_key)
    df.attrs["torn_note"] = ""
    return df


def load_sweep(path) -> pd.DataFrame:
    """A recorded sweep as a table: a sweep dir (its job records, else its close-out
    results.jsonl, else its results.csv), a results.csv (with samples from a sibling
    results.jsonl) or a results.jsonl. SweepError (one line) when there is nothing to read."""
    path = Path(path)
    if path.is_dir():
        if next((p for p in path.rglob(RESULTS_FILE) if p.is_file()), None) is not None:
            df = load(path)
        elif (path / CSV_FILE).is_file():
            df = _read_csv(path / CSV_FILE)
        else:
            raise SweepError(f"{path}: holds neither {RESULTS_FILE} records nor {CSV_FILE}")
    elif path.is_file():
        df = load(path) if path.suffix == ".jsonl" else _read_csv(path)
    else:
        raise SweepError(f"{path}: no such sweep dir or file")
    if df.empty:
        raise SweepError(f"{path}: no records")
    return df


def write_csv(df: pd.DataFrame, sweep_dir: Path) -> Path:
    table = df.drop(columns=[c for c in _NOT_IN_CSV if c in df])
    return write_atomically(Path(sweep_dir) / CSV_FILE, lambda tmp: table.to_csv(tmp, index=False))


SPEEDUPS_FILE = "speedups.csv"


def write_speedups(table: pd.DataFrame, sweep_dir: Path) -> Path:
    """The headline speedups with their 95 % intervals (headline()) as speedups.csv."""
    return write_atomically(Path(sweep_dir) / SPEEDUPS_FILE, lambda tmp: table.to_csv(tmp, index=False))


def _json_value(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def write_jsonl(df: pd.DataFrame, sweep_dir: Path) -> Path:
    """The sweep-level results.jsonl: the newest record of every point, samples included."""
    lines = []
    for row in df.to_dict("records"):
        rec = {k: v for k, v in row.items() if not (not isinstance(v, list) and is_missing(v))}
        lines.append(json.dumps(rec, default=_json_value) + "\n")
    return write_atomically(
        Path(sweep_dir) / RESULTS_FILE, lambda tmp: Path(tmp).write_text("".join(lines))
    )


def _samples(v):
    return v if isinstance(v, (list, np.ndarray)) and len(v) else None


def ratio_interval(num_samples, den_samples) -> tuple[float, float]:
    """95 % bootstrap interval of median(num) / median(den); NaNs without samples."""
    a, b = _samples(num_samples), _samples(den_samples)
    if a is None or b is None:
        return float("nan"), float("nan")
    _, lo, hi = bootstrap_ratio(a, b)
    return lo, hi


def repeat_units(r) -> list:
    """Each repeat's resampling units of a record (stats.py says why these): `repeat_units_ms`
    where the point ran several repeats; else the one run's e2e pass totals (`pass_ms`, or
    worked out of the samples of older records) or its samples; [] without samples."""
    given = r.get("repeat_units_ms")
    if isinstance(given, (list, np.ndarray)) and len(given):
        return [list(u) for u in given]
    if r.get("workload") == "e2e":
        passes = _samples(r.get("pass_ms"))
        if (
            passes is None
            and _samples(r.get("samples_ms")) is not None
            and not is_missing(r.get("num_batches"))
        ):
            passes = pass_totals(r["samples_ms"], int(r["num_batches"])) or None
        return [list(passes)] if passes is not None else []
    samples = _samples(r.get("samples_ms"))
    return [list(samples)] if samples is not None else []


REPEAT_COLUMNS = [
    *("ci_low", "ci_high", "spread_low", "spread_high", "repeats", "repeats_agree", "pair_ratio")
]


def repeat_ratio(num_units: list, den_units: list) -> tuple:
    """stat(num) / stat(den) over two records' repeats (repeat_units), paired in the order
    they ran: (ci_low, ci_high) the within-run 95 % interval of the median pair, (spread_low,
    spread_high) the lowest and highest pair ratio, repeats the pairs, repeats_agree whether
    the pairs' intervals overlap, pair_ratio the median pair's own ratio (the one its interval
    belongs to). NaNs and 0 pairs without units."""
    pairs = [bootstrap_ratio(n, d) for n, d in zip(num_units, den_units)]
    if not pairs:
        return (np.nan,) * 4 + (0, pd.NA, np.nan)
    mid = sorted(pairs)[(len(pairs) - 1) // 2]
    return (
        mid[1],
        mid[2],
        min(p[0] for p in pairs),
        max(p[0] for p in pairs),
        len(pairs),
        intervals_overlap([p[1:] for p in pairs]),
        mid[0],
    )


def speedups(
    df: pd.DataFrame, *, key: str, baseline: str, value: str = "median_ms", ignore=()
) -> pd.DataFrame:
    """Each ok record vs the baseline record that is the same point but for `key` (and the keys
    in `ignore`, e.g. new_history against a full recompute): tracking.identity decides, from
    the resolved config. `speedup` = baseline / record of `value` (each record's median
    repeat; where the records hold their samples, the median repeat pair's ratio of
    resampling-unit medians). Where the records hold their samples: ci_low, ci_high, the within-run 95 %
    interval (the median repeat pair's bootstrap of its resampling units, repeat_units);
    spread_low, spread_high, the lowest and highest ratio of the repeat pairs; repeats, how many
    pairs; repeats_agree, false when the pairs' intervals do not overlap (the runs disagree by
    more than their noise). `baseline_valid` says whether the baseline was judged valid."""
    okd = ok(df).copy()
    okd["valid"] = valid_mask(okd)
    okd["_point"] = same_point_key(okd.to_dict("records"), ignore=(key, *ignore))
    okd["_units"] = [repeat_units(r) for r in okd.to_dict("records")]
    carry = [value, "valid", "_units"]
    base = okd[okd[key] == baseline][["_point"] + carry].rename(
        columns={c: "baseline_" + c for c in carry}
    )
    other = okd[okd[key] != baseline]
    if len(base) and len(other):
        merged = other.merge(base, on="_point", how="inner").drop(columns="_point")
    else:
        merged = other.head(0).drop(columns="_point").assign(**{"baseline_" + c: [] for c in carry})
    rows = [repeat_ratio(b, o) for b, o in zip(merged["baseline__units"], merged["_units"])]
    for i, c in enumerate(REPEAT_COLUMNS):
        merged[c] = [r[i] for r in rows]
    # The median repeat pair's ratio where there are samples, so that the speedup lies in the
    # interval given with it (the ratio of each side's median repeat may pair two repeats that
    # never ran side by side).
    plain = merged["baseline_" + value] / merged[value]
    merged["speedup"] = pd.to_numeric(merged["pair_ratio"], errors="coerce").fillna(plain)
    return merged.drop(columns=["_units", "baseline__units", "pair_ratio"])


def block_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Block: every cache mode vs full recompute (cache=none), per kernel / graph."""
    block = ok(df)
    block = block[block["workload"] == "block"] if "workload" in block else block
    if block.empty or "cache" not in block or not (block["cache"] == "none").any():
        return block.head(0)
    return speedups(block, key="cache", baseline="none", ignore=("new_history", "page_size"))


def e2e_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """e2e: every mode vs baseline, per batch (the cache and graph follow from the mode)."""
    e2e = ok(df)
    e2e = e2e[e2e["workload"] == "e2e"] if "workload" in e2e else e2e.head(0)
    if e2e.empty or "mode" not in e2e or not (e2e["mode"] == "baseline").any():
        return e2e.head(0)
    # the ratio of pass totals: every mode serves the same stream (the per-batch median is one
    # middle batch of the stream, not a typical pass)
    return speedups(
        e2e, key="mode", baseline="baseline", value="total_ms", ignore=("cache", "graph", "page_size")
    )


def most_cached(sp: pd.DataFrame, by) -> pd.DataFrame:
    """Per group, the record with the fewest new tokens (the largest cached prefix)."""
    return (
        sp.sort_values("new_history", kind="stable")
        .groupby(list(by), as_index=False, dropna=False)
        .first()
    )


HEADLINE_COLUMNS = [
    "workload",
    "comparison",
    "batch_size",
    "total_history",
    "new_history",
    "speedup",
    "ci_low",
    "ci_high",
    "spread_low",
    "spread_high",
    "repeats",
    "repeats_agree",
    "valid",
    "baseline_valid",
]


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """The sweep's speedups in one table: block, cached vs full recompute with the largest cached
    prefix per T and batch, per kernel / graph; e2e, every mode vs baseline per batch."""
    parts = []
    sp = block_speedups(df)
    if len(sp):
        sp = sp.assign(
            comparison=sp["cache"].astype(str)
            + " vs none ("
            + sp["kernel"].astype(str)
            + "+"
            + sp["graph"].astype(str)
            + ")"
        )
        parts.append(most_cached(sp, ["comparison", "batch_size", "total_history"]))
    sp = e2e_speedups(df)
    if len(sp):
        parts.append(sp.assign(comparison=sp["mode"].astype(str) + " vs baseline"))
    if not parts:
        return pd.DataFrame(columns=HEADLINE_COLUMNS)
    # e2e records of older sweeps have no new_history column at all: missing, not an error
    out = pd.concat([p.reindex(columns=HEADLINE_COLUMNS) for p in parts], ignore_index=True)
    return out.sort_values(
        ["workload", "comparison", "batch_size", "total_history"], kind="stable"
    ).reset_index(drop=True)


def format_headline(table: pd.DataFrame) -> str:
    """The headline speedups as console lines, with their 95 % intervals; block rows at the
    largest T of each comparison and batch (the whole table goes to speedups.csv)."""
    lines = []
    block = table["workload"] == "block"
    if block.any():
        largest = table[block].groupby(["comparison", "batch_size"])["total_history"].transform("max")
        table = table[~block | (table["total_history"] == largest.reindex(table.index))]
    for _, r in table.iterrows():
        where = f"B={r['batch_size']}"
        if r["workload"] == "block":
            n = r["new_history"]
            where += f" T={r['total_history']}" + ("" if is_missing(n) else f" n={int(n)}")
        ci = "" if is_missing(r["ci_low"]) else f" [95% CI {r['ci_low']:.2f}-{r['ci_high']:.2f}]"
        lines.append(
            f"  {r['workload']} {r['comparison']} {where}: {r['speedup']:.2f}x{ci}"
            + _repeat_note(r)
            + _validity_mark(r)
        )
    head = (
        "speedups (95% bootstrap interval within a run: e2e of pass totals, resampled by "
        "pass; block of per-call samples" + ("; block: the largest T):" if block.any() else "):")
    )
    return "\n".join([head] + lines) if lines else ""


def _repeat_note(r) -> str:
    """', 3 repeats 7.10-7.31x' where a point ran several repeats; 'REPEATS DISAGREE' where
    their intervals do not overlap."""
    n = r.get("repeats")
    if is_missing(n) or int(n) < 2:
        return "; 1 run, no repeats"
    note = f"; {int(n)} repeats {r['spread_low']:.2f}-{r['spread_high']:.2f}x"
    return note + (", REPEATS DISAGREE" if str(r.get("repeats_agree")).lower() == "false" else "")


def _validity_mark(r) -> str:
    sides = [
        s
        for s, k in (("point", "valid"), ("baseline", "baseline_valid"))
        if r.get(k) is False or str(r.get(k)).lower() == "false"
    ]
    return f" (INVALID: {' and '.join(sides)})" if sides else ""


def mode_aggregates(df: pd.DataFrame) -> pd.DataFrame:
    """Per (workload, cache, kernel, graph, mode): points, ok points, median of medians, mean
    floor fraction."""
    keys = [k for k in ("workload", "cache", "kernel", "graph", "mode") if k in df]
    okd = ok(df)
    if okd.empty:
        return pd.DataFrame()
    agg = {"median_ms": "median"}
    if "floor_fraction" in okd:
        agg["floor_fraction"] = "mean"
    out = okd.groupby(keys, dropna=False).agg(agg).reset_index()
    out["points"] = okd.groupby(keys, dropna=False).size().values
    return out
