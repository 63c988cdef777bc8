#!/usr/bin/env bash
# device_validate.sh — the GPU machine's validation run: build for sm_90a, then the parts named
# in PARTS (default: all, in this order), logs under $OUT (tarred into logs.tgz), a short
# summary last. Parts:
#   tests      every GPU test with MOE_REQUIRE_GPU=1 (a skip is a failure): ctest -R "gpu|sass|hf"
#   checks     moe-ep check of the real layer shapes (T=4096, bf16, --backward, --sample 32) and
#              of the tiny presets in fp32/fp16/bf16 (every element)
#   sanitizer  compute-sanitizer memcheck + racecheck on small aligned configs (wgmma path)
#   ep         expert parallelism through the program vs HF fixtures (virtual ranks over NCCL,
#              ranks sharing the GPU over MPI)
#   bench      moe-ep bench sweeps: T = 1 ... 16384 (x2) with CUDA-graph replay, the cuBLAS
#              baselines and copy bandwidth, CSV + JSON (Llama-4 also --routed-only, the anchors'
#              fused-MLP comparison); a checked sweep; Qwen3 fwd+bwd
#   gg_small   compute-sanitizer memcheck on the grouped-GEMM test's small cases (every wgmma
#              configuration and flag combination), MOE_GG_TEST_SMALL=1
# CTEST_EXCLUDE="cli_ep_gpu" leaves tests out of the tests part; CHECK_MODELS picks the checks.
#   PARTS="tests checks" MOE_COMMIT=$(git rev-parse --short HEAD) ./launch/device_validate.sh
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/moe-out}; mkdir -p "$out/logs"
log=$out/logs
parts=" ${PARTS:-tests checks sanitizer ep bench} "
want() { [[ "$parts" == *" $1 "* ]]; }
cd "$here"
t0=$(date +%s)
el() { echo $(($(date +%s) - t0)); }
# BUDGET=seconds: later steps are skipped (and said so) once fewer than their reserve remain,
# so the logs are always tarred before a device command's time limit
room() { [ "$(el)" -lt $((${BUDGET:-1000000} - $1)) ] || { summary+=("skipped: $2 (budget)"); false; }; }
{ echo "commit ${MOE_COMMIT:-unknown}"; date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv; } > "$log/env.txt" 2>&1
./launch/device_build.sh > "$log/build.txt" 2>&1 || { tail -40 "$log/build.txt"; exit 1; }
source launch/device_env.sh
summary=("build done at $(el) s; parts:$parts")
export MOE_REQUIRE_GPU=1 MOE_AUTOTUNE_CACHE=$out/logs/autotune.json
ep=build-gpu/moe-ep
if want tests; then
  (cd build-gpu && ctest -R "gpu|sass|hf" ${CTEST_EXCLUDE:+-E "$CTEST_EXCLUDE"} --output-on-failure -j1 --timeout 400) > "$log/gpu_tests.txt" 2>&1
  summary+=("gpu ctest ($(el) s): $(grep -E 'tests passed|tests failed' "$log/gpu_tests.txt" | tail -1)")
  while read -r l; do summary+=("  $l"); done < <(grep -E "^ *[0-9]+/[0-9]+ Test" "$log/gpu_tests.txt" | sed -e 's/  */ /g')
fi
if want checks; then
  for m in ${CHECK_MODELS-qwen3-30b-a3b llama4-scout}; do
    room 300 "check $m" || continue
    timeout -s KILL 150 $ep check --backend cuda --model $m --tokens 4096 --dtype bf16 --backward --sample 32 > "$log/check_$m.txt" 2>&1
    summary+=("check $m T=4096 bf16 --backward --sample 32 ($(el) s): $(tail -1 "$log/check_$m.txt")")
  done
  for m in ${CHECK_TINY-tiny-qwen3 tiny-llama4}; do
    for d in fp32 fp16 bf16; do
      $ep check --backend cuda --model $m --dtype $d --tokens 300 --backward > "$log/check_${m}_$d.txt" 2>&1
      summary+=("check $m $d: $(tail -1 "$log/check_${m}_$d.txt")")
    done
  done
fi
# compute-sanitizer on the small aligned configurations (launch/configs/): 16-byte rows and
# >= 16 rows per expert, so the forward runs the Hopper wgmma/TMA kernel (the tiny presets take
# the narrow mma.sync path); forward + backward, memcheck and racecheck.
if want sanitizer; then
  if command -v compute-sanitizer >/dev/null; then
    for m in small-qwen3-aligned small-llama4-aligned; do
      for tool in memcheck racecheck; do
        # racecheck tracks every shared-memory access: a smaller batch (still >= 16 rows/expert)
        # (k=2, E=8: 64 tokens = 16 rows/expert; Llama-4 k=1 needs 128 for the wgmma path)
        tok=256; [ $tool = racecheck ] && tok=128
        timeout -s KILL 150 compute-sanitizer --tool $tool --error-exitcode 9 $ep check --backend cuda \
          --model launch/configs/$m.json --tokens $tok --backward > "$log/sanitizer_${tool}_$m.txt" 2>&1
        summary+=("compute-sanitizer $tool $m: exit $? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log/sanitizer_${tool}_$m.txt" | tail -1); $(grep -o 'gemm1: [^;]*' "$log/sanitizer_${tool}_$m.txt" | head -1))")
      done
    done
  else
    summary+=("compute-sanitizer: not found")
  fi
fi
# expert parallelism through the program on the GPU: HF fixtures (E=7 over 7 virtual ranks on
# NCCL-to-self; E=5 over 5 MPI ranks sharing the GPU) against HF's own output
if want ep; then
  fx=tests/fixtures/hf
  rm -f /tmp/ep_q.safetensors /tmp/ep_l.safetensors # never compare a stale output
  $ep forward --backend cuda --ep-virtual 7 --transport nccl --stats --config $fx/qwen3_norm_fp32/config.json \
    --weights $fx/qwen3_norm_fp32/weights.safetensors --input $fx/qwen3_norm_fp32/io.safetensors --output /tmp/ep_q.safetensors > "$log/ep_cli.txt" 2>&1
  $ep compare /tmp/ep_q.safetensors $fx/qwen3_norm_fp32/io.safetensors --tol 1e-5 --mask tie_mask >> "$log/ep_cli.txt" 2>&1
  summary+=("EP forward cuda V=7 nccl vs HF qwen3 fp32: exit $? ($(grep -c PASS "$log/ep_cli.txt") PASS)")
  mpirun --oversubscribe -np 5 -x NCCL_NVLS_ENABLE=0 $ep forward --backend cuda --transport mpi --config $fx/llama4_k1_fp32/config.json \
    --weights $fx/llama4_k1_fp32/weights.safetensors --input $fx/llama4_k1_fp32/io.safetensors --output /tmp/ep_l.safetensors >> "$log/ep_cli.txt" 2>&1
  $ep compare /tmp/ep_l.safetensors $fx/llama4_k1_fp32/io.safetensors --tol 1e-5 --mask tie_mask >> "$log/ep_cli.txt" 2>&1
  summary+=("EP forward cuda np5 mpi vs HF llama4 fp32: exit $?")
  for np in 2 4; do
    timeout -s KILL 150 mpirun --oversubscribe -np $np -x NCCL_NVLS_ENABLE=0 $ep check --backend cuda --transport mpi \
      --model qwen3-30b-a3b --tokens 2048 --backward > "$log/ep_check_np$np.txt" 2>&1
    summary+=("EP check cuda np$np mpi qwen3-30b-a3b T=2048 --backward: exit $? ($(grep -E 'PASS|FAIL' "$log/ep_check_np$np.txt" | tail -1))")
  done
  timeout -s KILL 150 $ep check --backend cuda --ep-virtual 4 --transport nccl --chunks 2 --model qwen3-30b-a3b \
    --tokens 4096 --backward > "$log/ep_check_v4.txt" 2>&1
  summary+=("EP check cuda V=4 nccl --chunks 2 qwen3-30b-a3b T=4096 --backward: exit $? ($(grep -E 'PASS|FAIL' "$log/ep_check_v4.txt" | tail -1))")
fi
if want bench; then
  for m in qwen3-30b-a3b llama4-scout llama4-scout-routed; do
    args=(--model $m)
    [ $m = llama4-scout-routed ] && args=(--model llama4-scout --routed-only)
    room 90 "bench sweep $m" || continue
    timeout -s KILL 200 $ep bench --backend cuda "${args[@]}" -b 1 -e 16384 -f 2 -w 3 -n 20 --graph \
      --csv "$log/sweep_$m.csv" --json "$log/sweep_$m.json" > "$log/sweep_$m.txt" 2>&1
    summary+=("bench sweep $m: exit $? ($(el) s)")
  done
  if room 40 "fwdbwd"; then
    timeout -s KILL 60 $ep bench --backend cuda --model qwen3-30b-a3b --mode fwdbwd -b 4096 -e 4096 -w 3 -n 10 \
      > "$log/bench_qwen3_fwdbwd.txt" 2>&1
    summary+=("bench qwen3 fwdbwd T=4096: exit $?")
  fi
  if room 60 "checked sweep"; then
    timeout -s KILL 120 $ep bench --backend cuda --model qwen3-30b-a3b -b 1024 -e 16384 -f 4 -w 3 -n 10 --check \
      > "$log/bench_qwen3_checked.txt" 2>&1
    summary+=("bench qwen3 --check 1024..16384: exit $?")
  fi
fi
if want gg_small && command -v compute-sanitizer >/dev/null && room 40 "gg_small memcheck"; then
  left=$((${BUDGET:-1000000} - $(el) - 15)); [ $left -gt 120 ] && left=120
  MOE_GG_TEST_SMALL=1 timeout -s KILL $left compute-sanitizer --tool memcheck --error-exitcode 9 \
    build-gpu/tests/test_gpu_grouped_gemm > "$log/sanitizer_memcheck_gg_small.txt" 2>&1
  summary+=("compute-sanitizer memcheck test_gpu_grouped_gemm (small cases): exit $? ($(grep -E 'ERROR SUMMARY' "$log/sanitizer_memcheck_gg_small.txt" | tail -1); $(el) s)")
fi
summary+=("total $(el) s")
(cd "$out" && tar czf logs.tgz logs && rm -rf logs)
printf '%s\n' "${summary[@]}"
if want bench; then
  for f in sweep_qwen3-30b-a3b sweep_llama4-scout-routed sweep_llama4-scout bench_qwen3_fwdbwd; do
    tar xzf "$out/logs.tgz" -O "logs/$f.txt" 2>/dev/null | grep -vE '^# ' | cut -c1-125 | head -18
  done
fi
