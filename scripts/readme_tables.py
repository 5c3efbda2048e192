#!/usr/bin/env python3
"""The README's number tables, generated from the records in outputs/published/.

    scripts/readme_tables.py            # rewrite every table between its markers in README.md
    scripts/readme_tables.py --check    # exit 1 when a table differs from what the records say

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in the README; the
text around the markers is prose and stays as written. tests/test_readme_tables.py runs
`--check`, so CI fails when the README and the records disagree. Exit status 0, 1 (--check:
a table differs), 2 (bad input: one line).
"""

import argparse
import difflib
import re
import sys
from pathlib import Path

import _venv  # noqa: F401,E402  (source tree on the path; re-run under .venv if needed)
import pandas as pd  # noqa: E402
from goals import ATTENTION, BLOCK, E2E_MS  # noqa: E402

PROG = "readme_tables.py"
ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "outputs" / "published"
# Which published sweeps each table reads.
GOAL_SWEEPS = [
    "goal_cases_triton_graph_h200_hopper",
    "seed_attention_h200_hopper",
    "seed_e2e_h200_hopper",
]
E2E_SWEEPS = ["seed_e2e_h200", "seed_e2e_h200_second"]
SERVE_SWEEP = "serve_slo_h200"
E2E_LABELS = {
    "baseline_graph": "baseline + CUDA graph",
    "cache": "KV cache (eager)",
    "cache_graph": "KV cache + CUDA graph",
}


def _load(name: str) -> pd.DataFrame:
    from hstu_exp.report.aggregate import load_sweep, ok

    return ok(load_sweep(PUBLISHED / name))


def _validity(r) -> str:
    v = str(r.get("valid")).lower()
    if v == "true":
        return "yes"
    if v == "false":
        return f"no ({r.get('invalid_reason')})"
    return "not judged"


def goals_table() -> list:
    """Each goal case of docs/design.md §6 at the README's configuration (Triton, CUDA graph):
    its median (or TFLOP/s), validity with the reason, and the goal."""
    block = _load(GOAL_SWEEPS[0])
    att = _load(GOAL_SWEEPS[1])
    e2e = _load(GOAL_SWEEPS[2])
    rows = ["| case | median | valid | goal |", "|---|---|---|---|"]
    block = block[
        (block["kernel"] == "triton")
        & (block["graph"] == "cudagraph")
        & (block["total_history"] == 4096)
    ]
    for name, b, n, goal in BLOCK:
        case = block[
            (block["batch_size"] == b)
            & (block["new_history"] == n)
            & (block["cache"] == ("none" if n == 4096 else "paged"))
        ]
        for _, r in case.iterrows():
            rows.append(
                f"| block, {name} ({4096 - n} of 4096 cached) | {r['median_ms']:.3f} ms "
                f"| {_validity(r)} | <= {goal} ms |"
            )
    for (b, cache, n), goal in ATTENTION.items():
        hit = att[
            (att["batch_size"] == b)
            & (att["cache"] == cache)
            & (att["new_history"] == n)
            & (att["total_history"] == 4096)
            & (att["kernel"] == "triton")
        ]
        for _, r in hit.iterrows():
            rows.append(
                f"| attention, batch {b}, {'full' if cache == 'none' else 'paged'} "
                f"| {r['tflops']:.0f} TFLOP/s | {_validity(r)} | >= {goal} TFLOP/s |"
            )
    for b, goal in E2E_MS.items():
        hit = e2e[(e2e["mode"] == "cache_graph") & (e2e["batch_size"] == b)]
        for _, r in hit.iterrows():
            rows.append(
                f"| e2e cache + graph, batch {b} | {r['median_ms']:.2f} ms a batch "
                f"| {_validity(r)} | <= {goal} ms |"
            )
    return rows


def _speedup_cell(r) -> str:
    cell = f"{r['speedup']:.2f}x [{r['ci_low']:.2f}-{r['ci_high']:.2f}]"
    if not pd.isna(r.get("repeats")) and int(r["repeats"]) > 1:
        cell += f", {int(r['repeats'])} repeats {r['spread_low']:.2f}-{r['spread_high']:.2f}x"
        if r.get("repeats_agree") is False:
            cell += " DISAGREE"
    invalid = [
        s
        for s, k in (("", "valid"), ("baseline ", "baseline_valid"))
        if str(r.get(k)).lower() == "false"
    ]
    return cell + (" (invalid)" if invalid else "")


def e2e_table() -> list:
    """Speedup over the eager baseline (ratio of pass totals, 95 % interval of the pass-by-pass
    bootstrap) of every published seed_e2e run side by side, one row per mode and batch."""
    from hstu_exp.report.aggregate import e2e_speedups

    runs = {name: e2e_speedups(_load(name)) for name in E2E_SWEEPS}
    batches = sorted({int(b) for sp in runs.values() for b in sp["batch_size"]})
    rows = [
        "| mode | batch | " + " | ".join(f"`{n}/`" for n in runs) + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    for mode, label in E2E_LABELS.items():
        for b in batches:
            cells = []
            for sp in runs.values():
                hit = sp[(sp["mode"] == mode) & (sp["batch_size"] == b)]
                cells.append(_speedup_cell(hit.iloc[0]) if len(hit) else "-")
            rows.append(f"| {label} | {b} | " + " | ".join(cells) + " |")
    return rows


def serve_table() -> list:
    """max QPS within the SLO per cache x graph, FIFO / length-aware batching, and the clock
    that produced it: the record's `clock`; records older than that field came from the only
    serve path there was, queueing simulated on measured service times (clock=simulated)."""
    df = _load(SERVE_SWEEP)
    df = df[df["max_qps"].notna()] if "max_qps" in df else df.head(0)
    clock = "/".join(
        sorted(
            {
                str(c) if isinstance(c, str) else "simulated"
                for c in df.get("clock", pd.Series([None] * len(df)))
            }
        )
    )
    graphs = sorted(df["graph"].unique(), key=lambda g: g != "none")
    rows = [
        f"| cache (clock: {clock}) | "
        + " | ".join("eager" if g == "none" else "CUDA graphs" for g in graphs)
        + " |",
        "|---|" + "---|" * len(graphs),
    ]
    for cache in ("none", "paged", "paged_offload"):
        cells = []
        for g in graphs:
            part = df[(df["cache"] == cache) & (df["graph"] == g)]
            qps = [
                part[part["mode"].astype(str).str.endswith(p)]["max_qps"]
                for p in ("fifo", "length_aware")
            ]
            cells.append(" / ".join(f"{q.iloc[0]:.0f}" if len(q) else "-" for q in qps) + " qps")
        if len(part) or any(c != "- / - qps" for c in cells):
            rows.append(f"| {cache} | " + " | ".join(cells) + " |")
    return rows


TABLES = {"goals": goals_table, "e2e": e2e_table, "serve_max_qps": serve_table}


def render(text: str) -> str:
    """The README text with every marked table regenerated."""
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"no <!-- table:{name} --> ... <!-- /table:{name} --> markers")
        body = "\n".join(make()) + "\n"
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    try:
        text = args.readme.read_text()
        new = render(text)
    except (OSError, ValueError) as exc:
        print(f"{PROG}: error: {args.readme}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            diff = difflib.unified_diff(
                text.splitlines(), new.splitlines(), "README.md", "from the records", lineterm="", n=0
            )
            print("\n".join(diff), file=sys.stderr)
            print(
                f"{PROG}: the README's tables differ from outputs/published/: run "
                f"scripts/readme_tables.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if new != text:
        args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
