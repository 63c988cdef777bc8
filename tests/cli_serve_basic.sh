#!/usr/bin/env bash
# cli_serve_basic.sh — a real `moe-ep serve` under mpirun -np 2 on a Unix socket:
#  - --threads reaches the layers (the start line says rank 0 runs on 3 threads);
#  - INFO reports the model, the layer and 2 ranks, expert-parallel (the 7 experts in uneven
#    slices of 4 and 3: E need not divide by the rank count);
#  - served results equal `moe-ep forward` under mpirun -np 2 (the same placement) bit for bit
#    (CPU backend): the HF fixture's hidden_states, and 300 random rows split by the client into
#    64-row requests that the server batches and spreads over both ranks (output and router
#    logits, byte-identical files); and the single-rank forward within fp32 tolerance;
#  - idle ranks do not spin a core (CPU time of every rank over 2 s, from /proc);
#  - SIGTERM to rank 0 drains, every rank exits 0, mpirun exits 0, ready file and socket go;
#  - the same for a Llama-4 block (E=5 over 2 ranks), stopped with SIGINT.
here=$(cd "$(dirname "$0")" && pwd)
. "$here/util/serve_common.sh"

SOCK=$TMP/s.sock
start_server basic 2 --listen "unix:$SOCK" --config "$QCFG" --weights "$QW" --max-batch-tokens 64 --threads 3
# --threads reaches the served layers (the start line names rank 0's)
grep -q "rank 0 on cpu (3 threads)" "$SERVER_LOG" || fail "--threads 3 did not reach the served layers"
[ "$ADDR" = "unix:$SOCK" ] || fail "ready file address '$ADDR'"
[ "$RANK0" -gt 0 ] 2>/dev/null || fail "ready file pid '$RANK0'"

info=$("$MOE_EP" client --connect "$ADDR" --info) || fail "client --info"
echo "$info"
echo "$info" | grep -q "backend cpu+ep, 2 rank(s)" || fail "INFO does not report 2 expert-parallel ranks"
echo "$info" | grep -q "hidden 37, experts 7, top-k 3" || fail "INFO shape"
echo "$info" | grep -q "^layers: 0$" || fail "INFO layers"
ok "INFO"

# The fixture's 14 tokens.
forward_as_served "$TMP/f1.st" --config "$QCFG" --weights "$QW" --input "$QIO" || fail "forward"
"$MOE_EP" client --connect "$ADDR" --input "$QIO" --output "$TMP/c1.st" --logits || fail "client forward"
cmp "$TMP/f1.st" "$TMP/c1.st" || fail "served output/logits differ from moe-ep forward (fixture)"
"$MOE_EP" forward --backend cpu --config "$QCFG" --weights "$QW" --input "$QIO" --output "$TMP/one.st" >/dev/null || fail "single-rank forward"
"$MOE_EP" compare "$TMP/c1.st" "$TMP/one.st" --tol 1e-6 >/dev/null || fail "served output differs from the single-rank forward beyond 1e-6"
"$MOE_EP" compare "$TMP/c1.st" "$QIO" --tol 1e-5 --mask tie_mask >/dev/null || fail "served output differs from HF's"
ok "fixture: served == forward (2 ranks), bit for bit; == one rank and HF within tolerance"

# 300 random rows (seed from the clock, printed): 5 requests of <= 64 rows.
seed=$(( $(date +%s%N) % 1000000007 ))
echo "random input seed $seed"
"$MOE_EP" gen-input --config "$QCFG" --tokens 300 --seed "$seed" --output "$TMP/x.st" >/dev/null || fail "gen-input"
forward_as_served "$TMP/f2.st" --config "$QCFG" --weights "$QW" --input "$TMP/x.st" || fail "forward"
out=$("$MOE_EP" client --connect "$ADDR" --input "$TMP/x.st" --output "$TMP/c2.st" --logits) || fail "client forward"
echo "$out"
echo "$out" | grep -q "in 5 request(s)" || fail "expected 5 requests of <= 64 rows"
cmp "$TMP/f2.st" "$TMP/c2.st" || fail "served output/logits differ from moe-ep forward (random, seed $seed)"
ok "random 300 rows: served == forward, bit for bit"

# Idle CPU: after the work above the ranks wait for the next batch. Busy-polling would cost
# ~100% of a core each (200 ticks in 2 s at 100 Hz); the sleep-poll loop costs a few percent.
sleep 1
pids=$(rank_pids)
[ "$(echo "$pids" | wc -w)" -eq 2 ] || fail "expected 2 rank processes under mpirun, found '$pids'"
hz=$(getconf CLK_TCK)
declare -A t0
for p in $pids; do t0[$p]=$(cpu_ticks "$p"); done
sleep 2
for p in $pids; do
    used=$(( $(cpu_ticks "$p") - ${t0[$p]} ))
    pct=$(( used * 100 / (2 * hz) ))
    echo "idle rank pid $p: $used ticks in 2 s = ${pct}% of a core"
    [ "$pct" -le 20 ] || fail "rank pid $p uses ${pct}% of a core while idle (expected <= 20%)"
done
ok "idle ranks do not spin"

stop_server TERM
[ ! -e "$TMP/basic.ready" ] || fail "ready file left behind"
[ ! -e "$SOCK" ] || fail "socket file left behind"
ok "ready file and socket removed"

# Llama-4 (shared expert, sigmoid routing), stopped with SIGINT.
LCFG=$FIX/llama4_k1_fp32/config.json
LW=$FIX/llama4_k1_fp32/weights.safetensors
LIO=$FIX/llama4_k1_fp32/io.safetensors
start_server llama 2 --listen "unix:$TMP/l.sock" --config "$LCFG" --weights "$LW"
forward_as_served "$TMP/f3.st" --config "$LCFG" --weights "$LW" --input "$LIO" || fail "forward llama4"
"$MOE_EP" client --connect "$ADDR" --input "$LIO" --output "$TMP/c3.st" --logits || fail "client llama4"
cmp "$TMP/f3.st" "$TMP/c3.st" || fail "llama4: served differs from moe-ep forward"
ok "llama4: served == forward, bit for bit"
stop_server INT
echo "PASS"
