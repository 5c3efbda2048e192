#!/usr/bin/env bash
# The sweeps behind the performance goals (DESIGN §6), sized to fit one ~8-minute GPU call.
#   scripts/gpu_goals.sh OUT_DIR [attention]   (on the GPU box, after the install line of gpu_run.sh)
# Writes one sweep dir per experiment under OUT_DIR and prints the goal table last. The attention
# sweep runs only when asked (it is the one that changes least between kernel-neutral commits).
set -u
out=${1:?usage: scripts/gpu_goals.sh OUT_DIR [attention]}
mkdir -p "$out"
run() { local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m hstu_exp -m logger=none hydra.sweep.dir="$out/$name" "$@" \
    > "$out/$name.log" 2>&1; echo "$name: exit $?"; }
run block_triton_graph 170 experiment=seed_block kernel=triton graph=cudagraph workload.min_time_s=0.2
run block_goal_cases 70 experiment=seed_block kernel=reference,triton graph=none,cudagraph \
  workload.min_time_s=0.2 workload.batch_size=1,8 workload.total_history=4096 workload.new_history=128,4096
[ "${2:-}" = attention ] && run attention 60 experiment=seed_attention workload.min_time_s=0.2
run e2e 200 experiment=seed_e2e   # min_time_s 1.0: host-bound baselines are noisy
python3 scripts/goals.py "$out"/block_goal_cases "$out"/e2e $([ -d "$out/attention" ] && echo "$out/attention")
