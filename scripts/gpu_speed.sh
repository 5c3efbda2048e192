#!/usr/bin/env bash
# Issue 24's levers side by side in one GPU call (< 9 minutes), after the install line of
# scripts/gpu_run.sh, from the repository root:
#   scripts/gpu_speed.sh OUT_DIR [OLD_TREE] [parts...]
# OLD_TREE: a source tree of the commit before the host-path change (c616487), e.g. unpacked on
# the box from `git archive c616487 | tar -x -C .whl/base` made before the call; "-" skips it.
# Parts (default: all, in this order; each has its own time limit):
#   tests   test_fp8 and test_host_path on the GPU (the e4m3 kernels and _scaled_mm on CUDA, the
#           graph replay of the fp8 block), then `-m gpu` of test_e2e, test_graphs_gpu,
#           test_offload, test_fused_ops (the request path, uploads and graphs on CUDA)
#   host    e2e cache_graph B=1/8, this tree vs OLD_TREE (host_ms, device_ms, ms a batch)
#   gemm    block B=1/8 cached and full, T=4096, Triton + graphs, bf16 vs fp8 GEMMs, verify=true
#           (an fp8 point that misses its accuracy gate is recorded failed, not timed)
#   d128    the attention at H8 D128 (full B=8, paged B=1) with the Hopper D=128 candidates
#   dlrmv3  experiment=dlrmv3_block at B=32 (1024 history, 2048 candidates), bf16 vs fp8
#   kv      the FP8 KV cache: test_fp8_kv on the GPU; block B=1/8 cached (T=4096, 128 new),
#           Triton + graphs, cache.dtype=bf16 vs fp8; e2e cache_graph B=8 over 32 users with a
#           pool of 384 pages (evictions to the host tier and onloads), bf16 vs fp8: the bytes
#           each way (fp8/bf16 = (256 + 4) / 512); verify=true, each fp8 point gated; the
#           paged attention alone at B=1/8 (T=4096, 128 new): bf16 (Hopper kernel), bf16 on the
#           portable kernel (kernel.hopper=false) and fp8 (portable: e4m3 pages)
# Every sweep lands in OUT_DIR/<part>; OUT_DIR/speed.tar.gz holds them all at the end.
# Expected ~7.5 minutes for the first five parts (limits add up to 11), ~6 for kv (limits 8):
# a call holds at most 10 minutes, so run `tests host gemm`, then `d128 dlrmv3`, then `kv`
# (warm machine).
set -u
out=${1:?usage: scripts/gpu_speed.sh OUT_DIR [OLD_TREE|-] [tests host gemm d128 dlrmv3 kv]}
old=${2:--}
shift $(( $# > 1 ? 2 : 1 ))
parts=${*:-tests host gemm d128 dlrmv3 kv}
mkdir -p "$out"
out=$(cd "$out" && pwd)
here=$PWD
sweep() { local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m hstu_exp -m logger=none hydra.sweep.dir="$out/$name" "$@" \
    > "$out/$name.log" 2>&1; echo "$name: exit $?"; tail -n 12 "$out/$name.log"; }
E2E=(experiment=seed_e2e workload.mode=cache_graph workload.batch_size=1,8
     workload.min_time_s=0.5 workload.max_time_s=1.5)
for part in $parts; do
  case $part in
    tests) timeout 120 python3 -m pytest -q -x tests/test_fp8.py tests/test_host_path.py \
             > "$out/tests.log" 2>&1; echo "tests (fp8, host path): exit $?"
           timeout 100 python3 -m pytest -q -x -m gpu tests/test_e2e.py tests/test_graphs_gpu.py \
             tests/test_offload.py tests/test_fused_ops.py >> "$out/tests.log" 2>&1
           echo "tests (-m gpu: e2e, graphs, offload): exit $?"; tail -n 5 "$out/tests.log" ;;
    host) sweep e2e_new 90 "${E2E[@]}"
          if [ "$old" != "-" ]; then
            (cd "$old" && PYTHONPATH=${PYTHONPATH/$here/$old} sweep e2e_old 90 "${E2E[@]}")
          fi ;;
    gemm) sweep block_gemm 170 experiment=seed_block kernel=triton graph=cudagraph verify=true \
            kernel.gemm_dtype=bf16,fp8 workload.batch_size=1,8 workload.total_history=4096 \
            workload.new_history=128,4096 workload.min_time_s=0.2 ;;
    d128) timeout 70 python3 scripts/gpu_attention_check.py --sweep --no-check --no-ref \
            --only "full  B=8 H8 D128,paged B=1 H8 D128" \
            --labels "triton auto,hopper,tuned,hopper ks3,hopper n128,hopper n128 ks3,hopper split=4" \
            > "$out/d128.log" 2>&1; echo "d128: exit $?"; tail -n 20 "$out/d128.log" ;;
    dlrmv3) sweep dlrmv3 120 experiment=dlrmv3_block kernel=triton verify=true \
              workload.batch_size=32 kernel.gemm_dtype=bf16,fp8 ;;
    kv) timeout 90 python3 -m pytest -q -x tests/test_fp8_kv.py > "$out/kv_tests.log" 2>&1
        echo "kv tests: exit $?"; tail -n 3 "$out/kv_tests.log"
        sweep block_kv 150 experiment=seed_block kernel=triton graph=cudagraph verify=true \
          cache.dtype=bf16,fp8 workload.batch_size=1,8 workload.total_history=4096 \
          workload.new_history=128 workload.min_time_s=0.2
        sweep e2e_kv 150 experiment=seed_e2e workload.mode=cache_graph workload.batch_size=8 \
          workload.num_users=32 cache.num_pages=384 cache.dtype=bf16,fp8 verify=true \
          workload.repeats=1 workload.min_time_s=0.5 workload.max_time_s=1.5
        sweep attention_kv 90 experiment=seed_attention kernel=triton graph=cudagraph \
          workload.batch_size=1,8 workload.total_history=4096 workload.new_history=128 \
          cache.dtype=bf16,fp8 kernel.hopper=true,false workload.min_time_s=0.2 ;;
    *) echo "gpu_speed.sh: unknown part '$part' (tests host gemm d128 dlrmv3 kv)" >&2; exit 2 ;;
  esac
done
tar -czf "$out/speed.tar.gz" -C "$out" --exclude speed.tar.gz . && echo "packed $out/speed.tar.gz"
