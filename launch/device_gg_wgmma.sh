#!/usr/bin/env bash
# device_gg_wgmma.sh — one device call for the Hopper wgmma grouped GEMM (docs/KERNELS.md):
# build for sm_90a, the GPU tests (ctest -R "gpu|sass|hf", wgmma ones included), GEMM1/GEMM2
# timings mma.sync vs wgmma (MOE_GG_BENCH=1, T = 256 ... 16384), then whole-MLP benches with the
# default (WG, "auto") and the old mma.sync default (OLD), and checks with backward, while time remains
# (BUDGET seconds, default 300). Logs under $OUT; a short summary last.
#   OUT=/tmp/o ./launch/device_gg_wgmma.sh [BUDGET]
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
out=${OUT:-/tmp/moe-out}
mkdir -p "$out"
budget=${1:-300}
t0=$(date +%s)
el() { echo $(($(date +%s) - t0)); }
room() { [ "$(el)" -lt "$1" ]; } # true while less than $1 seconds have gone
{ git log -1 --format='commit %H %cd' 2>/dev/null; date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv; } > "$out/env.txt" 2>&1
./launch/device_build.sh > "$out/build.txt" 2>&1 || { tail -40 "$out/build.txt"; exit 1; }
echo "build done at $(el) s"
source launch/device_env.sh
export MOE_REQUIRE_GPU=1
WG=${WG:-auto}
OLD=${OLD:-128x128x64,w8,s3}
# TESTS=0 skips the tests, MLP=0 the whole-MLP benches; CHECKS lists the models to check;
# BENCH_T=4096 times one T only (MOE_GG_BENCH_T), BENCH=0 skips the GEMM bench; SAN=1 runs
# compute-sanitizer memcheck + racecheck on the small grouped-GEMM cases (MOE_GG_TEST_SMALL=1).
grep -A2 "moe_gg_wgmma_kernel" "$out/build.txt" | grep -E "spill|stack" | sort | uniq -c > "$out/wgmma_ptxas.txt"
echo "wgmma ptxas: $(tr -s ' ' < "$out/wgmma_ptxas.txt" | tr '\n' ';')"
if [ "${TESTS:-1}" = 1 ]; then
(cd build-gpu && timeout -s KILL 200 ctest -R "gpu|sass|hf" --output-on-failure -j1 --timeout 180) > "$out/gpu_tests.txt" 2>&1
echo "gpu ctest rc=$? at $(el) s: $(grep -E 'tests passed|tests failed' "$out/gpu_tests.txt" | tail -1)"
grep -E "^ *[0-9]+/[0-9]+ Test" "$out/gpu_tests.txt"
grep -E ": [0-9]+ of [0-9]+ failed|SASS lines" "$out/gpu_tests.txt" | head -12
grep -E "rel err|exceeds|mismatch|NO HGMMA|NO tensor" "$out/gpu_tests.txt" | head -8
fi
if [ "${BENCH:-1}" = 1 ] && room $((budget - 100)); then
  bt=${BENCH_T:+MOE_GG_BENCH_T=$BENCH_T}
  bto=${BENCH_TIMEOUT:-150}
  left=$((budget - $(el) - 5))
  [ "$left" -lt "$bto" ] && bto=$left
  env MOE_GG_BENCH=1 $bt timeout -s KILL $bto build-gpu/tests/test_gpu_grouped_gemm > "$out/gg_bench.txt" 2>&1
  echo "bench rc=$? at $(el) s"
fi
if [ "${SAN:-0}" = 1 ] && room $((budget - 120)); then
  for tool in memcheck racecheck; do
    MOE_GG_TEST_SMALL=1 timeout -s KILL ${SAN_TIMEOUT:-100} compute-sanitizer --tool $tool --error-exitcode 9 \
      build-gpu/tests/test_gpu_grouped_gemm > "$out/san_$tool.txt" 2>&1
    echo "sanitizer $tool rc=$? at $(el) s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/san_$tool.txt" | tail -1)"
  done
fi
ep=build-gpu/moe-ep
for m in qwen3-30b-a3b llama4-scout; do
  [ "${MLP:-1}" = 1 ] || break
  for c in "$WG" "$OLD"; do
    room $((budget - 40)) || break
    tag=mma
    [ "$c" = "$WG" ] && tag=wgmma
    timeout -s KILL 60 $ep bench --backend cuda --model $m -b 1024 -e 16384 -f 4 --kernel-config "$c" \
      > "$out/mlp_${m}_$tag.txt" 2>&1
    echo "mlp bench $m $c rc=$? at $(el) s"
  done
done
for m in ${CHECKS-qwen3-30b-a3b llama4-scout}; do
  room $((budget - 25)) || break
  timeout -s KILL 45 $ep check --backend cuda --model $m --tokens 4096 --dtype bf16 --backward \
    --sample 32 > "$out/check_$m.txt" 2>&1
  echo "check $m T=4096 --backward (default config) rc=$? at $(el) s: $(tail -1 "$out/check_$m.txt")"
  grep "kernels:" "$out/check_$m.txt"
done
echo "---- summary ($(el) s)"
grep -h "SUMMARY" "$out/gg_bench.txt" 2>/dev/null | sed -e 's/  */ /g' 
for f in "$out"/mlp_*.txt; do [ -f "$f" ] && { echo "== $(basename "$f")"; grep -vE '^#' "$f" | head -6; }; done
