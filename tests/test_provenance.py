"""Provenance per point: versions as strings, git sha and dirty flag, host CPU, and GPU clocks
sampled while timing (NVML); without NVML the clocks are recorded as unavailable, with the
reason, never a crash. Checked against what the machine itself says."""

import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import FAST, ROOT, hstu_exp
from omegaconf import OmegaConf

from hstu_exp.bench.measure import FLOP_CONVENTION, Measured, finish
from hstu_exp.bench.timer import StopRule
from hstu_exp.env import CLOCK_KEYS, ClockSampler, environment
from hstu_exp.tracking.records import ENV_KEYS

VERSIONS = ["cuda", "torch", "triton", "torchrec", "fbgemm", "wandb", "python"]


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def test_environment_says_what_the_machine_says(monkeypatch):
    monkeypatch.delenv("HSTU_EXP_GIT_SHA", raising=False)
    environment.cache_clear()
    try:
        env = environment("cpu")
    finally:
        environment.cache_clear()
    assert set(env) | set(CLOCK_KEYS) == set(ENV_KEYS)
    assert all(env[k] is None or isinstance(env[k], str) for k in VERSIONS)
    assert env["torch"] == str(torch.__version__)
    assert env["wandb"] == importlib.metadata.version("wandb")
    assert env["python"] == platform.python_version()
    assert env["cpu_cores"] == os.cpu_count() and env["cpu_model"]
    assert env["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert env["gpu_uuid"] is None and env["gpu_index"] is None  # a CPU point names no GPU
    assert env["cuda_visible_devices"] == os.environ.get("CUDA_VISIBLE_DEVICES")
    head = git("rev-parse", "--short=12", "HEAD")
    if head:
        assert env["git_sha"] == head
        assert env["git_dirty"] is bool(git("status", "--porcelain", "--untracked-files=no"))


def test_clocks_on_a_cpu_are_unavailable_with_the_reason():
    with ClockSampler(torch.device("cpu")) as clocks:
        torch.ones(100).sum()
    summary = clocks.summary()
    assert set(summary) == set(CLOCK_KEYS)
    assert all(summary[k] is None for k in CLOCK_KEYS if k != "clocks_unavailable")
    assert summary["clocks_unavailable"] == "no NVIDIA GPU (device cpu)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has an NVIDIA GPU")
def test_clocks_without_nvml_are_unavailable_never_a_crash():
    """No NVIDIA driver here: the package is missing, or its library is (NVMLError)."""
    with ClockSampler(torch.device("cuda")) as clocks:
        pass
    summary = clocks.summary()
    assert summary["sm_clock_mhz"] is None and summary["throttled"] is None
    reason = summary["clocks_unavailable"]
    if importlib.util.find_spec("pynvml") is None:
        assert reason.startswith("NVML: ModuleNotFoundError") and "pynvml" in reason
    else:
        assert reason.startswith("NVML: NVMLError"), reason


@pytest.mark.gpu
def test_the_gpu_is_named_by_the_uuid_nvidia_smi_gives():
    environment.cache_clear()
    try:
        env = environment("cuda")
    finally:
        environment.cache_clear()
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid,index", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.splitlines()
    index_of = dict(tuple(part.strip() for part in line.split(",")) for line in smi)
    assert env["gpu_uuid"].startswith("GPU-") and env["gpu_uuid"] in index_of, (env, smi)
    # the host's index (nvidia-smi's), not CUDA's 0 under CUDA_VISIBLE_DEVICES
    assert env["gpu_index"] == int(index_of[env["gpu_uuid"]]), (env, smi)


@pytest.mark.gpu
def test_clocks_are_sampled_while_a_gpu_works():
    if importlib.util.find_spec("pynvml") is None:
        pytest.skip("nvidia-ml-py is not installed")
    a = torch.randn(4096, 4096, device="cuda")
    with ClockSampler(torch.device("cuda"), interval_s=0.02) as clocks:
        for _ in range(200):
            a = a @ a.T / 4096
        torch.cuda.synchronize()
    summary = clocks.summary()
    assert summary["clocks_unavailable"] is None, summary
    assert len(clocks.rows) >= 2
    assert summary["sm_clock_mhz"] > 100 and summary["mem_clock_mhz"] > 100
    assert summary["power_w"] > 1 and 0 < summary["temperature_c"] < 120
    assert isinstance(summary["throttle_reasons"], str)
    assert isinstance(summary["throttled"], bool)


def test_power_cap_is_marked_and_slowdown_is_judged_by_the_measured_clock():
    """SwPowerCap (a card's normal state under load) is recorded, never a reason to call a
    point invalid; a thermal slowdown is one only where the median SM clock while timing sat
    below 90 % of the card's maximum."""
    from hstu_exp.env import clock_summary

    def rows(sm, reasons):
        return [(sm, 2619, 690.0, 70, reasons)] * 5

    capped = clock_summary(rows(1600, 0x4), 1980)
    assert capped["power_capped"] and not capped["throttled"]
    assert capped["sm_clock_mhz"] == 1600 and capped["sm_clock_max_mhz"] == 1980
    hot_but_fast = clock_summary(rows(1950, 0x20), 1980)
    assert not hot_but_fast["throttled"] and hot_but_fast["throttle_reasons"] == "SwThermalSlowdown"
    assert clock_summary(rows(1500, 0x20 | 0x4), 1980)["throttled"]
    assert clock_summary(rows(1950, 0x20), None)["throttled"]  # no maximum: the flag judges


def test_a_point_timed_while_throttled_is_not_valid():
    cfg = OmegaConf.create({"calibrate": False, "profile": False, "verify": False})
    stop = StopRule(iters=3, min_time_s=0.0, max_time_s=1.0, cv_max=0.03, min_samples=3)
    steady = [1.0, 1.01, 0.99, 1.0]
    clocks = {
        "sm_clock_mhz": 1500,
        "sm_clock_max_mhz": 1980,
        "mem_clock_mhz": 2600,
        "power_w": 690.0,
        "temperature_c": 80,
        "throttle_reasons": "SwPowerCap,HwThermalSlowdown",
        "throttled": True,
        "clocks_unavailable": None,
    }
    for throttled in (False, True):
        m = Measured(
            samples_ms=steady,
            flops=2e9,
            nbytes=1e6,
            rule=stop,
            dtype=torch.float32,
            clocks={**clocks, "throttled": throttled},
        )
        r = finish(m, cfg, torch.device("cpu"))
        assert r["valid"] is not throttled
        assert r["invalid_reason"] == (
            "GPU throttled (SwPowerCap,HwThermalSlowdown, SM clock 1500 of 1980 MHz)"
            if throttled
            else None
        )
        assert r["tflops"] == pytest.approx(2e9 / 1.0 / 1e9)  # FLOPs / median ms / 1e9
        assert r["flop_convention"] == FLOP_CONVENTION == "unmasked query-key pairs"


def test_every_cli_record_carries_schema_env_model_timing_and_overrides(tmp_path):
    args = ["logger=none", "model=tiny", "workload.total_history=64", "workload.new_history=8", *FAST]
    proc = hstu_exp(*args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert r["schema_version"] == 3 and r["headline"] == "median_ms"
    assert set(ENV_KEYS) <= set(r)
    assert all(r[k] is None or isinstance(r[k], str) for k in VERSIONS)
    assert isinstance(r["git_dirty"], (bool, type(None))) and r["cpu_cores"] >= 1
    if not torch.cuda.is_available():
        assert r["clocks_unavailable"] == "no NVIDIA GPU (device cpu)"
    dims = {k: r[k] for k in ("num_layers", "hidden", "num_heads", "head_dim", "max_history")}
    assert dims == {
        "num_layers": 2,
        "hidden": 64,
        "num_heads": 2,
        "head_dim": 32,
        "max_history": 512,
    }  # conf/model/tiny.yaml
    timing = {
        k: r[k]
        for k in ("warmup", "iters", "min_time_s", "max_time_s", "cv_max", "min_samples", "input_sets")
    }
    cv_max = 0.03 if r["device"] == "cuda" else 0.25
    assert timing == {
        "warmup": 1,
        "iters": 3,
        "min_time_s": 0.01,
        "max_time_s": 0.05,
        "cv_max": cv_max,
        "min_samples": 10,
        "input_sets": 2,
    }
    assert r["overrides"] == args
