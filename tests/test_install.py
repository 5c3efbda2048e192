"""The README's manual install in a clean venv: `pip install torch==2.13.0`, then `pip install .`
(not editable), nothing else. The configs ship inside the package, every runtime dependency is
declared (029de16 used Triton without declaring it: every point failed), a block point runs from
any directory, and the workloads with TorchRec embeddings (e2e, serve) are refused with one line
while torchrec is missing. Installing takes a minute or more: marked slow."""

import json
import os
import subprocess
import sys

import pytest
import tomllib
from helpers import FAST, ROOT

TORCH = "torch==2.13.0"  # the README's CPU install


def test_pyproject_names_every_package_folder():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("hstu_exp", "hydra_plugins")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert folders | {"hstu_exp.conf"} == set(packages)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # --no-compile: no .pyc written ahead for torch's thousands of modules (half of the install's
    # time); Python compiles what the tests import as they import it
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    for step in ([TORCH], [str(ROOT)]):
        proc = subprocess.run(
            pip + step, capture_output=True, text=True, timeout=1200, env=_env(), cwd=root
        )
        if step == [TORCH] and proc.returncode != 0 and "No matching distribution" in proc.stderr:
            pytest.skip(f"no {TORCH} in reach: {proc.stderr.strip().splitlines()[-1]}")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return venv, root


def _env():
    # Without PYTHONDONTWRITEBYTECODE: the first run writes the bytecode of what it imports
    # (installed with --no-compile), so the other runs do not compile torch's modules again.
    unset = ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
    return {k: v for k, v in os.environ.items() if k not in unset}


def run(venv, *args, cwd):
    return subprocess.run(
        [str(venv / "bin" / "hstu-exp"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )


@pytest.mark.slow
def test_installed_package_runs_a_block_point_from_anywhere(installed):
    venv, root = installed
    proc = run(venv, *FAST, "logger=none", f"hydra.run.dir={root / 'run'}", cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads((root / "run" / "results.jsonl").read_text())
    assert record["status"] == "ok" and record["median_ms"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["e2e", "serve"])
def test_installed_package_refuses_embedding_workloads_without_torchrec(installed, workload):
    venv, root = installed
    proc = run(venv, f"workload={workload}", "logger=none", f"hydra.run.dir={root / workload}", cwd=root)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"hstu-exp: error: workload={workload}: needs torchrec and fbgemm-gpu, which are not "
        "installed (scripts/setup_env.sh installs them; see the README's install section)"
    ]
    assert not (root / workload).exists()
