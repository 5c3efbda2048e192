"""The table printed at the end of every run and sweep."""

from __future__ import annotations

from hstu_exp.tracking.identity import PLUMBING, POINT_KEY_OVERRIDES, text
from hstu_exp.tracking.records import point_overrides

COLUMNS = [
    ("status", "status", "{}"),
    ("workload", "workload", "{}"),
    ("model", "model", "{}"),
    ("cache", "cache", "{}"),
    ("kernel", "kernel", "{}"),
    ("graph", "graph", "{}"),
    ("mode", "mode", "{}"),
    ("batch_size", "B", "{}"),
    ("total_history", "T", "{}"),
    ("new_history", "n", "{}"),
    ("num_candidates", "cand", "{}"),
    ("median_ms", "median ms", "{:.3f}"),
    ("p90_ms", "p90 ms", "{:.3f}"),
    # serve: what tells the points of a QPS sweep apart, and whether the clock was real
    ("qps", "qps", "{:g}"),
    ("target_qps", "target qps", "{:g}"),
    ("p99_ms", "p99 ms", "{:.3f}"),
    ("achieved_qps", "achieved qps", "{:.1f}"),
    ("completed_qps", "completed qps", "{:.1f}"),
    ("slo_met", "SLO", "{}"),
    ("max_qps", "max qps", "{:.1f}"),
    ("clock", "clock", "{}"),
    ("cv", "cv", "{:.1%}"),
    ("valid", "valid", "{}"),
    ("floor_fraction", "floor %", "{:.1%}"),
    ("max_rel_error", "rel err", "{:.1e}"),
]


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    if key == "valid" and record.get("status") == "ok" and value is not None and value == value:
        # an invalid point is marked where the eye lands, with its reason in the summary
        return "yes" if value in (True, "True", "true") else "NO"
    if value is None or value != value:  # None or NaN
        return "-"
    if key == "slo_met":
        return "met" if value in (True, "True", "true") else "missed"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def swept_overrides(given: list) -> list:
    """Of the records' overrides (`given`, one {key: value} a record), those whose value differs
    between the records and that no column shows (cache.dtype=bf16,fp8 or kernel.hopper=true,
    false): without them such points would print as one row twice. In the order given."""
    keys = dict.fromkeys(k for g in given for k in g)
    return [
        k
        for k in keys
        if k not in POINT_KEY_OVERRIDES
        and k.split(".", 1)[0] not in PLUMBING
        and len({text(g.get(k)) for g in given}) > 1
    ]


def format_table(records) -> str:
    records = list(records)
    cols = [(k, h, f) for k, h, f in COLUMNS if any(r.get(k) is not None for r in records)]
    rows = [[h for _, h, _ in cols]] + [[_cell(r, k, f) for k, _, f in cols] for r in records]
    given = [point_overrides(r.get("overrides")) or {} for r in records]
    swept = swept_overrides(given)
    if swept:  # after the point keys, before the numbers
        at = next((i for i, (k, _, _) in enumerate(cols) if k == "median_ms"), len(cols))
        for j, key in enumerate(swept):
            head = key.removeprefix("workload.")
            cells = [text(g.get(key)) or "-" for g in given]
            for row, cell in zip(rows, [head, *cells]):
                row.insert(at + j, cell)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.append(summary_line(records))
    return "\n".join(lines)


def summary_line(records) -> str:
    """'8 points: 6 ok, 2 skipped, 0 failed; 5 valid, 1 invalid', and the invalid points'
    reasons, so an invalid point is never hidden among valid ones."""
    records = list(records)
    counts = {s: sum(r.get("status") == s for r in records) for s in ("ok", "skipped", "failed")}
    ok = [r for r in records if r.get("status") == "ok"]
    checked = [r for r in ok if r.get("valid") is not None and r.get("valid") == r.get("valid")]
    invalid = [r for r in checked if r["valid"] not in (True, "True", "true")]
    line = f"{len(records)} point{'' if len(records) == 1 else 's'}: " + ", ".join(
        f"{v} {k}" for k, v in counts.items()
    )
    if checked:
        line += f"; {len(checked) - len(invalid)} valid, {len(invalid)} invalid" + (
            f", {len(ok) - len(checked)} unchecked" if len(checked) < len(ok) else ""
        )
    for r in invalid[:10]:
        line += f"\n  invalid: {r.get('name', '?')}: {r.get('invalid_reason') or 'no reason given'}"
    if len(invalid) > 10:
        line += f"\n  invalid: {len(invalid) - 10} more (the records' invalid_reason)"
    return line


def print_summary(records) -> None:
    print("\n" + format_table(records), flush=True)
