# make run        install into .venv if needed, then run the default experiment (a small sweep)
# make test       install into .venv if needed, then the whole test suite (GPU tests skip without
#                 CUDA; slow ones included), in two workers
# make test-fast  the suite without the tests marked slow (and the GPU ones)
# make test-gpu   the GPU tests only (on a CUDA machine)
# make test-box-triton  the kernels compiled for sm_90a with the GPU box's Triton (3.6), and its
#                 cache carried to a fresh machine (scripts/triton_cache.sh)
# make lint       ruff check + ruff format --check + the import layers (lint-imports)
# make format     rewrite the tree in the format lint checks (ruff format, then the import sort)
.PHONY: run test test-fast test-gpu test-box-triton lint format setup
PY := .venv/bin/python
# One OpenMP thread a test process: two workers already fill two cores. The tests go to the
# workers one by one, but those sharing a fixture of their file go together (tests/conftest.py).
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup
setup:
	@scripts/setup_env.sh
run: setup
	.venv/bin/hstu-exp -m experiment=quick
test: setup
	$(PYTEST)
test-fast: setup
	$(PYTEST) -m "not slow and not gpu"
test-gpu: setup
	$(PY) -m pytest -q -m gpu
test-box-triton: setup
	scripts/box_triton.sh $(PY) -m pytest -q tests/test_kernel_report.py tests/test_triton_cache.py
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports
format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --select I --fix .
