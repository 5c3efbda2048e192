"""The tests' pre-warmed launcher (tests/zygote.py) stands for a fresh `python -m hstu_exp`: the
same exit code, stdout and stderr, the cwd and environment given, and a timeout that ends it."""

import os
import subprocess

import pytest
from helpers import ROOT, _base_env, _launcher, hstu_exp


@pytest.mark.parametrize(
    "args",
    [["--version"], ["model=nonexistent"], ["workload.batch_size=0", "logger=none"], ["--help"]],
)
def test_a_forked_child_answers_as_a_fresh_start(args):
    forked, fresh = hstu_exp(*args), hstu_exp(*args, fresh=True)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        fresh.returncode,
        fresh.stdout,
        fresh.stderr,
    )


def test_a_forked_child_has_the_cwd_env_and_argv_given(tmp_path):
    # A group file of the user's own, found only through the cwd (a relative search path), and
    # a value read from a variable the launcher's environment lacks.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text((ROOT / "conf" / "model" / "tiny.yaml").read_text())
    args = ["model=mine", "seed=${oc.env:HSTU_EXP_TEST_MARK}", "hydra.searchpath=[file://.]"]
    args += ["--cfg", "job", "--resolve"]
    env = {"HSTU_EXP_TEST_MARK": "4242"}
    forked = hstu_exp(*args, cwd=tmp_path, env=env)
    fresh = hstu_exp(*args, cwd=tmp_path, env=env, fresh=True)
    assert forked.returncode == 0, forked.stderr
    assert "\nseed: 4242\n" in forked.stdout
    assert (forked.stdout, forked.stderr) == (fresh.stdout, fresh.stderr)


def test_a_child_past_its_timeout_is_killed():
    with pytest.raises(subprocess.TimeoutExpired):
        hstu_exp("model=tiny", "logger=none", "workload.min_time_s=60", timeout=3)
    # the launcher still answers after killing one
    assert hstu_exp("--version").returncode == 0


def test_the_launcher_forks_with_one_thread_and_no_torch_op():
    pid = _launcher().proc.pid
    assert len(os.listdir(f"/proc/{pid}/task")) == 1


@pytest.mark.parametrize("test", ["one test", "the next test"])
def test_every_test_forks_its_calls_from_the_launcher(test):
    # The launcher starts in whichever test first calls the CLI; a later test's calls must still
    # fit it (a plain start costs seconds a call).
    assert _launcher().fits(_base_env())
