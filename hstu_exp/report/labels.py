"""Labels of serve points, as the figures, the console and the W&B summary show them: what a serve
sweep compares, in a few characters a point (presentation; the records keep the raw keys)."""

from __future__ import annotations

from hstu_exp.tracking.identity import MODE_OVERRIDES, PLUMBING
from hstu_exp.tracking.records import is_missing, point_overrides

# What labels a serve point (what a serve sweep compares), where the values vary; batch_size
# prints as "B<n>".
SERVE_LABEL_KEYS = ("cache", "kernel", "graph", "mode", "batch_size")


def _text(v) -> str:
    return "-" if is_missing(v) else str(v)


def _serve_label_plan(rows: list):
    """(label keys, override keys, each row's overrides) of serve_labels."""
    keys = [k for k in SERVE_LABEL_KEYS if len({_text(r.get(k)) for r in rows}) > 1] or ["cache"]
    given = [point_overrides(r.get("overrides")) for r in rows]
    # a record without overrides says nothing about them: it would make every key vary
    known = [o for o in given if o is not None]
    extra = sorted(
        k
        for k in {k for o in known for k in o}
        if k not in MODE_OVERRIDES  # told apart by a label key (mode: search, then policy)
        and k.split(".", 1)[0] not in PLUMBING
        and len({o.get(k, "-") for o in known}) > 1
    )
    return keys, extra, given


def serve_labels(rows: list) -> list:
    """One label per serve point (figures and W&B charts, serve/max_qps/<label> summary keys):
    the SERVE_LABEL_KEYS whose values vary across `rows` (the cache alone when none do), then
    "<last key component>=<value>" for every other override that varies, so points that differ
    only there (workload.user_skew=0.5,1.0) stay apart; e.g. 'paged+max_qps-fifo',
    'none+user_skew=0.5'. A missing value prints as "-"."""
    keys, extra, given = _serve_label_plan(rows)
    return [
        "+".join(
            [("B" if k == "batch_size" else "") + _text(r.get(k)) for k in keys]
            + [f"{k.rsplit('.', 1)[-1]}={(o or {}).get(k, '-')}" for k in extra]
        )
        for r, o in zip(rows, given)
    ]


def serve_label_title(rows: list) -> str:
    """What the parts of serve_labels(rows) are, e.g. 'cache+graph+user_skew' (a legend title)."""
    keys, extra, _ = _serve_label_plan(rows)
    return "+".join(keys + [k.rsplit(".", 1)[-1] for k in extra])
