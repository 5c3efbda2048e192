"""Every config composes and validates; bad input gets one line, exit 2 and no traceback."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hstu_exp.cli import CONF_DIR
from hstu_exp.config import ConfigError, point_problem, validate
from helpers import hstu_exp

GROUPS = ["model", "cache", "kernel", "graph", "workload", "logger"]


def options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", "device=cpu"],
                      return_hydra_config=True)
    assert cfg.name == experiment
    assert OmegaConf.select(cfg, "hydra.sweeper.params"), "an experiment carries a sweep grid"
    validate(cfg)


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    for option in options(group):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"{group}={option}"])
        validate(cfg)
        assert cfg[group] is not None


def test_seed_model_is_the_published_one():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        m = compose("config", overrides=["model=seed"]).model
    assert (m.num_layers, m.hidden, m.num_heads, m.head_dim) == (8, 1024, 4, 256)
    assert (m.max_history, m.max_candidates, m.max_batch, m.dtype) == (4096, 256, 16, "bfloat16")


def test_point_problems_name_the_keys():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["workload.total_history=128",
                                           "workload.new_history=256"])
        assert "workload.new_history=256" in point_problem(cfg)
        cfg = compose("config", overrides=["cache=none", "workload.new_history=64"])
        assert "cache=none" in point_problem(cfg)
        cfg = compose("config", overrides=["workload.total_history=256",
                                           "workload.new_history=256"])
        assert point_problem(cfg) is None
        with pytest.raises(ConfigError, match="cache.page_size=24"):
            validate(compose("config", overrides=["cache.page_size=24"]))


BAD = [
    (["model=huge"], "model=huge"),
    (["workload.batch_sise=2"], "workload.batch_sise"),
    (["workload.batch_size=abc"], "workload.batch_size"),
    (["workload.batch_size=0"], "workload.batch_size=0"),
    (["model.hidden=-4"], "model.hidden=-4"),
    (["cache.page_size=24"], "cache.page_size=24"),
    (["cache.num_pages=1", "workload.batch_size=2"], "cache.num_pages=1"),
    (["workload.total_history=100000", "workload.new_history=128"], "workload.total_history=100000"),
    (["experiment=nope"], "experiment=nope"),
    (["-m", "workload.batch_size=1,abc"], "workload.batch_size"),
    (["-m", "model=tiny,huge"], "model=huge"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line(args, needle, tmp_path):
    proc = hstu_exp(*args, "logger=none", f"hydra.run.dir={tmp_path}/run",
                    f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hstu-exp: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_cuda_without_gpu_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = hstu_exp("device=cuda", "logger=none", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2 and "device=cuda" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
