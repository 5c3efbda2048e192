"""The real server's start-up warm-up meets every shape a run can meet (needs a GPU: CUDA graphs
cannot be captured, nor the kernels tuned, on a CPU; the enumerations themselves are
test_warm_buckets): with graphs every graph bucket is captured, eager every shape the attention
tunes on is run, and a random stream afterwards captures, tunes and compiles nothing."""

import random

import pytest
import torch
from hydra import compose, initialize_config_dir

from hstu_exp import first_use
from hstu_exp.builders import eager_shapes, forget, model_dtype, shared_server
from hstu_exp.cli import CONF_DIR
from hstu_exp.config import point_problem, validate
from hstu_exp.serving.population import UserSequences, population_for
from hstu_exp.serving.server import WARM_INDEX, RealServer

pytestmark = pytest.mark.gpu


def warmed(overrides, graphed: bool):
    """The tiny model behind a pool too small for every user (misses and returns, short and long
    histories), warmed with one quiet round only: (path, users, population, warm-up record,
    max_batch)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["experiment=serve_smoke", "device=cuda", "cache=paged", "cache.num_pages=48"]
            + overrides,
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
        graphed=graphed,
        device="cuda",
        dtype=model_dtype(m),
        seed=0,
        progress=print,
    )
    users = UserSequences(m, 0)
    shapes = (
        None if graphed else eager_shapes(m, path.manager.cache, max_batch=w.max_batch, device="cuda")
    )
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
    if shapes is not None:
        assert warm["warm_shapes"] == len(shapes.buckets()) > 0 and warm["warm_graphs"] == 0
    return path, users, population, warm, w.max_batch


def serve_random_stream(path, users, population, max_batch: int) -> None:
    """600 batches of 1..max_batch requests; fails on any first-use work."""
    before, rng = first_use.events(), random.Random(2)
    for index in range(600):
        batch, seen = [], set()
        for _ in range(rng.randint(1, max_batch)):
            user, history, cands = population.next()
            if user not in seen:
                seen.add(user)
                batch.append(users.request(user, history, cands, 2 * WARM_INDEX + index))
        served = path.serve(batch)
        torch.cuda.synchronize()
        assert served.logits.shape[0] == sum(r.candidates.numel() for r in batch)
    assert first_use.events() == before, "first-use work after the warm-up"


@pytest.mark.parametrize("fit_rows", [False, True])
@torch.no_grad()
def test_after_the_warm_up_a_random_stream_meets_no_first_use_work(fit_rows):
    overrides = [
        "graph=cudagraph",
        "graph.batch_buckets=[1,2,4]",
        f"graph.fit_rows={str(fit_rows).lower()}",
    ]
    path, users, population, warm, max_batch = warmed(overrides, graphed=True)
    buckets = path.graphs.core.buckets()
    assert warm["warm_graphs"] == len(buckets) == len(path.graphs.core.graphs) > 0
    assert warm["warm_graphs_s"] > 0 and warm["warm_s"] >= warm["warm_graphs_s"]
    serve_random_stream(path, users, population, max_batch)
    assert path.graphs.core.evicted == 0
    used = path.graphs.core.used  # the buckets replayed (the rounds' and the stream's)
    assert used <= {b.name for b in buckets} and len(used) > 1


@torch.no_grad()
def test_after_the_eager_warm_up_a_random_stream_meets_no_first_use_work():
    """Eager, the Triton kernels tuning per shape: no tuning or compile after the warm-up."""
    path, users, population, _, max_batch = warmed(["graph=none", "kernel=triton"], graphed=False)
    serve_random_stream(path, users, population, max_batch)
