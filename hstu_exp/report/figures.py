"""Seed-style figures of a sweep, drawn from its table alone (no W&B needed).

Which figures appear depends on what the sweep holds: latency vs history per batch size (hue =
mode), speedup over the uncached baseline (bars, and a T x n heatmap per batch), roofline fraction,
e2e latency and speedup per batch, attention TFLOP/s.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from hstu_exp.report.aggregate import speedups  # noqa: E402


def mode_label(df: pd.DataFrame) -> pd.Series:
    """One 'mode' per record from the keys that vary in the sweep (cache / kernel / graph)."""
    parts = [k for k in ("cache", "kernel", "graph", "mode") if k in df and df[k].nunique() > 1]
    if not parts:
        parts = ["cache"]
    return df[parts].astype(str).agg("+".join, axis=1)


def _log2_axis(grid, values) -> None:
    """History lengths are powers of two: base-2 log axis labelled with the values themselves."""
    ticks = sorted(set(int(v) for v in values))
    for ax in grid.axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.tick_params(axis="x", labelrotation=45)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _most_cached(df: pd.DataFrame) -> pd.DataFrame:
    """Per (mode, batch, T) the record with the fewest new tokens: the seed charts' case."""
    return df.sort_values("new_history").groupby(["label", "batch_size", "total_history"],
                                                 as_index=False).first()


def _block(df: pd.DataFrame, out: Path) -> dict:
    figs = {}
    lat = _most_cached(df)
    g = sns.relplot(data=lat, x="total_history", y="median_ms", hue="label", col="batch_size",
                    kind="line", marker="o", col_wrap=min(4, lat["batch_size"].nunique()),
                    facet_kws={"sharey": False})
    g.set(yscale="log", xlabel="total history T", ylabel="median latency (ms)")
    _log2_axis(g, lat["total_history"])
    g.figure.suptitle("HSTU block latency (fewest new tokens per T)", y=1.03)
    figs["latency_vs_history"] = _save(g.figure, out / "latency_vs_history.png")

    sp = speedups(df, key="cache", baseline="none", ignore=("new_history", "page_size"))
    if len(sp):
        sp = sp.assign(label=mode_label(sp))
        best = sp.sort_values("new_history").groupby(["label", "batch_size", "total_history"],
                                                     as_index=False).first()
        g = sns.catplot(data=best, x="total_history", y="speedup", hue="batch_size",
                        col="label", kind="bar", palette="viridis")
        g.set(ylabel="speedup over cache=none", xlabel="total history T (fewest new tokens)")
        figs["speedup_bars"] = _save(g.figure, out / "speedup_bars.png")

        heat = sp[sp["label"] == sp["label"].iloc[0]]
        batches = sorted(heat["batch_size"].unique())
        fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.6), squeeze=False)
        for ax, b in zip(axes[0], batches):
            grid = heat[heat["batch_size"] == b].pivot_table(
                index="new_history", columns="total_history", values="speedup")
            sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", ax=ax, cbar=False)
            ax.set_title(f"batch {b}")
            ax.set_xlabel("total history T")
            ax.set_ylabel("new history n")
        fig.suptitle("speedup over full recompute (cache=none)")
        figs["speedup_heatmap"] = _save(fig, out / "speedup_heatmap.png")
    return figs


def _roofline(df: pd.DataFrame, out: Path) -> dict:
    if "floor_fraction" not in df or df["floor_fraction"].isna().all():
        return {}
    x = "total_history" if df["total_history"].nunique() > 1 else "batch_size"
    g = sns.relplot(data=_most_cached(df), x=x, y="floor_fraction", hue="label",
                    style="batch_size", kind="line", marker="o", errorbar=None)
    g.set(ylabel="floor / measured latency", xlabel=x)
    _log2_axis(g, df[x])
    g.figure.suptitle("fraction of the hardware floor (fewest new tokens per T)", y=1.03)
    return {"roofline_fraction": _save(g.figure, out / "roofline_fraction.png")}


def _e2e(df: pd.DataFrame, out: Path) -> dict:
    figs = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.barplot(data=df, x="batch_size", y="median_ms", hue="label", ax=ax)
    ax.set(ylabel="median latency per request batch (ms)", title="end-to-end ranking latency")
    figs["e2e_latency"] = _save(fig, out / "e2e_latency.png")
    sp = speedups(df, key="mode", baseline="baseline", ignore=("cache", "graph"))
    if len(sp):
        fig, ax = plt.subplots(figsize=(6, 4))
        sns.barplot(data=sp, x="batch_size", y="speedup", hue="mode", ax=ax)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(ylabel="speedup over baseline", title="end-to-end speedup")
        figs["e2e_speedup"] = _save(fig, out / "e2e_speedup.png")
    return figs


def _attention(df: pd.DataFrame, out: Path) -> dict:
    if "tflops" not in df:
        return {}
    g = sns.catplot(data=df, x="total_history", y="tflops", hue="label", col="batch_size",
                    kind="bar")
    g.set(ylabel="TFLOP/s")
    return {"attention_tflops": _save(g.figure, out / "attention_tflops.png")}


def draw_all(df: pd.DataFrame, out_dir: Path) -> dict:
    """Draw what the table supports into out_dir; returns {name: png path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = df[df["status"] == "ok"] if "status" in df else df
    if ok.empty:
        return {}
    sns.set_theme(style="whitegrid", context="paper")
    ok = ok.assign(label=mode_label(ok))
    figs = {}
    for workload, draw in (("block", _block), ("e2e", _e2e), ("attention", _attention)):
        part = ok[ok["workload"] == workload]
        if len(part):
            figs.update(draw(part, out))
    figs.update(_roofline(ok[ok["workload"] == "block"], out) if (ok["workload"] == "block").any()
                else {})
    return figs
