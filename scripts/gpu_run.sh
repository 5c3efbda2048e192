#!/usr/bin/env bash
# On the offline GPU test machine: install the carried wheels, then run the given command.
#   scripts/gpu_run.sh python3 -m hstu_exp -m experiment=seed_block logger=none
# (Wheels come from scripts/gpu_wheels.sh into ./.whl; see the README's GPU section.)
set -eo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# Kernels compiled on an earlier machine, where carried (scripts/triton_cache.sh says how).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
scripts/triton_cache.sh unpack
exec "$@"
