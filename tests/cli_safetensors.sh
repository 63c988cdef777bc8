#!/usr/bin/env bash
# cli_safetensors.sh — `moe-ep forward` on safetensors files that are wrong in ways a lenient
# reader would not notice: the HF fixture's input with its 8-byte header length one byte short
# (the header's last padding byte then reads as the first data byte, every tensor one byte off)
# or one byte long, and input or weights with bytes appended after the last tensor. Each must be
# refused with a non-zero exit and a message naming the file and the problem; the files as they
# are run.
set -u
ep=${MOE_EP:?MOE_EP must point at the moe-ep binary}
src=${MOE_SOURCE_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
command -v python3 >/dev/null || { echo "SKIP: python3 not installed"; exit 77; }
dir=$src/tests/fixtures/hf/qwen3_norm_fp32
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
expect() { # expect STATUS PATTERN -- command...   (STATUS "nonzero": any but 0)
  local want=$1 pat=$2; shift 3
  local out; out=$("$@" 2>&1); local got=$?
  if { [ "$want" = nonzero ] && [ "$got" = 0 ]; } || { [ "$want" != nonzero ] && [ "$got" != "$want" ]; } ||
     ! grep -q -- "$pat" <<<"$out"; then
    echo "FAIL: '$*' exited $got (want $want), output lacks '$pat':"; echo "$out" | tail -5; fail=1
  else
    echo "ok: $*"
  fi
}
# edit IN OUT DELTA [APPEND]: OUT is IN with its header length changed by DELTA and APPEND
# bytes added at the end
edit() {
  python3 - "$@" <<'PY'
import struct, sys
src, dst, delta = sys.argv[1], sys.argv[2], int(sys.argv[3])
extra = int(sys.argv[4]) if len(sys.argv) > 4 else 0
b = open(src, 'rb').read()
n = struct.unpack('<Q', b[:8])[0]
open(dst, 'wb').write(struct.pack('<Q', n + delta) + b[8:] + b'\0' * extra)
PY
}
# the precondition of the one-short case: the fixture's header ends in padding, so the cut
# header is still valid JSON and only the data area's coverage can tell
python3 -c "import struct,sys;b=open(sys.argv[1],'rb').read();n=struct.unpack('<Q',b[:8])[0];sys.exit(b[8+n-1:8+n]!=b' ')" \
  "$dir/io.safetensors" || { echo "FAIL: the fixture's header has no padding; the test needs another file"; exit 1; }
run() { "$ep" forward --backend cpu --threads 1 --config "$dir/config.json" --output "$tmp/out.safetensors" "$@"; }

expect 0 "14 tokens" -- run --weights "$dir/weights.safetensors" --input "$dir/io.safetensors"
edit "$dir/io.safetensors" "$tmp/short.safetensors" -1
expect nonzero "short.safetensors: 1 byte(s) after the last tensor .*wrong header length" -- \
  run --weights "$dir/weights.safetensors" --input "$tmp/short.safetensors"
edit "$dir/io.safetensors" "$tmp/long.safetensors" 1
expect nonzero "long.safetensors: " -- run --weights "$dir/weights.safetensors" --input "$tmp/long.safetensors"
edit "$dir/io.safetensors" "$tmp/trailing.safetensors" 0 4
expect nonzero "trailing.safetensors: 4 byte(s) after the last tensor" -- \
  run --weights "$dir/weights.safetensors" --input "$tmp/trailing.safetensors"
edit "$dir/weights.safetensors" "$tmp/wtrailing.safetensors" 0 1
expect nonzero "wtrailing.safetensors: 1 byte(s) after the last tensor" -- \
  run --weights "$tmp/wtrailing.safetensors" --input "$dir/io.safetensors"
[ -e "$tmp/out.safetensors.tmp" ] && { echo "FAIL: a temp output was left behind"; fail=1; }
exit $fail
