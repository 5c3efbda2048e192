#!/usr/bin/env bash
# The real-clock serving runs of issue 20 (LoadGen driving the real server), on the GPU box after
# the install line of gpu_run.sh. Each part fits one 10-minute device call (limits below leave
# room for start-up); a part cut short is continued by running it again (resume=true skips the
# points already ok in its sweep dir). Pool: cache=paged sized to the card (cache.gpu_fraction of
# the free memory); paged_offload: 16 GiB pool + 32 GiB host tier. Population: 1024 users.
#   scripts/gpu_serve.sh OUT_DIR goal_fifo          # the goal: paged + graphs, FIFO, 3 seeds
#   scripts/gpu_serve.sh OUT_DIR goal_la            # the goal: paged + graphs, length-aware
#   scripts/gpu_serve.sh OUT_DIR paged_eager none_graph offload_graph    # 1 seed each
#   scripts/gpu_serve.sh OUT_DIR dlrmv3_server dlrmv3_offline
#   scripts/gpu_serve.sh OUT_DIR sim_check          # 4 rates x both clocks, then the comparison
# Goal (H200): max QPS at p99 <= 80 ms >= 4000, VALID, busy_fraction >= 0.8 at that rate.
set -u
out=${1:?usage: scripts/gpu_serve.sh OUT_DIR PART...}
shift
mkdir -p "$out"
run() { local name=$1 limit=$2; shift 2
  # SIGTERM at the limit: the point under way is recorded interrupted once LoadGen closes its
  # logs (at most its min_duration_s later); -k makes sure the call ends.
  timeout -k 90 "$limit" python3 -m hstu_exp -m logger=wandb logger.mode=offline resume=true \
    hydra.sweep.dir="$out/$name" "$@" >> "$out/$name.log" 2>&1
  echo "$name: exit $?"; }
for part in "$@"; do
  case $part in
    goal_fifo) run serve_goal 480 experiment=serve_slo cache=paged graph=cudagraph \
                 workload.policy=fifo ;;
    goal_la) run serve_goal 480 experiment=serve_slo cache=paged graph=cudagraph \
               workload.policy=length_aware ;;
    paged_eager) run serve_configs 420 experiment=serve_slo cache=paged graph=none \
                   workload.policy=fifo workload.final_seeds=1 workload.qps=500 ;;
    none_graph) run serve_configs 420 experiment=serve_slo cache=none graph=cudagraph \
                  workload.policy=fifo workload.final_seeds=1 workload.qps=250 ;;
    offload_graph) run serve_configs 420 experiment=serve_slo cache=paged_offload \
                     graph=cudagraph workload.policy=fifo workload.final_seeds=1 \
                     workload.qps=500 cache.num_pages=16384 cache.host_pages=32768 ;;
    dlrmv3_server) run dlrmv3_server 480 experiment=dlrmv3_server workload.final_seeds=1 ;;
    dlrmv3_offline) run dlrmv3_offline 300 experiment=dlrmv3_offline ;;
    sim_check) run serve_sim_check 480 experiment=serve_qps cache=paged graph=cudagraph \
                 workload.clock=real,simulated workload.qps=500,1000,2000,3000
               python3 scripts/serve_sim_check.py "$out/serve_sim_check" ;;
    *) echo "gpu_serve.sh: unknown part '$part' (goal_fifo goal_la paged_eager none_graph" \
            "offload_graph dlrmv3_server dlrmv3_offline sim_check)" >&2; exit 2 ;;
  esac
done
