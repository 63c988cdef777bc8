#!/usr/bin/env bash
# cli_serve_tcp_load.sh — a real `moe-ep serve` under mpirun -np 2 on 127.0.0.1 (port 0: the
# kernel picks a free port, the ready file says which):
#  - 8 concurrent clients x 50 requests of random T (1..64): every reply row equals the
#    in-process engine's output for that row (outputs, and router logits on every other
#    request; within the per-row fp32 bound, the layer being expert-parallel over the 2 ranks),
#    none lost, none mixed up; a 20 ms batching budget makes requests of different clients
#    share batches (checked: a batch bigger than any one request);
#  - STATS counts exactly those requests and tokens, no errors;
#  - served == `moe-ep forward` under mpirun -np 2 (the same placement), bit for bit, over TCP;
#  - a SHUTDOWN request (the server runs with --allow-remote-shutdown) drains it: mpirun exits 0.
here=$(cd "$(dirname "$0")" && pwd)
. "$here/util/serve_common.sh"

start_server tcp 2 --listen tcp:127.0.0.1:0 --config "$QCFG" --weights "$QW" \
    --max-wait-us 20000 --allow-remote-shutdown
case "$ADDR" in tcp:127.0.0.1:[0-9]*) ;; *) fail "bound address '$ADDR'" ;; esac
[ "${ADDR##*:}" != 0 ] || fail "port 0 was not resolved to the bound port"

out=$("$MOE_EP" client --connect "$ADDR" --load --clients 8 --requests 50 --max-T 64 \
      --verify-config "$QCFG" --verify-weights "$QW" 2>&1)
rc=$?
echo "$out"
[ $rc -eq 0 ] || fail "load test failed (rc $rc)"
echo "$out" | grep -q "400 verified, 0 failed, 0 mismatched rows" || fail "load summary"
ok "8 clients x 50 requests: all verified"

stats=$("$MOE_EP" client --connect "$ADDR" --stats) || fail "stats"
echo "$stats"
val() { echo "$stats" | awk -v k="$1" '$1 == k {print $2}'; }
[ "$(val requests_ok)" = 400 ] || fail "requests_ok $(val requests_ok), expected 400"
[ "$(val requests_failed)" = 0 ] || fail "requests_failed $(val requests_failed)"
tokens=$(echo "$out" | sed -n 's/.* \([0-9]*\) tokens in .*/\1/p')
[ "$(val tokens)" = "$tokens" ] || fail "stats tokens $(val tokens) != client's $tokens"
[ "$(val batch_tokens_max)" -gt 64 ] || fail "no batch mixed requests (largest batch $(val batch_tokens_max) rows)"
[ "$(val batches)" -lt 400 ] || fail "every request ran alone ($(val batches) batches)"
[ "$(val latency_samples)" = 400 ] || fail "latency samples"
ok "stats: 400 requests, $(val batches) batches, largest $(val batch_tokens_max) rows"

forward_as_served "$TMP/f.st" --config "$QCFG" --weights "$QW" --input "$QIO" || fail "forward"
"$MOE_EP" client --connect "$ADDR" --input "$QIO" --output "$TMP/c.st" --logits || fail "client forward"
cmp "$TMP/f.st" "$TMP/c.st" || fail "served differs from moe-ep forward over TCP"
ok "tcp: served == forward"

"$MOE_EP" client --connect "$ADDR" --shutdown || fail "SHUTDOWN refused"
wait_exit "$SERVER_PID" 30
[ "$EXIT_RC" -eq 0 ] || fail "mpirun exited $EXIT_RC after SHUTDOWN"
grep -q "SHUTDOWN request: draining" "$SERVER_LOG" || fail "no drain after SHUTDOWN"
SERVER_PID=""
ok "SHUTDOWN: drained, mpirun exited 0"
echo "PASS"
