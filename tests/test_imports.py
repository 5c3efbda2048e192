"""The layer rule (pyproject's [tool.importlinter] contracts, docs/design.md §8) holds for the
tree, and the check fails when a lower layer imports a higher one."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    """lint-imports over the hstu_exp package found first on PYTHONPATH=tree, with the config of
    ROOT (no cache dir: tests may run side by side)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run(
        [str(LINT), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tree_keeps_its_layers():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_check(tmp_path):
    shutil.copytree(
        ROOT / "hstu_exp", tmp_path / "hstu_exp", ignore=shutil.ignore_patterns("__pycache__")
    )
    kernel = tmp_path / "hstu_exp/ops/fused.py"
    kernel.write_text(kernel.read_text() + "\nfrom hstu_exp.bench import timer  # upward\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0
    assert "hstu_exp.ops.fused -> hstu_exp.bench.timer" in proc.stdout, proc.stdout
