"""The README's manual install into a clean venv, for tests/test_install.py: `pip install
torch==2.13.0`, then `pip install .` (not editable), nothing else.

    python tests/clean_install.py DIR    # DIR/venv; then DIR/done, DIR/skipped or DIR/failed

Installing takes a minute or more of one core, mostly pip unpacking files. `.ci/run` starts this
beside scripts/setup_env.sh (whose pip leaves the second core idle) and names DIR in
HSTU_EXP_CLEAN_INSTALL; the test then waits for that install instead of making its own. The
sources are copied first: pip builds in the tree it is given, and setup_env.sh's editable install
writes in the checkout at the same time.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the README's CPU install
OUTCOMES = ("done", "skipped", "failed")


def env() -> dict:
    # Without PYTHONDONTWRITEBYTECODE: the first run writes the bytecode of what it imports
    # (installed with --no-compile), so the other runs do not compile torch's modules again.
    unset = ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
    return {k: v for k, v in os.environ.items() if k not in unset}


def install(root: Path, python: str = sys.executable) -> tuple[str, str]:
    """Installs into root/venv; (outcome, why): done, skipped (no torch wheel in reach), failed."""
    venv, src = root / "venv", root / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".ci", "build", "*.egg-info", "outputs", "wandb", "__pycache__"
        ),
    )
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    # --no-compile: no .pyc written ahead for torch's thousands of modules (half of the install's
    # time); Python compiles what the tests import as they import it
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    for step in ([TORCH], [str(src)]):
        proc = subprocess.run(
            pip + step, capture_output=True, text=True, timeout=1200, env=env(), cwd=root
        )
        if step == [TORCH] and proc.returncode != 0 and "No matching distribution" in proc.stderr:
            return "skipped", f"no {TORCH} in reach: {proc.stderr.strip().splitlines()[-1]}"
        if proc.returncode != 0:
            return "failed", proc.stdout[-2000:] + proc.stderr[-3000:]
    return "done", ""


def wait(root: Path, timeout_s: float = 1800) -> tuple[str, str]:
    """The outcome of an install another process is making in root (this module's command)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for outcome in OUTCOMES:
            if (root / outcome).is_file():
                return outcome, (root / outcome).read_text()
        time.sleep(1)
    return "failed", f"{root}: no install outcome after {timeout_s:g} s"


if __name__ == "__main__":
    out = Path(sys.argv[1]).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        outcome, why = install(out)
    except Exception as exc:  # noqa: BLE001 - the waiting test says what went wrong
        outcome, why = "failed", f"{type(exc).__name__}: {exc}"
    (out / outcome).write_text(why)
