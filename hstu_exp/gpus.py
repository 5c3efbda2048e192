"""The GPUs of one host, for a sweep that runs one point per GPU at a time (hydra/launcher=gpus).

The launching process lists the GPUs it may use (`visible_gpus`) and keeps `gpus: all | N` of
them (`choose_gpus`). Each worker process then holds one of them for its whole life through a
`GpuLeases` lock file and sets CUDA_VISIBLE_DEVICES to it before CUDA starts: CUDA binds a process
to its devices once, and the OS drops the lock however the worker ends, so a replacement worker
finds that GPU free. The lock files name their holder's pid (the launcher forwards a Ctrl-C to
the workers through them); a `stop` file beside them tells workers not to start further points.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import time
from pathlib import Path

ENV = "CUDA_VISIBLE_DEVICES"
# What a record says of its GPU's clocks while it was timed (env.ClockSampler measures them);
# records, results tables and the W&B sink carry them as environment keys.
CLOCK_KEYS = [
    "sm_clock_mhz",
    "sm_clock_max_mhz",
    "mem_clock_mhz",
    "power_w",
    "temperature_c",
    "throttle_reasons",
    "power_capped",
    "throttled",
    "clocks_unavailable",
]
LAUNCHER = "hydra_plugins.hstu_exp_gpus.gpus_launcher.GpuLauncher"  # conf/hydra/launcher/gpus


class GpuError(ValueError):
    """A `gpus` setting this host cannot satisfy; the message names the key and the value."""


def visible_gpus(environ=os.environ, count=None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (indices, or GPU-/MIG-
    UUIDs): the entries of CUDA_VISIBLE_DEVICES where it is set (even on a host without CUDA,
    which is how the CPU tests stand in two GPUs), else 0 .. count - 1. `count` defaults to
    torch.cuda.device_count(), which starts no CUDA context in this process."""
    given = environ.get(ENV)
    if given is not None:
        return [e.strip() for e in given.split(",") if e.strip()]
    if count is None:
        import torch

        count = torch.cuda.device_count()
    return [str(i) for i in range(count)]


def choose_gpus(visible: list[str], gpus, key: str = "hydra.launcher.gpus") -> list[str]:
    """`gpus: all` keeps every visible GPU, `gpus: N` the first N."""
    where = f" (visible: {','.join(visible)})" if visible else " (CUDA sees no GPU here)"
    if str(gpus).strip().lower() == "all":
        if not visible:
            raise GpuError(f"{key}=all: no GPU to run on{where}")
        return list(visible)
    try:
        n = int(str(gpus))
    except ValueError:
        raise GpuError(f"{key}={gpus}: must be 'all' or a number of GPUs") from None
    if n < 1:
        raise GpuError(f"{key}={gpus}: must be 'all' or a number of GPUs >= 1")
    if n > len(visible):
        raise GpuError(f"{key}={gpus}: only {len(visible)} GPU(s) visible{where}")
    return list(visible[:n])


def gpus_problem(launcher) -> str | None:
    """Why hydra/launcher=gpus cannot run here (its `gpus` asks for more GPUs than are
    visible, ...), or None; None for any other launcher."""
    if launcher is None or launcher.get("_target_") != LAUNCHER:
        return None
    for module, why in (
        (
            "hydra_plugins.hydra_joblib_launcher",
            "needs hydra-joblib-launcher (pip install hydra-joblib-launcher==1.2.0)",
        ),
        (
            "hydra_plugins.hstu_exp_gpus",
            "its Hydra plugin hydra_plugins/"
            "hstu_exp_gpus is not installed (run pip install -e . once more)",
        ),
    ):
        if importlib.util.find_spec(module) is None:
            return f"hydra/launcher=gpus: {why}"
    try:
        choose_gpus(visible_gpus(), launcher.get("gpus"))
    except GpuError as exc:
        return str(exc)
    return None


class GpuLeases:
    """The lock files of one sweep's GPUs under `folder`: `gpu<k>.lock` for the k-th device."""

    def __init__(self, devices: list[str], folder):
        self.devices, self.folder = list(devices), Path(folder)

    def _path(self, k: int) -> Path:
        return self.folder / f"gpu{k}.lock"

    def reset(self) -> None:
        """A new launch into this folder: workers may start points again (a resumed sweep
        finds the stop file of the interrupted one)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "stop").unlink(missing_ok=True)

    def stop(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "stop").touch()

    def stopped(self) -> bool:
        return (self.folder / "stop").exists()

    def claim(self, timeout_s: float = 60.0, poll_s: float = 0.05) -> tuple[int, str, int]:
        """(k, device, fd): the first free device, locked by this process until `fd` closes or
        the process ends. Waits up to `timeout_s` for one (a worker that is being replaced may
        still hold its GPU for a moment); TimeoutError when none frees."""
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        while True:
            for k, device in enumerate(self.devices):
                fd = os.open(self._path(k), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {device}\n".encode(), 0)
                return k, device, fd
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no free GPU among {','.join(self.devices)} after "
                    f"{timeout_s:g} s (each is held by a worker of this sweep)"
                )
            time.sleep(poll_s)

    def holders(self) -> dict[str, int]:
        """device -> pid of the process holding it now (devices nobody holds are left out)."""
        out = {}
        for k, device in enumerate(self.devices):
            path = self._path(k)
            if not path.exists():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: the file names the holder
                text = os.pread(fd, 64, 0).decode(errors="replace").split()
                if text and text[0].isdigit():
                    out[device] = int(text[0])
            finally:
                os.close(fd)  # also drops the shared lock taken on a free file
        return out
