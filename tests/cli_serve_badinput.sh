#!/usr/bin/env bash
# cli_serve_badinput.sh — every kind of bad input against a real `moe-ep serve` (mpirun -np 2,
# Unix socket), while well-behaved clients keep running verified load in parallel:
#   wrong magic / version, unknown op, wrong H / dtype, unknown layer, T = 0, T over the limit,
#   payload length not matching the header, a payload over the limit, unknown flags, a nonzero
#   status, frames truncated by a close (header / payload), a frame that stalls (io timeout),
#   a client that disconnects mid-request, one that never reads its replies, too many
#   connections, a refused SHUTDOWN.
# Each gets the documented error code and message; request-level errors leave the connection
# usable, stream-level ones close it. The parallel load must see no error and no wrong row,
# and the server must still answer correctly and drain cleanly at the end.
here=$(cd "$(dirname "$0")" && pwd)
. "$here/util/serve_common.sh"

start_server bad 2 --listen "unix:$TMP/b.sock" --config "$QCFG" --weights "$QW" \
    --io-timeout-ms 1000 --max-batch-tokens 256 --max-connections 12

# Well-behaved clients, in a loop until the bad inputs are done (so they overlap them
# whatever the machine's speed).
(
    n=0
    while [ ! -e "$TMP/done" ] || [ $n -lt 1 ]; do
        "$MOE_EP" client --connect "$ADDR" --load --clients 2 --requests 40 --max-T 32 \
            --verify-config "$QCFG" --verify-weights "$QW" >"$TMP/load.$n.log" 2>&1 ||
            echo "load round $n failed" >>"$TMP/load.fail"
        n=$((n + 1))
    done
    echo $n >"$TMP/load.rounds"
) &
LOAD_PID=$!

# case  expected-status  connection-afterwards
cases="bad-magic 3 closed
bad-version 4 closed
unknown-op 4 usable
wrong-h 1 usable
wrong-dtype 1 usable
unknown-layer 1 usable
t-zero 1 usable
t-over 1 closed
length-mismatch 1 usable
oversize 1 closed
bad-flags 1 usable
nonzero-status 1 usable
trunc-close 3 closed
trunc-payload-close 3 closed
trunc-stall 11 closed"
while read -r c code after; do
    out=$("$MOE_EP" client --connect "$ADDR" --malformed "$c" 2>&1)
    echo "$out"
    echo "$out" | grep -q "^$c: reply .* status=$code (" || fail "$c: expected status $code"
    echo "$out" | grep -q "^$c: reply .*message=\"..*\"" || fail "$c: no error message"
    echo "$out" | grep -q "^$c: connection $after$" || fail "$c: expected the connection $after"
    ok "$c -> status $code, connection $after"
done <<<"$cases"

# A client that sends a request and disconnects before the reply.
"$MOE_EP" client --connect "$ADDR" --malformed disconnect || fail "disconnect case"
# A client that never reads: its replies pile up, the write stalls past the io timeout.
out=$("$MOE_EP" client --connect "$ADDR" --malformed no-read --count 24 --hold-ms 30000) || fail "no-read case"
echo "$out"
echo "$out" | grep -q "closed by the server after" || fail "no-read: the server did not close the connection"
grep -q "replies unread for 1000 ms" "$SERVER_LOG" || fail "no-read: connection not timed out"
ok "no-read: timed out and closed"
# SHUTDOWN without --allow-remote-shutdown.
out=$("$MOE_EP" client --connect "$ADDR" --shutdown 2>&1) && fail "SHUTDOWN was accepted"
echo "$out" | grep -q "remote shutdown is disabled" || fail "SHUTDOWN refusal message: $out"
ok "SHUTDOWN refused"

touch "$TMP/done"
wait "$LOAD_PID"
rounds=$(cat "$TMP/load.rounds")
cat "$TMP"/load.*.log | grep "load:" | head -3
[ ! -e "$TMP/load.fail" ] || { cat "$TMP"/load.*.log; fail "the parallel load saw errors: $(cat "$TMP/load.fail")"; }
ok "parallel load: $rounds round(s) of 2 x 40 verified requests, no error"

# More connections than --max-connections 12. The limit is global, so a client connecting
# during the flood is refused too (by design); clients already connected must not notice:
# a paced load (2 connections, 40 requests/s, ~2 s) runs through the flood.
"$MOE_EP" client --connect "$ADDR" --load --clients 2 --requests 40 --max-T 32 --rate 40 \
    --verify-config "$QCFG" --verify-weights "$QW" >"$TMP/paced.log" 2>&1 &
PACED_PID=$!
for i in $(seq 100); do   # the paced clients' 2 connections + this STATS one
    [ "$(stat_field connections_open)" -ge 3 ] && break
    sleep 0.05
done
out=$("$MOE_EP" client --connect "$ADDR" --malformed too-many-connections --count 14 --hold-ms 300 2>&1)
echo "$out"
echo "$out" | grep -q "status=5 (.*too many connections (limit 12" || fail "too-many-connections: no refusal"
wait "$PACED_PID" || { cat "$TMP/paced.log"; fail "the connected load was disturbed by the connection flood"; }
cat "$TMP/paced.log"
ok "connections over the limit refused with status 5; connected clients unaffected"

# The server still answers correctly, and its counters saw the errors.
forward_as_served "$TMP/f.st" --config "$QCFG" --weights "$QW" --input "$QIO" || fail "forward"
"$MOE_EP" client --connect "$ADDR" --input "$QIO" --output "$TMP/c.st" --logits || fail "client after bad inputs"
cmp "$TMP/f.st" "$TMP/c.st" || fail "served differs from forward after bad inputs"
stats=$("$MOE_EP" client --connect "$ADDR" --stats)
echo "$stats"
val() { echo "$stats" | awk -v k="$1" '$1 == k {print $2}'; }
[ "$(val connections_timed_out)" -ge 2 ] || fail "expected >= 2 timed-out connections"
[ "$(val connections_rejected)" -ge 1 ] || fail "expected >= 1 refused connection"
[ "$(val errors.1)" -ge 9 ] || fail "expected >= 9 invalid-argument errors"
[ "$(val bytes_in_flight)" = 0 ] || fail "bytes in flight leaked: $(val bytes_in_flight)"
ok "server healthy after bad inputs"
stop_server TERM
echo "PASS"
