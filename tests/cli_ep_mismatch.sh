#!/usr/bin/env bash
# cli_ep_mismatch.sh — MPMD launches whose ranks were given different models or options
# (`mpirun -np 2 moe-ep ... : -np 2 moe-ep ...`, the issue's reproducers). Every one must fail
# fast on EVERY rank with a message naming the field the ranks disagree on: a non-zero exit, no
# PASS, no output file, never a hang (each run is time-bounded: a hang fails the test).
#  * check: --backward on half the ranks; --tokens 64 vs 128; two config files that differ
#    only in norm_topk_prob; --seed 2 vs 3 (the low bit); --stats on half the ranks;
#  * forward: two different weight files (the same shapes, other values); two configs that
#    differ only in norm_topk_prob; --stats on half the ranks; `forward : backward`.
set -u
ep=${MOE_EP:?MOE_EP must point at the moe-ep binary}
src=${MOE_SOURCE_DIR:?}
command -v python3 >/dev/null || { echo "SKIP: python3 not installed"; exit 77; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
LIMIT=60 # seconds; a well-behaved refusal takes about one

# mpmd LABEL PATTERN -- ARGS_A -- ARGS_B : mpirun -np 2 moe-ep ARGS_A : -np 2 moe-ep ARGS_B must
# exit non-zero within LIMIT, with PATTERN on all 4 ranks and no PASS
mpmd() {
  local what=$1 pat=$2; shift 3
  local a=() b=()
  while [ "$1" != -- ]; do a+=("$1"); shift; done
  shift
  b=("$@")
  local t0=$SECONDS
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 timeout -k 5 $LIMIT ${MPIEXEC:-mpirun} ${MPIRUN_FLAGS:-} -np 2 "$ep" "${a[@]}" : -np 2 "$ep" "${b[@]}" > "$tmp/log" 2>&1
  local rc=$? n
  n=$(grep -cF -- "$pat" "$tmp/log")
  if [ $rc = 0 ] || [ $rc = 124 ] || [ $rc = 137 ] || [ "$n" != 4 ] || grep -q "PASS" "$tmp/log" || [ -e "$tmp/out.safetensors" ]; then
    echo "FAIL: $what: exit $rc after $((SECONDS - t0)) s, '$pat' from $n of 4 ranks"; tail -15 "$tmp/log"; fail=1
  else
    echo "ok: $what: refused on all 4 ranks in $((SECONDS - t0)) s naming '$pat'"
  fi
  rm -f "$tmp/out.safetensors"
}

E8=$src/tests/fixtures/ep/qwen3_e8.json
sed 's/"norm_topk_prob": true/"norm_topk_prob": false/' "$E8" > "$tmp/e8_nonorm.json"
cmp -s "$E8" "$tmp/e8_nonorm.json" && { echo "FAIL: could not flip norm_topk_prob in $E8"; exit 1; }
C=(check --model "$E8" --backend cpu)
mpmd "check : check --backward" "ranks disagree on --backward" -- "${C[@]}" -- "${C[@]}" --backward
mpmd "check --tokens 64 : --tokens 128" "ranks disagree on --tokens" -- "${C[@]}" --tokens 64 -- "${C[@]}" --tokens 128
mpmd "check, configs differing in norm_topk_prob" "ranks disagree on --model: norm_topk_prob" -- "${C[@]}" -- check --model "$tmp/e8_nonorm.json" --backend cpu
mpmd "check --seed 2 : --seed 3" "ranks disagree on --seed" -- "${C[@]}" --seed 2 -- "${C[@]}" --seed 3
mpmd "check --stats : check" "ranks disagree on --stats" -- "${C[@]}" --stats -- "${C[@]}"

D=$src/tests/fixtures/hf/qwen3_norm_fp32
python3 "$src/tests/util/st_tool.py" reseed "$D/weights.safetensors" "$tmp/w2.safetensors" 7 || { echo "FAIL: writing weights"; exit 1; }
sed 's/"norm_topk_prob": true/"norm_topk_prob": false/' "$D/config.json" > "$tmp/nonorm.json"
cmp -s "$D/config.json" "$tmp/nonorm.json" && { echo "FAIL: could not flip norm_topk_prob in $D/config.json"; exit 1; }
# the second weights file works on its own
"$ep" forward --backend cpu --config "$D/config.json" --weights "$tmp/w2.safetensors" --input "$D/io.safetensors" \
  --output "$tmp/w2out.safetensors" > "$tmp/log" 2>&1 || { echo "FAIL: forward with the second weights"; cat "$tmp/log"; fail=1; }
F=(forward --backend cpu --config "$D/config.json" --input "$D/io.safetensors" --output "$tmp/out.safetensors")
mpmd "forward, two weight files" "ranks disagree on the router and shared-expert weights" -- "${F[@]}" --weights "$D/weights.safetensors" -- "${F[@]}" --weights "$tmp/w2.safetensors"
mpmd "forward, configs differing in norm_topk_prob" "ranks disagree on norm_topk_prob" -- "${F[@]}" --weights "$D/weights.safetensors" -- \
  forward --backend cpu --config "$tmp/nonorm.json" --input "$D/io.safetensors" --output "$tmp/out.safetensors" --weights "$D/weights.safetensors"
mpmd "forward --stats : forward" "ranks disagree on --stats" -- "${F[@]}" --weights "$D/weights.safetensors" --stats -- "${F[@]}" --weights "$D/weights.safetensors"
mpmd "forward : backward" "ranks disagree on the command" -- "${F[@]}" --weights "$D/weights.safetensors" -- \
  backward --backend cpu --config "$D/config.json" --input "$D/io.safetensors" --grad-output "$D/io.safetensors" --output "$tmp/out.safetensors" --weights "$D/weights.safetensors"
exit $fail
