"""Serving HSTU ranking requests (workload=serve, docs/serving.md). One module per job:

- `path`: the request path, the one thing that runs a batch (lookup, page planning, onload,
  embeddings, block, heads); e2e and serve both call it.
- `batcher`, `worker`, `server`: the real server (a batcher thread with real timers, a pipelined
  worker, start-up warm-up and one LoadGen run); `loadgen_sut`: MLPerf LoadGen's side of it.
- `population`: who sends requests (users, their histories, candidates) and, for the simulated
  clock, when.
- `sim`: the discrete-event simulator of one server over measured service times (pure Python);
  `simulated`: a serve trial on that clock.
- `stats`: percentiles, SLO early stops, who owns the tail; `outcome`: a real run's record keys
  and requests.csv.

Nothing here imports the benchmark harness (`hstu_exp.bench`); `bench/serve.py` is the workload.
"""
