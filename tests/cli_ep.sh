#!/usr/bin/env bash
# cli_ep.sh — the expert-parallel program under mpirun on the CPU backend:
#  * `moe-ep check` at 1, 2 and 4 ranks against the single-rank fused path (forward and
#    backward) for Qwen3- and Llama-4-shaped configs with E=8: router and forced routing (skewed,
#    all-to-one: a rank receiving nothing), T not divisible by N, chunks 1 and 3, virtual ranks;
#  * `moe-ep forward` expert-parallel on the HuggingFace fixtures (E=7 over 7 ranks, E=5 over 5):
#    equal to HF's output and to the single-rank run;
#  * E not divisible by the rank count works (contiguous slices, the first E mod N ranks own one
#    more): `moe-ep check` of the tiny E=7 preset over 2 and 3 ranks passes against the
#    single-rank path, and `moe-ep forward` of the E=7 / E=5 fixtures over 2 and 4 ranks equals
#    the single-rank run and HF's output;
#  * more ranks than experts: refused on every rank with the reason (non-zero exit, no hang),
#    unless an explicit --expert-map leaves ranks empty, which then equals the single-rank run.
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
# E not divisible by N: uneven contiguous slices, the same results as one rank
for np in 2 3; do
  run_mpi $np "$ep" check --model tiny-qwen3 --tokens 37 --backward --seed $seed --backend cpu > "$tmp/log" 2>&1
  rc=$?; grep -q "PASS on all $np ranks" "$tmp/log" || rc=1
  ok_or_fail $rc "np $np check tiny-qwen3 (E=7 over $np ranks: uneven slices)"
done
grep -q "^rank 0 of 3: tokens \[0, 13), 3 experts \[0,1,2\]" "$tmp/log" && grep -q "^rank 2 of 3: tokens \[25, 37), 2 experts \[5,6\]" "$tmp/log"
ok_or_fail $? "E=7 over 3 ranks: slices of 3, 2, 2 experts"
for case in "qwen3_norm_fp32 2" "qwen3_norm_fp32 4" "llama4_k2_fp32 2"; do
  set -- $case; name=$1; np=$2; dir=$src/tests/fixtures/hf/$name
  "$ep" forward --backend cpu --config "$dir/config.json" --weights "$dir/weights.safetensors" --input "$dir/io.safetensors" --output "$tmp/one.safetensors" > "$tmp/log" 2>&1
  ok_or_fail $? "single-rank forward $name"
  run_mpi $np "$ep" forward --backend cpu --config "$dir/config.json" --weights "$dir/weights.safetensors" --input "$dir/io.safetensors" --output "$tmp/ep.safetensors" > "$tmp/log" 2>&1
  ok_or_fail $? "np $np forward $name (uneven slices)"
  "$ep" compare "$tmp/ep.safetensors" "$tmp/one.safetensors" --tol 1e-6 > "$tmp/log" 2>&1
  ok_or_fail $? "np $np forward $name equals the single-rank run"
  "$ep" compare "$tmp/ep.safetensors" "$tmp/one.safetensors" --tensor router_logits --tol 1e-6 > "$tmp/log" 2>&1
  ok_or_fail $? "np $np router_logits $name equal the single-rank run's"
  "$ep" compare "$tmp/ep.safetensors" "$dir/io.safetensors" --tol 1e-5 --mask tie_mask > "$tmp/log" 2>&1
  ok_or_fail $? "np $np forward $name equals HF's output"
done
# more ranks than experts (E=2 over 3): a clear error on every rank, non-zero exit, no hang
cat > "$tmp/e2.json" <<'JSON'
{"model_type": "qwen3_moe", "hidden_size": 16, "moe_intermediate_size": 8, "num_experts": 2,
 "num_experts_per_tok": 1, "norm_topk_prob": true, "torch_dtype": "float32"}
JSON
timeout 120 bash -c 'OMP_NUM_THREADS=1 '"${MPIEXEC:-mpirun} ${MPIRUN_FLAGS:-}"' -np 3 "$0" check --model "$1" --tokens 8 --backend cpu' "$ep" "$tmp/e2.json" > "$tmp/log" 2>&1; rc=$?
n=$(grep -c "3 ranks but only 2 experts: with contiguous slices every rank must own at least one expert" "$tmp/log")
if [ $rc = 0 ] || [ $rc = 124 ] || [ "$n" != 3 ] || grep -q PASS "$tmp/log"; then
  echo "FAIL: E=2 over 3 ranks (exit $rc, $n of 3 ranks gave the reason)"; cat "$tmp/log"; fail=1
else echo "ok: E=2 over 3 ranks refused on every rank"; fi
# ... unless the expert map leaves a rank empty: then it runs, and equals one rank
echo '{"experts_per_rank": [[1], [], [0]]}' > "$tmp/e2map.json"
run_mpi 3 "$ep" check --model "$tmp/e2.json" --tokens 8 --backward --backend cpu --expert-map "$tmp/e2map.json" > "$tmp/log" 2>&1
rc=$?; grep -q "PASS on all 3 ranks" "$tmp/log" && grep -q "^rank 1 of 3: tokens \[3, 6), 0 experts$" "$tmp/log" || rc=1
ok_or_fail $rc "E=2 over 3 ranks with an expert map leaving rank 1 empty"
exit $fail
