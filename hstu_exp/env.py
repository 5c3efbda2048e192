"""Where a point runs: device resolution and the environment stamped on every record."""
from __future__ import annotations

import functools
import os
import importlib.metadata
import platform
import socket
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _version(package: str):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(*cmd: str):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                              cwd=ROOT).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=None)
def environment(device_type: str) -> dict:
    device = torch.device(device_type)
    driver = None
    if device.type == "cuda":
        driver = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        driver = driver.splitlines()[0] if driver else None
    # A copied tree (a GPU box) may have no .git, or a stale one that names an older commit:
    # the caller's word, when given, wins.
    git_sha, dirty = os.environ.get("HSTU_EXP_GIT_SHA"), None
    if not git_sha:
        git_sha = _run("git", "rev-parse", "--short=12", "HEAD")
        dirty = _run("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "device_name": device_name(device),
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torchrec": _version("torchrec"),
        "fbgemm": _version("fbgemm-gpu") or _version("fbgemm-gpu-cpu"),
        "git_sha": (git_sha + ("-dirty" if dirty else "")) if git_sha else None,
        "hostname": socket.gethostname(),
    }
