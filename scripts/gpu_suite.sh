#!/usr/bin/env bash
# The GPU test suite on the GPU box (after the install line of scripts/gpu_run.sh), from the
# repository root: every test marked gpu, plus the kernel test files whose unmarked tests run on
# CUDA when it is there, in three groups side by side (the box has 16 cores; each group takes
# the GPU in turns, which changes no result).
#   scripts/gpu_suite.sh OUT_DIR [LIMIT_S]
# Logs: OUT_DIR/suite_{hopper,kernels,marked}.log; the exit line of each group on stdout.
set -u
out=${1:?usage: scripts/gpu_suite.sh OUT_DIR [LIMIT_S]}
limit=${2:-200}
mkdir -p "$out"
pt=(python3 -m pytest -q -p no:cacheprovider)
group() { local name=$1; shift
  timeout -k 10 "$limit" "${pt[@]}" "$@" > "$out/suite_$name.log" 2>&1
  echo "suite $name: exit $? ($(tail -n 1 "$out/suite_$name.log"))"; }
kernels=(tests/test_triton_attention.py tests/test_fused_ops.py tests/test_block_kernels.py
         tests/test_fp8.py tests/test_fp8_kv.py tests/test_host_path.py)
group hopper tests/test_hopper_attention.py &
group kernels "${kernels[@]}" &
group marked -m gpu tests --ignore=tests/test_hopper_attention.py \
  $(printf -- '--ignore=%s ' "${kernels[@]}") &
wait
