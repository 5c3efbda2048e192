#!/usr/bin/env bash
# Issue 25 on a multi-GPU kind (after the install line of scripts/gpu_run.sh): a sweep on every
# GPU of the host against the same sweep on one GPU, through the same launcher.
#   scripts/gpu_run.sh scripts/gpu_multi.sh OUT_DIR                 # experiment=seed_block
#   scripts/gpu_run.sh scripts/gpu_multi.sh OUT_DIR experiment=seed_block workload.min_time_s=0.5
# Goal: wall(one GPU) / wall(N GPUs) >= 0.85 x N. A warm-up point first fills the disk caches
# (calibration, Triton) that both runs then find. Prints the wall times, the speedup against the
# goal, which cards the points ran on, and hstu-exp-compare of the two sweeps (the same points
# timed with every GPU busy: a geomean far from 1 means the host, not the GPU, is the limit).
set -u
out=${1:?usage: scripts/gpu_multi.sh OUT_DIR [overrides...]}
shift
args=("${@:-experiment=seed_block}")
n=$(nvidia-smi -L | grep -c '^GPU ')
mkdir -p "$out"
echo "GPUs: $n"; nvidia-smi -L
python3 -m hstu_exp "${args[@]}" logger=none workload.batch_size=1 workload.total_history=128 \
  workload.new_history=128 cache=none hydra.run.dir="$out/warmup" > "$out/warmup.log" 2>&1
echo "warm-up point: exit $?"
sweep() { local name=$1 gpus=$2 t0 t1
  t0=$(date +%s.%N)
  python3 -m hstu_exp -m "${args[@]}" hydra/launcher=gpus hydra.launcher.gpus="$gpus" \
    logger=none hydra.sweep.dir="$out/$name" > "$out/$name.log" 2>&1
  echo "$name: exit $?"
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.1f}')" > "$out/$name.wall_s"; }
sweep one_gpu 1
sweep all_gpus all
python3 - "$out" "$n" <<'EOF'
import sys
from pathlib import Path
from hstu_exp.tracking.records import read_records
out, n = Path(sys.argv[1]), int(sys.argv[2])
wall = {k: float((out / f"{k}.wall_s").read_text()) for k in ("one_gpu", "all_gpus")}
speedup = wall["one_gpu"] / wall["all_gpus"]
verdict = "met" if speedup >= 0.85 * n else "missed"
print(f"wall: one GPU {wall['one_gpu']:.1f} s, {n} GPUs {wall['all_gpus']:.1f} s: "
      f"{speedup:.2f}x = {speedup / n:.2f} x N (goal >= 0.85 x N: {verdict})")
for k in ("one_gpu", "all_gpus"):
    recs = list(read_records(out / k))
    cards = sorted({r.get("gpu_index") for r in recs if r.get("status") == "ok"}, key=str)
    print(f"{k}: {len(recs)} records, "
          f"{sum(r.get('status') == 'ok' for r in recs)} ok, on GPU index {cards}")
EOF
python3 -m hstu_exp.report.compare "$out/one_gpu" "$out/all_gpus" --no-figure | tail -4
