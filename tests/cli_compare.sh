#!/usr/bin/env bash
# cli_compare.sh — `moe-ep compare` where nothing or not everything can be compared:
#   nothing compared (every row masked, an empty tensor) fails with a message, exit 1, never a
#   PASS; --tol must be a finite number > 0 (inf, nan, negative, zero, empty: usage error 2,
#   naming the option, as --help says); a NaN (or Inf) in either tensor counts as a differing
#   row, the count of differing rows is printed and never negative. The inputs are tiny
#   safetensors files written here with python3's struct (no numpy needed).
set -u
ep=${MOE_EP:?MOE_EP must point at the moe-ep binary}
command -v python3 >/dev/null || { echo "SKIP: python3 not installed"; exit 77; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
expect() { # expect STATUS PATTERN -- command...
  local want=$1 pat=$2; shift 3
  local out; out=$("$@" 2>&1); local got=$?
  if [ "$got" != "$want" ] || ! grep -q -- "$pat" <<<"$out"; then
    echo "FAIL: '$*' exited $got (want $want), output lacks '$pat':"; echo "$out" | tail -5; fail=1
  elif grep -qE '(^|[ (])-[0-9]' <<<"$out"; then
    echo "FAIL: '$*' prints a negative number:"; echo "$out" | tail -5; fail=1
  elif [ "$want" != 0 ] && grep -q "^PASS" <<<"$out"; then
    echo "FAIL: '$*' exited $got but says PASS:"; echo "$out" | tail -5; fail=1
  else
    echo "ok: $*"
  fi
}
# Files: NAME followed by tensors as name:dtype:shape:values (shape and values comma separated,
# "-" for none; nan and inf allowed).
python3 - "$tmp" <<'PY'
import json, struct, sys
d = sys.argv[1]
def write(path, tensors):
    hdr, data = {"__metadata__": {"format": "pt"}}, b""
    for spec in tensors:
        name, dt, shape, vals = spec.split(":")
        shape = [int(x) for x in shape.split(",")] if shape != "-" else []
        vals = [float(x) for x in vals.split(",")] if vals != "-" else []
        raw = struct.pack("<%d%s" % (len(vals), {"F32": "f", "I32": "i"}[dt]),
                          *([int(v) for v in vals] if dt == "I32" else vals))
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    open(f"{d}/{path}", "wb").write(struct.pack("<Q", len(h)) + h + data)
write("ref.safetensors", ["output:F32:3,2:1,2,3,4,5,6", "all:I32:3:1,1,1", "one:I32:3:0,1,0",
                          "first:I32:3:1,0,0", "empty:F32:0,2:-", "empty2:F32:2,0:-"])
write("same.safetensors", ["output:F32:3,2:1,2,3,4,5,6", "empty:F32:0,2:-", "empty2:F32:2,0:-"])
write("nan_got.safetensors", ["output:F32:3,2:nan,2,3,4,5,6"])
write("nan_all.safetensors", ["output:F32:3,2:nan,nan,nan,nan,nan,nan"])
write("nan_ref.safetensors", ["output:F32:3,2:1,2,3,nan,5,6", "all:I32:3:1,1,1"])
write("inf_ref.safetensors", ["output:F32:3,2:1,2,3,4,inf,6"])
write("off.safetensors", ["output:F32:3,2:1,2,3,4,50,6"])
write("none.safetensors", [])
PY
[ -s "$tmp/ref.safetensors" ] || { echo "FAIL: could not write the input files"; exit 1; }
cmp() { "$ep" compare "$tmp/$1" "$tmp/$2" "${@:3}"; }

# controls: equal tensors pass with no differing row; a partial mask still compares
expect 0 "0 of 3 rows differ" -- cmp same.safetensors ref.safetensors
expect 0 "PASS" -- cmp same.safetensors ref.safetensors --mask one
expect 0 "0 of 2 rows differ" -- cmp same.safetensors ref.safetensors --mask one
# a NaN only in a masked row is not compared
expect 0 "PASS" -- cmp nan_got.safetensors ref.safetensors --mask first

# nothing compared: a failure with a message
expect 1 "nothing compared: mask 'all' leaves out all 3 rows" -- cmp same.safetensors ref.safetensors --mask all
expect 1 "nothing compared: 'empty' has no elements" -- cmp same.safetensors ref.safetensors --tensor empty
expect 1 "nothing compared: 'empty2' has no elements" -- cmp same.safetensors ref.safetensors --tensor empty2
expect 1 "nothing compared" -- cmp same.safetensors ref.safetensors --tensor empty --mask all
expect 1 "tensor 'output' not found" -- cmp none.safetensors ref.safetensors

# --tol: a finite number > 0, as --help says
expect 0 "tol X .*a finite number > 0" -- "$ep" compare --help
expect 0 "nothing was compared" -- "$ep" compare --help
for t in inf -inf INF infinity 1e999 nan -1 0 -0 "" 1e-2x; do
  expect 2 "tol expects a positive number (finite, > 0), got '$t'" -- cmp same.safetensors ref.safetensors --tol "$t"
done
expect 0 "PASS" -- cmp same.safetensors ref.safetensors --tol 1e-300

# NaN / Inf: counted as differing rows, never a negative count
expect 1 "1 of 3 rows differ: 1 with NaN/Inf, 0 beyond 10x tol" -- cmp nan_got.safetensors ref.safetensors
expect 1 "3 of 3 rows differ: 3 with NaN/Inf, 0 beyond 10x tol" -- cmp nan_all.safetensors ref.safetensors
expect 1 "1 of 3 rows differ: 1 with NaN/Inf" -- cmp same.safetensors nan_ref.safetensors
expect 1 "1 of 3 rows differ: 1 with NaN/Inf" -- cmp nan_ref.safetensors same.safetensors --tol 1
expect 1 "1 of 3 rows differ: 1 with NaN/Inf" -- cmp same.safetensors inf_ref.safetensors
expect 1 "NaN/Inf present" -- cmp nan_got.safetensors ref.safetensors
# a row off without NaN
expect 1 "1 of 3 rows differ: 0 with NaN/Inf, 1 beyond 10x tol" -- cmp off.safetensors ref.safetensors
expect 0 "0 of 3 rows differ" -- cmp off.safetensors ref.safetensors --tol 100
exit $fail
