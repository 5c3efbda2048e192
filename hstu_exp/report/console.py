"""The table printed at the end of every run and sweep."""
from __future__ import annotations

COLUMNS = [("status", "status", "{}"), ("workload", "workload", "{}"), ("model", "model", "{}"),
           ("cache", "cache", "{}"), ("kernel", "kernel", "{}"), ("graph", "graph", "{}"),
           ("mode", "mode", "{}"), ("batch_size", "B", "{}"), ("total_history", "T", "{}"),
           ("new_history", "n", "{}"), ("num_candidates", "cand", "{}"),
           ("median_ms", "median ms", "{:.3f}"), ("p90_ms", "p90 ms", "{:.3f}"),
           ("floor_fraction", "floor %", "{:.1%}"), ("max_rel_error", "rel err", "{:.1e}")]


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    if value is None or value != value:  # None or NaN
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_table(records) -> str:
    records = list(records)
    cols = [(k, h, f) for k, h, f in COLUMNS if any(r.get(k) is not None for r in records)]
    rows = [[h for _, h, _ in cols]] + [[_cell(r, k, f) for k, _, f in cols] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    counts = {s: sum(r.get("status") == s for r in records) for s in ("ok", "skipped", "failed")}
    lines.append(f"{len(records)} points: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)


def print_summary(records) -> None:
    print("\n" + format_table(records), flush=True)
