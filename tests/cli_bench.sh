#!/usr/bin/env bash
# cli_bench.sh — the benchmark driver on the CPU backend (what CI can run): a small sweep with
# --check for both tiny models and all modes; every size verified (#wrong 0), one row per size,
# valid JSON and CSV; bad arguments rejected with the argument named.
set -u
ep=${MOE_EP:?MOE_EP must point at the moe-ep binary}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
for m in tiny-qwen3 tiny-llama4; do
  for mode in fwd bwd fwdbwd; do
    out=$("$ep" bench --backend cpu --model "$m" --mode "$mode" -b 8 -e 64 -f 2 -w 1 -n 3 --check \
          --json "$tmp/r.json" --csv "$tmp/r.csv" 2>&1)
    rc=$?
    rows=$(grep -cE '^ +(8|16|32|64) ' <<<"$out")
    if [ $rc != 0 ] || [ "$rows" != 4 ] || ! grep -q "all sizes verified" <<<"$out"; then
      echo "FAIL: bench $m $mode (exit $rc, $rows rows)"; echo "$out"; fail=1; continue
    fi
    # every row says 0 wrong
    if awk '/^ +[0-9]+ /{ if ($NF != 0) bad=1 } END { exit bad }' <<<"$out"; then :; else
      echo "FAIL: bench $m $mode reports wrong results"; echo "$out"; fail=1; fi
    if ! python3 -c "import json,sys; d=json.load(open('$tmp/r.json')); assert len(d['rows'])==4 and all(r['wrong']==0 for r in d['rows'])"; then
      echo "FAIL: JSON for $m $mode"; fail=1; fi
    if [ "$(wc -l < "$tmp/r.csv")" != 5 ]; then echo "FAIL: CSV for $m $mode"; fail=1; fi
    echo "ok: bench $m $mode"; echo "$out" | tail -6
  done
done
"$ep" bench --backend cpu -b 64 -e 8 >/dev/null 2>"$tmp/err"; rc=$?
if [ $rc != 2 ] || ! grep -q "larger than -e" "$tmp/err"; then echo "FAIL: -b > -e accepted"; fail=1; fi
"$ep" bench --backend cpu --mode sideways >/dev/null 2>"$tmp/err"; rc=$?
if [ $rc != 2 ] || ! grep -q "mode expects fwd, bwd or fwdbwd" "$tmp/err"; then echo "FAIL: bad --mode accepted"; fail=1; fi
exit $fail
