"""The W&B summary run of serve sweeps, read back from real offline runs of the CLI's serve smoke
sweep: latency percentiles vs offered QPS, max QPS within the SLO, hit rates and bytes per
request, per configuration; serve points stay out of the latency-vs-T tables and charts.

CPU timing on a shared machine: OMP_NUM_THREADS=1 (see test_serve.py)."""

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
from helpers import ROOT, hstu_exp, read_run

from hstu_exp.report.labels import serve_labels
from hstu_exp.tracking.wandb_sink import summary_spec

# Two serve sweeps logged to offline W&B (module fixtures), then read back.
pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
# LoadGen runs as short as serve_smoke's 50 queries allow (what is read back is the records and
# charts, not the rates): the same in both sweeps, so no label names them.
SHORT = ["workload.min_duration_s=0.5", "workload.search_duration_s=0.5"]
WANDB = ["logger.name=wandb", "logger.mode=offline", "verify=false", *SHORT]


def serve_sweep(out, *args):
    """A serve_smoke sweep logged to offline W&B: (records, summary run, its dir)."""
    proc = hstu_exp("-m", "experiment=serve_smoke", *WANDB, *args, f"hydra.sweep.dir={out}", env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    return records, read_run(run_dir), run_dir


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    """Two offered rates x no cache vs paged_offload: 4 online points."""
    out = tmp_path_factory.mktemp("wbserve") / "online"
    return (*serve_sweep(out, "workload.qps=20,40", "cache=none,paged_offload"), out)


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """search=max_qps, no cache vs paged: 2 points, each a short search (80 qps, then 160 or 40,
    one bisection)."""
    out = tmp_path_factory.mktemp("wbserve") / "search"
    return serve_sweep(
        out,
        "workload.search=max_qps",
        "workload.qps=80",
        "workload.search_steps=1",
        "workload.slo_ms=25",
        "workload.duration_s=1.5",
        "cache=none,paged",
    )


def charts(run):
    """chart key -> (panel kind, its fields)."""
    return {
        k.split("/", 2)[-1]: (v["panel_config"]["panelDefId"], v["panel_config"]["fieldSettings"])
        for k, v in run["config"].items()
        if k.startswith("_wandb/visualize/")
    }


def chart_rows(run, run_dir, key):
    """The rows of the table behind a native chart, from the run's files."""
    path = run["summary"][f"{key}_table/path"]
    table = json.loads((Path(run_dir) / "files" / path).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def no_latency_vs_t(run):
    assert not [k for k in charts(run) if k.startswith("charts/latency_vs_T")]
    assert not [k for k in run["summary"] if "latency_B" in k or "latency_vs_T" in k]


def test_online_sweep_charts_percentiles_and_hit_rates_vs_qps(online):
    records, run, run_dir, out = online
    no_latency_vs_t(run)  # serve points have no T: before, they filled latency_B4
    got = charts(run)
    for p in ("p50", "p99", "p999"):
        assert got[f"charts/serve_{p}_vs_qps"] == (
            "wandb/line/v0",
            {"x": "qps", "y": f"{p}_ms", "stroke": "label"},
        )
    assert got["charts/serve_gpu_hit_rate_vs_qps"][1]["y"] == "gpu_hit_rate"
    assert got["charts/serve_host_hit_rate_vs_qps"][1]["y"] == "host_hit_rate"
    assert "charts/serve_max_qps" not in got
    assert not [k for k in run["summary"] if k.startswith("serve/max_qps")]

    # one row per point, one line per cache mode, the offered rates of results.csv
    with open(out / "results.csv") as f:
        offered = sorted((r["cache"], float(r["qps"])) for r in csv.DictReader(f))
    rows = chart_rows(run, run_dir, "charts/serve_p99_vs_qps")
    assert [(r["label"], r["qps"]) for r in rows] == offered
    assert offered == [(c, q) for c in ("none", "paged_offload") for q in (20.0, 40.0)]
    by = {(r["cache"], r["qps"]): r for r in records}
    for row in rows:
        rec = by[row["label"], row["qps"]]
        for k in ("p50_ms", "p99_ms", "p999_ms", "achieved_qps", "slo_met", "valid"):
            assert row[k] == pytest.approx(rec[k]), k

    rows = chart_rows(run, run_dir, "charts/serve_gpu_hit_rate_vs_qps")
    assert len(rows) == 4
    for row in rows:
        rec = by[row["label"], row["offered_qps"]]
        for k in ("requests", "gpu_hit_rate", "host_hit_rate", "miss_rate"):
            assert row[k] == pytest.approx(rec[k]), k
        for k in ("onloaded_bytes", "offloaded_bytes"):
            assert row[f"{k}_per_request"] == pytest.approx(rec[k] / rec["requests"])
    assert any(r["host_hit_rate"] > 0 for r in rows)  # paged_offload's host tier was hit


def test_max_qps_sweep_bar_chart_and_summary(search):
    records, run, run_dir = search
    no_latency_vs_t(run)
    got = charts(run)
    assert got["charts/serve_max_qps"] == ("wandb/bar/v0", {"label": "label", "value": "max_qps"})
    assert not [k for k in got if k.startswith("charts/serve_p")]  # no offered rates to draw
    # 0: no rate met the SLO (the record then has no max_qps: None values are not written)
    expected = {r["cache"]: r.get("max_qps") or 0.0 for r in records}
    assert sorted(expected) == ["none", "paged"]
    rows = chart_rows(run, run_dir, "charts/serve_max_qps")
    assert {r["label"]: r["max_qps"] for r in rows} == expected
    assert {r["label"]: r["slo_ms"] for r in rows} == {"none": 25.0, "paged": 25.0}
    assert {
        k.split("/", 2)[-1]: v for k, v in run["summary"].items() if k.startswith("serve/max_qps/")
    } == expected


def test_mixed_serve_records_in_summary_spec(online, search, tmp_path):
    """A sweep of online, offline-mode and search points, from the real records: each kind in
    its own table, labels that tell the configurations apart, 0 where no rate met the SLO."""
    records = online[0] + search[0]
    failed = dict(search[0][0], graph="cudagraph", max_qps=None, slo_met=False)
    offline = dict(online[0][0], mode="offline-fifo")
    spec = summary_spec(
        pd.DataFrame(records + [failed, offline]),
        logger={},
        sweep_dir=tmp_path,
        group="mixed",
        images={},
        labels=serve_labels,
        csv=None,
    )
    tables, summary = spec["tables"], spec["summary"]
    assert not [k for k in tables if k.startswith("latency_B")]

    def rows(name):
        t = tables[name]
        return [dict(zip(t["columns"], row)) for row in t["data"]]

    # online points only, labelled cache+graph+mode and the overrides the two sweeps differ in
    # (unset in the online sweep: "-")
    online_ = "+duration_s=-+search_steps=-+slo_ms=-"
    search_ = "+duration_s=1.5+search_steps=1+slo_ms=25"
    latency = rows("serve_latency")
    assert sorted((r["label"], r["qps"]) for r in latency) == [
        (f"{c}+none+online-fifo{online_}", q) for c in ("none", "paged_offload") for q in (20.0, 40.0)
    ]
    maxed = {r["label"]: r["max_qps"] for r in rows("serve_max_qps")}
    assert maxed == {
        **{f"{r['cache']}+none+max_qps-fifo{search_}": r.get("max_qps") or 0.0 for r in search[0]},
        f"none+cudagraph+max_qps-fifo{search_}": 0.0,
    }
    assert {
        k[len("serve/max_qps/") :]: v for k, v in summary.items() if k.startswith("serve/max_qps/")
    } == maxed
    assert len(rows("serve_cache")) == len(records) + 2  # every serve point
    assert {p["key"] for p in spec["bars"]} >= {"charts/serve_max_qps"}

    # a one-rate sweep (serve_smoke as it ships): the tables, and no line of one point
    spec = summary_spec(
        pd.DataFrame([r for r in online[0] if r["qps"] == 20.0]),
        logger={},
        sweep_dir=tmp_path,
        group="one",
        images={},
        labels=serve_labels,
        csv=None,
    )
    assert len(spec["tables"]["serve_latency"]["data"]) == 2 and "serve_cache" in spec["tables"]
    assert not [p for p in spec["lines"] if p["key"].startswith("charts/serve_")]


def test_points_apart_only_in_an_override_get_labels_of_their_own(tmp_path):
    """workload.user_skew=0.5,1.0 at one cache / graph / mode: the W&B summary keys and the figure's
    bars stay apart (before, both were 'paged' and one overwrote the other), and the figures and
    W&B agree, from the records and from results.csv (where overrides is the list's repr).
    Points of the published serve_slo sweep keep the labels they had."""
    from hstu_exp.report import figures
    from hstu_exp.report.aggregate import load_sweep, write_csv
    from hstu_exp.tracking.records import read_records

    published = list(read_records(ROOT / "outputs/published/serve_slo_h200/results.jsonl"))
    base = next(
        r for r in published if (r["cache"], r["graph"], r["mode"]) == ("paged", "none", "max_qps-fifo")
    )
    skewed = [
        dict(
            base,
            overrides=base["overrides"] + [f"workload.user_skew={s}"],
            max_qps=q,
            config_key=f"{base['config_key']}-{s}",
        )
        for s, q in (("0.5", 300.0), ("1.0", 200.0))
    ]
    expected = {"paged+user_skew=0.5": 300.0, "paged+user_skew=1.0": 200.0}

    write_csv(pd.DataFrame(skewed), tmp_path)
    from_csv = load_sweep(tmp_path / "results.csv")
    assert isinstance(from_csv["overrides"][0], str)
    for df in (pd.DataFrame(skewed), from_csv):
        spec = summary_spec(
            df, logger={}, sweep_dir=tmp_path, group="skew", images={}, labels=serve_labels, csv=None
        )
        assert {
            k[len("serve/max_qps/") :]: v
            for k, v in spec["summary"].items()
            if k.startswith("serve/max_qps/")
        } == expected
        fig = figures.serve_max_qps(df)
        legend = fig.axes[0].get_legend()
        assert [t.get_text() for t in legend.get_texts()] == sorted(expected)
        assert list(figures._serve_label(df)) == list(expected)

    # the published sweep (its last point was resumed: resume=True is no label), graph=none of
    # it, and the same points without overrides (older records)
    assert serve_labels(published)[:2] == ["none+none+max_qps-fifo", "none+none+max_qps-length_aware"]
    labels = {f"{r['cache']}+{r['graph']}+{r['mode']}" for r in published}
    assert set(serve_labels(published)) == labels and len(labels) == 12
    one_graph = [r for r in published if r["graph"] == "none"]
    old = [{k: v for k, v in r.items() if k != "overrides"} for r in one_graph]
    for rows in (one_graph, old, [*one_graph, old[0]]):
        labelled = list(figures._serve_label(pd.DataFrame(rows)))
        assert labelled == [f"{r['cache']}+{r['mode']}" for r in rows]
        spec = summary_spec(
            pd.DataFrame(rows),
            logger={},
            sweep_dir=tmp_path,
            group="slo",
            images={},
            labels=serve_labels,
            csv=None,
        )
        assert sorted(k for k in spec["summary"] if k.startswith("serve/max_qps/")) == sorted(
            f"serve/max_qps/{label}" for label in set(labelled)
        )
    assert "serve/max_qps/paged+max_qps-fifo" in spec["summary"]
