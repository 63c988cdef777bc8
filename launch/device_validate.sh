#!/usr/bin/env bash
# device_validate.sh — one call on the GPU machine: build for sm_90a, run every GPU test with
# MOE_REQUIRE_GPU=1 (a skip is a failure), the correctness checks of the real layer shapes, and a
# benchmark sweep; logs under $OUT (tarred), a short table last.
#   ./launch/device_validate.sh [quick]
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/moe-out}; mkdir -p "$out/logs"
log=$out/logs
cd "$here"
{ echo "commit ${MOE_COMMIT:-unknown}"; date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv; } > "$log/env.txt" 2>&1
./launch/device_build.sh > "$log/build.txt" 2>&1 || { tail -40 "$log/build.txt"; exit 1; }
source launch/device_env.sh
summary=()
export MOE_REQUIRE_GPU=1 MOE_AUTOTUNE_CACHE=$out/logs/autotune.json
(cd build-gpu && ctest -R "gpu|sass|hf" --output-on-failure -j1 --timeout 600) > "$log/gpu_tests.txt" 2>&1
summary+=("gpu ctest: $(grep -E 'tests passed|tests failed' "$log/gpu_tests.txt" | tail -1)")
ep=build-gpu/moe-ep
for m in qwen3-30b-a3b llama4-scout; do
  $ep check --backend cuda --model $m --tokens 4096 --dtype bf16 --backward --sample 32 > "$log/check_$m.txt" 2>&1
  summary+=("check $m T=4096 bf16 --backward --sample 32: $(tail -1 "$log/check_$m.txt")")
done
for m in tiny-qwen3 tiny-llama4; do
  for d in fp32 fp16 bf16; do
    $ep check --backend cuda --model $m --dtype $d --tokens 300 --backward > "$log/check_${m}_$d.txt" 2>&1
    summary+=("check $m $d: $(tail -1 "$log/check_${m}_$d.txt")")
  done
done
# compute-sanitizer on the small aligned configurations (launch/configs/): 16-byte rows and
# >= 16 rows per expert, so the forward runs the Hopper wgmma/TMA kernel (the tiny presets take
# the narrow mma.sync path); forward + backward, memcheck and racecheck.
if command -v compute-sanitizer >/dev/null; then
  for m in small-qwen3-aligned small-llama4-aligned; do
    for tool in memcheck racecheck; do
      timeout -s KILL 240 compute-sanitizer --tool $tool --error-exitcode 9 $ep check --backend cuda \
        --model launch/configs/$m.json --tokens 256 --backward > "$log/sanitizer_${tool}_$m.txt" 2>&1
      summary+=("compute-sanitizer $tool $m: exit $? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log/sanitizer_${tool}_$m.txt" | tail -1); $(grep -o 'gemm1: [^;]*' "$log/sanitizer_${tool}_$m.txt" | head -1))")
    done
  done
else
  summary+=("compute-sanitizer: not found")
fi
# expert parallelism through the program on the GPU: HF fixtures (E=7 over 7 virtual ranks on
# NCCL-to-self; E=5 over 5 MPI ranks sharing the GPU) against HF's own output
fx=tests/fixtures/hf
$ep forward --backend cuda --ep-virtual 7 --transport nccl --stats --config $fx/qwen3_norm_fp32/config.json \
  --weights $fx/qwen3_norm_fp32/weights.safetensors --input $fx/qwen3_norm_fp32/io.safetensors --output /tmp/ep_q.safetensors > "$log/ep_cli.txt" 2>&1
$ep compare /tmp/ep_q.safetensors $fx/qwen3_norm_fp32/io.safetensors --tol 1e-5 --mask tie_mask >> "$log/ep_cli.txt" 2>&1
summary+=("EP forward cuda V=7 nccl vs HF qwen3 fp32: exit $? ($(grep -c PASS "$log/ep_cli.txt") PASS)")
mpirun --oversubscribe -np 5 -x NCCL_NVLS_ENABLE=0 $ep forward --backend cuda --transport mpi --config $fx/llama4_k1_fp32/config.json \
  --weights $fx/llama4_k1_fp32/weights.safetensors --input $fx/llama4_k1_fp32/io.safetensors --output /tmp/ep_l.safetensors >> "$log/ep_cli.txt" 2>&1
$ep compare /tmp/ep_l.safetensors $fx/llama4_k1_fp32/io.safetensors --tol 1e-5 --mask tie_mask >> "$log/ep_cli.txt" 2>&1
summary+=("EP forward cuda np5 mpi vs HF llama4 fp32: exit $?")
if [ "${1:-}" != quick ]; then
  $ep bench --backend cuda --model qwen3-30b-a3b -b 1024 -e 16384 -f 4 -w 5 -n 20 --check --csv "$log/bench_qwen3.csv" > "$log/bench_qwen3.txt" 2>&1
  $ep bench --backend cuda --model llama4-scout -b 1024 -e 16384 -f 4 -w 3 -n 10 --check --csv "$log/bench_llama4.csv" > "$log/bench_llama4.txt" 2>&1
  $ep bench --backend cuda --model qwen3-30b-a3b --mode fwdbwd -b 4096 -e 4096 -w 3 -n 10 > "$log/bench_qwen3_fwdbwd.txt" 2>&1
fi
(cd "$out" && tar czf logs.tgz logs && rm -rf logs)
printf '%s\n' "${summary[@]}"
for f in bench_qwen3 bench_llama4 bench_qwen3_fwdbwd; do
  [ -f "$out/logs.tgz" ] && tar xzf "$out/logs.tgz" -O "logs/$f.txt" 2>/dev/null | grep -vE '^#' | head -8
done
