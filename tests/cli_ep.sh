#!/usr/bin/env bash
# cli_ep.sh — the expert-parallel program under mpirun on the CPU backend:
#  * `moe-ep check` at 1, 2 and 4 ranks against the single-rank fused path (forward and
#    backward) for Qwen3- and Llama-4-shaped configs with E=8: router and forced routing (skewed,
#    all-to-one: a rank receiving nothing), T not divisible by N, chunks 1 and 3, virtual ranks;
#  * `moe-ep forward` expert-parallel on the HuggingFace fixtures (E=7 over 7 ranks, E=5 over 5):
#    equal to HF's output and to the single-rank run;
#  * a clear error when E is not divisible by the rank count.
set -u
ep=${MOE_EP:?MOE_EP must point at the moe-ep binary}
src=${MOE_SOURCE_DIR:?}
run_mpi() { local np=$1; shift; OMP_NUM_THREADS=1 ${MPIEXEC:-mpirun} ${MPIRUN_FLAGS:-} -np "$np" "$@"; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
seed=$(( $(date +%s%N) % 1000003 ))
echo "seed $seed"
ok_or_fail() { if [ "$1" = 0 ]; then echo "ok: $2"; else echo "FAIL: $2"; tail -30 "$tmp/log"; fail=1; fi; }
for cfg in qwen3_e8 llama4_e8; do
  for np in 1 2 4; do
    for extra in "--chunks 1" "--chunks 3 --route skewed" "--route all-to-one --dtype bf16" "--ep-virtual 2 --chunks 3"; do
      run_mpi $np "$ep" check --model "$src/tests/fixtures/ep/$cfg.json" --tokens 37 --backward --seed $seed $extra > "$tmp/log" 2>&1
      rc=$?; grep -qE "PASS on all $np ranks|^PASS: " "$tmp/log" || rc=1  # np 1 without EP options is the plain check
      ok_or_fail $rc "np $np check $cfg $extra"
    done
  done
done
for case in "qwen3_norm_fp32 7" "llama4_k1_fp32 5" "llama4_k2_fp32 5"; do
  set -- $case; name=$1; np=$2; dir=$src/tests/fixtures/hf/$name
  "$ep" forward --backend cpu --config "$dir/config.json" --weights "$dir/weights.safetensors" --input "$dir/io.safetensors" --output "$tmp/one.safetensors" > "$tmp/log" 2>&1
  ok_or_fail $? "single-rank forward $name"
  run_mpi $np "$ep" forward --config "$dir/config.json" --weights "$dir/weights.safetensors" --input "$dir/io.safetensors" --output "$tmp/ep.safetensors" --stats > "$tmp/log" 2>&1
  ok_or_fail $? "np $np forward $name"
  "$ep" compare "$tmp/ep.safetensors" "$dir/io.safetensors" --tol 1e-5 --mask tie_mask > "$tmp/log" 2>&1
  ok_or_fail $? "np $np forward $name equals HF's output"
  "$ep" compare "$tmp/ep.safetensors" "$tmp/one.safetensors" --tol 1e-6 > "$tmp/log" 2>&1
  ok_or_fail $? "np $np forward $name equals the single-rank run"
  "$ep" compare "$tmp/ep.safetensors" "$dir/io.safetensors" --tensor router_logits --tol 1e-5 > "$tmp/log" 2>&1
  ok_or_fail $? "np $np router_logits $name"
done
# E=7 over 2 ranks: a clear error on every rank, non-zero exit, no hang
run_mpi 2 "$ep" check --model tiny-qwen3 --tokens 8 > "$tmp/log" 2>&1; rc=$?
if [ $rc = 0 ] || ! grep -q "cannot be split evenly over 2 ranks" "$tmp/log"; then echo "FAIL: E=7 over 2 ranks"; cat "$tmp/log"; fail=1; else echo "ok: E=7 over 2 ranks refused"; fi
exit $fail
