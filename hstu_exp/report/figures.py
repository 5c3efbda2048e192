"""Figures of a sweep, drawn from its table alone (no W&B needed).

Which figures appear depends on what the sweep holds:
- block: latency vs history per batch size (at one T: latency vs batch size instead);
  absolute-latency bars per batch size, grouped by T with one bar per cached length (as NVIDIA's
  recsys-examples charts, for a direct comparison); speedup over full recompute as bars (with
  95 % intervals) and as a T x n heatmap per mode; roofline fraction;
- e2e: latency per batch for every mode, and every mode's speedup over baseline with intervals;
- attention: TFLOP/s;
- serve: latency percentiles vs offered QPS, max QPS within the SLO, latency CDFs, hit rates per
  tier and bytes moved.
A figure with nothing meaningful to show (a line over one T, one rate or one point) is not drawn:
a warning says which and why (NotDrawn). Every figure says what it shows: a title, and a footer
with the GPU, model, kernel / graph and commit from the records. Invalid points (record key
`valid` false) are hatched bars or hollow markers, never drawn like valid ones. Each PNG is
written to a temporary name and renamed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import matplotlib
import matplotlib.ticker as mticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from hstu_exp.report.aggregate import (
    block_speedups,
    e2e_speedups,
    most_cached,
    ok,  # noqa: E402
    valid_mask,
)
from hstu_exp.report.labels import serve_label_title, serve_labels  # noqa: E402
from hstu_exp.tracking.records import FileWriteError, write_atomically  # noqa: E402

E2E_MODES = {
    "baseline": "Baseline",
    "baseline_graph": "Baseline + CUDA graph",
    "cache": "KV cache",
    "cache_graph": "KV cache + CUDA graph",
}
KEY_NAMES = {
    "batch_size": "batch size",
    "total_history": "total history T",
    "new_history": "new history n",
    "cached": "cached tokens (T - n)",
    "label": "mode",
    "mode": "e2e mode",
}
INVALID_HATCH = "///"
log = logging.getLogger(__name__)


class NotDrawn(Exception):
    """The records hold nothing this figure can show meaningfully (one T, one point); the
    message says why and is logged instead of a degenerate figure."""


def label_keys(df: pd.DataFrame) -> list:
    """The keys that make a 'mode' here: those of cache / kernel / graph / mode that vary."""
    parts = [k for k in ("cache", "kernel", "graph", "mode") if k in df and df[k].nunique() > 1]
    return parts or ["cache"]


def mode_label(df: pd.DataFrame) -> pd.Series:
    """One 'mode' per record from the keys that vary in the sweep (cache / kernel / graph)."""
    parts = label_keys(df)
    # map(str), not astype(str): pandas 3 keeps NaN through astype(str)
    return df[parts].map(lambda v: "-" if v is None or v != v else str(v)).agg("+".join, axis=1)


def _values(df: pd.DataFrame, key: str) -> str:
    if key not in df:
        return "?"
    vals = sorted({str(v) for v in df[key].dropna()})
    return "/".join(vals) if vals else "?"


def provenance(df: pd.DataFrame) -> str:
    """GPU, model, kernel / graph and commit of the records drawn: the figure's footer."""
    gpu = _values(df, "device_name")
    if "device" in df and set(df["device"].dropna()) == {"cpu"} and "cpu_model" in df:
        gpu = "CPU " + _values(df, "cpu_model")  # device_name is only the architecture there
    model = _values(df, "model") + (f" ({_values(df, 'dtype')})" if "dtype" in df else "")
    cand = _values(df, "num_candidates")
    return (
        f"{gpu} | model {model} | kernel {_values(df, 'kernel')} | graph "
        f"{_values(df, 'graph')} | {cand} candidates | commit {_values(df, 'git_sha')}"
    )


def _finish(fig, title: str, df: pd.DataFrame, below: float = 0.0) -> None:
    """Title, provenance and the invalid points' note under the figure (`below`: the height of
    what hangs there already, a legend, as a fraction of the figure's)."""
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, -0.01 - below, provenance(df), ha="center", va="top", fontsize=7, color="dimgray")
    n_invalid = (
        int(sum(_is_invalid(v) for v in df["valid_"]))
        if "valid_" in df
        else int(valid_mask(df).eq(False).sum())
    )
    if n_invalid:
        fig.text(
            0.5,
            -0.045 - below,
            f"{n_invalid} of {len(df)} points invalid (hatched / hollow): "
            "see the records' invalid_reason",
            ha="center",
            va="top",
            fontsize=7,
            color="firebrick",
        )


def _save(fig, path: Path) -> Path:
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def _log2_x(ax, values) -> None:
    """History lengths are powers of two: base-2 log axis labelled with the values themselves."""
    ticks = sorted(set(int(v) for v in values))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(mticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    ax.tick_params(axis="x", labelrotation=45)


def _plain_log(ax, which: str = "y") -> None:
    """Log y (or x) ticked at 1, 2, 5 of each decade, with plain numbers (0.5, 1, 2) rather than
    5x10^-1: a span under a decade still gets ticks."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(mticker.NullFormatter())


def _legend_below(fig, axes, fontsize: int = 7) -> float:
    """One legend of every panel's lines (each label once), hung under the figure in as many
    columns as its width holds: beside a narrow panel a legend of long labels squeezes the axis
    to a sliver, and the last panel alone may lack some labels. Returns its height as a
    fraction of the figure's, for `_finish(below=)`."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if not entries:
        return 0.0
    per = 0.4 + 0.055 * max(len(label) for label in entries)  # inches a column at 7 pt
    ncol = max(1, min(len(entries), int(fig.get_figwidth() // per)))
    rows = -(-len(entries) // ncol)
    fig.legend(
        list(entries.values()),
        list(entries),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=ncol,
        fontsize=fontsize,
    )
    return (0.19 * rows + 0.15) / fig.get_figheight()


def _grid(n: int, width: float = 4.2, height: float = 3.4):
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _bars(
    ax,
    groups,
    series,
    table: pd.DataFrame,
    *,
    x: str,
    hue: str,
    y: str,
    lo: str | None = None,
    hi: str | None = None,
    labels=None,
    fmt="{:.2f}",
    palette=None,
):
    """Grouped bars: one group per x value, one bar per hue value; error bars from lo/hi
    columns; invalid records hatched; a value label on every bar. `palette` ({series: colour})
    keeps a series' colour the same across figures."""
    width = 0.8 / max(1, len(series))
    # "deep" has 10 colours and then repeats: more series than that get tab20's 20
    colors = sns.color_palette("deep" if len(series) <= 10 else "tab20", len(series))
    if palette:
        colors = [palette.get(s, c) for s, c in zip(series, colors)]
    for j, s in enumerate(series):
        part = table[table[hue] == s].set_index(x)
        xs, ys, errs, bad = [], [], [], []
        for i, g in enumerate(groups):
            if g not in part.index:
                continue
            r = part.loc[g]
            r = r.iloc[0] if isinstance(r, pd.DataFrame) else r
            xs.append(i + (j - (len(series) - 1) / 2) * width)
            ys.append(float(r[y]))
            if lo and hi and pd.notna(r.get(lo)) and pd.notna(r.get(hi)):
                errs.append((max(0.0, ys[-1] - float(r[lo])), max(0.0, float(r[hi]) - ys[-1])))
            else:
                errs.append((0.0, 0.0))
            bad.append(_is_invalid(r.get("valid_")))
        if not xs:
            continue
        label = labels(s) if labels else str(s)
        # the legend takes its swatch from an empty bar, so a hatched (invalid) first bar does
        # not make the whole series look invalid
        ax.bar([xs[0]], [0], 0, color=colors[j], label=label)
        bars = ax.bar(
            xs,
            ys,
            width * 0.95,
            color=colors[j],
            yerr=np.array(errs).T if any(e != (0.0, 0.0) for e in errs) else None,
            capsize=2,
            error_kw={"lw": 0.8},
        )
        for bar, is_bad in zip(bars, bad):
            if is_bad:
                bar.set_hatch(INVALID_HATCH)
                bar.set_edgecolor("black")
        ax.bar_label(
            bars,
            labels=[fmt.format(v) for v in ys],
            fontsize=6,
            padding=1,
            rotation=90 if len(series) * len(groups) > 12 else 0,
        )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([str(g) for g in groups])


def _with_ratio_valid(sp: pd.DataFrame) -> pd.DataFrame:
    """valid_ of a ratio: as valid as the weaker of its two records."""
    sp = _with_valid(sp)
    base = sp["baseline_valid"] if "baseline_valid" in sp else pd.Series(pd.NA, index=sp.index)
    sp["valid_"] = [
        None if a is None and pd.isna(b) else not (_is_invalid(a) or _is_invalid(b))
        for a, b in zip(sp["valid_"], base)
    ]
    return sp


def _is_invalid(v) -> bool:
    """Judged invalid (False); None / NA means no validity was recorded."""
    return v is not None and not pd.isna(v) and not bool(v)


def _with_valid(df: pd.DataFrame) -> pd.DataFrame:
    v = valid_mask(df)
    return df.assign(valid_=[None if pd.isna(x) else bool(x) for x in v])


def _latency_lines(ax, part: pd.DataFrame, x: str, colors: dict) -> None:
    """Median latency against `x`, one line per mode, a p10-p90 band; hollow = invalid."""
    for lab, colour in colors.items():
        s = part[part["label"] == lab].sort_values(x)
        if s.empty:
            continue
        ax.plot(s[x], s["median_ms"], color=colour, label=lab)
        if "p10_ms" in s and "p90_ms" in s and s["p10_ms"].notna().all():
            ax.fill_between(s[x], s["p10_ms"], s["p90_ms"], color=colour, alpha=0.15, lw=0)
        bad = s["valid_"] == False  # noqa: E712
        ax.scatter(s.loc[~bad, x], s.loc[~bad, "median_ms"], color=colour, s=18, zorder=3)
        ax.scatter(
            s.loc[bad, x], s.loc[bad, "median_ms"], facecolors="none", edgecolors=colour, s=30, zorder=3
        )
    _plain_log(ax)


def _mode_colors(lat: pd.DataFrame) -> dict:
    labels = sorted(lat["label"].unique())
    return dict(zip(labels, sns.color_palette("deep", len(labels))))


def latency_vs_history(df: pd.DataFrame):
    lat = _with_valid(most_cached(df, ["label", "batch_size", "total_history"]))
    if lat["total_history"].nunique() < 2:
        raise NotDrawn(
            f"one total history (T={_values(lat, 'total_history')}): no line over T to draw "
            "(latency_vs_batch and latency_bars show this sweep)"
        )
    batches = sorted(lat["batch_size"].unique())
    fig, axes = _grid(len(batches))
    colors = _mode_colors(lat)
    for ax, b in zip(axes, batches):
        _latency_lines(ax, lat[lat["batch_size"] == b], "total_history", colors)
        _log2_x(ax, lat["total_history"])
        ax.set(title=f"batch size {b}", xlabel="total history T", ylabel="median latency (ms)")
    axes[0].legend(title="+".join(label_keys(df)), fontsize=7, title_fontsize=7)
    _finish(
        fig,
        "HSTU block latency vs history (fewest new tokens per T; band p10-p90; hollow = invalid)",
        df,
    )
    return fig


def latency_vs_batch(df: pd.DataFrame):
    """A sweep at one total history: median latency against batch size, one line per mode."""
    lat = _with_valid(most_cached(df, ["label", "batch_size", "total_history"]))
    if lat["batch_size"].nunique() < 2:
        raise NotDrawn(
            f"one total history (T={_values(lat, 'total_history')}) and one batch size "
            f"({_values(lat, 'batch_size')}): no line to draw (latency_bars shows the points)"
        )
    fig, ax = plt.subplots(layout="constrained", figsize=(6.0, 4.2))
    _latency_lines(ax, lat, "batch_size", _mode_colors(lat))
    _log2_x(ax, lat["batch_size"])
    t = _values(lat, "total_history")
    ax.set(xlabel="batch size", ylabel="median latency (ms)")
    ax.legend(title="+".join(label_keys(df)), fontsize=7, title_fontsize=7)
    _finish(
        fig,
        f"HSTU block latency vs batch size at T={t} (fewest new tokens; band p10-p90; hollow = invalid)",
        df,
    )
    return fig


def _spread(values: list, most: int = 5) -> list:
    """At most `most` of the sorted values: the first, the last and evenly spaced between."""
    if len(values) <= most:
        return values
    idx = np.linspace(0, len(values) - 1, most).round().astype(int)
    return [values[i] for i in sorted(set(idx))]


def latency_bars(df: pd.DataFrame):
    """NVIDIA-style: absolute latency per batch size, groups = T, one bar per cached length
    (0 = full recompute; at most five per T, spread over the range), one row of panels per
    kernel / graph. Colour = cached share of T."""
    d = df.assign(
        cached=(df["total_history"] - df["new_history"]).astype(int),
        kg=df["kernel"].astype(str) + "+" + df["graph"].astype(str),
    )
    d = _with_valid(d)
    if "time" in d:
        d = d.sort_values("time", kind="stable")
    # "0 cached" is the full-recompute baseline (cache=none), not a paged point with n = T,
    # whichever ran last: the none records go last so drop_duplicates keeps them
    d = d.assign(_baseline=(d["cache"] == "none")).sort_values("_baseline", kind="stable")
    rows = sorted(d["kg"].unique())
    batches = sorted(d["batch_size"].unique())
    fig, axes = plt.subplots(
        len(rows),
        len(batches),
        squeeze=False,
        layout="constrained",
        figsize=(5.5 * len(batches), 3.8 * len(rows)),
    )
    cmap = plt.get_cmap("viridis")
    for i, kg in enumerate(rows):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            part = d[(d["kg"] == kg) & (d["batch_size"] == b)].drop_duplicates(
                ["total_history", "cached"], keep="last"
            )
            ticks, names, centres, groups = [], [], [], []
            x = 0.0
            for t in sorted(part["total_history"].unique()):
                group = part[part["total_history"] == t].set_index("cached").sort_index()
                shown = _spread(list(group.index))
                centres.append(x + (len(shown) - 1) / 2)
                groups.append(f"T={int(t)}")
                for c in shown:
                    r = group.loc[c]
                    err = None
                    if pd.notna(r.get("p10_ms")) and pd.notna(r.get("p90_ms")):
                        err = [
                            [max(0.0, r["median_ms"] - r["p10_ms"])],
                            [max(0.0, r["p90_ms"] - r["median_ms"])],
                        ]
                    bar = ax.bar(
                        x,
                        r["median_ms"],
                        0.9,
                        color=cmap(c / t * 0.9),
                        yerr=err,
                        capsize=1.5,
                        error_kw={"lw": 0.7},
                    )
                    if _is_invalid(r["valid_"]):
                        bar[0].set_hatch(INVALID_HATCH)
                        bar[0].set_edgecolor("black")
                    ax.bar_label(
                        bar, labels=[f"{r['median_ms']:.2f}"], fontsize=5, rotation=90, padding=1
                    )
                    ticks.append(x)
                    names.append(str(c))
                    x += 1
                x += 0.8
            # cached lengths as major tick labels; each T once, centred under its group as a
            # minor tick label padded below them, so the layout makes room and nothing overprints
            rotated = len(ticks) > 6
            ax.set_xticks(ticks, names, rotation=90 if rotated else 0, fontsize=6)
            ax.set_xticks(centres, groups, minor=True, fontsize=7)
            # the T labels' pad (points): the major tick and its pad, then the 6 pt labels'
            # height (rotated: their length, at most 4 pt a digit) and a 2 pt gap
            height = 4.0 * max(map(len, names)) if rotated else 8.0
            pad = plt.rcParams["xtick.major.size"] + plt.rcParams["xtick.major.pad"] + height + 2
            ax.tick_params(axis="x", which="minor", length=0, pad=pad)
            ax.xaxis.remove_overlapping_locs = False  # a centre may sit on a bar's tick
            ax.margins(y=0.12)  # room above the tallest bar for its value label
            ax.set(title=f"{kg}, batch size {b}", ylabel="median latency (ms)")
    fig.supxlabel("cached tokens per user (0 = full recompute), grouped by total history T", fontsize=9)
    share = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1 / 0.9))
    fig.colorbar(share, ax=axes.ravel().tolist(), label="cached share of T", shrink=0.8)
    _finish(
        fig,
        "HSTU block latency per batch size (bars: median, whiskers p10-p90, colour: "
        "cached share of T; hatched = invalid)",
        df,
    )
    return fig


def speedup_bars(sp: pd.DataFrame):
    best = _with_ratio_valid(most_cached(sp, ["label", "batch_size", "total_history"]))
    labels = sorted(best["label"].unique())
    fig, axes = _grid(len(labels), width=5.0, height=3.8)
    span = best["speedup"].max() / max(best["speedup"].min(), 1e-12)
    for ax, lab in zip(axes, labels):
        part = best[best["label"] == lab]
        _bars(
            ax,
            sorted(part["total_history"].unique()),
            sorted(part["batch_size"].unique()),
            part,
            x="total_history",
            hue="batch_size",
            y="speedup",
            lo="ci_low",
            hi="ci_high",
            fmt="{:.2f}x",
        )
        ax.axhline(1.0, color="black", lw=0.9, ls="--")
        if span >= 10:  # ratios spanning a decade or more: 0.5x and 2x equally far from 1
            _plain_log(ax)
        ax.set(
            title=f"{lab} vs cache=none",
            xlabel="total history T (fewest new tokens)",
            ylabel="speedup over full recompute",
        )
        ax.legend(title=KEY_NAMES["batch_size"], fontsize=7, title_fontsize=7)
    _finish(
        fig,
        "Speedup of the KV cache over full recompute (whiskers: 95% bootstrap "
        "interval; dashed: 1.0; hatched = invalid)",
        best,
    )
    return fig


def speedup_heatmap(sp: pd.DataFrame):
    """One row of panels per mode (named), one column per batch size; ONE diverging colour
    scale, log, centred at 1 (red slower, blue faster), with a colourbar."""
    labels = sorted(sp["label"].unique())
    batches = sorted(sp["batch_size"].unique())
    sp = _with_ratio_valid(sp)
    extreme = float(np.nanmax(np.abs(np.log10(sp["speedup"].clip(lower=1e-6)))))
    extreme = max(extreme, np.log10(1.25))
    norm = LogNorm(vmin=10**-extreme, vmax=10**extreme)  # symmetric in log: centre = 1
    fig, axes = plt.subplots(
        len(labels),
        len(batches),
        squeeze=False,
        layout="constrained",
        figsize=(3.9 * len(batches) + 1.0, 3.3 * len(labels)),
    )
    image = None
    for i, lab in enumerate(labels):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            part = sp[(sp["label"] == lab) & (sp["batch_size"] == b)]
            grid = part.pivot_table(
                index="new_history", columns="total_history", values="speedup", aggfunc="last"
            )
            xs, ys = list(grid.columns), list(grid.index)
            image = ax.imshow(grid.values, cmap="RdBu", norm=norm, aspect="auto", origin="lower")
            bad = part[part["valid_"] == False]  # noqa: E712
            for _, r in part.iterrows():
                x, y = xs.index(r["total_history"]), ys.index(r["new_history"])
                ax.text(
                    x,
                    y,
                    f"{r['speedup']:.1f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if 0.5 < r["speedup"] < 2 else "white",
                )
            for _, r in bad.iterrows():
                x, y = xs.index(r["total_history"]), ys.index(r["new_history"])
                ax.add_patch(
                    plt.Rectangle(
                        (x - 0.5, y - 0.5),
                        1,
                        1,
                        fill=False,
                        hatch=INVALID_HATCH,
                        edgecolor="black",
                        lw=0,
                    )
                )
            ax.set_xticks(range(len(xs)), [str(int(v)) for v in xs], rotation=45)
            ax.set_yticks(range(len(ys)), [str(int(v)) for v in ys])
            ax.set(title=f"{lab}, batch size {b}", xlabel="total history T", ylabel="new history n")
            ax.grid(False)
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9)
    bar.set_label("speedup over cache=none (log; 1 = same)")
    ticks = [t for t in (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 10, 20, 50, 100) if norm.vmin <= t <= norm.vmax]
    bar.set_ticks(ticks, labels=[f"{t:g}x" for t in ticks])
    bar.ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    _finish(
        fig,
        "Speedup over full recompute, one panel per mode and batch size "
        "(blue faster, red slower; hatched = invalid)",
        sp,
    )
    return fig


def roofline(df: pd.DataFrame):
    """Floor fraction against T, one line per mode and (marker) batch size; at one T against
    batch size, one line per mode."""
    data = most_cached(df, ["label", "batch_size", "total_history"])
    x = next((k for k in ("total_history", "batch_size") if data[k].nunique() > 1), None)
    if x is None:
        raise NotDrawn(
            f"one total history (T={_values(data, 'total_history')}) and one batch size "
            f"({_values(data, 'batch_size')}): no line to draw"
        )
    mode, batch = "mode: " + "+".join(label_keys(df)), KEY_NAMES["batch_size"]  # not a column
    # seaborn titles the legend's sections by the column names: name them for the reader
    data = data.assign(floor_pct=100 * data["floor_fraction"]).rename(
        columns={"label": mode, "batch_size": batch} if x == "total_history" else {"label": mode}
    )
    fig, ax = plt.subplots(layout="constrained", figsize=(6.5, 4.2))
    sns.lineplot(
        data=data,
        x=x,
        y="floor_pct",
        hue=mode,
        style=batch if x == "total_history" else None,
        markers=True,
        marker=None if x == "total_history" else "o",
        errorbar=None,
        ax=ax,
    )
    bad = _with_valid(data)
    bad = bad[[_is_invalid(v) for v in bad["valid_"]]]
    if len(bad):  # the footer promises hollow invalid points
        ax.scatter(
            bad[x],
            bad["floor_pct"],
            s=46,
            facecolors="white",
            edgecolors="black",
            zorder=3,
            label="invalid",
        )
    _log2_x(ax, data[x])
    ax.set(xlabel=KEY_NAMES.get(x, x), ylabel="hardware floor / measured latency (%)")
    ax.legend(title=None if x == "total_history" else mode, fontsize=7, title_fontsize=7)
    _finish(
        fig, "Fraction of the hardware floor reached (fewest new tokens per T; hollow = invalid)", df
    )
    return fig


def _e2e_label(mode) -> str:
    return E2E_MODES.get(str(mode), str(mode))


# One colour per e2e mode in every e2e figure (the speedup figure has no baseline bar).
E2E_COLORS = dict(zip(E2E_MODES, sns.color_palette("deep", len(E2E_MODES))))


def _e2e_bars(d: pd.DataFrame, y: str, lo: str, hi: str, ylabel: str, fmt: str = "{:.2f}"):
    """One bar per e2e mode (in E2E_MODES order, its colour in every figure) per batch size,
    whiskers from lo to hi, the legend beside the axes."""
    modes = [m for m in E2E_MODES if m in set(d["mode"])] + sorted(
        set(d["mode"].astype(str)) - set(E2E_MODES)
    )
    fig, ax = plt.subplots(layout="constrained", figsize=(7.5, 4.2))
    _bars(
        ax,
        sorted(d["batch_size"].unique()),
        modes,
        d,
        x="batch_size",
        hue="mode",
        y=y,
        lo=lo,
        hi=hi,
        labels=_e2e_label,
        fmt=fmt,
        palette=E2E_COLORS,
    )
    ax.set(xlabel="batch size (users per request batch)", ylabel=ylabel)
    ax.legend(
        title="e2e mode", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0)
    )
    return fig, ax


def e2e_latency(df: pd.DataFrame):
    fig, _ = _e2e_bars(_with_valid(df), "median_ms", "p10_ms", "p90_ms", "median latency per batch (ms)")
    _finish(fig, "End-to-end ranking latency per batch (whiskers p10-p90; hatched = invalid)", df)
    return fig


def e2e_speedup(sp: pd.DataFrame):
    d = _with_ratio_valid(sp)
    fig, ax = _e2e_bars(d, "speedup", "ci_low", "ci_high", "speedup over baseline", fmt="{:.2f}x")
    ax.axhline(1.0, color="black", lw=0.9, ls="--")
    _finish(
        fig,
        "End-to-end speedup over baseline: ratio of median pass totals (whiskers: "
        "95% interval within a run, passes resampled; dashed: 1.0; hatched = invalid)",
        d,
    )
    return fig


def e2e_host_device(df: pd.DataFrame):
    """Per e2e mode, per batch size: the host's time to issue a batch and its compute's time on
    the device (pass medians / batches), beside the batch latency: where host >= device the
    step is host-bound."""
    d = df[df["device_ms"].notna()]
    modes = [m for m in E2E_MODES if m in set(d["mode"])]
    fig, axes = _grid(len(modes))
    for ax, mode in zip(axes, modes):
        part = d[d["mode"] == mode].sort_values("batch_size")
        x = np.arange(len(part))
        per = part["num_batches"].to_numpy(dtype=float)
        ax.bar(x - 0.2, part["host_ms"] / per, 0.4, label="host (issue)")
        ax.bar(x + 0.2, part["device_ms"] / per, 0.4, label="device (compute)")
        ax.plot(x, part["median_ms"], "k_", markersize=14, label="batch latency (median)")
        ax.set_xticks(x, [str(b) for b in part["batch_size"]])
        ax.set(title=_e2e_label(mode), xlabel="batch size", ylabel="ms a batch")
    # once, beside the panels: inside one it covers the bars
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _finish(fig, "Host vs device time a batch (e2e)", df)
    return fig


def attention_tflops(df: pd.DataFrame):
    d = _with_valid(most_cached(df, ["label", "batch_size", "total_history"]))
    batches = sorted(d["batch_size"].unique())
    fig, axes = _grid(len(batches))
    for ax, b in zip(axes, batches):
        part = d[d["batch_size"] == b]
        _bars(
            ax,
            sorted(part["total_history"].unique()),
            sorted(part["label"].unique()),
            part,
            x="total_history",
            hue="label",
            y="tflops",
            fmt="{:.0f}",
        )
        ax.set(title=f"batch size {b}", xlabel="total history T", ylabel="TFLOP/s")
        ax.legend(title="+".join(label_keys(df)), fontsize=7, title_fontsize=7)
    _finish(fig, "Attention throughput (fewest new tokens per T; unmasked query-key pairs)", df)
    return fig


def _draw(figs: dict, out: Path, name: str, build, *args) -> None:
    try:
        fig = build(*args)
    except NotDrawn as exc:
        log.warning("[hstu-exp] figure %s not drawn: %s", name, exc)
        return
    figs[name] = _save(fig, out / f"{name}.png")


def draw_all(df: pd.DataFrame, out_dir: Path) -> dict:
    """Draw what the table supports into out_dir; returns {name: png path}. FileWriteError when
    the dir or a figure cannot be written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileWriteError(out, exc) from exc
    good = ok(df)
    if good.empty or "workload" not in good:
        return {}
    sns.set_theme(style="whitegrid", context="paper")
    figs: dict = {}
    block = good[good["workload"] == "block"]
    block = block.assign(label=mode_label(block))
    if len(block):
        _draw(figs, out, "latency_vs_history", latency_vs_history, block)
        if block["total_history"].nunique() == 1:
            _draw(figs, out, "latency_vs_batch", latency_vs_batch, block)
        _draw(figs, out, "latency_bars", latency_bars, block)
        sp = block_speedups(block)
        if len(sp):
            sp = sp.assign(label=mode_label(sp))
            _draw(figs, out, "speedup_bars", speedup_bars, sp)
            _draw(figs, out, "speedup_heatmap", speedup_heatmap, sp)
        if "floor_fraction" in block and block["floor_fraction"].notna().any():
            _draw(figs, out, "roofline_fraction", roofline, block)
    e2e = good[good["workload"] == "e2e"]
    if len(e2e):
        _draw(figs, out, "e2e_latency", e2e_latency, e2e)
        sp = e2e_speedups(e2e)
        if len(sp):
            _draw(figs, out, "e2e_speedup", e2e_speedup, sp)
        if "device_ms" in e2e and e2e["device_ms"].notna().any():
            _draw(figs, out, "e2e_host_device", e2e_host_device, e2e)
    att = good[good["workload"] == "attention"]
    att = att.assign(label=mode_label(att))
    if len(att) and "tflops" in att:
        _draw(figs, out, "attention_tflops", attention_tflops, att)
    draw_serve(good, out, figs)
    return figs


# -- workload=serve (docs/serving.md) -------------------------------------------------------------


def _serve_label(df: pd.DataFrame) -> pd.Series:
    """What a serve sweep compares, per point (labels.serve_labels, as the W&B charts label
    it): cache / kernel / graph / mode / batch size and the other overrides that vary."""
    return pd.Series(serve_labels(df.to_dict("records")), index=df.index, dtype=object)


def _slo(df: pd.DataFrame):
    slo = df["slo_ms"].dropna().unique() if "slo_ms" in df else []
    return float(slo[0]) if len(slo) == 1 else None


def _slo_line(ax, df: pd.DataFrame, vertical: bool = False) -> None:
    """The latency SLO: horizontal where latency is the y axis, vertical on a CDF (latency x)."""
    slo = _slo(df)
    if slo is not None:
        draw = ax.axvline if vertical else ax.axhline
        draw(slo, color="firebrick", lw=0.9, ls="--", label=f"SLO {slo:g} ms")


def _clock(r) -> str:
    """'real' (LoadGen drove a server on the wall clock) or 'simulated' (the discrete-event
    what-if simulator). Records older than the clock field came from the simulator, the only
    serve path there was."""
    c = r.get("clock")
    return str(c) if isinstance(c, str) and c else "simulated"


def _clocks(df: pd.DataFrame) -> str:
    """What every serve figure says in its title: 'clock: real', '... simulated', or both."""
    return "clock: " + " and ".join(sorted({_clock(r) for r in df.to_dict("records")}))


def _offered(df: pd.DataFrame) -> pd.Series:
    """The rate asked of the server: target_qps (LoadGen's), else the older records' qps."""
    if "target_qps" in df:
        return df["target_qps"].fillna(df["qps"]) if "qps" in df else df["target_qps"]
    return df["qps"]


def _passed(r) -> Optional[bool]:
    """LoadGen's verdict where there is one (VALID / INVALID), else the record's validity."""
    verdict = r.get("verdict")
    if isinstance(verdict, str) and verdict:
        return verdict.upper() == "VALID"
    return None if r.get("valid_") is None else bool(r.get("valid_"))


def serve_latency_vs_qps(df: pd.DataFrame):
    """The hockey stick: p50 / p99 / p99.9 latency (queueing + service) vs offered QPS; real
    clock solid, simulated dashed beside it; every point marked by its verdict (filled:
    VALID, hollow: INVALID)."""
    d = _with_valid(df).assign(label=_serve_label(df), offered=_offered(df))
    if d["offered"].nunique() < 2:
        raise NotDrawn(f"one offered rate ({_values(d, 'offered')} requests/s): no line over the load")
    d = d.assign(clock_=[_clock(r) for r in d.to_dict("records")]).sort_values("offered")
    stats = [(k, t) for k, t in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")) if k in d]
    fig, axes = _grid(len(stats))
    both = d["clock_"].nunique() > 1
    for ax, (key, name) in zip(axes, stats):
        for (label, clock), part in d.groupby(["label", "clock_"], sort=True):
            (line,) = ax.plot(
                part["offered"],
                part[key],
                ls="-" if clock == "real" else "--",
                label=f"{label} ({clock})" if both else label,
            )
            passed = [_passed(r) for r in part.to_dict("records")]
            for ok_, face in ((True, line.get_color()), (False, "white"), (None, "lightgrey")):
                pts = part[[p is ok_ for p in passed]]
                if len(pts):
                    ax.plot(pts["offered"], pts[key], "o", mfc=face, color=line.get_color())
        _slo_line(ax, d)
        _plain_log(ax)
        ax.set(
            title=f"{name} latency",
            xlabel="offered load (requests/s)",
            ylabel=f"{name} latency, queueing + service (ms)",
        )
    axes[-1].legend(
        title=serve_label_title(df.to_dict("records")),
        fontsize=7,
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    _finish(
        fig,
        f"Serving latency vs offered load ({_clocks(d)}; solid real, dashed "
        "simulated; filled VALID, hollow INVALID)",
        df,
    )
    return fig


def serve_max_qps(df: pd.DataFrame):
    """The highest QPS within the SLO per configuration (search=max_qps points), with the
    bracket the search left: from the highest rate that passed to the lowest that failed."""
    d = _with_valid(df).assign(label=_serve_label(df))
    d = d.assign(max_qps=d["max_qps"].fillna(0.0), group="all")
    labels = sorted(d["label"].unique())
    fig, ax = plt.subplots(layout="constrained", figsize=(max(5.0, 0.9 * len(labels) + 3), 4.2))
    _bars(ax, ["all"], labels, d, x="group", hue="label", y="max_qps", fmt="{:.0f}")
    width = 0.8 / max(1, len(labels))  # where _bars puts each label's bar in the one group
    for j, label in enumerate(labels):
        row = d[d["label"] == label].iloc[0]
        top = row.get("min_failing_qps")
        if top is not None and not pd.isna(top):
            x = (j - (len(labels) - 1) / 2) * width
            ax.plot(
                [x, x], [row["max_qps"], float(top)], color="black", lw=1.0, marker="_", markersize=8
            )
    ax.set_xticks([])
    slo = f"p{_values(d, 'slo_percentile')} <= {_values(d, 'slo_ms')} ms"
    ax.set(ylabel=f"max requests/s with {slo}")
    ax.legend(
        title="configuration", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0)
    )
    _finish(
        fig,
        f"Max QPS within the SLO ({slo}; {_clocks(d)}; bracket: up to the lowest rate "
        "that failed; 0: no rate met it; hatched = invalid)",
        d,
    )
    return fig


def serve_latency_cdf(df: pd.DataFrame):
    """Latency CDF of every point, one panel per offered QPS (at most 4, spread over the sweep),
    the SLO as a vertical line at its latency."""
    d = df.assign(label=_serve_label(df), offered=_offered(df))
    d = d[d["samples_ms"].map(lambda s: isinstance(s, (list, tuple)) and len(s) > 0)]
    rates = _spread(sorted(d["offered"].dropna().unique()), most=4) or [None]
    fig, axes = _grid(len(rates))
    both = len({_clock(r) for r in d.to_dict("records")}) > 1
    for ax, rate in zip(axes, rates):
        part = d if rate is None else d[d["offered"] == rate]
        for _, r in part.sort_values("label").iterrows():
            s = np.sort(np.asarray(r["samples_ms"], dtype=float))
            ax.plot(
                s,
                np.arange(1, s.size + 1) / s.size,
                ls="-" if _clock(r) == "real" else "--",
                label=r["label"] + (f" ({_clock(r)})" if both else ""),
            )
        _slo_line(ax, d, vertical=True)
        _plain_log(ax, which="x")
        ax.set(
            title="all points" if rate is None else f"{rate:g} requests/s offered",
            xlabel="latency, queueing + service (ms)",
            ylabel="fraction of requests",
            ylim=(0, 1.02),
        )
    below = _legend_below(fig, axes)
    _finish(fig, f"Serving latency CDF (counted requests; {_clocks(d)})", df, below)
    return fig


def serve_cache(df: pd.DataFrame):
    """Where requests' cached prefixes came from, and the bytes moved, per configuration and
    offered QPS: what explains the latency differences. Lines over the offered rate; at one
    rate, bars per configuration. Shares on a 0-1 axis."""
    d = df.assign(label=_serve_label(df), qps_=df["qps"].fillna(df.get("max_qps")))
    served = d["requests"] > 0  # a point that served nothing has no rate: not drawn as a 0
    moved = (d["onloaded_bytes"] + d["offloaded_bytes"]) / d["requests"].clip(lower=1) / 2**20
    panels = {
        "requests hitting the GPU pool": d["gpu_hit_rate"].where(served),
        "requests hitting the host tier": d["host_hit_rate"].where(served),
        "MiB moved per request (on + off)": moved.where(served),
    }
    rates = sorted(d["qps_"].dropna().unique())
    labels = sorted(d["label"].unique())
    colors = dict(zip(labels, sns.color_palette("deep" if len(labels) <= 10 else "tab20", len(labels))))
    fig, axes = _grid(3)
    for ax, (what, values) in zip(axes, panels.items()):
        part = d.assign(v_=values).sort_values("qps_")
        if len(rates) > 1:
            for label, g in part.groupby("label", sort=True):
                ax.plot(g["qps_"], g["v_"], marker="o", color=colors[label], label=label)
            ax.set(xlabel="offered load (requests/s)")
            ax.legend(fontsize=7)
        else:  # one rate: a line of one point says nothing; compare the configurations
            heights = [part.loc[part["label"] == lab, "v_"].iloc[0] for lab in labels]
            ax.bar(range(len(labels)), heights, color=[colors[lab] for lab in labels])
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
            ax.set(xlabel=f"configuration, {_values(d, 'qps_')} requests/s offered")
        ax.set(ylabel=what)
        if what.startswith("requests"):  # a share
            ax.set_ylim(0, 1.02)
        else:
            ax.set_ylim(bottom=0)
    _finish(fig, f"KV cache: hit rates per tier and bytes moved ({_clocks(d)})", df)
    return fig


def draw_serve(good: pd.DataFrame, out: Path, figs: dict) -> None:
    """The serve figures the records support (called by draw_all)."""
    serve = good[good["workload"] == "serve"] if "workload" in good else good.head(0)
    if serve.empty:
        return
    if "qps" not in serve:  # records of searches alone: no offered rate is kept where none is set
        serve = serve.assign(qps=np.nan)
    online = serve[serve["qps"].notna()]
    if len(online):
        _draw(figs, out, "serve_latency_vs_qps", serve_latency_vs_qps, online)
    if "max_qps" in serve and serve["mode"].astype(str).str.startswith("max_qps").any():
        _draw(
            figs,
            out,
            "serve_max_qps",
            serve_max_qps,
            serve[serve["mode"].astype(str).str.startswith("max_qps")],
        )
    if "samples_ms" in serve:
        _draw(figs, out, "serve_latency_cdf", serve_latency_cdf, serve)
    if "gpu_hit_rate" in serve and (serve["cache"] != "none").any():
        _draw(figs, out, "serve_cache", serve_cache, serve)
