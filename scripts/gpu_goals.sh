#!/usr/bin/env bash
# The sweeps behind the performance goals (docs/design.md §6), on the GPU box after the install
# line of gpu_run.sh. Each part has its own time limit; pick parts so that one call stays under the
# device's 10 minutes (all four do not fit in one call):
#   scripts/gpu_goals.sh OUT_DIR                   # cases + e2e
#   scripts/gpu_goals.sh OUT_DIR block attention   # the seed_block grid + the kernel alone
# Writes one sweep dir per part under OUT_DIR (each with offline W&B runs: `hstu-exp-wandb` is not
# needed for them; `wandb sync` them from a connected machine) and prints the goal table last.
# Limits: the seed_block grid with autotune and a graph capture per point ran past 170 s, the goal
# cases past 70 s (2026-11-28); e2e with four modes times each point until its CV is under 3 %
# or max_time_s, so its limit is the largest.
set -u
out=${1:?usage: scripts/gpu_goals.sh OUT_DIR [block] [cases] [attention] [e2e]}
shift
parts=${*:-cases e2e}
mkdir -p "$out"
run() { local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m hstu_exp -m logger=wandb logger.mode=offline \
    hydra.sweep.dir="$out/$name" "$@" \
    > "$out/$name.log" 2>&1; echo "$name: exit $?"; }
for part in $parts; do
  case $part in
    block) run block_triton_graph 420 experiment=seed_block kernel=triton graph=cudagraph \
             workload.min_time_s=0.2 ;;
    cases) run block_goal_cases 200 experiment=seed_block kernel=reference,triton \
             graph=none,cudagraph workload.min_time_s=0.2 workload.batch_size=1,8 \
             workload.total_history=4096 workload.new_history=128,4096 ;;
    attention) run attention 90 experiment=seed_attention workload.min_time_s=0.2 ;;
    e2e) run e2e 330 experiment=seed_e2e workload.min_time_s=0.5 workload.max_time_s=2 ;;
    *) echo "gpu_goals.sh: unknown part '$part' (block, cases, attention, e2e)" >&2; exit 2 ;;
  esac
done
sweeps=()
for d in block_goal_cases e2e attention; do [ -d "$out/$d" ] && sweeps+=("$out/$d"); done
[ ${#sweeps[@]} -gt 0 ] && python3 scripts/goals.py "${sweeps[@]}"
