"""Builds the hstu-exp W&B workspace as code (wandb-workspaces: `pip install -e '.[dashboard]'`).

    .venv/bin/python scripts/wandb_dashboard.py --entity TEAM [--project hstu-exp]
        [--sweep GROUP] [--workload block] --save     # saves the workspace (needs a login)
    .venv/bin/python scripts/wandb_dashboard.py --json  # builds it offline, prints its layout

Panels read what the per-point runs hold (docs/wandb.md): config `point.*` (what ran), `env.*`
(GPU, versions, git), summary `latency/*`, `validity/*`, `roofline/*`, history `latency_ms`
per `iteration`, and the summary run's figures. Runs are grouped by cache mode; summary runs are
kept in the runset for the figures panel, and `--sweep` / `--workload` narrow the runset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Every close-out figure (report/figures.py draw_all and draw_serve).
FIGURES = [
    "figures/latency_vs_history",
    "figures/latency_vs_batch",
    "figures/speedup_heatmap",
    "figures/speedup_bars",
    "figures/latency_bars",
    "figures/roofline_fraction",
    "figures/e2e_latency",
    "figures/e2e_speedup",
    "figures/attention_tflops",
    "figures/serve_latency_vs_qps",
    "figures/serve_max_qps",
    "figures/serve_latency_cdf",
    "figures/serve_cache",
]
WORKLOADS = ["block", "attention", "e2e", "serve"]
PINNED = [
    "config:point.batch_size",
    "config:point.total_history",
    "config:point.new_history",
    "config:point.cache",
    "config:point.kernel",
    "config:point.graph",
    "summary:latency/median_ms",
    "summary:latency/p90_ms",
    "summary:latency/cv",
    "summary:validity/valid",
]


def build(entity: str, project: str, sweep=None, workload=None):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    # Summary runs stay in the runset (the media panel shows their figures); they have no
    # point.* config or latency/* summary, so the point panels pass over them.
    filters = []
    if sweep:
        filters.append(ws.Metric("Group") == sweep)
    if workload:
        filters.append(ws.Config("point.workload") == workload)

    def column(expr, log=False):
        return wr.ParallelCoordinatesPlotColumn(metric=expr, log=log)

    latency = ws.Section(
        name="Latency vs history",
        is_open=True,
        panels=[
            wr.ScatterPlot(
                title="median latency (ms) vs total history T",
                log_x=True,
                log_y=True,
                x=wr.Config("point.total_history"),
                y=wr.SummaryMetric("latency/median_ms"),
            ),
            wr.ScatterPlot(
                title="p90 latency (ms) vs total history T",
                log_x=True,
                log_y=True,
                x=wr.Config("point.total_history"),
                y=wr.SummaryMetric("latency/p90_ms"),
            ),
            wr.ScatterPlot(
                title="median latency (ms) vs cached share (new history n)",
                log_x=True,
                log_y=True,
                x=wr.Config("point.new_history"),
                y=wr.SummaryMetric("latency/median_ms"),
            ),
            wr.ParallelCoordinatesPlot(
                title="B, T, n -> median latency",
                columns=[
                    column(wr.Config("point.batch_size")),
                    column(wr.Config("point.total_history")),
                    column(wr.Config("point.new_history")),
                    column(wr.SummaryMetric("latency/median_ms"), log=True),
                ],
            ),
        ],
    )
    # what a recsys engineer opens first: latency by batch size per cache mode and graph (the
    # runs are grouped by both), the speedups with their intervals, serving p99 vs load
    batch = ws.Section(
        name="Latency vs batch size",
        is_open=True,
        panels=[
            wr.ScatterPlot(
                title="median latency (ms) vs batch size, by cache mode and graph",
                log_x=True,
                log_y=True,
                x=wr.Config("point.batch_size"),
                y=wr.SummaryMetric("latency/median_ms"),
            ),
            wr.CustomChart(
                query={"summaryTable": {"tableKey": "charts/speedup_vs_batch_table"}},
                chart_name="wandb/line/v0",
                chart_fields={"x": "batch_size", "y": "speedup", "stroke": "series"},
                chart_strings={"title": "speedup vs batch size with its 95 % interval (summary runs)"},
            ),
        ],
    )
    serve = ws.Section(
        name="Serving",
        is_open=False,
        panels=[
            wr.ScatterPlot(
                title="p99 latency (ms) vs offered QPS (the figures say real or simulated)",
                log_y=True,
                x=wr.Config("point.qps"),
                y=wr.SummaryMetric("latency/p99_ms"),
            ),
            wr.MediaBrowser(
                title="serve figures", media_keys=[f for f in FIGURES if "serve_" in f], num_columns=2
            ),
        ],
    )
    samples = ws.Section(
        name="Per-iteration samples",
        is_open=True,
        panels=[
            wr.LinePlot(title="latency (ms) per timed iteration", x="iteration", y=["latency_ms"]),
        ],
    )
    validity = ws.Section(
        name="Validity and provenance",
        is_open=False,
        panels=[
            wr.ScatterPlot(
                title="coefficient of variation vs median latency",
                log_y=True,
                x=wr.SummaryMetric("latency/median_ms"),
                y=wr.SummaryMetric("latency/cv"),
            ),
            wr.BarPlot(
                title="roofline floor fraction", metrics=[wr.SummaryMetric("roofline/floor_fraction")]
            ),
            wr.RunComparer(diff_only="split"),
        ],
    )
    summary = ws.Section(
        name="Sweep summary (summary runs)",
        is_open=False,
        panels=[
            wr.MediaBrowser(title="close-out figures", media_keys=FIGURES, num_columns=2),
        ],
    )
    return ws.Workspace(
        entity=entity,
        project=project,
        name=f"hstu-exp: {workload or 'all workloads'}" + (f" · {sweep}" if sweep else ""),
        sections=[batch, latency, serve, samples, validity, summary],
        runset_settings=ws.RunsetSettings(
            filters=filters,
            groupby=[ws.Config("point.cache"), ws.Config("point.graph")],
            pinned_columns=PINNED,
        ),
    )


def describe(workspace) -> dict:
    """The layout, for a reader or a test: sections, panel types and titles, grouping."""
    return {
        "entity": workspace.entity,
        "project": workspace.project,
        "name": workspace.name,
        "groupby": [str(g) for g in workspace.runset_settings.groupby],
        "filters": str(workspace.runset_settings.filters or ""),
        "sections": [
            {
                "name": s.name,
                "panels": [
                    {"type": type(p).__name__, "title": getattr(p, "title", None)} for p in s.panels
                ],
            }
            for s in workspace.sections
        ],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--entity",
        default=os.environ.get("WANDB_ENTITY"),
        help="W&B team or user (default: WANDB_ENTITY)",
    )
    p.add_argument("--project", default="hstu-exp")
    p.add_argument("--sweep", default=None, help="only this sweep (its W&B group)")
    p.add_argument("--workload", choices=WORKLOADS, default=None)
    p.add_argument("--save", action="store_true", help="save to W&B (needs a login)")
    p.add_argument("--json", action="store_true", help="print the layout as JSON")
    args = p.parse_args(argv)
    if args.save and not args.entity:
        print("wandb_dashboard.py: error: --save needs --entity (or WANDB_ENTITY)", file=sys.stderr)
        sys.exit(2)
    try:
        workspace = build(args.entity or "ENTITY", args.project, args.sweep, args.workload)
    except ImportError as exc:
        print(
            f"wandb_dashboard.py: error: {exc.name or exc} is not installed: "
            "pip install -e '.[dashboard]'",
            file=sys.stderr,
        )
        sys.exit(2)
    layout = describe(workspace)
    if args.json:
        print(json.dumps(layout, indent=1))
    else:
        for s in layout["sections"]:
            print(
                f"{s['name']}: "
                + ", ".join(
                    f"{p['type']} ({p['title']})" if p["title"] else p["type"] for p in s["panels"]
                )
            )
    if args.save:
        try:
            saved = workspace.save()
        except Exception as exc:  # noqa: BLE001 - no login, no network: one line
            print(
                f"wandb_dashboard.py: error: could not save the workspace "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]})",
                file=sys.stderr,
            )
            sys.exit(1)
        print(f"saved: {getattr(saved, 'url', '')}")


if __name__ == "__main__":
    main()
