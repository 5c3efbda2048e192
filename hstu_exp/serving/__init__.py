"""Serving HSTU ranking requests (workload=serve, docs/serving.md). One module per job:

- `path`: the request path, the one thing that runs a batch (lookup, page planning, onload,
  embeddings, block, heads); e2e and serve both call it.
- `population`: who sends requests (users, their histories, candidates) and, for the simulated
  clock, when.
- `sim`: the discrete-event simulator of one server over measured service times (pure Python).
- `stats`: percentiles, SLO early stops, who owns the tail.
- `simulated`: a serve trial on the simulated clock (the simulator driving the request path).

Nothing here imports the benchmark harness (`hstu_exp.bench`); `bench/serve.py` is the workload.
"""
