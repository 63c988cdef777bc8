#!/usr/bin/env bash
# cli_nonfinite.sh — a NaN or Inf in the input gives non-finite router logits for that token;
# `moe-ep forward` and `backward` finish (exit 0: the other tokens are right) but warn on stderr
# with the number of such tokens (the layer counts them while routing and moe_layer_check_errors
# reports them), on one rank and under mpirun; the other tokens' outputs equal the clean run's
# bit for bit. A clean input gives no warning.
set -u
ep=${MOE_EP:?MOE_EP must point at the moe-ep binary}
src=${MOE_SOURCE_DIR:?}
command -v python3 >/dev/null || { echo "SKIP: python3 not installed"; exit 77; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
bad() { echo "FAIL: $1"; [ -f "$tmp/err" ] && tail -5 "$tmp/err"; fail=1; }
fx=$src/tests/fixtures/hf/qwen3_norm_fp32
# hidden_states with rows 1 (NaN) and 4 (+Inf) poisoned; grad_output kept
python3 - "$fx/io.safetensors" "$tmp/bad.safetensors" <<'EOF'
import json, struct, sys
src, dst = sys.argv[1], sys.argv[2]
b = open(src, "rb").read()
n = struct.unpack("<Q", b[:8])[0]
hdr = json.loads(b[8:8 + n])
data = bytearray(b[8 + n:])
h = hdr["hidden_states"]
assert h["dtype"] == "F32"
H = h["shape"][-1]
a0 = h["data_offsets"][0]
for row, val in ((1, float("nan")), (4, float("inf"))):
    for c in range(H):
        struct.pack_into("<f", data, a0 + 4 * (row * H + c), val)
open(dst, "wb").write(b[:8 + n] + bytes(data))
EOF
run() { # expect_warning NAME -- command...
  local want=$1 name=$2; shift 3
  "$@" > "$tmp/out" 2> "$tmp/err"
  local rc=$?
  [ $rc = 0 ] || bad "$name: exit $rc"
  if [ "$want" = warn ]; then
    grep -q "warning: 2 token(s) had non-finite router logits" "$tmp/err" || bad "$name: no warning naming 2 tokens"
  else
    ! grep -q "non-finite" "$tmp/err" || bad "$name: a warning on a clean input"
  fi
}
common=(--config "$fx/config.json" --weights "$fx/weights.safetensors" --backend cpu)
run clean "forward, clean input" -- "$ep" forward "${common[@]}" --input "$fx/io.safetensors" --output "$tmp/clean.safetensors"
run warn "forward, NaN and Inf rows" -- "$ep" forward "${common[@]}" --input "$tmp/bad.safetensors" --output "$tmp/bad_out.safetensors"
run warn "backward, NaN and Inf rows" -- "$ep" backward "${common[@]}" --input "$tmp/bad.safetensors" --grad-output "$tmp/bad.safetensors" --output "$tmp/grads.safetensors"
# the other tokens are untouched: compare every row but the poisoned ones
python3 - "$tmp/clean.safetensors" "$tmp/bad_out.safetensors" <<'EOF' || bad "forward: clean tokens changed next to the poisoned ones"
import json, struct, sys
def load(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n]); t = h["output"]; o0, o1 = t["data_offsets"]
    return t["shape"][-1], b[8 + n + o0:8 + n + o1]
H, a = load(sys.argv[1]); _, b = load(sys.argv[2])
rows = len(a) // (4 * H)
diff = [r for r in range(rows) if r not in (1, 4) and a[r*4*H:(r+1)*4*H] != b[r*4*H:(r+1)*4*H]]
sys.exit(1 if diff or rows < 6 else 0)
EOF
if command -v "${MPIEXEC:-mpirun}" >/dev/null; then
  run warn "forward under mpirun -np 2" -- timeout 120 ${MPIEXEC:-mpirun} ${MPIRUN_FLAGS:-} -np 2 "$ep" forward "${common[@]}" --input "$tmp/bad.safetensors" --output "$tmp/ep_out.safetensors"
fi
[ $fail = 0 ] && echo "PASS: cli_nonfinite"
exit $fail
