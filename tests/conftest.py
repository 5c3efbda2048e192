"""Shared test set-up. On machines without CUDA, Triton kernels run under its interpreter:
the variable must be set before triton is first imported."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory, monkeypatch):
    # Roofline calibration is cached per device; keep tests from touching the user's cache.
    monkeypatch.setenv("HSTU_EXP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hstu-cache"))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
