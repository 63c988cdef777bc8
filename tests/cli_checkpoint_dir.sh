#!/usr/bin/env bash
# cli_checkpoint_dir.sh — a checkpoint directory as --weights (and as the model): the
# directory's model.safetensors.index.json when there is one, else its model.safetensors.
#  * forward with --weights DIR (one model.safetensors) and with --weights DIR of a sharded
#    checkpoint (index + 3 shards, per-expert hub names; and a full checkpoint's
#    model.layers.0.mlp.* names with --layer 0): output and router_logits byte-identical to the
#    run on the plain file, on one rank and expert-parallel over 2 ranks (each rank reads its
#    experts from the shards);
#  * backward with --weights DIR: the same gradient file as with the plain file;
#  * check with the directory as --model (check draws its weights from the seed and takes no
#    --weights): config.json is read from it, PASS on one rank and over 2;
#  * a directory holding neither file: refused on every rank naming it, no hang.
set -u
. "$(dirname "$0")/util/cli_mpi_common.sh"
ok_or_fail() { if [ "$1" = 0 ]; then echo "ok: $2"; else echo "FAIL: $2"; tail -20 "$tmp/log"; fail=1; fi; }
D=$src/tests/fixtures/hf/qwen3_norm_fp32
IN=$D/io.safetensors

# one file: DIR/model.safetensors (+ its config.json)
mkdir "$tmp/single"
cp "$D/config.json" "$tmp/single/config.json"
cp "$D/weights.safetensors" "$tmp/single/model.safetensors"
# sharded, per-expert hub names
mkdir "$tmp/sharded"
cp "$D/config.json" "$tmp/sharded/config.json"
$st shard "$D/weights_hub.safetensors" "$tmp/sharded" 3 || { echo "FAIL: sharding"; exit 1; }
# sharded full checkpoint: model.layers.0.mlp.<name>
mkdir "$tmp/full"
$st shard "$D/weights.safetensors" "$tmp/full" 2 model.layers.0.mlp. || { echo "FAIL: sharding"; exit 1; }
ls "$tmp"/single "$tmp"/sharded "$tmp"/full

# forward_same NAME NP REF_WEIGHTS DIR_WEIGHTS [ARGS...]: byte-identical output files
forward_same() {
  local name=$1 np=$2 ref=$3 dir=$4; shift 4
  local launch=("$ep")
  [ "$np" -gt 1 ] && launch=(run_mpi "$np" "$ep")
  "${launch[@]}" forward --backend cpu --config "$D/config.json" --weights "$ref" --input "$IN" --output "$tmp/ref.st" > "$tmp/log" 2>&1 ||
    { ok_or_fail 1 "$name: forward on the file"; return; }
  "${launch[@]}" forward --backend cpu --config "$D/config.json" --weights "$dir" "$@" --input "$IN" --output "$tmp/dir.st" > "$tmp/log" 2>&1 ||
    { ok_or_fail 1 "$name: forward on the directory"; return; }
  cmp "$tmp/ref.st" "$tmp/dir.st" > "$tmp/log" 2>&1
  ok_or_fail $? "$name (np $np): output and router_logits byte-identical to the plain file's"
}
for np in 1 2; do
  forward_same "--weights DIR (model.safetensors)" $np "$D/weights.safetensors" "$tmp/single"
  forward_same "--weights DIR (index + 3 shards, hub names)" $np "$D/weights_hub.safetensors" "$tmp/sharded"
  forward_same "--weights DIR --layer 0 (full checkpoint, 2 shards)" $np "$D/weights.safetensors" "$tmp/full" --layer 0
done
forward_same "--weights DIR/model.safetensors.index.json" 2 "$D/weights_hub.safetensors" "$tmp/sharded/model.safetensors.index.json"
# the result is HF's
"$ep" compare "$tmp/dir.st" "$IN" --tol 1e-5 --mask tie_mask > "$tmp/log" 2>&1
ok_or_fail $? "forward on the sharded directory equals HF's output"

# backward: the same gradients, under the loaded names
"$ep" backward --backend cpu --config "$D/config.json" --weights "$D/weights_hub.safetensors" --input "$IN" --grad-output "$IN" \
  --output "$tmp/g_ref.st" > "$tmp/log" 2>&1 && run_mpi 2 "$ep" backward --backend cpu --config "$tmp/sharded" --weights "$tmp/sharded" \
  --input "$IN" --grad-output "$IN" --output "$tmp/g_dir.st" >> "$tmp/log" 2>&1 &&
  $st layout "$tmp/g_ref.st" "$tmp/g_dir.st" >> "$tmp/log" 2>&1 && $st bitwise "$tmp/g_dir.st" "$tmp/g_ref.st" "experts." >> "$tmp/log" 2>&1 &&
  "$ep" compare "$tmp/g_dir.st" "$tmp/g_ref.st" --tensor grad.hidden_states --tol 1e-5 >> "$tmp/log" 2>&1
ok_or_fail $? "np 2 backward --config DIR --weights DIR (sharded): the single-rank file's names, shapes and gradients"

# check: the directory as the model
"$ep" check --model "$tmp/single" --backend cpu --tokens 20 --backward > "$tmp/log" 2>&1 && grep -q "^PASS" "$tmp/log"
ok_or_fail $? "check --model DIR"
run_mpi 2 "$ep" check --model "$tmp/sharded" --backend cpu --tokens 20 --backward > "$tmp/log" 2>&1 && grep -q "PASS on all 2 ranks" "$tmp/log"
ok_or_fail $? "np 2 check --model DIR"

# a directory without weights: refused on every rank, naming it
mkdir "$tmp/empty"
for np in 1 2; do
  launch=("$ep"); [ $np -gt 1 ] && launch=(run_mpi $np "$ep")
  "${launch[@]}" forward --backend cpu --config "$D/config.json" --weights "$tmp/empty" --input "$IN" --output "$tmp/x.st" > "$tmp/log" 2>&1; rc=$?
  n=$(grep -c "$tmp/empty: a directory without model.safetensors.index.json or model.safetensors" "$tmp/log")
  [ $rc != 0 ] && [ $rc != 124 ] && [ "$n" = $np ] && [ ! -e "$tmp/x.st" ]
  ok_or_fail $? "np $np: a directory without weights refused on every rank (exit $rc)"
done
exit $fail
