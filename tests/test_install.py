"""The README's manual install in a clean venv: `pip install torch==2.13.0`, then `pip install .`
(not editable), nothing else. The configs ship inside the package, every runtime dependency is
declared (029de16 used Triton without declaring it: every point failed), a block point runs from
any directory, and the workloads with TorchRec embeddings (e2e, serve) are refused with one line
while torchrec is missing. Installing takes a minute or more: marked slow."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import tomllib
from clean_install import env, install, wait
from helpers import FAST, ROOT


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
    """The clean venv: made here, or by .ci/run beside its own install (HSTU_EXP_CLEAN_INSTALL
    names the dir; tests/clean_install.py)."""
    made = os.environ.get("HSTU_EXP_CLEAN_INSTALL")
    root = Path(made) if made else tmp_path_factory.mktemp("install")
    outcome, why = wait(root) if made else install(root)
    if outcome == "skipped":
        pytest.skip(why)
    assert outcome == "done", why
    return root / "venv", root


def run(venv, *args, cwd):
    return subprocess.run(
        [str(venv / "bin" / "hstu-exp"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
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
