"""Shared test set-up. On machines without CUDA, Triton kernels run under its interpreter:
the variable must be set before triton is first imported."""

import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_SILENT", "true")


def _cache_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "hstu-cache"


@pytest.fixture(scope="session")
def _calibrated_once(tmp_path_factory):
    """The CPU's float32 peaks measured once a test process and cached where its CLI runs look.
    The tests keep both cores busy, and a calibration under load is never cached (roofline),
    so every point of every sweep would measure them again (~1 s each); the tests of the cache
    rules themselves use their own dirs."""
    import hstu_exp.bench.roofline as roofline

    key = f"{roofline.device_name(torch.device('cpu'))}|{torch.float32}"
    peak = roofline._measure(torch.device("cpu"), torch.float32)
    path = _cache_dir(tmp_path_factory) / "calibration.json"
    roofline._write_cache(path, {key: {**peak, "measured_at": time.time()}})


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory, monkeypatch, _calibrated_once):
    # Roofline calibration is cached per device; keep tests from touching the user's cache.
    monkeypatch.setenv("HSTU_EXP_CACHE_DIR", str(_cache_dir(tmp_path_factory)))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
