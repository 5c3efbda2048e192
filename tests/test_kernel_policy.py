"""The kernel policy: the config's kernel knobs reach the kernels as a value (no module globals),
each policy keeps its own tuned table, and a sweep's points choose the same launches whatever
order they run in."""

import json

import pytest
import torch
from helpers import FAST, hstu_exp

from hstu_exp.core.jagged import make_batch
from hstu_exp.ops import kernels
from hstu_exp.ops.policy import KernelPolicy


def test_each_policy_has_its_own_attention_and_equal_policies_share_one():
    a, b = KernelPolicy(split_k=2), KernelPolicy(split_k=2)
    assert kernels("triton", a).attention is kernels("triton", b).attention
    other = kernels("triton", KernelPolicy(split_k=1)).attention
    assert other is not kernels("triton", a).attention
    assert other.tuned is not kernels("triton", a).attention.tuned
    assert kernels("reference", a).attention is None


@pytest.mark.parametrize("bad", [dict(split_k=0), dict(hopper_group=0), dict(tune_timing="wallclock")])
def test_a_policy_refuses_impossible_knobs(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        KernelPolicy(**bad)


def test_forced_splits_reach_the_launch_and_leave_other_policies_alone():
    """Two policies used in turn on one shape: each launch follows its own policy."""
    batch = make_batch([40, 7], [8, 3], "cpu")
    q = torch.randn(47, 1, 16)
    forced, free = (kernels("triton", KernelPolicy(autotune=False, split_k=s)) for s in (3, None))
    for ops, splits in ((forced, 3), (free, 1), (forced, 3)):
        ops.attention_full(q, q, q, batch, alpha=0.25, inv_n=1 / 64)
        assert ops.attention.last_launch["splits"] == splits


def test_config_knobs_are_checked_with_one_line():
    proc = hstu_exp("kernel=triton", "kernel.split_k=0", "device=cpu")
    assert proc.returncode != 0
    assert "hstu-exp: error: kernel.split_k=0: must be positive" in proc.stderr
    assert "Traceback" not in proc.stderr


def _chosen(out, *sweep):
    proc = hstu_exp(
        "-m",
        "workload=attention",
        "model=tiny",
        "kernel=triton",
        "device=cpu",
        "logger=none",  # what is read is results.jsonl (W&B started a run a point)
        *FAST,
        "workload.min_samples=2",
        "workload.total_history=64",
        "workload.num_candidates=8",
        *sweep,
        f"hydra.sweep.dir={out}",
        env={"OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    chosen = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert r["status"] == "ok", r
        point = (r["new_history"], next(o for o in r["overrides"] if o.startswith("kernel.split_k")))
        chosen[point] = (r["attention_tiles"], r["attention_splits"])
    return chosen


@pytest.mark.slow
def test_a_sweep_chooses_the_same_launches_in_either_order(tmp_path):
    """Full and paged points, with and without forced splits, run in one order and then in the
    reverse one: every point records the same tiles and splits, and the forced points split."""
    forward = _chosen(tmp_path / "forward", "workload.new_history=64,16", "kernel.split_k=null,2")
    backward = _chosen(tmp_path / "backward", "workload.new_history=16,64", "kernel.split_k=2,null")
    assert len(forward) == 4 and forward == backward
    assert {splits for (n, k), (_, splits) in forward.items() if k.endswith("=2")} == {2}
    assert {splits for (n, k), (_, splits) in forward.items() if k.endswith("=null")} == {1}


def test_graph_runners_are_keyed_by_what_they_capture():
    """Graphs are reused for the module and cache built from the same config, and never for
    an object the builders did not make (no id() that a new object could take over)."""
    from hydra import compose, initialize_config_dir

    from hstu_exp import builders
    from hstu_exp.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["model=tiny", "cache=paged", "graph=cudagraph"])
    m, f32 = cfg.model, torch.float32

    def graphs(block, cache):
        return builders.shared_graphs(
            block, cache, m, cfg.graph, device="cpu", dtype=f32, progress=print
        )

    kernel = builders.kernel_args(cfg.kernel)
    block = builders.shared_block(m, kernel=kernel, device="cpu", dtype=f32, seed=0)
    cache = builders.shared_cache(m, cfg.cache, device="cpu", dtype=f32)
    first = graphs(block, cache)
    assert graphs(block, cache) is first
    assert builders.shared_block(m, kernel=kernel, device="cpu", dtype=f32, seed=0) is block
    other = builders.shared_block(m, kernel=kernel, device="cpu", dtype=f32, seed=1)
    assert graphs(other, cache) is not first  # another module: other graphs
    with pytest.raises(ValueError, match="not built by hstu_exp.builders"):
        graphs(block, cache)  # the seed-0 block was dropped when the seed-1 one was built
