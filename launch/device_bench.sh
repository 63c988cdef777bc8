#!/usr/bin/env bash
# device_bench.sh — one device call for kernel work (issue "Hopper-speed kernels"): build for
# sm_90a, the grouped-GEMM GPU test (every wgmma configuration, MOE_REQUIRE_GPU=1), the GEMM
# bench (MOE_GG_BENCH=1: every configuration at T=4096, the wgmma ones at 1024 and 16384),
# then `moe-ep bench` sweeps of the whole layer for each model with the default configuration
# and with each of $CONFIGS forced, Llama-4 also --routed-only (the anchors' fused-MLP
# comparison), and a Qwen3 fwd+bwd; PROFILE=1 first profiles the forward's two grouped GEMMs of
# each model at T=4096 with Nsight Compute (--set full, per-instruction stall samples).
# Logs in $OUT/logs.tgz (the device tool brings back at most 8 files), a short table last.
#   OUT=/tmp/o CONFIGS="128x256x64,w12,s4,tma" ./launch/device_bench.sh [BUDGET_SECONDS]
# Switches: TESTS=0 (no GPU test), GG=0 (no GEMM bench), MLP=0 (no layer sweeps),
# SWEEP="-b 1024 -e 16384 -f 2" (the layer sweep), MODELS="qwen3-30b-a3b llama4-scout",
# GG_T="4096 16384 1024" (the GEMM bench's token counts), PROFILE=1 (ncu),
# TEST_ENV="VAR=1 ..." (environment of the GPU tests only), VARIANT_ENV="VAR=1 ..." (each layer
# sweep is repeated with that environment, as mlp_*_variant), SAN=1 (compute-sanitizer memcheck
# and racecheck on the grouped-GEMM test's small cases), CHECKS="qwen3-30b-a3b llama4-scout"
# (moe-ep check --backward of each at CHECK_T tokens, default 4096, --sample 32, after the sweeps),
# AUTOTUNE=1 (each layer sweep once more with --autotune; the picks land in logs/autotune.json),
# DECODE=1 (T = 1 ... 128 with --graph, with and without MOE_ROUTE_SMALL=1, both models).
# (This script took over launch/device_gg_wgmma.sh of rounds 1-2: its old-vs-new layer benches
# are CONFIGS="128x128x64,w8,s3", its checks CHECKS=..., its sanitizers SAN=1.)
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
out=${OUT:-/tmp/moe-out}
log=/tmp/moe-logs/logs # tarred into $out/logs.tgz at the end
rm -rf "$log"; mkdir -p "$log" "$out"
budget=${1:-540}
t0=$(date +%s)
el() { echo $(($(date +%s) - t0)); }
room() { [ "$(el)" -lt $((budget - $1)) ]; } # true while more than $1 seconds remain
summary=()
{ git log -1 --format='commit %H %cd' 2>/dev/null; echo "MOE_COMMIT=${MOE_COMMIT:-}"; date -u
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,memory.total --format=csv; } > "$log/env.txt" 2>&1
# -Xptxas=-v (off by default) for the per-kernel register/spill report summarised below
./launch/device_build.sh -DMOE_PTXAS_VERBOSE=ON > "$log/build.txt" 2>&1 || { tail -40 "$log/build.txt"; exit 1; }
summary+=("build done at $(el) s")
grep -A2 "moe_gg_wgmma_kernel" "$log/build.txt" | grep -E "spill|stack" | sort | uniq -c > "$log/wgmma_ptxas.txt"
summary+=("wgmma ptxas: $(tr -s ' ' < "$log/wgmma_ptxas.txt" | tr '\n' ';')")
source launch/device_env.sh
export MOE_REQUIRE_GPU=1 MOE_AUTOTUNE_CACHE=$log/autotune.json
ep=build-gpu/moe-ep

if [ "${PROFILE:-0}" = 1 ] && command -v ncu >/dev/null; then
  for m in qwen3-30b-a3b llama4-scout; do
    room 240 || break
    extra=()
    [ "$m" = llama4-scout ] && extra=(--routed-only)
    # the first forward's GEMM1 and GEMM2 (routing, sort and combine are not wgmma kernels)
    timeout -s KILL 150 ncu --clock-control none --set full --import-source yes --kernel-name regex:wgmma \
      --launch-count 2 -f -o "$log/ncu_$m" $ep bench --backend cuda --model $m -b 4096 -e 4096 -w 0 -n 1 \
      --copy-mib 0 "${extra[@]}" > "$log/ncu_${m}_run.txt" 2>&1
    summary+=("ncu $m rc=$? at $(el) s")
    ncu --import "$log/ncu_$m.ncu-rep" --page details > "$log/ncu_${m}_details.txt" 2>&1
    ncu --import "$log/ncu_$m.ncu-rep" --page source --csv --print-source sass > "$log/ncu_${m}_sass.csv" 2>&1
    summary+=("  ncu pages: $(wc -c < "$log/ncu_${m}_details.txt") + $(wc -c < "$log/ncu_${m}_sass.csv") bytes")
  done
fi
if [ "${TESTS:-1}" = 1 ]; then
  env ${TEST_ENV:-} timeout -s KILL 240 build-gpu/tests/test_gpu_grouped_gemm > "$log/test_gpu_grouped_gemm.txt" 2>&1
  rc=$?
  summary+=("test_gpu_grouped_gemm rc=$rc at $(el) s: $(grep -E '^\[  (PASSED|FAILED) \]' "$log/test_gpu_grouped_gemm.txt" | tr '\n' ' ')")
  while read -r l; do summary+=("  $l"); done < <(grep -E "failed|FAILED|rel err .* exceeds|mismatch" "$log/test_gpu_grouped_gemm.txt" | head -12)
  for t in ${MORE_TESTS:-}; do # e.g. "test_gpu_block test_real_llama4"
    room 150 || break
    timeout -s KILL 150 build-gpu/tests/$t > "$log/$t.txt" 2>&1
    summary+=("$t rc=$? at $(el) s: $(grep -E '^\[  (PASSED|FAILED) \]' "$log/$t.txt" | tr '\n' ' ')")
  done
fi
if [ "${SAN:-0}" = 1 ]; then
  for tool in memcheck racecheck; do
    room 200 || { summary+=("sanitizer $tool skipped (budget)"); continue; }
    MOE_GG_TEST_SMALL=1 timeout -s KILL ${SAN_TIMEOUT:-100} compute-sanitizer --tool $tool --error-exitcode 9 \
      build-gpu/tests/test_gpu_grouped_gemm > "$log/san_$tool.txt" 2>&1
    summary+=("sanitizer $tool rc=$? at $(el) s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log/san_$tool.txt" | tail -1)")
  done
fi
if [ "${GG:-1}" = 1 ]; then
  for T in ${GG_T:-4096 16384 1024}; do
    room 200 || { summary+=("gg bench T=$T skipped (budget)"); continue; }
    MOE_GG_BENCH=1 MOE_GG_BENCH_T=$T timeout -s KILL 120 build-gpu/tests/test_gpu_grouped_gemm > "$log/gg_bench_$T.txt" 2>&1
    summary+=("gg bench T=$T rc=$? at $(el) s")
  done
fi
sweep=${SWEEP:--b 1024 -e 16384 -f 2}
run_bench() { # name, args...
  local name=$1; shift
  room 60 || { summary+=("skipped $name (budget)"); return; }
  timeout -s KILL 150 $ep bench --backend cuda "$@" --csv "$log/$name.csv" > "$log/$name.txt" 2>&1
  summary+=("bench $name rc=$? at $(el) s")
}
if [ "${MLP:-1}" = 1 ]; then
  for m in ${MODELS:-qwen3-30b-a3b llama4-scout}; do
    extra=()
    [ "$m" = llama4-scout ] && extra=(--routed-only)
    run_bench "mlp_${m}_auto" --model $m $sweep -w 3 -n 20 "${extra[@]}"
    if [ -n "${VARIANT_ENV:-}" ]; then
      (export ${VARIANT_ENV}; run_bench "mlp_${m}_variant" --model $m $sweep -w 3 -n 20 "${extra[@]}")
      summary+=("variant ($VARIANT_ENV) $m rc=$? at $(el) s")
    fi
    # the autotuner's picks (every configuration with its epilogue / A-load options; the cache
    # in the logs says which won for each GEMM)
    [ "${AUTOTUNE:-0}" = 1 ] && MOE_AUTOTUNE_QUIET=1 run_bench "mlp_${m}_tuned" --model $m $sweep -w 3 -n 20 --autotune "${extra[@]}"
    i=0
    for c in ${CONFIGS:-}; do
      run_bench "mlp_${m}_cfg$i" --model $m $sweep -w 3 -n 20 --kernel-config "$c" "${extra[@]}"
      i=$((i + 1))
    done
    [ "$m" = llama4-scout ] && run_bench "mlp_${m}_shared_auto" --model $m -b 1024 -e 16384 -f 4 -w 3 -n 10
  done
  run_bench fwdbwd_qwen3 --model qwen3-30b-a3b --mode fwdbwd -b 4096 -e 4096 -w 3 -n 10
fi
if [ "${DECODE:-0}" = 1 ]; then
  # small batches with CUDA-graph replays, the per-stage route against the one-launch route
  # (MOE_ROUTE_SMALL=1: T <= 32 in one launch), Llama-4 with its shared expert as served
  for m in qwen3-30b-a3b llama4-scout; do
    run_bench "decode_${m}" --model $m -b 1 -e 128 -f 2 -w 5 -n 50 --graph
    MOE_ROUTE_SMALL=1 run_bench "decode_${m}_route_small" --model $m -b 1 -e 128 -f 2 -w 5 -n 50 --graph
  done
fi

for m in ${CHECKS:-}; do
  room 60 || { summary+=("check $m skipped (budget)"); continue; }
  timeout -s KILL 120 $ep check --backend cuda --model $m --tokens ${CHECK_T:-4096} --dtype bf16 --backward \
    --sample 32 > "$log/check_$m.txt" 2>&1
  summary+=("check $m T=${CHECK_T:-4096} --backward rc=$? at $(el) s: $(tail -1 "$log/check_$m.txt")")
done

echo "---- summary ($(el) s)"
printf '%s\n' "${summary[@]}"
for T in ${GG_T:-4096 16384 1024}; do
  grep -h "SUMMARY" "$log/gg_bench_$T.txt" 2>/dev/null | grep -E "tma|cuBLAS|default" | grep -v "prefetch" | sed -e 's/  */ /g'
done
for f in "$log"/mlp_*.txt "$log"/fwdbwd_*.txt "$log"/decode_*.txt; do
  [ -f "$f" ] || continue
  echo "== $(basename "$f" .txt): $(grep -E '^# kernels' "$f" | tail -1 | cut -c1-150)"
  # from the run's CSV, columns by name (empty where a mode has none):
  # T time TFLOP/s %roof %copy fill | route permute gemm1 gemm2 combine | dense x-dense wrong | graph %copy
  # (graph: the CUDA-graph replay's ms and %copy, decode runs only)
  csv=${f%.txt}.csv
  [ -f "$csv" ] && awk -F, 'NR==1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
    function v(n) { return (n in c) ? $(c[n]) : "" }
    { printf "%s %s %s %s %s %s | %s %s %s %s %s | %s %s %s | %s %s\n", v("T"), v("time_ms"), v("tflops"),
      v("pct_roofline"), v("pct_copy"), v("tile_fill"), v("route_ms"), v("permute_ms"), v("gemm1_ms"),
      v("gemm2_ms"), v("combine_ms"), v("dense_ms"), v("x_dense"), v("wrong"), v("graph_ms"),
      v("graph_pct_copy") }' "$csv" | head -8
done
tar -czf "$out/logs.tgz" -C "$log/.." logs 2>/dev/null
