#!/usr/bin/env bash
# plot_bench.sh — TFLOP/s vs T (log2 x) from one or more `moe-ep bench --csv` files, as a PNG:
# one line per series that has data — ours (eager), ours (CUDA-graph replay, with --graph),
# the cuBLAS dense ceiling, the per-expert cuBLAS loop and cublasGemmGroupedBatchedEx — per CSV.
# Needs gnuplot (Debian: gnuplot-nox). Series whose column is empty in every row (e.g. the
# baselines of a CPU run) are left out, and the script says on stderr what it plotted.
#
#   launch/plot_bench.sh [-o OUT.png] [-t TITLE] [-l] [-s WxH] bench.csv [more.csv ...]
#     -o  output PNG (default bench.png)
#     -t  title (default: "moe-ep bench: <models>, <mode> <dtype>, <device>" from the CSVs)
#     -l  linear y axis (default: log10 y, TFLOP/s spans decades from T=1 to T=16384)
#     -s  size in pixels (default 1100x700)
# Example (H100 sweep, then the plot committed under docs/plots/):
#   ./build/moe-ep bench --backend cuda --model qwen3-30b-a3b -b 1 -e 16384 --csv q.csv
#   launch/plot_bench.sh -o docs/plots/bench_qwen3.png q.csv
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
out=bench.png title="" logy=1 size=1100,700
while getopts "o:t:ls:h" opt; do
  case $opt in
    o) out=$OPTARG ;;
    t) title=$OPTARG ;;
    l) logy=0 ;;
    s) size=${OPTARG/x/,} ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "plot_bench.sh: no CSV given" >&2; usage; }
command -v gnuplot >/dev/null || { echo "plot_bench.sh: gnuplot not found (Debian: apt-get install gnuplot-nox)" >&2; exit 3; }
[[ $size =~ ^[0-9]+,[0-9]+$ ]] || { echo "plot_bench.sh: -s expects WxH, got '$size'" >&2; exit 2; }

# column number of a header name in a CSV (0 = absent)
col() { head -1 "$1" | tr -d '\r' | awk -F, -v n="$2" '{ for (i = 1; i <= NF; i++) if ($i == n) { print i; exit } print 0 }'; }
# does column $2 hold a positive number in any data row
has_data() { awk -F, -v c="$2" 'NR > 1 && $c != "" && $c + 0 > 0 { found = 1 } END { exit !found }' "$1"; }
# distinct values of column $2 over the data rows, joined with "/"
values() { awk -F, -v c="$2" 'NR > 1 && !seen[$c]++ { printf "%s%s", n++ ? "/" : "", $c }' "$1"; }

series=(  "tflops"  "graph_tflops"       "dense_tflops"        "loop_tflops"              "grouped_tflops")
labels=(  "ours"    "ours, graph replay" "dense cuBLAS (ceiling)" "per-expert cuBLAS loop" "grouped cuBLAS")
styles=(  "lw 3 pt 7" "lw 2 dt 2 pt 6"   "lw 2 dt 3 pt 5"      "lw 2 pt 9"                "lw 2 pt 11")

plots=() models="" modes="" devices="" dtypes="" seen_models=" "
for f in "$@"; do
  [ -r "$f" ] || { echo "plot_bench.sh: cannot read $f" >&2; exit 2; }
  cT=$(col "$f" T)
  cm=$(col "$f" model)
  [ "$cT" != 0 ] && [ "$(col "$f" tflops)" != 0 ] && [ "$cm" != 0 ] ||
    { echo "plot_bench.sh: $f is not a moe-ep bench CSV (no T/tflops/model columns)" >&2; exit 2; }
  [ "$(wc -l < "$f")" -ge 2 ] || { echo "plot_bench.sh: $f has no data rows" >&2; exit 2; }
  model=$(values "$f" "$cm")
  models+="${models:+, }$model"
  modes+="${modes:+/}$(values "$f" "$(col "$f" mode)")"
  dtypes+="${dtypes:+/}$(values "$f" "$(col "$f" dtype)")"
  cd_=$(col "$f" device)
  [ "$cd_" != 0 ] && devices+="${devices:+/}$(values "$f" "$cd_")"
  # legend prefix with several CSVs: the model, or the file name when a model repeats
  prefix=""
  if [ $# -gt 1 ]; then
    if [[ $seen_models == *" $model "* ]]; then prefix="$(basename "$f" .csv): "; else prefix="$model: "; fi
  fi
  seen_models+="$model "
  for i in "${!series[@]}"; do
    c=$(col "$f" "${series[$i]}")
    if [ "$c" != 0 ] && has_data "$f" "$c"; then
      # gnuplot string: escape the file name's quotes; empty fields are missing points
      plots+=("'${f//\'/\'\'}' using $cT:(\$$c > 0 ? \$$c : NaN) with linespoints ${styles[$i]} title '${prefix}${labels[$i]}'")
      echo "plot_bench.sh: $f: ${series[$i]} -> ${prefix}${labels[$i]}" >&2
    fi
  done
done
[ ${#plots[@]} -gt 0 ] || { echo "plot_bench.sh: no series with data" >&2; exit 2; }
uniq_join() { tr '/' '\n' <<<"$1" | awk '!s[$0]++' | paste -sd/ -; }
[ -n "$title" ] || title="moe-ep bench: $models, $(uniq_join "$modes") $(uniq_join "$dtypes"), $(uniq_join "${devices:-?}")"

plot_cmd=$(printf '%s, ' "${plots[@]}"); plot_cmd=${plot_cmd%, }
gnuplot <<EOF
set terminal pngcairo size $size enhanced font "sans,11"
set output '${out//\'/\'\'}'
set datafile separator ","
set datafile missing ""
set key autotitle columnhead
set title '${title//\'/\'\'}' noenhanced
set xlabel "T (tokens)"
set ylabel "TFLOP/s (expert GEMMs, 2·M·N·K, M = T·k)"
set logscale x 2
set format x "%.0f"
$( [ $logy = 1 ] && echo 'set logscale y 10' )
set grid xtics ytics mytics
set key top left box opaque noenhanced
plot $plot_cmd
EOF
echo "plot_bench.sh: wrote $out" >&2
