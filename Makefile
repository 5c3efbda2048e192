# make run    install into .venv if needed, then run the default experiment (a small sweep)
# make test   install into .venv if needed, then run the test suite
.PHONY: run test setup
setup:
	@scripts/setup_env.sh
run: setup
	.venv/bin/hstu-exp -m experiment=quick
test: setup
	.venv/bin/python -m pytest -q
