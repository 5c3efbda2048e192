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


def _shares_a_module_fixture(item) -> bool:
    """Whether the test uses a module- or session-scoped fixture of its own file (a sweep run
    once for the file's tests)."""
    module = item.nodeid.split("::")[0]
    return any(
        d.scope in ("module", "session") and d.baseid == module
        for defs in item._fixtureinfo.name2fixturedefs.values()
        for d in defs
    )


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        # `make test` spreads the tests one by one over its workers (--dist loadgroup); those
        # sharing a fixture of their file stay on one worker, which makes that fixture once.
        if _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
