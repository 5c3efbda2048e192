#!/usr/bin/env bash
# GPU tests of the kernels, graphs and e2e path, then the e2e and attention sweeps (the goal
# experiments), results under $OUT (tarred). On the GPU box (its .git, if any, is stale):
#   SHA=<commit> OUT=<dir> bash scripts/gpu_kernels_check.sh
set -u
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HSTU_EXP_GIT_SHA=${SHA:-}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_graphs_gpu.py \
  tests/test_block_kernels.py tests/test_fused_ops.py tests/test_e2e.py tests/test_staging.py \
  -k "not done_when and not sweep" \
  "tests/test_triton_attention.py::test_gpu_autotune_picks_a_candidate_and_matches" \
  "tests/test_triton_attention.py::test_gpu_cuda_graph_capture" \
  "tests/test_triton_attention.py::test_partial_fp32_hands_over_the_split_sums" > $OUT/tests.log 2>&1
echo "tests exit $?"; grep -E "passed|failed|Error" $OUT/tests.log | tail -6
timeout 170 python3 -m hstu_exp -m logger=none experiment=seed_e2e workload.min_time_s=0.3 \
  hydra.sweep.dir=$OUT/e2e > $OUT/e2e.log 2>&1; echo "e2e exit $?"
timeout 100 python3 -m hstu_exp -m logger=none experiment=seed_attention workload.min_time_s=0.2 \
  hydra.sweep.dir=$OUT/attention > $OUT/attention.log 2>&1; echo "attention exit $?"
python3 scripts/goals.py $OUT/e2e $OUT/attention
cd $OUT && tar czf sweeps.tgz e2e attention && rm -rf e2e attention
