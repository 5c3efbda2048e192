"""Where a point runs: device resolution and the environment stamped on every record."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import socket
import statistics
import subprocess
import threading
from pathlib import Path

import torch

from hstu_exp.gpus import CLOCK_KEYS

ROOT = Path(__file__).resolve().parent.parent


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def memory_bytes(device: torch.device) -> int:
    """The device's total memory: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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
        return (
            subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _string(value):
    return None if value is None else str(value)


def _boot_id():
    """This boot of this machine: two records with different boot ids ran on different machine
    starts, even where the hostname is the same (a lent VM is always called `vm`)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _gpu_uuid(device: torch.device):
    """The physical GPU (its UUID), so two runs can tell one card from another."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return None if uuid is None else f"GPU-{uuid}"


def _gpu_index(uuid):
    """The GPU's index on its host (nvidia-smi's numbering), whatever CUDA_VISIBLE_DEVICES made
    of it in this process; None without NVML."""
    if uuid is None:
        return None
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(uuid)))
    except Exception:  # noqa: BLE001 - no NVML, not permitted, a MIG uuid it does not know
        return None


@functools.lru_cache(maxsize=None)
def environment(device_type: str) -> dict:
    """What a point ran on and with. Versions are strings (a CSV reader must not turn CUDA
    "12.10" into the float 12.1); None where a package is missing."""
    device = torch.device(device_type)
    driver = None
    if device.type == "cuda":
        driver = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        driver = driver.splitlines()[0] if driver else None
    # A copied tree (a GPU box) may have no .git, or a stale one that names an older commit:
    # the caller's word, when given, wins (and whether that tree was dirty is then unknown).
    git_sha, dirty = os.environ.get("HSTU_EXP_GIT_SHA"), None
    if not git_sha:
        git_sha = _run("git", "rev-parse", "--short=12", "HEAD")
        if git_sha:
            dirty = bool(_run("git", "status", "--porcelain", "--untracked-files=no"))
    uuid = _gpu_uuid(device)
    return {
        "device_name": device_name(device),
        "driver": driver,
        "cuda": _string(torch.version.cuda),
        "torch": _string(torch.__version__),
        "triton": _version("triton"),
        "torchrec": _version("torchrec"),
        "fbgemm": _version("fbgemm-gpu") or _version("fbgemm-gpu-cpu"),
        "wandb": _version("wandb"),
        "python": platform.python_version(),
        "git_sha": git_sha,
        "git_dirty": dirty,
        "hostname": socket.gethostname(),
        "boot_id": _boot_id(),
        "gpu_uuid": uuid,
        "gpu_index": _gpu_index(uuid),
        # the GPUs this process was given (hydra/launcher=gpus gives each worker one)
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
    }


# NVML clock-event ("throttle") reason bits (nvml.h, nvmlClocksEventReason*).
THROTTLE_REASONS = {
    0x1: "GpuIdle",
    0x2: "ApplicationsClocksSetting",
    0x4: "SwPowerCap",
    0x8: "HwSlowdown",
    0x10: "SyncBoost",
    0x20: "SwThermalSlowdown",
    0x40: "HwThermalSlowdown",
    0x80: "HwPowerBrakeSlowdown",
    0x100: "DisplayClockSetting",
}
# Power capping under sustained load is a card's normal state (every B=8 full-recompute point
# on the H200 runs at it): recorded as power_capped, never a reason to call a point invalid.
POWER_CAP = 0x4
# Thermal and hardware slowdowns are not: with the SM clock measured while timing below
# CLOCK_FLOOR of the card's maximum, the point is throttled (invalid). The flag alone is not
# enough: NVML raises it for single samples whose clock never came down.
SLOWDOWN = 0x8 | 0x20 | 0x40 | 0x80
CLOCK_FLOOR = 0.9


def _nvml_handle(device: torch.device):
    """(pynvml module, handle of the device) or raises with the reason."""
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:  # CUDA and NVML may number the GPUs differently (CUDA_VISIBLE_DEVICES)
        try:
            return pynvml, pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)


class ClockSampler:
    """GPU clocks, power, temperature and throttle reasons sampled by a background thread while
    the `with` block runs (every `interval_s`, and once at each end). Never raises: without
    NVML (no NVIDIA GPU, package missing, not permitted) `summary()` says why, under
    clocks_unavailable, with the values None."""

    def __init__(self, device: torch.device, interval_s: float = 0.05):
        self.device, self.interval_s = torch.device(device), interval_s
        self.rows: list = []
        self.unavailable = None
        self.max_sm = None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.device.type != "cuda":
            self.unavailable = f"no NVIDIA GPU (device {self.device.type})"
            return self
        try:
            self._nvml, self._handle = _nvml_handle(self.device)
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError (no permission), ...
            self.unavailable = f"NVML: {type(exc).__name__}: {exc}".strip()[:200]
            return self
        try:
            self.max_sm = self._nvml.nvmlDeviceGetMaxClockInfo(self._handle, self._nvml.NVML_CLOCK_SM)
        except Exception:  # noqa: BLE001 - then the reason bits alone judge
            self.max_sm = None
        self._sample()
        if self.unavailable:
            return self
        self._thread = threading.Thread(target=self._loop, name="clock-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
        return False

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self):
        nvml, h = self._nvml, self._handle
        try:
            reasons = getattr(
                nvml,
                "nvmlDeviceGetCurrentClocksEventReasons",
                nvml.nvmlDeviceGetCurrentClocksThrottleReasons,
            )(h)
            self.rows.append(
                (
                    nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
                    nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
                    nvml.nvmlDeviceGetPowerUsage(h) / 1e3,
                    nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
                    int(reasons),
                )
            )
        except Exception as exc:  # noqa: BLE001 - a query this GPU does not support
            self.unavailable = f"NVML: {type(exc).__name__}: {exc}".strip()[:200]
            self._stop.set()

    def summary(self) -> dict:
        return clock_summary(self.rows, self.max_sm, self.unavailable)


def clock_summary(rows: list, max_sm, unavailable=None) -> dict:
    """Medians of the (sm, mem, power, temperature, reasons) samples; the reasons seen in any
    sample, by name; power_capped when the power cap held the clock at any time; throttled
    when a thermal or hardware slowdown was seen and the median SM clock sat below CLOCK_FLOOR
    of the card's maximum (without the maximum, the slowdown flag alone)."""
    if not rows:
        return {**{k: None for k in CLOCK_KEYS}, "clocks_unavailable": unavailable or "no sample taken"}
    sm, mem, power, temp, reasons = zip(*rows)
    seen = 0
    for r in reasons:
        seen |= r
    names = [name for bit, name in THROTTLE_REASONS.items() if seen & bit]
    sm_median = statistics.median(sm)
    slow_clock = max_sm is None or sm_median < CLOCK_FLOOR * max_sm
    return {
        "sm_clock_mhz": sm_median,
        "sm_clock_max_mhz": max_sm,
        "mem_clock_mhz": statistics.median(mem),
        "power_w": round(statistics.median(power), 1),
        "temperature_c": statistics.median(temp),
        "throttle_reasons": ",".join(names),
        "power_capped": bool(seen & POWER_CAP),
        "throttled": bool(seen & SLOWDOWN) and slow_clock,
        "clocks_unavailable": unavailable,
    }
