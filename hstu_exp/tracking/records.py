"""One JSON object per sweep point in `<job dir>/results.jsonl`, on disk before anything else.

A record is flat: status (ok | skipped | failed), reason / error, the swept keys (SWEPT_KEYS),
latency stats (median_ms, p10_ms, p90_ms, mean_ms, min_ms, max_ms, iterations, samples_ms),
validity (valid, invalid_reason), roofline, memory, graph bucket, max_rel_error when
verify=true, workload extras, and the environment (ENV_KEYS).

A point killed mid-write leaves a torn last line. The writer starts every record on a fresh line
and moves such a fragment into `results.jsonl.torn` beside the file (evidence is kept, never
deleted); the reader passes over torn lines and counts them. The close-out writes a sweep-level
`results.jsonl` (the newest record of every point) into the sweep dir; readers of a sweep dir
use the job dirs' records when there are any, so the two are never counted twice.
"""

from __future__ import annotations

import ast
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from hstu_exp.gpus import CLOCK_KEYS

RESULTS_FILE = "results.jsonl"
TORN_SUFFIX = ".torn"

# The point keys every record carries (runner.swept_values: what ran, derived from the config):
# what tables and names show, and what identifies a record without a `config` (tracking.identity).
SWEPT_KEYS = [
    "workload",
    "model",
    "dtype",
    "cache",
    "page_size",
    "kernel",
    "graph",
    "mode",
    "batch_size",
    "total_history",
    "new_history",
    "num_candidates",
    "qps",
    "device",
]
ENV_KEYS = [
    "device_name",
    "driver",
    "cuda",
    "torch",
    "triton",
    "torchrec",
    "fbgemm",
    "wandb",
    "python",
    "git_sha",
    "git_dirty",
    "hostname",
    "boot_id",
    "gpu_uuid",
    "gpu_index",
    "cuda_visible_devices",
    "cpu_model",
    "cpu_cores",
    *CLOCK_KEYS,
]
STATS_KEYS = ["median_ms", "p10_ms", "p90_ms", "mean_ms", "min_ms", "max_ms", "iterations"]
# Every record starts with this key (runner builds it first): where a torn fragment and a whole
# record were glued on one line by an older writer, the record after the fragment is recovered.
_RECORD_START = '{"status": '


class RecordWriteError(OSError):
    """A record could not be written; the message is one line naming the path and the cause."""


class FileWriteError(OSError):
    """A close-out file could not be written; the message is `<path>: <cause>`."""

    def __init__(self, path: Path, cause: BaseException):
        self.path = Path(path)
        self.reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        super().__init__(f"{self.path}: {self.reason}")


def _set_torn_fragment_aside(path: Path) -> None:
    """When the file does not end with a newline, its last line is a fragment of a record that
    was being written when the process died: append it to `<path>.torn` and cut it off."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        try:  # a whole record that only lost its newline stays where it is
            json.loads(data[keep:])
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
            return
        except ValueError:
            pass
        with open(str(path) + TORN_SUFFIX, "ab") as torn:
            torn.write(data[keep:] + b"\n")
            torn.flush()
            os.fsync(torn.fileno())
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def append_record(job_dir: Path, record: dict) -> Path:
    """Append one record, durable (fsync) and on a line of its own; RecordWriteError when it
    cannot be written."""
    path = Path(job_dir) / RESULTS_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            _set_torn_fragment_aside(path)
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise RecordWriteError(f"cannot write the record to {path}: {reason}") from exc
    return path


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """write(tmp) fills a temporary file beside `path`, which then replaces `path` in one rename:
    a reader sees the old file or the new one, never half a file. FileWriteError names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, ValueError, RuntimeError) as exc:  # a full disk surfaces from savefig too
        raise FileWriteError(path, exc) from exc
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    return path


@dataclass
class Scan:
    """What reading the records of a dir found."""

    records: list = field(default_factory=list)
    torn: int = 0  # unreadable lines passed over in results.jsonl files
    malformed: int = 0  # whole JSON lines that are not a record (hand edits, other tools)
    set_aside: int = 0  # fragments kept in results.jsonl.torn files by earlier writes

    def torn_note(self) -> str:
        """One line when anything was torn, else ''."""
        parts = []
        if self.torn:
            parts.append(f"passed over {self.torn} torn line(s) in {RESULTS_FILE}")
        if self.malformed:
            parts.append(f"passed over {self.malformed} malformed record(s) in {RESULTS_FILE}")
        if self.set_aside:
            parts.append(
                f"{self.set_aside} torn fragment(s) from interrupted writes kept in "
                f"{RESULTS_FILE}{TORN_SUFFIX}"
            )
        return "; ".join(parts)


def record_files(root: Path) -> list:
    """The results.jsonl files under root, in path order. A file whose dir has job dirs with
    records below it is a sweep-level copy made by the close-out: it is left out then.
    `root` may also be one results.jsonl file."""
    if Path(root).is_file():
        return [Path(root)]
    paths = sorted(p for p in Path(root).rglob(RESULTS_FILE) if p.is_file())
    dirs = {p.parent for p in paths}
    return [p for p in paths if not any(p.parent in d.parents for d in dirs)]


def _parse_line(line: str):
    """(record or None, torn?)"""
    try:
        return json.loads(line), False
    except json.JSONDecodeError:
        start = line.rfind(_RECORD_START)
        if start > 0:
            try:
                return json.loads(line[start:]), True
            except json.JSONDecodeError:
                pass
        return None, True


STATUSES = ("ok", "skipped", "failed")
# Numbers every reader computes with: a record where one is text (a hand edit) is malformed.
_NUMERIC_KEYS = STATS_KEYS + ["p99_ms", "cv", "wall_s", "floor_fraction", "max_rel_error"]


def well_formed(record) -> bool:
    """What every reader may assume of a record: an object with a status, numbers where numbers
    go, and an ok record's median."""
    if not isinstance(record, dict) or record.get("status") not in STATUSES:
        return False
    if any(
        not (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
        for v in (record.get(k) for k in _NUMERIC_KEYS)
    ):
        return False
    return record["status"] != "ok" or isinstance(record.get("median_ms"), (int, float))


def scan_records(root: Path) -> Scan:
    """Every record under `root` (a job dir, a whole sweep dir or one results.jsonl), in path
    order, and the count of torn lines passed over."""
    scan = Scan()
    for path in record_files(root):
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            record, torn = _parse_line(line)
            scan.torn += torn
            if record is not None and not well_formed(record):
                scan.malformed += 1
            elif record is not None:
                scan.records.append(record)
        torn_file = Path(str(path) + TORN_SUFFIX)
        if torn_file.is_file():
            scan.set_aside += sum(
                1 for ln in torn_file.read_text(errors="replace").splitlines() if ln.strip()
            )
    return scan


def read_records(root: Path) -> Iterator[dict]:
    """Every record under `root`; torn lines are passed over (scan_records counts them)."""
    yield from scan_records(root).records


def is_missing(v) -> bool:
    """None, NaN or pandas' NA (a records frame has every column, missing ones filled in). While
    pandas is not imported, no value can be its NA."""
    return (
        v is None
        or (isinstance(v, float) and math.isnan(v))
        or v is getattr(sys.modules.get("pandas"), "NA", None)
    )


def point_overrides(value):
    """A record's `overrides` as {key: value}, or None where it has none (older records). In
    results.csv the list is its Python repr; Hydra's +, ++ and ~ prefixes are dropped."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return None
    if not isinstance(value, (list, tuple)):
        return None
    out = {}
    for item in value:
        key, sep, val = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = val
    return out
