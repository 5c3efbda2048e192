"""The real server's start-up warm-up captures every graph bucket a run can meet (needs a GPU:
CUDA graphs cannot be captured on a CPU; the enumeration itself is test_warm_buckets)."""

import random

import pytest
import torch
from hydra import compose, initialize_config_dir

from hstu_exp import first_use
from hstu_exp.builders import forget, model_dtype, shared_server
from hstu_exp.cli import CONF_DIR
from hstu_exp.config import point_problem, validate
from hstu_exp.serving.population import UserSequences, population_for
from hstu_exp.serving.server import WARM_INDEX, RealServer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("fit_rows", [False, True])
@torch.no_grad()
def test_after_the_warm_up_a_random_stream_meets_no_first_use_work(fit_rows):
    """The tiny model, a pool too small for every user (misses and returns, short and long
    histories): after `warm` (graphs captured, then one quiet round only) a stream of random
    batches of 1..max_batch requests captures, tunes and compiles nothing."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=serve_smoke",
                "device=cuda",
                "cache=paged",
                "cache.num_pages=48",
                "graph=cudagraph",
                "graph.batch_buckets=[1,2,4]",
                f"graph.fit_rows={str(fit_rows).lower()}",
            ],
        )
    validate(cfg)
    assert point_problem(cfg) is None
    forget()
    first_use.count_triton_compiles()
    m, w = cfg.model, cfg.workload
    path = shared_server(
        m,
        cfg.cache,
        cfg.graph,
        cfg.kernel,
        cached=True,
        graphed=True,
        device="cuda",
        dtype=model_dtype(m),
        seed=0,
        progress=print,
    )
    users = UserSequences(m, 0)
    server = RealServer(
        path,
        users,
        max_batch=w.max_batch,
        max_wait_s=0.0,
        policy="fifo",
        device="cuda",
        token_buckets=cfg.graph.token_buckets,
        num_context=m.num_context,
    )
    population = population_for(cfg, w.qps, seed=1)
    warm = server.warm(population, cache_requests=0, quiet_rounds=1, max_s=600.0, progress=print)
    buckets = path.graphs.core.buckets()
    assert warm["warm_graphs"] == len(buckets) == len(path.graphs.core.graphs) > 0
    assert warm["warm_graphs_s"] > 0 and warm["warm_s"] >= warm["warm_graphs_s"]

    before, rng = first_use.events(), random.Random(2)
    for index in range(600):
        batch, seen = [], set()
        for _ in range(rng.randint(1, w.max_batch)):
            user, history, cands = population.next()
            if user not in seen:
                seen.add(user)
                batch.append(users.request(user, history, cands, 2 * WARM_INDEX + index))
        served = path.serve(batch)
        torch.cuda.synchronize()
        assert served.logits.shape[0] == sum(r.candidates.numel() for r in batch)
    assert first_use.events() == before, "first-use work after the warm-up"
    assert path.graphs.core.evicted == 0
    used = path.graphs.core.used  # the buckets replayed (the rounds' and the stream's)
    assert used <= {b.name for b in buckets} and len(used) > 1


@torch.no_grad()
def test_after_the_eager_warm_up_a_random_stream_meets_no_first_use_work():
    """Eager (no graphs), the Triton kernels tuning per shape: after `warm` (every shape of
    `eager_shapes` run, then one quiet round only) random batches of 1..max_batch requests of
    returns and misses tune and compile nothing."""
    from hstu_exp.builders import eager_shapes

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=serve_smoke",
                "device=cuda",
                "cache=paged",
                "cache.num_pages=48",
                "graph=none",
                "kernel=triton",
            ],
        )
    validate(cfg)
    forget()
    first_use.count_triton_compiles()
    m, w = cfg.model, cfg.workload
    path = shared_server(
        m,
        cfg.cache,
        cfg.graph,
        cfg.kernel,
        cached=True,
        graphed=False,
        device="cuda",
        dtype=model_dtype(m),
        seed=0,
        progress=print,
    )
    users = UserSequences(m, 0)
    shapes = eager_shapes(m, path.manager.cache, max_batch=w.max_batch, device="cuda")
    server = RealServer(
        path,
        users,
        max_batch=w.max_batch,
        max_wait_s=0.0,
        policy="fifo",
        device="cuda",
        token_buckets=cfg.graph.token_buckets,
        num_context=m.num_context,
        shapes=[shapes],
    )
    population = population_for(cfg, w.qps, seed=1)
    warm = server.warm(population, cache_requests=0, quiet_rounds=1, max_s=600.0, progress=print)
    assert warm["warm_shapes"] == len(shapes.buckets()) > 0 and warm["warm_graphs"] == 0

    before, rng = first_use.events(), random.Random(2)
    for index in range(600):
        batch, seen = [], set()
        for _ in range(rng.randint(1, w.max_batch)):
            user, history, cands = population.next()
            if user not in seen:
                seen.add(user)
                batch.append(users.request(user, history, cands, 2 * WARM_INDEX + index))
        path.serve(batch)
        torch.cuda.synchronize()
    assert first_use.events() == before, "first-use work after the warm-up"
