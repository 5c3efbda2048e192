#!/usr/bin/env bash
# The real-clock serving runs of issue 20 (LoadGen driving the real server), on the GPU box after
# the install line of gpu_run.sh. Each part fits one 10-minute device call (limits below leave
# room for start-up); a part cut short is continued by running it again (resume=true skips the
# points already ok in its sweep dir). Pool: cache=paged sized to the card (cache.gpu_fraction of
# the free memory); paged_offload: 16 GiB pool + 32 GiB host tier. Population: 1024 users.
#   scripts/gpu_serve.sh OUT_DIR goal_fifo          # the goal: paged + graphs, FIFO: the search,
#                                                   # then its max_qps 60 s x LoadGen seeds 1-3
#   scripts/gpu_serve.sh OUT_DIR goal_fifo_final    # the found max_qps again (a re-run)
#   scripts/gpu_serve.sh OUT_DIR goal_la goal_la_final               # the same, length-aware
#   scripts/gpu_serve.sh OUT_DIR goal_fifo_fp8 goal_fifo_fp8_final   # the same, FIFO, fp8 KV cache
#       (e4m3 K/V: the pool holds ~2x the users; on an H100 bf16's pool is half the population)
#   scripts/gpu_serve.sh OUT_DIR goal_fifo_pool=0.9   # goal_fifo, bf16, the pool at 0.9 of free
#       memory (serve_slo: 0.8; on an H100 0.8 holds 502 of 1024 users), 1 final seed
#   scripts/gpu_serve.sh OUT_DIR goal_fifo_batch=16   # goal_fifo, bf16, batches of up to 16 (graph
#       buckets 1, 2, 4, ..., 16; serve_slo: 8), 1 final seed
#   scripts/gpu_serve.sh OUT_DIR paged_eager none_graph offload_graph    # 1 seed each
#   scripts/gpu_serve.sh OUT_DIR dlrmv3_server dlrmv3_offline
#   scripts/gpu_serve.sh OUT_DIR sim_check          # 4 rates x both clocks, then the comparison
#   scripts/gpu_serve.sh OUT_DIR gc_ab              # gc_freeze x switch interval at GC_AB_QPS (60 s each)
#   scripts/gpu_serve.sh OUT_DIR replicas=1 replicas=8   # serving replicas: max QPS, 1 vs 8 GPUs
#   scripts/gpu_serve.sh OUT_DIR rate=1500         # one fixed rate (60 s, seed 1), this tree
#   AB_OLD=DIR AB_OLD_SHA=REV AB_QPS=1250 scripts/gpu_serve.sh OUT_DIR rate_ab   # one fixed rate
#       (60 s, seed 1): this tree, then the source tree of commit REV in DIR (`git archive REV |
#       tar -x -C DIR` before the call; its records name REV)
# SERVE_LOGGER=none runs without W&B (its 26 MB wheel left behind when the tree is near the
# device's 64 MiB limit); the default logs each point to an offline W&B run.
# Goal (H200): max QPS at p99 <= 80 ms >= 4000, VALID, busy_fraction >= 0.8 at that rate. A
# goal part fits one call: the start-up warm-up (every graph bucket: 90-205 s with Triton's
# cache cold on an H100, 13-15 s warm), ~5 trials of 10 s, then 3 x 60 s at the rate found.
set -u
out=${1:?usage: scripts/gpu_serve.sh OUT_DIR PART...}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
here=$PWD
run() { local name=$1 limit=$2; shift 2
  # SIGTERM at the limit: the point under way is recorded interrupted once LoadGen closes its
  # logs (at most its min_duration_s later); -k makes sure the call ends.
  timeout -k 60 "$limit" python3 -m hstu_exp -m logger="${SERVE_LOGGER:-wandb}" logger.mode=offline \
    resume=true \
    hydra.sweep.dir="$out/$name" "$@" >> "$out/$name.log" 2>&1
  echo "$name: exit $?"; }
policy() { case $1 in goal_la*) echo length_aware ;; *) echo fifo ;; esac; }
kv() { case $1 in *_fp8*) echo fp8 ;; *) echo bf16 ;; esac; }
max_qps() {  # the max_qps of the newest ok search record of a sweep dir
  python3 -c 'import json, pathlib, sys
recs = [json.loads(l) for p in pathlib.Path(sys.argv[1]).rglob("results.jsonl")
        for l in p.read_text().splitlines() if l.strip()]
ok = [r for r in recs if r.get("status") == "ok" and r.get("max_qps")]
print(ok[-1]["max_qps"] if ok else "")' "$1"; }
for part in "$@"; do
  case $part in
    goal_fifo|goal_la|goal_fifo_fp8)
      run "$part" 540 experiment=serve_slo cache=paged cache.dtype="$(kv $part)" graph=cudagraph \
        workload.policy="$(policy $part)" workload.final_seeds=3 ;;
    goal_fifo_final|goal_la_final|goal_fifo_fp8_final)
      qps=$(max_qps "$out/${part%_final}")
      [ -n "$qps" ] || { echo "$part: no max_qps in $out/${part%_final} yet" >&2; exit 2; }
      run "$part" 480 experiment=serve_slo cache=paged cache.dtype="$(kv $part)" graph=cudagraph \
        workload.policy="$(policy $part)" workload.search=none workload.qps="$qps" \
        workload.loadgen_seed=1,2,3 ;;
    paged_eager) run paged_eager 420 experiment=serve_slo cache=paged graph=none \
                   workload.policy=fifo workload.final_seeds=1 workload.qps=500 ;;
    none_graph) run none_graph 420 experiment=serve_slo cache=none graph=cudagraph \
                  workload.policy=fifo workload.final_seeds=1 workload.qps=250 ;;
    offload_graph) run offload_graph 420 experiment=serve_slo cache=paged_offload \
                     graph=cudagraph workload.policy=fifo workload.final_seeds=1 \
                     workload.qps=500 cache.num_pages=16384 cache.host_pages=32768 ;;
    goal_fifo_pool=*)  # the bf16 pool's share of free memory (the record's peak reserved
                       # memory says what the graphs and the step leave)
      f=${part#goal_fifo_pool=}
      run "goal_fifo_pool_$f" 540 experiment=serve_slo cache=paged cache.gpu_fraction="$f" \
        graph=cudagraph workload.policy=fifo workload.final_seeds=1 ;;
    goal_fifo_batch=*)  # larger batches where the device is the bound: per request, e2e cache +
                        # graph gets cheaper with the batch (B=4 -> 8: -27 % on the H200)
      n=${part#goal_fifo_batch=}
      [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "gpu_serve.sh: $part: N is a batch size (1, 2, ...)" >&2
                                     exit 2; }
      buckets=1 b=1
      while [ "$b" -lt "$n" ]; do b=$(( 2 * b < n ? 2 * b : n )); buckets+=",$b"; done
      run "goal_fifo_batch_$n" 540 experiment=serve_slo cache=paged graph=cudagraph \
        workload.policy=fifo workload.final_seeds=1 workload.max_batch="$n" \
        "graph.batch_buckets=[$buckets]" ;;
    replicas=*)  # issue 25: N replicas (cuda:0..N-1) vs replicas=1; the population and the
                 # starting rate scale with N (the same users per replica)
      n=${part#replicas=}
      run "replicas_$n" 480 experiment=serve_slo cache=paged graph=cudagraph \
        workload.policy=fifo workload.final_seeds=1 workload.replicas="$n" \
        workload.num_users=$((1024 * n)) workload.qps=$((1000 * n)) ;;
    gc_ab)  # the interpreter levers at one rate (GC_AB_QPS, default 700: the FIFO bracket on
            # an H100 at cddc484): the collector frozen or not x switch interval 5 / 0.5 ms
      run gc_ab 540 experiment=serve_slo cache=paged graph=cudagraph workload.policy=fifo \
        workload.search=none workload.qps="${GC_AB_QPS:-700}" workload.gc_freeze=false,true \
        workload.switch_interval_ms=5,0.5 ;;
    rate_ab)  # a host-path lever at one rate: this tree, then AB_OLD's, same machine
      old=${AB_OLD:?rate_ab needs AB_OLD, a source tree of the commit to compare with}
      old_sha=${AB_OLD_SHA:?rate_ab needs AB_OLD_SHA, the commit of AB_OLD}
      for tree in "$here" "$old"; do
        name=rate_ab_new sha=${HSTU_EXP_GIT_SHA:-}
        [ "$tree" = "$here" ] || name=rate_ab_old sha=$old_sha
        (cd "$tree" && PYTHONPATH=${PYTHONPATH/$here/$tree} HSTU_EXP_GIT_SHA=$sha \
          run "$name" 300 experiment=serve_slo \
          cache=paged graph=cudagraph workload.policy=fifo workload.search=none \
          workload.qps="${AB_QPS:-1250}" workload.loadgen_seed=1)
      done ;;
    rate=*)  # one fixed rate, 60 s, LoadGen seed 1, this tree: a lever's effect at a known
             # rate, with its batches' host phases (serve_stalls.py), in ~90 s after the warm-up
      qps=${part#rate=}
      run "rate_$qps" 300 experiment=serve_slo cache=paged graph=cudagraph workload.policy=fifo \
        workload.search=none workload.qps="$qps" workload.loadgen_seed=1 ;;
    dlrmv3_server) run dlrmv3_server 480 experiment=dlrmv3_server workload.final_seeds=1 ;;
    dlrmv3_offline) run dlrmv3_offline 300 experiment=dlrmv3_offline ;;
    sim_check) run serve_sim_check 480 experiment=serve_qps cache=paged graph=cudagraph \
                 workload.clock=real,simulated workload.qps=500,1000,2000,3000
               python3 scripts/serve_sim_check.py "$out/serve_sim_check" ;;
    *) echo "gpu_serve.sh: unknown part '$part' (goal_fifo goal_fifo_final goal_la goal_fifo_fp8" \
            "goal_la_final paged_eager none_graph offload_graph dlrmv3_server dlrmv3_offline" \
            "sim_check gc_ab rate=QPS rate_ab replicas=N goal_fifo_pool=F goal_fifo_batch=N)" >&2; exit 2 ;;
  esac
done
