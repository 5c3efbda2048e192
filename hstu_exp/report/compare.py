"""Compare two sweeps point by point: `hstu-exp-compare SWEEP_A SWEEP_B` (= scripts/compare.py).

    hstu-exp-compare outputs/multirun/<before> outputs/multirun/<after>
    hstu-exp-compare BASE/results.csv NEW --fail-above 1.05      # exit 1: a point surely slower
    hstu-exp-compare BASE NEW --ignore kernel --threshold 1.10 --csv joined.csv

A sweep is a sweep dir (its results.jsonl records, or its results.csv when it holds no records,
as in outputs/published/) or a results.csv file. The ok records of both are joined on the swept
keys (SWEPT_KEYS); a key that holds one value in each sweep but different values between them
(e.g. kernel=reference in A and kernel=triton in B) is left out of the join, so two sweeps of
the same grid with one choice changed line up. Ratios are B / A: median and p90 latency,
e2e's median pass total, and peak memory (> 1 is worse) and the floor fraction (< 1 is worse).
A point is flagged when a ratio is worse than --threshold; the geometric mean of each ratio
closes the table. A figure (B vs A latency, and the ratio of every metric per point) goes to
--figure, by default SWEEP_B/figures/compare_vs_<A>.png. The latency ratio a point is judged by
(e2e: of the median pass totals, else of the medians) carries a 95 % bootstrap interval within
a run from the raw samples (a sweep dir, a results.jsonl, or a results.csv with the close-out's
results.jsonl beside it), and where points ran several repeats (workload.repeats) the lowest
and highest B/A of the repeat pairs, flagged DISAGREE when their intervals do not overlap.
Exit status: 0, or 1 when --fail-above R is given and a point's latency ratio B/A is above R
with confidence (the lower end of its 95 % interval is above R; without samples, the point
estimate; with --gate geomean, the geometric mean of the point estimates) or a point ok in A
has no ok record in B; 2 on bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from hstu_exp.report.aggregate import REPEAT_COLUMNS, SweepError, ok, repeat_ratio, repeat_units, require
from hstu_exp.report.aggregate import load_sweep as _load_sweep
from hstu_exp.tracking.identity import has_config, identity, identity_hash, short, text
from hstu_exp.tracking.records import SWEPT_KEYS, FileWriteError, write_atomically

# (record column, short name, True when larger is worse)
METRICS = [
    ("median_ms", "median", True),
    ("total_ms", "pass", True),
    ("p90_ms", "p90", True),
    ("mem_allocated_bytes", "memory", True),
    ("floor_fraction", "floor", False),
]
_SHORT = {
    "batch_size": "B",
    "total_history": "T",
    "new_history": "n",
    "num_candidates": "cand",
    "page_size": "page",
}


CompareError = SweepError  # bad input of any kind: one line, exit 2
# Where and how each side ran: what explains a difference the intervals do not cover.
WHERE = ["gpu_uuid", "boot_id", "throttled", "valid", "invalid_reason"]
# Without these a point cannot be joined or compared at all.
NEEDED = ["workload", "batch_size", "median_ms"]


def load_sweep(path) -> pd.DataFrame:
    """A sweep (hstu_exp.report.aggregate.load_sweep) that holds what a comparison needs."""
    df = _load_sweep(path)
    require(df, NEEDED, path, "a comparison joins on the swept keys and compares median_ms")
    if df.attrs.get("torn_note"):
        print(f"hstu-exp-compare: {path}: {df.attrs['torn_note']}", file=sys.stderr)
    return df


def join(a: pd.DataFrame, b: pd.DataFrame, ignore=()) -> tuple[pd.DataFrame, list, dict]:
    """(joined ok records with ratio columns, the point keys that tell joined points apart,
    {key: (value in A, value in B)} of the keys left out because they differ sweep-wide).

    Points are joined on their identity (tracking.identity: the resolved config, or for older
    records their point keys and overrides), less --ignore's keys and less every key that holds
    one value in A and another in B (kernel=reference in A, kernel=triton in B)."""
    a, b = ok(a).copy(), ok(b).copy()
    if a.empty or b.empty:
        raise CompareError(f"no ok records in sweep {'A' if a.empty else 'B'}")
    recs_a, recs_b = a.to_dict("records"), b.to_dict("records")
    with_config = all(has_config(r) for r in recs_a + recs_b)
    ids_a = [identity(r, ignore=ignore, with_config=with_config) for r in recs_a]
    ids_b = [identity(r, ignore=ignore, with_config=with_config) for r in recs_b]
    differ = {}
    for k in sorted({k for i in ids_a + ids_b for k in i}):
        va, vb = {i.get(k, "") for i in ids_a}, {i.get(k, "") for i in ids_b}
        if len(va) == 1 and len(vb) == 1 and va != vb:
            differ[k] = (va.pop(), vb.pop())
    a["_point"] = [identity_hash({k: v for k, v in i.items() if k not in differ}) for i in ids_a]
    b["_point"] = [identity_hash({k: v for k, v in i.items() if k not in differ}) for i in ids_b]
    for df, side in ((a, "A"), (b, "B")):
        twice = df["_point"].duplicated(keep=False)
        if twice.any():  # load() keeps the newest record of a point: these differ in a way
            raise CompareError(
                f"sweep {side}: {int(twice.sum())} records are the same point "
                "once the ignored keys are left out; --ignore less"
            )
    on = [
        k
        for k in SWEPT_KEYS
        if k in a and k in b and k not in ignore and k not in {short(d) for d in differ}
    ]
    for df in (a, b):
        for k in on:
            df[k] = df[k].map(text)
    extra = []  # config paths that vary among A's points in a way no point key shows
    for path in sorted({k for i in ids_a for k in i} - set(differ)):
        values = pd.Series([i.get(path, "") for i in ids_a], index=a.index)
        name = short(path)
        if values.nunique() > 1 and name not in a and not _shown(values, a[on]):
            a[name] = values
            extra.append(name)
    metrics = [m for m, _, _ in METRICS]
    sides = []
    for df, tag in ((a, "a"), (b, "b")):
        df = df.assign(
            _units=[repeat_units(r) for r in df.to_dict("records")],
            _e2e=df["workload"].astype(str).eq("e2e"),
        )
        cols = {m: f"{m}_{tag}" for m in metrics + ["_units", "_e2e"] + WHERE if m in df}
        keep = ["_point"] + (on + extra if tag == "a" else [])
        sides.append(df[keep + list(cols)].rename(columns=cols))
    joined = sides[0].merge(sides[1], on="_point", how="inner").drop(columns="_point")
    for m in metrics:
        ma, mb = f"{m}_a", f"{m}_b"
        if ma in joined and mb in joined:
            va = pd.to_numeric(joined[ma], errors="coerce")
            vb = pd.to_numeric(joined[mb], errors="coerce")
            joined[f"{m}_ratio"] = (vb / va).where((va > 0) & (vb > 0))
    # the latency B/A a point is judged by: e2e's median pass total (a pass repeats the same
    # stream; the per-batch median is one middle batch), else the median
    e2e = (
        joined["_e2e_a"].astype(bool)
        & joined.get("total_ms_ratio", pd.Series(np.nan, index=joined.index)).notna()
    )
    joined["ratio"] = (
        joined["total_ms_ratio"].where(e2e, joined["median_ms_ratio"])
        if "total_ms_ratio" in joined
        else joined["median_ms_ratio"]
    )
    joined["ratio_of"] = np.where(e2e, "pass total", "median")
    stats = [repeat_ratio(b, a) for a, b in zip(joined["_units_a"], joined["_units_b"])]
    for i, c in enumerate(REPEAT_COLUMNS):
        joined[c] = [row[i] for row in stats]
    # judged by the median repeat pair's ratio where there are samples: the one the interval is of
    joined["ratio"] = pd.to_numeric(joined["pair_ratio"], errors="coerce").fillna(joined["ratio"])
    joined = joined.drop(columns=["_units_a", "_units_b", "_e2e_a", "_e2e_b", "pair_ratio"])
    joined["agrees"], joined["why_not"] = (
        zip(*(agreement(r) for _, r in joined.iterrows())) if len(joined) else ([], [])
    )
    joined.attrs["only_a"] = len(sides[0]) - len(joined)
    joined.attrs["only_b"] = len(sides[1]) - len(joined)
    joined.attrs["missing_in_b"] = joined.attrs["only_a"]  # what --fail-above cannot clear
    return joined, on + extra, {short(k): v for k, v in differ.items()}


def _shown(values: pd.Series, keys: pd.DataFrame) -> bool:
    """Whether one point key takes exactly the same partition of the points as `values` (a
    kernel group's own settings follow kernel=triton; workload.mode is the mode column)."""
    for k in keys:
        pairs = pd.DataFrame({"v": values, "k": keys[k]}).drop_duplicates()
        if len(pairs) == values.nunique() == keys[k].nunique():
            return True
    return False


def _true(v) -> bool:
    return v is True or str(v).lower() == "true"


def _known(v) -> bool:
    return v is not None and v == v and str(v) not in ("", "nan", "None")


def _other_gpu(r) -> bool:
    """Whether the records name two different cards for A and B (a sweep on all GPUs of a host
    puts a point on whichever card is free)."""
    ua, ub = r.get("gpu_uuid_a"), r.get("gpu_uuid_b")
    return _known(ua) and _known(ub) and ua != ub


def _other_gpu_note(rows: pd.DataFrame, of: str = "them") -> str:
    moved = sum(1 for _, r in rows.iterrows() if _other_gpu(r))
    return (
        (
            f"; {moved} of {of} ran on another GPU in B than in A (cards of one kind differ: "
            "rerun both on one card before calling it a regression)"
        )
        if moved
        else ""
    )


def agreement(r) -> tuple:
    """(whether B/A's 95 % interval holds 1, what the records say about a difference).

    The interval covers the sampling noise within each run, not what differs between runs: a
    second card of the same kind (BENCHMARKS, "card to card"), a second boot, a throttled or
    invalid point. Where the records
    name such a cause, `why_not` says it; where they name none, the difference is the code's
    or the settings'."""
    lo, hi = r.get("ci_low"), r.get("ci_high")
    if lo is None or lo != lo:
        return None, "no samples"
    if lo <= 1.0 <= hi:
        return True, ""
    why = []
    ua, ub = r.get("gpu_uuid_a"), r.get("gpu_uuid_b")
    ba, bb = r.get("boot_id_a"), r.get("boot_id_b")
    if _other_gpu(r):
        why.append("another GPU")
    elif _known(ba) and _known(bb) and ba != bb:
        why.append("another boot")
    elif not (_known(ua) and _known(ub)) and not (_known(ba) and _known(bb)):
        why.append("machine not recorded")
    for side in ("a", "b"):
        if _true(r.get(f"throttled_{side}")):
            why.append(f"throttled in {side.upper()}")
        elif str(r.get(f"valid_{side}")).lower() == "false":
            why.append(f"invalid in {side.upper()}")
    return False, ", ".join(why) or "same GPU and boot: a real difference"


def agreement_line(joined: pd.DataFrame) -> str:
    """How many points agree within their intervals, and why the others may not."""
    known = joined["agrees"].dropna() if "agrees" in joined else pd.Series(dtype=object)
    if known.empty:
        return "agreement: no samples, no intervals"
    n_ok = int(known.astype(bool).sum())
    causes: dict = {}
    for why in joined.loc[known.index[~known.astype(bool)], "why_not"]:
        for cause in str(why).split(", "):
            causes[cause] = causes.get(cause, 0) + 1
    rest = "; ".join(f"{n} {c}" for c, n in sorted(causes.items(), key=lambda kv: -kv[1]))
    return f"agreement: {n_ok} of {len(known)} points with B/A's 95% interval holding 1" + (
        f"; the others: {rest} (the intervals cover noise within a run, not between "
        "cards, boots or clocks)"
        if rest
        else ""
    )


def geomean(series: pd.Series) -> float:
    x = pd.to_numeric(series, errors="coerce").dropna()
    x = x[x > 0]
    return float(np.exp(np.log(x).mean())) if len(x) else float("nan")


def flag(joined: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Adds `worse_<metric>` booleans and `regression` (any metric worse than the threshold)."""
    out = joined.copy()
    worse = []
    for m, _, larger_worse in METRICS:
        r = f"{m}_ratio"
        if r not in out:
            continue
        bad = out[r] > threshold if larger_worse else out[r] < 1 / threshold
        out[f"worse_{m}"] = bad.fillna(False)
        worse.append(f"worse_{m}")
    out["regression"] = out[worse].any(axis=1) if worse else False
    return out


def _fmt_ms(v) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def _fmt_ratio(v, bad: bool) -> str:
    return "-" if v is None or v != v else f"{v:.3f}" + ("!" if bad else " ")


def _fmt_agrees(agrees, why) -> str:
    if agrees is None or agrees != agrees:
        return "-"
    return "yes" if agrees else f"no: {why}"


def _fmt_ci(lo, hi) -> str:
    return "-" if lo is None or lo != lo else f"{lo:.3f}-{hi:.3f}"


def _fmt_spread(r) -> str:
    """'0.981-1.020 (3)': the lowest and highest B/A of the repeat pairs; DISAGREE where the
    pairs' own intervals do not overlap."""
    n = r.get("repeats")
    if n is None or n != n or int(n) < 2:
        return "-"
    return f"{r['spread_low']:.3f}-{r['spread_high']:.3f} ({int(n)})" + (
        " DISAGREE" if str(r.get("repeats_agree")).lower() == "false" else ""
    )


def format_table(joined: pd.DataFrame, on: list, *, threshold: float, name_a: str, name_b: str) -> str:
    """One row per joined point: the keys that vary, A and B median, B/A ratios; then the
    geometric means."""
    shown = [k for k in on if joined[k].nunique() > 1] or on[:1]
    metrics = [
        (m, s, w) for m, s, w in METRICS if f"{m}_ratio" in joined and joined[f"{m}_ratio"].notna().any()
    ]
    with_ci = joined["ci_low"].notna().any() if "ci_low" in joined else False
    # the spread between repeats, where a point ran several (workload.repeats)
    with_spread = with_ci and (pd.to_numeric(joined["repeats"], errors="coerce") > 1).any()
    head = (
        [_SHORT.get(k, k) for k in shown]
        + ["A median ms", "B median ms"]
        + [f"{s} B/A" for _, s, _ in metrics]
        + (["latency B/A 95% CI", "within CI"] if with_ci else [])
        + (["B/A between repeats"] if with_spread else [])
        + ["worse"]
    )
    rows = [head]
    for _, r in joined.iterrows():
        rows.append(
            [str(r[k]) or "-" for k in shown]
            + [_fmt_ms(r.get("median_ms_a")), _fmt_ms(r.get("median_ms_b"))]
            + [_fmt_ratio(r[f"{m}_ratio"], bool(r.get(f"worse_{m}", False))) for m, _, _ in metrics]
            + (
                [_fmt_ci(r["ci_low"], r["ci_high"]), _fmt_agrees(r.get("agrees"), r.get("why_not"))]
                if with_ci
                else []
            )
            + ([_fmt_spread(r)] if with_spread else [])
            + [" ".join(s for m, s, _ in metrics if r.get(f"worse_{m}", False))]
        )
    gm = (
        ["geomean"]
        + [""] * (len(shown) + 1)
        + [_fmt_ratio(geomean(joined[f"{m}_ratio"]), False) for m, _, _ in metrics]
        + (["", ""] if with_ci else [])
        + ([""] if with_spread else [])
        + [""]
    )
    widths = [max(len(row[i]) for row in rows + [gm]) for i in range(len(head))]

    def line(row):
        return "  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip()

    out = [
        f"B/A: A = {name_a}, B = {name_b}; '!' = worse than {threshold:g}x "
        "(latency, memory: higher; floor fraction: lower)"
    ]
    out += [line(rows[0]), line(["-" * w for w in widths])] + [line(r) for r in rows[1:]]
    out += [line(["-" * w for w in widths]), line(gm)]
    n_reg = int(joined["regression"].sum())
    out.append(
        f"{len(joined)} points joined, {n_reg} flagged"
        f" ({joined.attrs.get('only_a', 0)} only in A, "
        f"{joined.attrs.get('only_b', 0)} only in B)"
    )
    if with_ci:
        out.append(agreement_line(joined))
    return "\n".join(out)


def draw(joined: pd.DataFrame, path: Path, *, threshold: float, name_a: str, name_b: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as mticker
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    a, b = joined["median_ms_a"].astype(float), joined["median_ms_b"].astype(float)
    slower = joined.get("worse_median_ms", pd.Series(False, index=joined.index))
    ax1.scatter(a[~slower], b[~slower], s=22, alpha=0.85, color="tab:blue", label="within")
    ax1.scatter(
        a[slower], b[slower], s=22, alpha=0.85, color="tab:red", label=f"slower than {threshold:g}x"
    )
    lo, hi = float(min(a.min(), b.min())) * 0.8, float(max(a.max(), b.max())) * 1.25
    xs = np.array([lo, hi])
    ax1.plot(xs, xs, color="grey", lw=0.8, label="B = A")
    ax1.plot(xs, xs * threshold, color="tab:red", lw=0.8, ls="--", label=f"B = {threshold:g} A")
    ax1.set(
        xscale="log",
        yscale="log",
        xlim=(lo, hi),
        ylim=(lo, hi),
        xlabel="A median (ms)",
        ylabel="B median (ms)",
        title="median latency per point",
    )
    ax1.legend(loc="upper left")

    shown = [
        (m, short)
        for m, short, _ in METRICS
        if f"{m}_ratio" in joined and joined[f"{m}_ratio"].notna().any()
    ]
    for i, (m, _short) in enumerate(shown):
        ratio = joined[f"{m}_ratio"].astype(float)
        worse = joined.get(f"worse_{m}", pd.Series(False, index=joined.index)).astype(bool)
        xs = i + np.linspace(-0.25, 0.25, len(ratio)) if len(ratio) > 1 else np.full(1, i)
        if m in ("median_ms", "total_ms") and "ci_low" in joined:
            # the latency ratio's 95 % bootstrap interval: what --fail-above gates on (e2e: of
            # the pass totals, on the pass strip)
            lo = joined["ci_low"].astype(float)
            hi = joined["ci_high"].astype(float)
            judged = joined["ratio_of"].eq("pass total" if m == "total_ms" else "median")
            has = (lo.notna() & judged).to_numpy()
            ax2.errorbar(
                xs[has],
                ratio[has],
                yerr=[(ratio - lo)[has].clip(lower=0), (hi - ratio)[has].clip(lower=0)],
                fmt="none",
                ecolor="grey",
                lw=0.8,
                capsize=2,
            )
        ax2.scatter(xs[~worse.to_numpy()], ratio[~worse], s=16, color="tab:blue", alpha=0.8)
        ax2.scatter(xs[worse.to_numpy()], ratio[worse], s=16, color="tab:red", alpha=0.8)
        g = geomean(ratio)
        ax2.plot([i - 0.35, i + 0.35], [g, g], color="black", lw=2)
        ax2.annotate(f"{g:.3f}", (i + 0.37, g), va="center", fontsize=8)
    ax2.set_xticks(range(len(shown)), [short for _, short in shown])
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_yscale("log")
    ax2.set(
        ylabel="B / A (bar: geometric mean)",
        xlabel="",
        title="B / A per point (red: worse than the threshold; whiskers: 95% CI)",
    )
    for ax, axis in ((ax1, "x"), (ax1, "y"), (ax2, "y")):
        ticks = getattr(ax, f"{axis}axis")
        ticks.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ticks.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ticks.set_minor_formatter(mticker.NullFormatter())
    fig.suptitle(f"A = {name_a}   B = {name_b}   ({len(joined)} points)", y=1.02)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    except FileExistsError as exc:
        raise FileWriteError(path.parent, exc) from exc
    finally:
        plt.close(fig)
    return path


def compare(path_a, path_b, *, threshold: float = 1.05, ignore=()) -> tuple[pd.DataFrame, list, dict]:
    joined, on, differ = join(load_sweep(path_a), load_sweep(path_b), ignore=ignore)
    if joined.empty:
        raise CompareError(
            "no point of A matches a point of B on the swept keys "
            f"({', '.join(on)}); --ignore KEY leaves a key out of the join"
        )
    return flag(joined, threshold), on, differ


def _name(path: Path) -> str:
    path = Path(path).resolve()
    if not path.is_file():
        return path.name
    return path.parent.name if path.stem == "results" else f"{path.parent.name}/{path.stem}"


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line and exit 2 (argparse prints the usage too); the report
    scripts use it as well."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(
        prog="hstu-exp-compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("sweep_a", type=Path, help="baseline: sweep dir, results.csv or results.jsonl")
    p.add_argument("sweep_b", type=Path, help="candidate: sweep dir, results.csv or results.jsonl")
    p.add_argument(
        "--threshold",
        type=float,
        default=1.05,
        help="flag a point whose ratio is worse than this (default 1.05)",
    )
    p.add_argument(
        "--fail-above",
        type=float,
        default=None,
        metavar="R",
        help="exit 1 when a point's median latency B/A is above R with confidence: "
        "the lower end of its 95%% bootstrap interval is above R (the point "
        "estimate when the sweeps hold no samples)",
    )
    p.add_argument(
        "--gate",
        choices=("any", "geomean"),
        default="any",
        help="what --fail-above looks at: any point's interval (default) or the "
        "geometric mean of the point estimates",
    )
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="KEY",
        help="leave a swept key out of the join (repeatable)",
    )
    p.add_argument(
        "--figure",
        type=Path,
        default=None,
        help="where to write the figure (default SWEEP_B/figures/compare_vs_<A>.png)",
    )
    p.add_argument("--no-figure", action="store_true", help="do not draw the figure")
    p.add_argument("--csv", type=Path, default=None, help="also write the joined table here")
    return p.parse_args(argv)


def _gate(joined: pd.DataFrame, on: list, limit: float, how: str) -> tuple[bool, str]:
    """(failed, what): the --fail-above verdict and the line that says why. A point of A that
    B did not measure (failed, skipped or never run) fails the gate: it cannot be shown not to
    be slower."""
    missing = joined.attrs.get("missing_in_b", 0)
    lacking = (
        (f"{missing} point(s) ok in A have no ok record in B (failed, skipped or never run)")
        if missing
        else ""
    )
    if joined.empty:
        return True, lacking or "no point joined"
    ratios = joined["ratio"]
    if how == "geomean":
        value = geomean(ratios)
        what = f"geometric mean of median latency B/A {value:.3f} (point estimate)" + _other_gpu_note(
            joined, of="the points"
        )
        failed = value > limit
        return failed or bool(missing), "; ".join(
            w for w in (what if failed else "", lacking) if w
        ) or what
    low = joined["ci_low"]
    # the interval's lower end where there are samples, else the point estimate
    evidence = low.where(low.notna(), ratios)
    above = evidence > limit
    worst = joined.loc[evidence.fillna(0).idxmax()]
    where = ", ".join(f"{_SHORT.get(k, k)}={worst[k] or '-'}" for k in on if joined[k].nunique() > 1)
    basis = (
        "95% interval's lower end"
        if low.notna().all()
        else (
            "point estimate (no samples)"
            if low.isna().all()
            else "95% interval's lower end, or the point estimate where there are no samples"
        )
    )
    flagged = joined[above]
    invalid = sum(
        1
        for _, r in flagged.iterrows()
        if any(str(r.get(f"valid_{s}")).lower() == "false" for s in "ab")
    )
    what = (
        f"{int(above.sum())} point(s) with median latency B/A above {limit:g} by the "
        f"{basis} (worst {worst['ratio']:.3f}"
        + ("" if pd.isna(worst["ci_low"]) else f", 95% CI {worst['ci_low']:.3f}-{worst['ci_high']:.3f}")
        + (f" at {where})" if where else ")")
        + (
            "; e2e points by their median pass total"
            if joined["ratio_of"].eq("pass total").any()
            else ""
        )
        + (f"; {invalid} of them invalid in A or B (noise, not a verdict)" if invalid else "")
        + _other_gpu_note(flagged)
    )
    if above.any():
        return True, "; ".join(w for w in (what, lacking) if w)
    return bool(missing), lacking or what


def _write_csv(joined: pd.DataFrame, path: Path) -> None:
    table = joined.drop(columns=[c for c in joined if c.startswith("samples_ms")])
    write_atomically(path, lambda tmp: table.to_csv(tmp, index=False))


def _bad_number(args) -> str:
    """'' or why --threshold / --fail-above cannot be used (nan would turn the gate off)."""
    for flag, value in (("--threshold", args.threshold), ("--fail-above", args.fail_above)):
        if value is not None and not (math.isfinite(value) and value > 0):
            return f"{flag} {value:g}: must be a positive finite ratio"
    return ""


def main(argv=None) -> int:
    args = parse_args(argv)
    if _bad_number(args):
        print(f"hstu-exp-compare: error: {_bad_number(args)}", file=sys.stderr)
        return 2
    name_a, name_b = _name(args.sweep_a), _name(args.sweep_b)
    if name_a == name_b:
        name_a, name_b = f"A:{name_a}", f"B:{name_b}"
    try:
        joined, on, differ = compare(
            args.sweep_a, args.sweep_b, threshold=args.threshold, ignore=args.ignore
        )
    except CompareError as exc:
        print(f"hstu-exp-compare: error: {exc}", file=sys.stderr)
        return 2
    if differ:
        print(
            "joined ignoring keys that differ between the sweeps: "
            + ", ".join(f"{k} ({va or '-'} -> {vb or '-'})" for k, (va, vb) in differ.items())
        )
    print(format_table(joined, on, threshold=args.threshold, name_a=name_a, name_b=name_b))
    try:
        if args.csv:
            _write_csv(joined, args.csv)
            print(f"table: {args.csv}")
        if not args.no_figure:
            figure = args.figure
            if figure is None:
                base = args.sweep_b if args.sweep_b.is_dir() else args.sweep_b.parent
                figure = base / "figures" / f"compare_vs_{_name(args.sweep_a).replace('/', '_')}.png"
            draw(joined, figure, threshold=args.threshold, name_a=name_a, name_b=name_b)
            print(f"figure: {figure}")
    except FileWriteError as exc:
        print(f"hstu-exp-compare: error: cannot write {exc.path}: {exc.reason}", file=sys.stderr)
        return 2
    if args.fail_above is not None:
        failed, what = _gate(joined, on, args.fail_above, args.gate)
        if failed:
            print(f"REGRESSION: {what}", file=sys.stderr)
            return 1
        how = "geometric mean" if args.gate == "geomean" else "every point, by its 95% interval"
        print(f"gate passed: median latency B/A not above {args.fail_above:g} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
