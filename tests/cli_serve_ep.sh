#!/usr/bin/env bash
# cli_serve_ep.sh — the served layer running expert-parallel (src/ep/): each rank holds its
# contiguous slice of the experts (the first E mod N ranks one more) and the batch's rows are
# dispatched to their experts' owners and combined back.
#  - Qwen3-style block, E=8 over 2 ranks (random weights, the same generator the client
#    verifies with): INFO says cpu+ep; 8 clients x 50 requests of random T, every row within
#    the docs/DESIGN.md per-row fp32 bound (10 x 1e-5) of the single-rank engine in the client's
#    process (expert parallelism rounds each rank's partial sum, so not bit for bit);
#  - Llama-4-style block (shared expert, sigmoid routing), E=4 over 2 ranks: the same;
#  - E=8 over 4 ranks (oversubscribed): the same, fewer requests;
#  - --ep off on the E=8 block: experts replicated, bit for bit again;
#  - --ep on where E does not divide (the 7-expert fixture over 2 ranks: slices of 4 and 3):
#    expert-parallel, verified load, and the fixture's output equal to `moe-ep forward` under
#    mpirun -np 2 bit for bit and to the single-rank forward and HF's within tolerance;
#  - more ranks than experts (E=2 over 3 ranks): --ep on is a startup error on every rank
#    naming why (no hang); --ep auto falls back to replicated experts.
here=$(cd "$(dirname "$0")" && pwd)
. "$here/util/serve_common.sh"

cat >"$TMP/q8.json" <<'EOF'
{"model_type": "qwen3_moe", "hidden_size": 48, "moe_intermediate_size": 24, "num_experts": 8,
 "num_experts_per_tok": 3, "norm_topk_prob": true, "torch_dtype": "float32"}
EOF
cat >"$TMP/l4.json" <<'EOF'
{"model_type": "llama4_text", "hidden_size": 40, "intermediate_size": 20, "num_local_experts": 4,
 "num_experts_per_tok": 1, "torch_dtype": "float32"}
EOF
seed=$(( $(date +%s%N) % 1000000007 ))
echo "weights seed $seed"

load() { # CONFIG TOL CLIENTS REQUESTS
    local out
    out=$("$MOE_EP" client --connect "$ADDR" --load --clients "$3" --requests "$4" --max-T 48 \
          --verify-config "$1" --verify-weights "random:$seed" --tol "$2" 2>&1)
    local rc=$?
    echo "$out"
    [ $rc -eq 0 ] || fail "load against $1 (tol $2) failed"
    echo "$out" | grep -q "$(( $3 * $4 )) verified, 0 failed, 0 mismatched rows" || fail "load summary"
}

for cfg in q8 l4; do
    start_server "ep-$cfg" 2 --listen "unix:$TMP/$cfg.sock" --config "$TMP/$cfg.json" --weights "random:$seed"
    grep -q "expert-parallel" "$SERVER_LOG" || fail "$cfg: not expert-parallel"
    "$MOE_EP" client --connect "$ADDR" --info | grep -q "backend cpu+ep, 2 rank(s)" || fail "$cfg: INFO"
    load "$TMP/$cfg.json" 1e-4 8 50
    stop_server TERM
    ok "$cfg: expert-parallel over 2 ranks, every row within tolerance"
done

start_server ep4 4 --listen "unix:$TMP/q8x4.sock" --config "$TMP/q8.json" --weights "random:$seed"
"$MOE_EP" client --connect "$ADDR" --info | grep -q "backend cpu+ep, 4 rank(s)" || fail "4 ranks: INFO"
load "$TMP/q8.json" 1e-4 4 20
stop_server TERM
ok "E=8 over 4 ranks"

start_server repl 2 --listen "unix:$TMP/r.sock" --config "$TMP/q8.json" --weights "random:$seed" --ep off
"$MOE_EP" client --connect "$ADDR" --info | grep -q "backend cpu, 2 rank(s)" || fail "--ep off: INFO"
load "$TMP/q8.json" 0 4 25
stop_server TERM
ok "--ep off: replicated experts, bit for bit"

# E=7 over 2 ranks (uneven slices), --ep on: works
start_server e7 2 --listen "unix:$TMP/e7.sock" --config "$QCFG" --weights "$QW" --ep on
"$MOE_EP" client --connect "$ADDR" --info | grep -q "backend cpu+ep, 2 rank(s)" || fail "E=7: INFO"
"$MOE_EP" client --connect "$ADDR" --load --clients 4 --requests 25 --max-T 48 \
    --verify-config "$QCFG" --verify-weights "$QW" >"$TMP/e7load.log" 2>&1 || { cat "$TMP/e7load.log"; fail "E=7: load"; }
grep -q "100 verified, 0 failed, 0 mismatched rows" "$TMP/e7load.log" || { cat "$TMP/e7load.log"; fail "E=7: load summary"; }
"$MOE_EP" client --connect "$ADDR" --input "$QIO" --output "$TMP/e7c.st" --logits >/dev/null || fail "E=7: client"
forward_as_served "$TMP/e7f.st" --config "$QCFG" --weights "$QW" --input "$QIO" || fail "E=7: forward under mpirun"
cmp "$TMP/e7f.st" "$TMP/e7c.st" || fail "E=7: served differs from forward under mpirun -np 2"
"$MOE_EP" forward --backend cpu --config "$QCFG" --weights "$QW" --input "$QIO" --output "$TMP/e7one.st" >/dev/null || fail "E=7: forward"
"$MOE_EP" compare "$TMP/e7c.st" "$TMP/e7one.st" --tol 1e-6 >/dev/null || fail "E=7: served differs from one rank"
"$MOE_EP" compare "$TMP/e7c.st" "$QIO" --tol 1e-5 --mask tie_mask >/dev/null || fail "E=7: served differs from HF"
stop_server TERM
ok "--ep on with E=7 over 2 ranks: expert-parallel, equal to forward (2 ranks: bit for bit; 1 rank, HF: within tolerance)"

# more ranks than experts: E=2 over 3
cat >"$TMP/e2.json" <<'EOF'
{"model_type": "qwen3_moe", "hidden_size": 16, "moe_intermediate_size": 8, "num_experts": 2,
 "num_experts_per_tok": 1, "norm_topk_prob": true, "torch_dtype": "float32"}
EOF
# shellcheck disable=SC2086
$MPIEXEC $MPIRUN_FLAGS -np 3 "$MOE_EP" serve --listen "unix:$TMP/x.sock" --config "$TMP/e2.json" \
    --weights "random:$seed" --ep on >"$TMP/x.log" 2>&1 &
pid=$!
wait_exit $pid 60
cat "$TMP/x.log"
[ "$EXIT_RC" -ne 0 ] || fail "--ep on with E=2 over 3 ranks exited 0"
grep -q "ep on, but there are more ranks than experts (E=2 experts, 3 rank(s)" "$TMP/x.log" ||
    fail "no reason given for refusing --ep on"
ok "--ep on with E=2 over 3 ranks: refused at startup with the reason"
start_server e2auto 3 --listen "unix:$TMP/e2.sock" --config "$TMP/e2.json" --weights "random:$seed"
"$MOE_EP" client --connect "$ADDR" --info | grep -q "backend cpu, 3 rank(s)" || fail "E=2 over 3, --ep auto: INFO"
load "$TMP/e2.json" 0 2 10
stop_server TERM
ok "--ep auto with E=2 over 3 ranks: replicated experts, bit for bit"
echo "PASS"
