"""A plain `pip install .` (not editable) into a new venv that already has torch: the configs ship
inside the package, a block point runs from any directory, and the workloads with TorchRec
embeddings (e2e, serve) are refused with one line while torchrec is missing."""
import json
import os
import re
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import FAST, ROOT

# What the new venv borrows from ours: everything but TorchRec and fbgemm, so "torch already
# present, torchrec missing" is the situation under test.
LEFT_OUT = re.compile(r"^(torchrec|fbgemm_gpu|hstu_exp|hstu-exp|__editable__|_hstu_exp)", re.I)


def test_pyproject_names_every_package_folder():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "hstu_exp").rglob("__init__.py")}
    assert folders | {"hstu_exp.conf"} == set(packages)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (borrowed := root / "borrowed").mkdir()
    # Our site-packages and, on a machine that adds packages through PYTHONPATH (the GPU box),
    # those folders too; the new venv then runs without PYTHONPATH.
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
             if p and Path(p).is_dir() and Path(p).resolve() != ROOT]
    for folder in [*site.getsitepackages(), *extra]:
        for entry in Path(folder).iterdir() if Path(folder).is_dir() else []:
            link = borrowed / entry.name
            if not (LEFT_OUT.match(entry.name) or entry.name == "__pycache__" or link.exists()):
                link.symlink_to(entry)
    (new_site,) = (venv / "lib").glob("python*/site-packages")
    (new_site / "borrowed.pth").write_text(f"{borrowed}\n")
    py = venv / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "--no-index", str(ROOT)],
                          capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return venv, root


def _env():
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(venv, *args, cwd):
    return subprocess.run([str(venv / "bin" / "hstu-exp"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=_env())


def test_installed_package_runs_a_block_point_from_anywhere(installed):
    venv, root = installed
    proc = run(venv, *FAST, "logger=none", f"hydra.run.dir={root / 'run'}", cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads((root / "run" / "results.jsonl").read_text())
    assert record["status"] == "ok" and record["median_ms"] > 0


@pytest.mark.parametrize("workload", ["e2e", "serve"])
def test_installed_package_refuses_embedding_workloads_without_torchrec(installed, workload):
    venv, root = installed
    proc = run(venv, f"workload={workload}", "logger=none", f"hydra.run.dir={root / workload}",
               cwd=root)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"hstu-exp: error: workload={workload}: needs torchrec and fbgemm-gpu, which are not "
        "installed (scripts/setup_env.sh installs them; see the README's install section)"]
    assert not (root / workload).exists()
