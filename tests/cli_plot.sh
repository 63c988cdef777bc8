#!/usr/bin/env bash
# cli_plot.sh — launch/plot_bench.sh on CSVs of real CPU bench runs: a PNG comes out (PNG
# signature, plausible size), exactly the series with data are plotted (a CPU run has no
# baselines; a CSV whose baseline/graph columns we fill in gets all five lines), several CSVs
# go into one plot, and bad input is rejected. SKIP (77) without gnuplot.
set -u
command -v gnuplot >/dev/null || { echo "SKIP: gnuplot not installed (Debian: gnuplot-nox)"; exit 77; }
ep=${MOE_EP:?MOE_EP must point at the moe-ep binary}
src=${MOE_SOURCE_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
plot=$src/launch/plot_bench.sh
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
is_png() { [ -s "$1" ] && [ "$(head -c 8 "$1" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] &&
           [ "$(wc -c < "$1")" -gt 5000 ]; }

for m in tiny-qwen3 tiny-llama4; do
  if ! "$ep" bench --backend cpu --model $m -b 1 -e 32 -w 0 -n 2 --copy-mib 8 --csv "$tmp/$m.csv" >/dev/null 2>"$tmp/err"; then
    echo "FAIL: bench $m"; cat "$tmp/err"; exit 1; fi
done

# one CPU CSV: only our line (the baseline and graph columns are empty)
bash "$plot" -o "$tmp/one.png" "$tmp/tiny-qwen3.csv" 2>"$tmp/log"; rc=$?
if [ $rc != 0 ] || ! is_png "$tmp/one.png"; then echo "FAIL: plot of one CSV (exit $rc)"; cat "$tmp/log"; fail=1; fi
n=$(grep -c -- '->' "$tmp/log")
if [ "$n" != 1 ] || ! grep -q 'tflops -> ours$' "$tmp/log"; then
  echo "FAIL: a CPU CSV should plot exactly one series (ours), got $n"; cat "$tmp/log"; fail=1; fi

# the same rows with the graph and baseline columns filled in (found by header name, so the
# test follows the CSV layout): all five series; two CSVs in one plot with a title
awk -F, -v OFS=, 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; print; next }
  { t = $c["tflops"]; $c["graph_tflops"] = t * 1.2; $c["dense_tflops"] = t * 2;
    $c["loop_tflops"] = t / 3; $c["grouped_tflops"] = t / 2; print }' "$tmp/tiny-qwen3.csv" > "$tmp/full.csv"
bash "$plot" -o "$tmp/two.png" -t "test plot" "$tmp/full.csv" "$tmp/tiny-llama4.csv" 2>"$tmp/log"; rc=$?
if [ $rc != 0 ] || ! is_png "$tmp/two.png"; then echo "FAIL: plot of two CSVs (exit $rc)"; cat "$tmp/log"; fail=1; fi
for s in tflops graph_tflops dense_tflops loop_tflops grouped_tflops; do
  grep -q "full.csv: $s -> tiny-qwen3: " "$tmp/log" || { echo "FAIL: series $s of full.csv not plotted"; cat "$tmp/log"; fail=1; }
done
[ "$(grep -c 'tiny-llama4.csv: ' "$tmp/log")" = 1 ] || { echo "FAIL: tiny-llama4.csv should give one series"; cat "$tmp/log"; fail=1; }
# linear y and a size
bash "$plot" -l -s 640x480 -o "$tmp/lin.png" "$tmp/full.csv" 2>"$tmp/log" && is_png "$tmp/lin.png" ||
  { echo "FAIL: -l -s 640x480"; cat "$tmp/log"; fail=1; }

# bad input: no CSV, a non-bench CSV, a missing file
bash "$plot" -o "$tmp/x.png" >/dev/null 2>&1 && { echo "FAIL: no CSV accepted"; fail=1; }
printf 'a,b\n1,2\n' > "$tmp/other.csv"
bash "$plot" -o "$tmp/x.png" "$tmp/other.csv" 2>"$tmp/log" && { echo "FAIL: non-bench CSV accepted"; fail=1; }
grep -q "not a moe-ep bench CSV" "$tmp/log" || { echo "FAIL: message for a non-bench CSV"; cat "$tmp/log"; fail=1; }
bash "$plot" -o "$tmp/x.png" "$tmp/nope.csv" 2>"$tmp/log" && { echo "FAIL: missing file accepted"; fail=1; }
grep -q "cannot read" "$tmp/log" || { echo "FAIL: message for a missing file"; fail=1; }
[ $fail = 0 ] && echo "ok: plot_bench.sh"
exit $fail
