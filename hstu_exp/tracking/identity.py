"""Which records are the same point, and which differ only in a compared key (no torch, no pandas).

A point is its resolved config minus the keys that say where and how a sweep ran (the logger,
Hydra, resume, the sweep's name): `point_config` is what a record keeps under `config`, and
`config_key` hashes it (resume and the W&B ids use that hash). A speedup pairs two records whose
identities agree once the compared key is left out (`identity(record, ignore=("cache",))`);
`hstu-exp-compare` joins two sweeps on the same identity. Nothing here lists the swept keys by
hand: sweeping any knob (graph.fit_rows, workload.user_skew) keeps its points apart.

Records written before the config was recorded (schema 2 and older: the published sweeps) carry
their derived point keys and their own Hydra overrides; their identity is those two together.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Iterable

from hstu_exp.tracking.records import SWEPT_KEYS, point_overrides

# Top-level config keys that do not change what a point measures.
NOT_IDENTITY = ("logger", "hydra", "resume", "name")
# Overrides that say where and how a sweep ran, not what a point measures.
PLUMBING = NOT_IDENTITY + ("experiment",)
# Overrides that pick what a sweep compares (cache / kernel / graph, the serve mode, search and
# policy, the batch, the offered rate): run names and serve labels show them as point keys, so
# a part of their own would only repeat them.
MODE_OVERRIDES = frozenset(
    {
        "cache",
        "cache.mode",
        "kernel",
        "kernel.name",
        "graph",
        "graph.mode",
        "workload.batch_size",
        "workload.max_batch",
        "workload.policy",
        "workload.search",
        "workload.mode",
        "workload.qps",
    }
)
# Overrides a point key already shows (B, T, n, candidates, qps, mode, cache / kernel / graph,
# model, workload, device): names and tables show every other swept override beside them.
POINT_KEY_OVERRIDES = MODE_OVERRIDES | {
    "model",
    "workload",
    "device",
    "workload.total_history",
    "workload.new_history",
    "workload.num_candidates",
}
_GROUPS = ("model", "cache", "kernel", "graph")
_TOP = ("device", "seed", "verify", "calibrate", "profile")
# A point key named in a comparison -> the config paths it stands for.
_PATHS = {
    "page_size": ("cache.page_size",),
    "dtype": ("model.dtype",),
    "workload": ("workload.name",),
    "qps": ("workload.qps",),
    "batch_size": ("workload.batch_size", "workload.max_batch"),
}
_POINT = "point:"  # prefix of the point keys in an identity


def point_config(cfg: dict) -> dict:
    """The resolved config (a plain dict) less NOT_IDENTITY: what the record keeps."""
    return {k: v for k, v in cfg.items() if k not in NOT_IDENTITY}


def config_key(config: dict) -> str:
    """Stable hash of a point_config: resume's and W&B's name for the point."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(tree, prefix: str = "") -> dict:
    """{'cache': {'mode': 'paged'}} -> {'cache.mode': 'paged'}."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, path + "."))
        else:
            out[path] = v
    return out


def paths_of(key: str) -> tuple:
    """The config paths a compared key stands for: 'cache' -> the cache group, 'new_history' ->
    workload.new_history, a dotted path -> itself."""
    if "." in key or key in _TOP:
        return (key,)
    if key in _GROUPS:
        return (key,)
    return _PATHS.get(key, (f"workload.{key}",))


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def text(value) -> str:
    """One spelling per value, whether it came from JSON (None, 32) or a CSV (NaN, 32.0)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # a numpy scalar
        return text(value.item())
    return str(value)


def has_config(record) -> bool:
    return isinstance(record.get("config"), dict) and bool(record.get("config"))


def identity(record, *, ignore: Iterable[str] = (), with_config: bool | None = None) -> dict:
    """What a record measured, as {path: text}, less the compared keys in `ignore` (point keys
    or config paths): its point keys (what ran, derived from the config) and, with its config
    (with_config=None: when the record has one), every config path; without, its overrides."""
    ignore = list(ignore)
    prefixes = [p for k in ignore for p in paths_of(k)] + ignore
    if with_config is None:
        with_config = has_config(record)
    if with_config:
        items = {
            k: v
            for k, v in flatten(record.get("config") or {}).items()
            if k.split(".", 1)[0] not in NOT_IDENTITY
        }
    else:
        items = {
            k: v
            for k, v in (point_overrides(record.get("overrides")) or {}).items()
            if k.split(".", 1)[0] not in PLUMBING
        }
    items.update({_POINT + k: record.get(k) for k in SWEPT_KEYS if k not in ignore})
    return {k: text(v) for k, v in sorted(items.items()) if not _under(k, prefixes)}


def identity_hash(ident: dict) -> str:
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def same_point_key(records: list, *, ignore: Iterable[str] = ()) -> list:
    """One hash per record: equal hashes are the same point once `ignore` is left out. The
    config is used only when every record has one (a sweep of older records, or an old sweep
    beside a new one, is joined on point keys and overrides for all)."""
    with_config = all(has_config(r) for r in records)
    return [identity_hash(identity(r, ignore=ignore, with_config=with_config)) for r in records]


def short(path: str) -> str:
    """A path as a table shows it: point keys bare, config paths by their last part."""
    return path[len(_POINT) :] if path.startswith(_POINT) else path.rsplit(".", 1)[-1]
