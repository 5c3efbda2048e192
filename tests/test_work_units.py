"""`make test`'s two workers: the tests sharing a fixture of their file run on one worker, which
makes that fixture once (tests/conftest.py's scheduler); the others are spread one by one."""

import os
import re
import subprocess
import sys

from conftest import work_unit
from helpers import ROOT


def test_a_test_of_a_shared_fixture_goes_with_its_file_and_any_other_alone():
    # test_install's `installed` (a wheel in a clean venv) and test_readme_tables' `published`
    # (real LoadGen sweeps) are the costliest fixtures of the suite
    shared = "test_installed_package_refuses_embedding_workloads_without_torchrec[serve]"
    assert work_unit(f"tests/test_install.py::{shared}") == "tests/test_install.py"
    alone = "tests/test_install.py::test_pyproject_names_every_package_folder"
    assert work_unit(alone) == alone
    through_a_fixture = "tests/test_readme_tables.py::test_the_serving_goals_are_judged_on_the_records"
    assert work_unit(through_a_fixture) == "tests/test_readme_tables.py"


# three tests of test_figures.py that share its `block` fixture (drawing no PNG), two that use none
SHARED = ["test_speedup_bars_have_a_one_line_error_bars_labels_and_hatched_invalid"]
SHARED += ["test_heatmap_one_panel_per_mode_one_scale_centred_at_one"]
SHARED += ["test_latency_bars_per_batch_size_one_bar_per_cached_length"]
ALONE = ["test_grouped_bars_give_every_series_its_own_colour"]
ALONE += ["test_e2e_host_device_bars_hold_the_per_batch_times"]


def test_two_workers_run_a_files_shared_fixture_tests_on_one_of_them():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-n", "2", "--dist", "loadgroup"]
        + ["-p", "no:cacheprovider", *(f"tests/test_figures.py::{name}" for name in SHARED + ALONE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    ran = {
        name: worker
        for worker, name in re.findall(
            r"\[(gw\d)\] \[ *\d+%\] PASSED tests/test_figures.py::(\w+)", proc.stdout
        )
    }
    assert sorted(ran) == sorted(SHARED + ALONE), proc.stdout[-3000:]
    assert len({ran[name] for name in SHARED}) == 1, ran  # `block` made once
    assert set(ran.values()) == {"gw0", "gw1"}, ran  # the others went to the other worker
