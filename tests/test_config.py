"""Every config composes and validates; bad input gets one line, exit 2 and no traceback."""

from pathlib import Path

import pytest
from helpers import hstu_exp
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hstu_exp.cli import CONF_DIR
from hstu_exp.config import ConfigError, point_problem, validate

GROUPS = ["model", "cache", "kernel", "graph", "workload", "logger"]


def options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"experiment={experiment}", "device=cpu"], return_hydra_config=True
        )
    assert cfg.name == experiment
    validate(cfg)
    if not OmegaConf.select(cfg, "hydra.sweeper.params"):
        # No grid: the experiment is one point (dlrmv3_server / dlrmv3_offline: one LoadGen run
        # each), so that point as composed must be one that runs, not one the sweep skips.
        assert point_problem(cfg) is None, point_problem(cfg)


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    for option in options(group):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"{group}={option}"])
        validate(cfg)
        # the option's own values are what composed (over its schema's defaults)
        written = OmegaConf.load(Path(CONF_DIR) / group / f"{option}.yaml")
        given = {k: v for k, v in OmegaConf.to_container(written).items() if k != "defaults"}
        assert given, option
        assert {k: OmegaConf.to_container(cfg[group])[k] for k in given} == given, option


def test_seed_model_is_the_published_one():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        m = compose("config", overrides=["model=seed"]).model
    assert (m.num_layers, m.hidden, m.num_heads, m.head_dim) == (8, 1024, 4, 256)
    assert (m.max_history, m.max_candidates, m.max_batch, m.dtype) == (4096, 256, 16, "bfloat16")


def test_dlrmv3_model_is_mlperfs_hstu_and_its_sweep_points_run():
    """MLPerf DLRMv3's HSTU shape; every point of its block sweep is a runnable combination."""
    import itertools

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        m = compose("config", overrides=["model=dlrmv3"]).model
        assert (m.num_layers, m.hidden, m.num_heads, m.head_dim) == (5, 512, 4, 128)
        assert (m.max_history, m.max_candidates, m.num_context) == (16384, 2048, 1)
        grid = compose(
            "config", overrides=["experiment=dlrmv3_block"], return_hydra_config=True
        ).hydra.sweeper.params
        axes = {k: str(v).split(",") for k, v in grid.items()}
        for values in itertools.product(*axes.values()):
            cfg = compose(
                "config",
                overrides=["experiment=dlrmv3_block", "device=cpu"]
                + [f"{k}={v}" for k, v in zip(axes, values)],
            )
            assert (cfg.workload.num_candidates, cfg.workload.total_history) == (2048, 1024)
            assert point_problem(cfg) is None, values


@pytest.mark.parametrize(
    "workload,schema",
    [("block", "BlockWorkload"), ("attention", "AttentionWorkload"), ("e2e", "E2EWorkload")],
)
def test_each_workload_has_its_own_schema(workload, schema):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"workload={workload}"])
    assert OmegaConf.get_type(cfg.workload).__name__ == schema
    e2e_only = {"mode", "history_start", "history_step", "num_batches", "num_users"}
    block_only = {"total_history", "new_history", "input_sets"}
    keys = set(cfg.workload)
    assert keys >= {
        "batch_size",
        "num_candidates",
        "warmup",
        "min_time_s",
        "max_time_s",
        "iters",
        "cv_max",
        "min_samples",
    }
    assert (keys & e2e_only, keys & block_only) == (
        (e2e_only, set()) if workload == "e2e" else (set(), block_only)
    )


def test_point_problems_name_the_keys():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["workload.total_history=128", "workload.new_history=256"])
        assert "workload.new_history=256" in point_problem(cfg)
        cfg = compose("config", overrides=["cache=none", "workload.new_history=64"])
        assert "cache=none" in point_problem(cfg)
        cfg = compose("config", overrides=["workload.total_history=256", "workload.new_history=256"])
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
    (["workload.cv_max=-1"], "workload.cv_max=-1: must be positive"),
    (
        ["workload.min_time_s=0.5", "workload.max_time_s=0.1"],
        "workload.max_time_s=0.1: below workload.min_time_s=0.5",
    ),
    (["workload.min_samples=1"], "workload.min_samples=1: must be at least 2"),
    (["-m", "workload.cv_max=0.1,0"], "workload.cv_max=0: must be positive"),
    # per-workload schemas: another workload's key is unknown at composition
    (["workload=block", "workload.history_step=3"], "workload.history_step: unknown key"),
    (["workload=e2e", "workload.total_history=64"], "workload.total_history: unknown key"),
    (
        ["workload=e2e", "workload.mode=turbo"],
        "workload.mode=turbo: must be one of baseline, baseline_graph, cache, cache_graph",
    ),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line(args, needle, tmp_path):
    proc = hstu_exp(
        *args, "logger=none", f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"
    )
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
