#!/usr/bin/env bash
# cli_bench.sh — the benchmark driver on the CPU backend (what CI can run): a small sweep with
# --check for both tiny models and all modes; every size verified (#wrong 0), one row per size,
# valid JSON and CSV; bad arguments rejected with the argument named. The weight-streaming
# columns (copy bandwidth, touched experts, %copy) are checked against values computed here
# from the model's shapes, the 128-row tile fill and the busiest expert's load from the
# routed-row count; --graph is refused on the CPU backend with the option named.
set -u
ep=${MOE_EP:?MOE_EP must point at the moe-ep binary}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
for m in tiny-qwen3 tiny-llama4; do
  for mode in fwd bwd fwdbwd; do
    out=$("$ep" bench --backend cpu --model "$m" --mode "$mode" -b 8 -e 64 -f 2 -w 1 -n 3 --check --copy-mib 8 \
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
# new columns: CSV header, JSON keys, and their values on a run from T=1. Independent facts:
# at T=1 exactly k distinct experts are touched, never more than E; weight bytes =
# touched * 3*H*I*4 (fp32); %copy = weight bytes / time / copy GB/s; baselines and graph empty.
out=$("$ep" bench --backend cpu --model tiny-qwen3 --dtype fp32 -b 1 -e 16 -w 0 -n 3 --copy-mib 8 \
      --csv "$tmp/n.csv" --json "$tmp/n.json" 2>&1); rc=$?
if [ $rc != 0 ] || ! grep -qE '^# copy bandwidth: [0-9.]+ GB/s' <<<"$out" || ! grep -q '^# kernels: ' <<<"$out" ||
   ! grep -q '^# cpu: ' <<<"$out"; then
  echo "FAIL: header (exit $rc)"; echo "$out"; fail=1; fi
if ! python3 - "$tmp/n.csv" "$tmp/n.json" <<'PY'
import csv, json, sys, re
rows = list(csv.DictReader(open(sys.argv[1])))
need = ["device", "experts_touched", "weight_bytes", "tile_fill", "max_over_mean", "copy_gbs", "pct_copy", "graph_ms", "graph_tflops",
        "graph_pct_copy", "dense_ms", "loop_ms", "grouped_ms", "dense_tflops", "loop_tflops",
        "grouped_tflops", "x_dense", "x_loop", "x_grouped", "kernels", "wrong"]
missing = [c for c in need if c not in rows[0]]
assert not missing, f"CSV lacks {missing}"
# the phase columns, in order, after graph_pct_copy (the old act column is gone)
cols = list(rows[0].keys())
phases = [p + "_ms" for p in ["route", "permute", "dispatch", "gemm1", "gemm2", "combine", "shared"]]
i = cols.index("graph_pct_copy") + 1
assert cols[i:i + len(phases)] == phases and "act_ms" not in cols, cols
assert [int(r["T"]) for r in rows] == [1, 2, 4, 8, 16], [r["T"] for r in rows]
H, I, E, k = 37, 23, 7, 3                      # tiny-qwen3 (checked against the header below)
for r in rows:
    t = float(r["experts_touched"])
    assert (t == k) if r["T"] == "1" else (k <= t <= E), f"touched {t} at T={r['T']}"
    assert abs(float(r["weight_bytes"]) - t * 3 * H * I * 4) <= 3 * H * I * 4 * 6e-5 + 1, r  # touched printed to 4 decimals
    want = float(r["weight_bytes"]) / (float(r["time_ms"]) * 1e-3) / 1e9 / float(r["copy_gbs"]) * 100
    assert abs(float(r["pct_copy"]) - want) <= 0.02 * want + 0.01, (r["pct_copy"], want)
    for c in ["graph_ms", "dense_ms", "loop_ms", "grouped_ms", "dense_tflops", "x_dense"]:
        assert r[c] == "", f"{c} should be empty on the CPU, is {r[c]!r}"
    for c in phases:  # host-clock phase times where the layer marks them, else empty
        assert r[c] == "" or float(r[c]) >= 0, f"{c} is {r[c]!r}"
    assert r["kernels"] == "cpu" and r["device"] == "cpu", r
    # T*k <= 48 rows: no expert needs a second 128-row tile, so the routed rows fill
    # T*k / (128 * touched) of the tiles' row slots; at T=1 each touched expert has one row,
    # the busiest one row against a mean of k/E
    T = int(r["T"])
    want = T * k / (128.0 * t)
    assert abs(float(r["tile_fill"]) - want) <= 1e-3 * want + 1e-4, (T, r["tile_fill"], want)
    mom = float(r["max_over_mean"])
    assert 1.0 <= mom <= E and (T != 1 or abs(mom - E / k) < 1e-3), (T, mom)
d = json.load(open(sys.argv[2]))
assert d["copy_gbs"] > 0 and d["graph"] is False
for r in d["rows"]:
    assert r["graph_ms"] is None and r["dense_ms"] is None and r["pct_copy"] > 0, r
    assert 0 < r["tile_fill"] <= 1 and r["max_over_mean"] >= 1, r
PY
then echo "FAIL: new CSV/JSON columns"; fail=1; fi
grep -q "(H=37 I=23 E=7 k=3)" <<<"$out" || { echo "FAIL: tiny-qwen3 shapes changed; update the test"; fail=1; }
# the text table has the %copy and touched-experts columns
grep -qE '^ +T +M +time\(ms\) .*%copy +exp +%fill ' <<<"$out" || { echo "FAIL: table header lacks %copy/exp/%fill"; echo "$out"; fail=1; }
grep -qE '%fill +route +permute +dispatch +gemm1 +gemm2 +combine +shared +#wrong$' <<<"$out" ||
  { echo "FAIL: table header lacks the phase columns route..shared"; echo "$out"; fail=1; }
# more than 128 rows per expert (T*k = 1536 over E = 7): the second tile's padding shows; the
# fill is bounded by rows / (rows + 127 per touched expert) below and 1 above
"$ep" bench --backend cpu --model tiny-qwen3 -b 512 -e 512 -w 0 -n 1 --copy-mib 0 --csv "$tmp/f.csv" >"$tmp/out" 2>&1 ||
  { echo "FAIL: bench T=512"; cat "$tmp/out"; fail=1; }
python3 - "$tmp/f.csv" <<'PY' || { echo "FAIL: %fill at T=512"; fail=1; }
import csv, sys
r = list(csv.DictReader(open(sys.argv[1])))[0]
M, t, fill = int(r["M"]), float(r["experts_touched"]), float(r["tile_fill"])
assert M == 1536, M
assert M / (M + 127 * t) <= fill <= 1, (fill, t)
assert float(r["max_over_mean"]) >= 1
PY
# --copy-mib 0: no probe, %copy empty
"$ep" bench --backend cpu -b 4 -e 8 -w 0 -n 1 --copy-mib 0 --csv "$tmp/z.csv" >"$tmp/out" 2>&1 || { echo "FAIL: --copy-mib 0"; fail=1; }
grep -q "copy bandwidth: not measured" "$tmp/out" || { echo "FAIL: --copy-mib 0 header"; cat "$tmp/out"; fail=1; }
python3 -c "import csv,sys; r=list(csv.DictReader(open('$tmp/z.csv'))); assert all(x['pct_copy']=='' and x['copy_gbs']=='' for x in r)" ||
  { echo "FAIL: --copy-mib 0 CSV"; fail=1; }
# --graph needs the CUDA backend: a clear refusal naming the option, no crash
"$ep" bench --backend cpu --graph -b 1 -e 1 >/dev/null 2>"$tmp/err"; rc=$?
if [ $rc != 2 ] || ! grep -q -- "--graph .*needs the CUDA backend" "$tmp/err"; then
  echo "FAIL: --graph on the CPU (exit $rc)"; cat "$tmp/err"; fail=1; fi
# --routed-only: Llama-4 without its shared expert, still verified against the reference (which
# then leaves the shared expert out too); the header says so; a no-op for Qwen3
out=$("$ep" bench --backend cpu --model tiny-llama4 --routed-only -b 8 -e 32 -w 0 -n 2 --check --copy-mib 0 2>&1); rc=$?
if [ $rc != 0 ] || ! grep -q "routed experts only" <<<"$out" || grep -q ", shared expert)" <<<"$out" ||
   ! grep -q "all sizes verified" <<<"$out"; then
  echo "FAIL: --routed-only on tiny-llama4 (exit $rc)"; echo "$out"; fail=1; fi
out=$("$ep" bench --backend cpu --model tiny-llama4 -b 8 -e 8 -w 0 -n 1 --copy-mib 0 2>&1)
grep -q ", shared expert)" <<<"$out" || { echo "FAIL: tiny-llama4 header lacks its shared expert"; echo "$out"; fail=1; }
"$ep" bench --backend cpu --model tiny-qwen3 --routed-only -b 8 -e 8 -w 0 -n 1 --check --copy-mib 0 >"$tmp/out" 2>&1 ||
  { echo "FAIL: --routed-only on tiny-qwen3"; cat "$tmp/out"; fail=1; }
# --help documents every option with its default
help=$("$ep" bench --help)
for o in --graph --copy-mib --rotate --csv --json --check --mode --kernel-config --autotune --routed-only --peak-gbs --exact-hf-rounding; do
  grep -q -- "$o" <<<"$help" || { echo "FAIL: --help lacks $o"; fail=1; }
done
grep -q -- "--copy-mib N .*default 1024 on cuda, 256 on cpu" <<<"$help" || { echo "FAIL: --copy-mib default in --help"; fail=1; }
"$ep" bench --backend cpu -b 64 -e 8 >/dev/null 2>"$tmp/err"; rc=$?
if [ $rc != 2 ] || ! grep -q "larger than -e" "$tmp/err"; then echo "FAIL: -b > -e accepted"; fail=1; fi
"$ep" bench --backend cpu --mode sideways >/dev/null 2>"$tmp/err"; rc=$?
if [ $rc != 2 ] || ! grep -q "mode expects fwd, bwd or fwdbwd" "$tmp/err"; then echo "FAIL: bad --mode accepted"; fail=1; fi
exit $fail
