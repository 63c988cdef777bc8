#!/usr/bin/env bash
# cli_serve_lifecycle.sh — the service's life cycle under mpirun -np 2:
#  - drain: a request waiting in the batch queue (a 5 s batching budget holds it there) when
#    SIGTERM reaches rank 0 is still answered, correctly; then every rank and mpirun exit 0;
#  - startup failures (missing weights; the socket of a live server) end every rank with one
#    clear message and a nonzero status, never a hang; the live server is unaffected;
#  - a rank that dies ends the whole job (mpirun exits nonzero) instead of a hang;
#  - --layers: a full checkpoint with model.layers.3 and model.layers.5 (built from two HF
#    fixtures when python3 is there) serves both, each equal to `moe-ep forward --layer N`
#    (served results are compared with `moe-ep forward` under mpirun -np 2: the same
#    expert-parallel placement, so bit for bit);
#    an unserved layer is refused;
#  - a bf16 block: served == forward, bit for bit.
here=$(cd "$(dirname "$0")" && pwd)
. "$here/util/serve_common.sh"

forward_as_served "$TMP/f.st" --config "$QCFG" --weights "$QW" --input "$QIO" || fail "forward"

# ---- drain with a request in flight ----
start_server drain 2 --listen "unix:$TMP/d.sock" --config "$QCFG" --weights "$QW" --max-wait-us 5000000
"$MOE_EP" client --connect "$ADDR" --input "$QIO" --output "$TMP/c.st" --logits >"$TMP/drain-client.log" 2>&1 &
CLIENT_PID=$!
queued=0
for i in $(seq 100); do
    [ "$(stat_field queue_depth)" = 1 ] && { queued=1; break; }
    sleep 0.05
done
[ $queued = 1 ] || fail "the request never showed in the queue"
kill -TERM "$RANK0"
wait_exit "$CLIENT_PID" 30
[ "$EXIT_RC" -eq 0 ] || { cat "$TMP/drain-client.log"; fail "the in-flight request was not answered"; }
cmp "$TMP/f.st" "$TMP/c.st" || fail "the drained request's output differs from forward"
wait_exit "$SERVER_PID" 30
[ "$EXIT_RC" -eq 0 ] || fail "mpirun exited $EXIT_RC after the drain"
grep -q "draining (finishing 1 queued request(s))" "$SERVER_LOG" || fail "drain message"
SERVER_PID=""
ok "SIGTERM with a queued request: answered correctly, mpirun exited 0"

# ---- admission limits: requests waiting per connection, bytes in flight ----
# A 1-row fp32 request reserves 148 (payload) + 48 + 148 (reply) = 344 bytes; a 5 s batching
# budget keeps admitted requests queued while the limits are probed.
start_server limits 2 --listen "unix:$TMP/lim.sock" --config "$QCFG" --weights "$QW" \
    --max-wait-us 5000000 --max-pending 2 --max-inflight-bytes 1100
# A: 1st and 2nd admitted (688 bytes), 3rd over --max-pending 2.
"$MOE_EP" client --connect "$ADDR" --malformed no-read --rows 1 --count 3 --hold-ms 100 || fail "no-read A"
# B: 1st admitted (1032 bytes), 2nd over --max-inflight-bytes 1100.
"$MOE_EP" client --connect "$ADDR" --malformed no-read --rows 1 --count 2 --hold-ms 100 || fail "no-read B"
stats=$("$MOE_EP" client --connect "$ADDR" --stats)
val() { echo "$stats" | awk -v k="$1" '$1 == k {print $2}'; }
grep -q "requests of this connection are already waiting (limit 2" "$SERVER_LOG" || fail "no --max-pending refusal"
grep -q "bytes in flight + 344 for this request exceed the limit of 1100" "$SERVER_LOG" || fail "no --max-inflight-bytes refusal"
[ "$(val errors.5)" = 2 ] || fail "expected 2 'busy' errors, got $(val errors.5)"
[ "$(val queue_depth)" = 3 ] || fail "expected 3 queued requests, got $(val queue_depth)"
[ "$(val bytes_in_flight)" = 1032 ] || fail "expected 1032 bytes in flight, got $(val bytes_in_flight)"
stop_server TERM   # the drain runs the 3 queued requests; their clients are gone: dropped
grep -q "draining (finishing 3 queued request(s))" "$SERVER_LOG" || fail "drain of the queued requests"
ok "limits: --max-pending and --max-inflight-bytes refuse with status 5; drain with orphaned requests"

# ---- startup failures ----
# shellcheck disable=SC2086
$MPIEXEC $MPIRUN_FLAGS -np 2 "$MOE_EP" serve --listen "unix:$TMP/x.sock" --config "$QCFG" \
    --weights "$TMP/missing.safetensors" --ready-file "$TMP/x.ready" >"$TMP/x.log" 2>&1 &
pid=$!
wait_exit $pid 60
cat "$TMP/x.log"
[ "$EXIT_RC" -ne 0 ] || fail "serving missing weights exited 0"
[ "$(grep -c "missing.safetensors" "$TMP/x.log")" -ge 1 ] || fail "no message naming the file"
[ ! -e "$TMP/x.ready" ] || fail "a ready file for a server that failed"
ok "missing weights: every rank exits nonzero with the message"

start_server live 2 --listen "unix:$TMP/live.sock" --config "$QCFG" --weights "$QW"
live_addr=$ADDR
# shellcheck disable=SC2086
$MPIEXEC $MPIRUN_FLAGS -np 2 "$MOE_EP" serve --listen "$live_addr" --config "$QCFG" \
    --weights "$QW" >"$TMP/y.log" 2>&1 &
pid=$!
wait_exit $pid 60
cat "$TMP/y.log"
[ "$EXIT_RC" -ne 0 ] || fail "a second server on a live socket exited 0"
grep -q "another server is accepting" "$TMP/y.log" || fail "no 'another server' message"
"$MOE_EP" client --connect "$live_addr" --input "$QIO" --output "$TMP/c2.st" --logits >/dev/null || fail "live server hurt"
cmp "$TMP/f.st" "$TMP/c2.st" || fail "live server output"
ok "socket in use: refused; the live server still serves"

# ---- a rank dies ----
pids=$(rank_pids)
victim=""
for p in $pids; do [ "$p" != "$RANK0" ] && victim=$p; done
[ -n "$victim" ] || fail "cannot find rank 1 (ranks: $pids)"
kill -9 "$victim"
wait_exit "$SERVER_PID" 60
[ "$EXIT_RC" -ne 0 ] || fail "mpirun exited 0 after a rank was killed"
SERVER_PID=""
tail -n 5 "$SERVER_LOG"
ok "rank 1 killed: the job ended (mpirun status $EXIT_RC), no hang"

# ---- bf16 ----
BCFG=$FIX/qwen3_norm_bf16/config.json
BW=$FIX/qwen3_norm_bf16/weights.safetensors
BIO=$FIX/qwen3_norm_bf16/io.safetensors
start_server bf16 2 --listen "unix:$TMP/h.sock" --config "$BCFG" --weights "$BW"
"$MOE_EP" client --connect "$ADDR" --info | grep -q "dtype bf16" || fail "bf16 INFO"
forward_as_served "$TMP/fb.st" --config "$BCFG" --weights "$BW" --input "$BIO" || fail "forward bf16"
"$MOE_EP" client --connect "$ADDR" --input "$BIO" --output "$TMP/cb.st" --logits >/dev/null || fail "client bf16"
cmp "$TMP/fb.st" "$TMP/cb.st" || fail "bf16: served differs from forward"
stop_server TERM
ok "bf16: served == forward"

# ---- --layers on a full checkpoint ----
if ! command -v python3 >/dev/null; then
    echo "python3 not found: skipping the --layers part"
    echo "PASS"
    exit 0
fi
# Rename the block's tensors to model.layers.N.mlp.* (safetensors: u64 LE header length, JSON
# header, data), stdlib only.
python3 - "$TMP/full.safetensors" "$QW" 3 "$FIX/qwen3_nonorm_fp32/weights.safetensors" 5 <<'EOF' || fail "building the checkpoint"
import json, struct, sys
out, pairs = sys.argv[1], sys.argv[2:]
header, blobs, off = {}, [], 0
for path, layer in zip(pairs[0::2], pairs[1::2]):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
        data = f.read()
    for name, e in h.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        header[f"model.layers.{layer}.mlp.{name}"] = {"dtype": e["dtype"], "shape": e["shape"],
                                                     "data_offsets": [off, off + end - b]}
        blobs.append(data[b:end])
        off += end - b
hj = json.dumps(header).encode()
hj += b" " * (-len(hj) % 8)
with open(out, "wb") as f:
    f.write(struct.pack("<Q", len(hj)) + hj + b"".join(blobs))
EOF
start_server layers 2 --listen "unix:$TMP/m.sock" --config "$QCFG" --weights "$TMP/full.safetensors" --layers 3,5
"$MOE_EP" client --connect "$ADDR" --info | grep -q "^layers: 3 5$" || fail "INFO layers"
for L in 3 5; do
    forward_as_served "$TMP/fl$L.st" --config "$QCFG" --weights "$TMP/full.safetensors" --layer $L --input "$QIO" || fail "forward layer $L"
    "$MOE_EP" client --connect "$ADDR" --layer $L --input "$QIO" --output "$TMP/cl$L.st" --logits >/dev/null || fail "client layer $L"
    cmp "$TMP/fl$L.st" "$TMP/cl$L.st" || fail "layer $L: served differs from forward"
done
cmp -s "$TMP/cl3.st" "$TMP/cl5.st" && fail "layers 3 and 5 gave the same output (weights not per layer?)"
out=$("$MOE_EP" client --connect "$ADDR" --layer 4 --input "$QIO" --output "$TMP/cl4.st" 2>&1) && fail "layer 4 was served"
echo "$out" | grep -q "layer 4 is not served (served layers: 3,5)" || fail "unserved layer message: $out"
stop_server TERM
ok "--layers 3,5: each equals forward --layer N; layer 4 refused"
echo "PASS"
