"""Shared test set-up. On machines without CUDA, Triton kernels run under its interpreter:
the variable must be set before triton is first imported."""

import ast
import functools
import os
import time
from pathlib import Path

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


@functools.cache
def shared_fixture_users(path: Path) -> frozenset:
    """The tests of a test file that use a module- or session-scoped fixture the file defines,
    directly or through its other fixtures (a sweep run once for the file's tests)."""
    funcs = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)]
    args = {f.name: {a.arg for a in f.args.args} for f in funcs}
    shared = {f.name for f in funcs if any(_wide_fixture(d) for d in f.decorator_list)}
    fixtures = {f.name for f in funcs if any("fixture" in ast.unparse(d) for d in f.decorator_list)}
    grew = True
    while grew:
        users = {name for name in fixtures - shared if args[name] & shared}
        shared |= users
        grew = bool(users)
    return frozenset(f.name for f in funcs if f.name.startswith("test") and args[f.name] & shared)


def _wide_fixture(decorator) -> bool:
    return isinstance(decorator, ast.Call) and any(
        k.arg == "scope" and getattr(k.value, "value", None) in ("module", "session")
        for k in decorator.keywords
    )


def work_unit(nodeid: str) -> str:
    """What `make test` hands a worker at once: a test file's tests that share a fixture of
    their file go together (one worker makes that fixture once); any other test goes alone."""
    file, _, name = nodeid.partition("::")
    path = Path(__file__).parent.parent / file
    shared = path.suffix == ".py" and path.exists() and name.split("[")[0] in shared_fixture_users(path)
    return file if shared else nodeid


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup`: the work units of work_unit. xdist's own xdist_group marks do not
    reach its scheduler under pytest 9 (it renames items through an attribute pytest no longer
    reads), so every test went alone and a file's shared fixture was made on both workers, and
    again each time another file's test ran between two of its tests."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return work_unit(nodeid)

    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
