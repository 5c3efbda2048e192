"""Running the real CLI from tests."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = ["workload.warmup=1", "workload.iters=3", "workload.min_time_s=0.01"]


def hstu_exp(*args, cwd=None, timeout=300, env=None):
    """Runs `python -m hstu_exp ARGS`; returns the CompletedProcess (text mode)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "hstu_exp", *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)
