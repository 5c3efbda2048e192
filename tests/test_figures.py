"""The close-out figures say what they show: checked on the matplotlib objects (panels, one
shared colour scale centred at 1, 1.0 lines, error bars, hatched invalid points, titles, legend
titles, provenance footer) and on the PNG pixels, from records made up with known speedups."""

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from test_sweep import assert_real_png

from hstu_exp.report import figures
from hstu_exp.report.aggregate import block_speedups, e2e_speedups, headline

ENV = {
    "device_name": "NVIDIA H200",
    "git_sha": "0123abcd4567",
    "model": "seed",
    "dtype": "bfloat16",
    "num_candidates": 256,
    "device": "cuda",
    "status": "ok",
}


def _rec(rng, median, **keys):
    samples = rng.normal(median, 0.02 * median, 200)
    return {
        **ENV,
        **keys,
        "median_ms": float(np.median(samples)),
        "p10_ms": float(np.percentile(samples, 10)),
        "p90_ms": float(np.percentile(samples, 90)),
        "samples_ms": samples.tolist(),
        "valid": True,
        "floor_fraction": 0.3,
    }


@pytest.fixture(scope="module")
def block():
    """Two modes; the cache makes triton+cudagraph 4x faster at T=1024 and reference 0.5x at
    T=256 (slower); one invalid point."""
    rng = np.random.default_rng(0)
    recs = []
    for kernel, graph, gain in (("triton", "cudagraph", 4.0), ("reference", "none", 0.5)):
        for b in (1, 2):
            for t in (256, 1024):
                full = 0.1 * t / 256 * b
                base = dict(
                    workload="block",
                    kernel=kernel,
                    graph=graph,
                    batch_size=b,
                    total_history=t,
                    page_size=None,
                )
                recs.append(_rec(rng, full, cache="none", new_history=t, **base))
                for n in (64, t // 2):
                    g = gain if t == 1024 or gain < 1 else 1.5
                    speed = g if n == 64 else (1 + g) / 2
                    recs.append(
                        _rec(
                            rng, full / speed, cache="paged", new_history=n, **{**base, "page_size": 32}
                        )
                    )
    df = pd.DataFrame(recs)
    df.loc[3, "valid"] = False
    df.loc[3, "invalid_reason"] = "cv 9% above the ceiling 3%"
    return df


@pytest.fixture(scope="module")
def e2e():
    rng = np.random.default_rng(1)
    speed = {"baseline": 1.0, "baseline_graph": 1.3, "cache": 2.0, "cache_graph": 4.0}
    df = pd.DataFrame(
        [
            _rec(
                rng,
                5.0 / speed[m] * b,
                workload="e2e",
                mode=m,
                batch_size=b,
                kernel="triton",
                graph="none",
                cache="none",
                total_history=4096,
            )
            for m in speed
            for b in (1, 4)
        ]
    )
    # one batch a pass: every sample is a pass total (the e2e speedup's unit)
    return df.assign(total_ms=df["median_ms"], num_batches=1)


def _labelled(df):
    return df.assign(label=figures.mode_label(df))


def test_heatmap_one_panel_per_mode_one_scale_centred_at_one(block):
    sp = _labelled(block_speedups(block))
    fig = figures.speedup_heatmap(sp)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 * 2  # 2 modes x 2 batch sizes
    titles = {ax.get_title() for ax in panels}
    assert {"triton+cudagraph, batch size 1", "reference+none, batch size 2"} <= titles
    norms = {(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in panels}
    ((vmin, vmax),) = norms  # ONE shared scale
    assert vmin * vmax == pytest.approx(1.0)  # log scale centred at 1
    assert vmax >= 4.0 * 0.95 and vmin <= 0.5 * 1.05
    assert len(fig.axes) == len(panels) + 1  # and one colourbar
    footer = " ".join(t.get_text() for t in fig.texts)
    assert "NVIDIA H200" in footer and "0123abcd4567" in footer and "seed" in footer


def test_speedup_bars_have_a_one_line_error_bars_labels_and_hatched_invalid(block):
    sp = _labelled(block_speedups(block))
    fig = figures.speedup_bars(sp)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2 and all(ax.get_title().endswith("vs cache=none") for ax in axes)
    for ax in axes:
        assert any(np.allclose(line.get_ydata(), 1.0) for line in ax.lines)
        assert ax.get_legend().get_title().get_text() == "batch size"
        labels = [t.get_text() for t in ax.texts]
        assert labels and all(t.endswith("x") for t in labels)
        # whiskers: the 95 % interval around each bar
        assert any(c.has_yerr for c in ax.containers if hasattr(c, "has_yerr"))
    hatched = [p for ax in axes for p in ax.patches if p.get_hatch()]
    assert len(hatched) >= 1  # the invalid point's ratio
    assert fig._suptitle.get_text().startswith("Speedup of the KV cache")


def test_latency_bars_per_batch_size_one_bar_per_cached_length(block):
    fig = figures.latency_bars(_labelled(block))
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert len(axes) == 2 * 2  # kernel/graph rows x batch columns
    ax = axes[0]
    # T=256: cached 0, 128, 192; T=1024: 0, 512, 960
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "128", "192", "0", "512", "960"]
    assert sum(bool(p.get_hatch()) for a in axes for p in a.patches) == 1


def test_e2e_figures_show_all_four_modes_with_intervals(e2e):
    fig = figures.e2e_speedup(e2e_speedups(e2e))
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend.get_title().get_text() == "e2e mode"
    assert [t.get_text() for t in legend.get_texts()] == [
        "Baseline + CUDA graph",
        "KV cache",
        "KV cache + CUDA graph",
    ]
    assert any(np.allclose(line.get_ydata(), 1.0) for line in ax.lines)
    fig = figures.e2e_latency(e2e)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "Baseline",
        "Baseline + CUDA graph",
        "KV cache",
        "KV cache + CUDA graph",
    ]


def test_headline_intervals_hold_the_known_speedups(block, e2e):
    table = headline(pd.concat([block, e2e], ignore_index=True))
    assert list(table.columns) == [
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
    row = table[
        (table.comparison == "paged vs none (triton+cudagraph)")
        & (table.batch_size == 2)
        & (table.total_history == 1024)
    ].iloc[0]
    assert row.new_history == 64  # the largest cached prefix
    assert row.ci_low < 4.0 < row.ci_high and row.ci_high - row.ci_low < 0.4
    e = table[table.comparison == "cache_graph vs baseline"]
    assert len(e) == 2 and ((e.ci_low < 4.0) & (4.0 < e.ci_high)).all()


def test_pngs_have_the_content(block, e2e, tmp_path):
    out = figures.draw_all(pd.concat([block, e2e], ignore_index=True), tmp_path)
    assert set(out) == {
        "latency_vs_history",
        "latency_bars",
        "speedup_bars",
        "speedup_heatmap",
        "roofline_fraction",
        "e2e_latency",
        "e2e_speedup",
    }
    for path in out.values():
        assert_real_png(path)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    img = mpimg.imread(out["speedup_heatmap"])[..., :3]
    r, b = img[..., 0], img[..., 2]
    # faster cells are blue, slower cells red, on one diverging scale
    assert ((b - r > 0.3) & (b > 0.4)).sum() > 500
    assert ((r - b > 0.3) & (r > 0.4)).sum() > 500


def test_grouped_bars_give_every_series_its_own_colour():
    """12 configurations (serve_slo: 3 caches x 2 graphs x 2 policies) are 12 colours, not 10
    that repeat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from hstu_exp.report.figures import _bars

    series = [f"config{i}" for i in range(12)]
    table = pd.DataFrame({"group": "all", "label": series, "v": range(1, 13), "valid_": True})
    fig, ax = plt.subplots()
    _bars(ax, ["all"], series, table, x="group", hue="label", y="v")
    colours = {tuple(bar.get_facecolor()) for bar in ax.patches if bar.get_height() > 0}
    plt.close(fig)
    assert len(colours) == 12


def test_e2e_host_device_bars_hold_the_per_batch_times():
    """One panel per mode; per batch size the host and device bars are the records' pass
    medians divided by the stream's batches, and the latency marker is median_ms."""
    recs = [
        {
            **ENV,
            "workload": "e2e",
            "mode": m,
            "batch_size": b,
            "num_batches": 16,
            "host_ms": 16 * host,
            "device_ms": 16 * dev,
            "median_ms": max(host, dev) + 0.05,
            "valid": True,
        }
        for m, host, dev in (("cache", 2.0, 1.0), ("cache_graph", 0.3, 0.5))
        for b in (1, 8)
    ]
    fig = figures.e2e_host_device(pd.DataFrame(recs))
    assert [ax.get_title() for ax in fig.axes] == ["KV cache", "KV cache + CUDA graph"]
    for ax, (host, dev) in zip(fig.axes, ((2.0, 1.0), (0.3, 0.5))):
        heights = [round(p.get_height(), 6) for p in ax.patches]
        assert heights == [host, host, dev, dev]
        assert np.allclose(ax.lines[0].get_ydata(), max(host, dev) + 0.05)
    # one legend, beside the last panel, not over a panel's bars
    assert fig.axes[0].get_legend() is None
    assert fig.axes[-1].get_legend().get_bbox_to_anchor().x0 > fig.axes[-1].get_window_extent().x1


def _serve(clock, label_cache, qps, p99, verdict, **extra):
    samples = list(np.linspace(5, p99 * 1.1, 50))
    return {
        "workload": "serve",
        "status": "ok",
        "cache": label_cache,
        "kernel": "triton",
        "graph": "none",
        "mode": "online-fifo",
        "batch_size": 8,
        "qps": qps,
        "target_qps": qps,
        "p50_ms": p99 / 3,
        "p99_ms": p99,
        "p999_ms": p99 * 1.2,
        "slo_ms": 80.0,
        "slo_percentile": 99.0,
        "clock": clock,
        "verdict": verdict,
        "valid": True,
        "samples_ms": samples,
        **extra,
    }


def test_serve_figures_say_the_clock_and_the_verdict_and_draw_the_slo_right():
    """Real solid, simulated dashed; INVALID points hollow; the CDF's SLO is a vertical line at
    80 ms spanning the fraction axis; max-QPS bars carry the bracket up to the lowest failing
    rate; every title says which clock."""
    recs = [
        _serve(c, "paged", q, p, v)
        for c in ("real", "simulated")
        for q, p, v in ((100, 20, "VALID"), (400, 60, "VALID"), (800, 300, "INVALID"))
    ]
    df = pd.DataFrame(recs)
    fig = figures.serve_latency_vs_qps(df)
    ax = fig.axes[1]  # p99
    styles = {
        line.get_label(): line.get_linestyle()
        for line in ax.lines
        if not line.get_label().startswith("_")
    }
    assert styles["paged (real)"] == "-" and styles["paged (simulated)"] == "--"
    hollow = [line for line in ax.lines if line.get_markerfacecolor() == "white"]
    assert sorted(float(x) for line in hollow for x in line.get_xdata()) == [800, 800]
    assert "clock: real and simulated" in fig._suptitle.get_text()

    fig = figures.serve_latency_cdf(df[df["clock"] == "simulated"])
    ax = fig.axes[0]
    slo = [line for line in ax.lines if line.get_label() == "SLO 80 ms"]
    assert len(slo) == 1 and set(slo[0].get_xdata()) == {80.0}
    assert list(slo[0].get_ydata()) == [0, 1]  # axvline: the full height, in axes units
    assert ax.get_ylim()[1] <= 1.05 and "clock: simulated" in fig._suptitle.get_text()

    search = pd.DataFrame(
        [
            _serve("real", c, None, 50, "VALID", mode="max_qps-fifo", max_qps=m, min_failing_qps=f)
            for c, m, f in (("none", 450.0, 500.0), ("paged", 700.0, None))
        ]
    )
    fig = figures.serve_max_qps(search)
    ax = fig.axes[0]
    brackets = [line for line in ax.lines if len(line.get_ydata()) == 2]
    assert len(brackets) == 1 and list(brackets[0].get_ydata()) == [450.0, 500.0]


def test_latency_bars_zero_cached_bar_is_the_cache_none_baseline(block):
    """A paged point with n = T recorded after the cache=none point must not replace it."""
    d = _labelled(block)
    full = d[
        (d["cache"] == "none")
        & (d["batch_size"] == 1)
        & (d["total_history"] == 256)
        & (d["kernel"] == "triton")
    ].iloc[0]
    late = full.copy()
    late["cache"], late["median_ms"], late["time"] = "paged", full["median_ms"] * 3, "9"
    d = pd.concat([d.assign(time="0"), late.to_frame().T], ignore_index=True)
    fig = figures.latency_bars(d)
    ax = next(a for a in fig.axes if a.get_title() == "triton+cudagraph, batch size 1")
    heights = [p.get_height() for p in ax.patches]
    assert heights[0] == pytest.approx(full["median_ms"])
    assert any("cached share" in a.get_ylabel() for a in fig.axes)  # the colour legend


def test_e2e_figures_give_each_mode_one_colour(e2e):
    """The speedup figure has no baseline bar; a mode keeps its latency figure's colour."""

    def colours(fig):
        handles, labels = fig.axes[0].get_legend_handles_labels()
        return {label: tuple(h.patches[0].get_facecolor()) for h, label in zip(handles, labels)}

    latency = colours(figures.e2e_latency(e2e))
    speedup = colours(figures.e2e_speedup(e2e_speedups(e2e)))
    assert set(speedup) == {"Baseline + CUDA graph", "KV cache", "KV cache + CUDA graph"}
    assert all(speedup[m] == latency[m] for m in speedup)


# -- sweeps of one T or one point (issue 21): something meaningful, or no figure and a logged why


def test_one_total_history_draws_latency_against_batch_size_instead(block, tmp_path, caplog):
    one = block[block["total_history"] == 1024]
    with caplog.at_level("WARNING", logger="hstu_exp.report.figures"):
        figs = figures.draw_all(one, tmp_path)
    assert "latency_vs_history" not in figs and "latency_vs_batch" in figs
    assert "figure latency_vs_history not drawn: one total history (T=1024)" in caplog.text
    fig = figures.latency_vs_batch(_labelled(one))
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    assert len(lines) == 4  # one line per mode, over the batch sizes
    for label, line in lines.items():
        mine = _labelled(one)
        mine = mine[mine["label"] == label].sort_values("new_history").drop_duplicates("batch_size")
        mine = mine.sort_values("batch_size")
        assert list(line.get_xdata()) == [1, 2]
        assert np.allclose(line.get_ydata(), mine["median_ms"])  # the fewest new tokens
    assert "T=1024" in fig._suptitle.get_text() and ax.get_xlabel() == "batch size"
    # the roofline: against batch size, one line per mode, markers, the legend titled by mode
    fig = figures.roofline(_labelled(one))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "batch size"
    drawn = [line for line in ax.lines if len(line.get_xdata()) == 2]
    assert len(drawn) == 4 and all(line.get_marker() == "o" for line in drawn)
    assert ax.get_legend().get_title().get_text() == "mode: cache+kernel+graph"


def test_one_point_draws_only_the_bars_and_says_why(block, tmp_path, caplog):
    point = block[(block["total_history"] == 1024) & (block["batch_size"] == 2)].head(1)
    with caplog.at_level("WARNING", logger="hstu_exp.report.figures"):
        figs = figures.draw_all(point, tmp_path)
    assert sorted(figs) == ["latency_bars"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency_bars.png"]
    for name in ("latency_vs_history", "latency_vs_batch", "roofline_fraction"):
        assert f"figure {name} not drawn: one total history (T=1024)" in caplog.text
    assert "and one batch size (2)" in caplog.text


def test_latency_bars_name_each_T_once_and_no_label_overprints(block):
    fig = figures.latency_bars(_labelled(block))
    fig.canvas.draw()
    render = fig.canvas.get_renderer()
    panels = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    for ax in panels:
        assert ax.get_xlabel() == ""  # the axis label is the figure's, once
        groups = [t for t in ax.get_xticklabels(minor=True) if t.get_text()]
        assert [t.get_text() for t in groups] == ["T=256", "T=1024"]
        cached = [t for t in ax.get_xticklabels() if t.get_text()]
        assert [t.get_text() for t in cached] == ["0", "128", "192", "0", "512", "960"]
        boxes = [t.get_window_extent(render) for t in cached + groups]
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1 :])
        # each T label sits under the middle of its group's bars
        ticks = ax.get_xticks()
        assert list(ax.get_xticks(minor=True)) == [ticks[1], ticks[4]]
    assert fig.get_supxlabel().startswith("cached tokens per user")
    assert sum(t.get_text().startswith("T=") for t in fig.texts) == 0  # no loose T texts


def test_serve_at_one_rate_bars_per_configuration_on_a_share_axis(tmp_path, caplog):
    recs = [
        _serve("real", c, 400, 30, "VALID", gpu_hit_rate=g, host_hit_rate=h, requests=100)
        for c, g, h in (("none", 0.0, 0.0), ("paged", 0.6, 0.0), ("paged_offload", 0.3, 0.5))
    ]
    df = pd.DataFrame(recs).assign(onloaded_bytes=[0, 0, 2**20 * 100], offloaded_bytes=0)
    fig = figures.serve_cache(df)
    gpu, host, moved = fig.axes[:3]
    assert [t.get_text() for t in gpu.get_xticklabels()] == ["none", "paged", "paged_offload"]
    assert [p.get_height() for p in gpu.patches] == [0.0, 0.6, 0.3]
    assert [p.get_height() for p in host.patches] == [0.0, 0.0, 0.5]
    assert [p.get_height() for p in moved.patches] == [0.0, 0.0, 1.0]  # MiB a request
    assert gpu.get_ylim() == (0, 1.02) and "400" in gpu.get_xlabel()
    # a point that served no request has no hit rate: no bar, not a bar of 0
    empty = df.assign(requests=[100, 0, 100])
    gpu = figures.serve_cache(empty).axes[0]
    assert [p.get_height() for p in gpu.patches][::2] == [0.0, 0.3]
    assert np.isnan(gpu.patches[1].get_height())
    with caplog.at_level("WARNING", logger="hstu_exp.report.figures"):
        figs = figures.draw_all(df, tmp_path)
    assert "serve_latency_vs_qps" not in figs and "serve_cache" in figs
    assert "figure serve_latency_vs_qps not drawn: one offered rate (400" in caplog.text


def test_a_cdf_legend_of_long_labels_sits_below_and_leaves_the_axis_its_width():
    """The published collector x switch-interval sweep: four labels of ~45 characters. Beside
    the one panel they squeezed its axis to a sliver; below it, the axis keeps most of the
    figure's width and the legend stays clear of the axis and its x label."""
    from helpers import ROOT

    from hstu_exp.report.aggregate import load

    df = load(ROOT / "outputs" / "published" / "serve_gc_ab_h100")
    fig = figures.serve_latency_cdf(df)
    fig.canvas.draw()
    ax = fig.axes[0]
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(labels) == 5 and min(len(label) for label in labels[:4]) > 40
    box, leg = ax.get_window_extent(), legend.get_window_extent()
    assert box.width > 0.6 * fig.bbox.width
    assert leg.y1 < ax.xaxis.label.get_window_extent().y0  # below the x label
    provenance = [t for t in fig.texts if "commit" in t.get_text()]
    assert provenance and provenance[0].get_window_extent().y1 <= leg.y0  # and above the footer
    # latencies within about a decade still get ticks at 1, 2, 5 of it, in plain numbers
    lo, hi = ax.get_xlim()
    shown = [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    assert len([t for t in shown if t]) >= 3 and all("^" not in t for t in shown), shown
