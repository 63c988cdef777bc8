#!/usr/bin/env bash
# cli_ep_backward.sh — `moe-ep backward` under mpirun (CPU backend): rank 0 writes the gradients
# file, and it must be the single-rank run's file again:
#  * the same tensor names, dtypes and shapes (grad.hidden_states keeps the input's [B,S,H]);
#  * the expert gradients byte for byte (each expert is computed whole on its owner, in the same
#    order as on one rank);
#  * grad.hidden_states, the router's and Llama-4's shared-expert gradients within 1e-5 (fp32:
#    each owner's partial sums, and the replicated gradients summed over the ranks, round
#    differently);
# for the tiny E=7 preset (tiny-qwen3, the HF fixture's weights: fused and per-expert hub
# names) at -np 2 and 4 (uneven slices), and for a Llama-4 block (E=5, shared expert) at -np 2
# and 4; also with --expert-map: a non-contiguous placement, and maps that leave a rank (rank 0
# included: it writes the file) without experts.
set -u
. "$(dirname "$0")/util/cli_mpi_common.sh"
seed=$(( $(date +%s%N) % 1000003 ))
echo "input seed $seed"
bad() { echo "FAIL: $1"; [ -f "$tmp/log" ] && tail -20 "$tmp/log"; fail=1; }

# backward_case NAME CONFIG WEIGHTS H NP [MAP_JSON]: one rank's gradients vs NP ranks'
backward_case() {
  local name=$1 cfg=$2 w=$3 H=$4 np=$5 map=${6:-}
  local in=$tmp/in_$H.safetensors one=$tmp/one_$name.safetensors got=$tmp/ep.safetensors extra=()
  if [ ! -f "$in" ]; then
    $st gen "$in" "$seed" "hidden_states:3x15x$H" "grad_output:3x15x$H" || { bad "writing the inputs"; return; }
  fi
  if [ ! -f "$one" ]; then
    "$ep" backward --backend cpu --config "$cfg" --weights "$w" --input "$in" --grad-output "$in" --output "$one" > "$tmp/log" 2>&1 ||
      { bad "$name: single-rank backward"; return; }
  fi
  local what="$name np $np${map:+ map $map}"
  if [ -n "$map" ]; then echo "$map" > "$tmp/map.json"; extra=(--expert-map "$tmp/map.json"); fi
  rm -f "$got"
  run_mpi "$np" "$ep" backward --backend cpu --config "$cfg" --weights "$w" --input "$in" --grad-output "$in" \
    --output "$got" "${extra[@]}" > "$tmp/log" 2>&1 || { bad "$what: backward under mpirun (exit $?)"; return; }
  grep -q "over $np ranks" "$tmp/log" || { bad "$what: not expert-parallel over $np ranks"; return; }
  $st layout "$got" "$one" > "$tmp/log" 2>&1 || { bad "$what: tensor names/dtypes/shapes differ from one rank's"; return; }
  $st bitwise "$got" "$one" "experts." > "$tmp/log" 2>&1 || { bad "$what: expert gradients not bitwise equal to one rank's"; return; }
  local n t ok=1
  n=$($st names "$one" "experts.")
  for t in $n; do
    "$ep" compare "$got" "$one" --tensor "$t" --tol 1e-5 > "$tmp/log" 2>&1 || { bad "$what: $t beyond 1e-5 of one rank's"; ok=0; }
  done
  [ $ok = 1 ] && echo "ok: $what: same names and shapes, expert gradients bitwise, $(echo $n | wc -w) others within 1e-5"
}

Q=$src/tests/fixtures/hf/qwen3_norm_fp32
L=$src/tests/fixtures/hf/llama4_k2_fp32
backward_case qwen3 tiny-qwen3 "$Q/weights.safetensors" 37 2
backward_case qwen3 tiny-qwen3 "$Q/weights.safetensors" 37 4
backward_case qwen3 tiny-qwen3 "$Q/weights.safetensors" 37 2 '{"experts_per_rank": [[0, 2, 4, 6], [1, 3, 5]]}'
backward_case qwen3 tiny-qwen3 "$Q/weights.safetensors" 37 4 '{"experts_per_rank": [[6, 0], [], [1, 2, 3, 5], [4]]}'
backward_case qwen3hub tiny-qwen3 "$Q/weights_hub.safetensors" 37 4
backward_case qwen3hub tiny-qwen3 "$Q/weights_hub.safetensors" 37 2 '{"experts_per_rank": [[], [0, 1, 2, 3, 4, 5, 6]]}'
backward_case llama4 "$L/config.json" "$L/weights.safetensors" 41 2
backward_case llama4 "$L/config.json" "$L/weights.safetensors" 41 4
backward_case llama4 "$L/config.json" "$L/weights.safetensors" 41 2 '{"experts_per_rank": [[4, 1], [0, 2, 3]]}'
backward_case llama4 "$L/config.json" "$L/weights.safetensors" 41 4 '{"experts_per_rank": [[], [3], [0, 1, 2], [4]]}'

# a map that is not a placement of the E experts: refused on every rank, naming the file
echo '{"experts_per_rank": [[0, 1, 2], [3, 4]]}' > "$tmp/short.json"
run_mpi 2 "$ep" backward --backend cpu --config tiny-qwen3 --weights "$Q/weights.safetensors" --input "$tmp/in_37.safetensors" \
  --grad-output "$tmp/in_37.safetensors" --output "$tmp/x.safetensors" --expert-map "$tmp/short.json" > "$tmp/log" 2>&1; rc=$?
n=$(grep -c "expert-map $tmp/short.json: expert 5 is not listed for any rank" "$tmp/log")
if [ $rc = 0 ] || [ $rc = 124 ] || [ "$n" -lt 1 ] || [ -e "$tmp/x.safetensors" ]; then
  bad "a map missing experts 5 and 6 (exit $rc)"; else echo "ok: a map missing experts refused"; fi
exit $fail
