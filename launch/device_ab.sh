#!/usr/bin/env bash
# device_ab.sh — A/B timing of two commits of moe-ep in one device call, for refactors that must
# keep speed: builds `moe-ep` of the baseline tree (OLD_SRC, e.g. made here with
#   git archive --prefix=old/ BASE | tar x -C .ab   and carried as .ab) and of this tree, then
# runs the same `moe-ep bench` sweeps REPS times, alternating the order (old,new / new,old),
# and prints per row (model, mode, T) the median eager and graph times of each and the ratio
# old/new (> 1: the new tree is faster). A split of the baseline's own reps (odd vs even) is the
# noise floor (old/old). CSVs and the table land in $OUT/ab.tgz.
#   OLD_SRC=.ab/old REPS=5 OUT=/tmp/o ./launch/device_ab.sh [BUDGET_SECONDS]
# Switches: MODELS="qwen3-30b-a3b llama4-scout", SWEEP="-b 1 -e 16384 -f 4",
# FWDBWD="qwen3-30b-a3b" (a fwdbwd row at T=4096 per model named; empty: none),
# SKIP_BUILD=1 (reuse build-old/ and build-gpu/ already there).
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
old_src=$(cd "${OLD_SRC:-.ab/old}" && pwd) || { echo "device_ab: OLD_SRC ${OLD_SRC:-.ab/old} not found" >&2; exit 2; }
out=${OUT:-/tmp/moe-out}
log=/tmp/moe-ab/ab
rm -rf "$log"; mkdir -p "$log" "$out"
budget=${1:-560}
reps=${REPS:-5}
t0=$(date +%s)
el() { echo $(($(date +%s) - t0)); }
source launch/device_env.sh
gencode="-gencode=arch=compute_90a,code=sm_90a"
build() { # src dir, build dir
  cmake -S "$1" -B "$2" -DCMAKE_BUILD_TYPE=Release -DMOE_CUDA_GENCODE="$gencode" > "$2.cmake.log" 2>&1 \
    && cmake --build "$2" --target moe-ep -j8
}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  build "$old_src" "$here/build-old" > "$log/build_old.txt" 2>&1 &
  pid_old=$!
  build "$here" "$here/build-gpu" > "$log/build_new.txt" 2>&1 || { tail -30 "$log/build_new.txt"; exit 1; }
  wait $pid_old || { tail -30 "$log/build_old.txt"; cat build-old.cmake.log | tail -20; exit 1; }
fi
echo "builds done at $(el) s"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv > "$log/env.txt" 2>&1
declare -A bin=([old]=build-old/moe-ep [new]=build-gpu/moe-ep)
runs=()
for m in ${MODELS:-qwen3-30b-a3b llama4-scout}; do runs+=("fwd:$m"); done
for m in ${FWDBWD-qwen3-30b-a3b}; do runs+=("fwdbwd:$m"); done
for r in $(seq 1 "$reps"); do
  order="old new"; [ $((r % 2)) = 0 ] && order="new old"
  for job in "${runs[@]}"; do
    mode=${job%%:*} m=${job#*:}
    for v in $order; do
      [ "$(el)" -lt $((budget - 45)) ] || { echo "budget: stopped before rep $r $v $job"; break 3; }
      if [ "$mode" = fwd ]; then
        args=(${SWEEP:--b 1 -e 16384 -f 4} --graph)
      else
        args=(-b 4096 -e 4096 --mode fwdbwd)
      fi
      timeout -s KILL 120 ${bin[$v]} bench --backend cuda --model "$m" "${args[@]}" -w 3 -n 20 --copy-mib 0 \
        --csv "$log/${v}_${mode}_${m}_r$r.csv" > "$log/${v}_${mode}_${m}_r$r.txt" 2>&1 \
        || echo "rep $r $v $mode $m: exit $?"
    done
  done
  echo "rep $r done at $(el) s"
done
python3 - "$log" > "$log/ab_table.txt" <<'EOF'
import csv, glob, os, statistics as st, sys, collections
d = sys.argv[1]
rows = collections.defaultdict(lambda: collections.defaultdict(list))  # (model,mode,T) -> col -> [(variant, rep, v)]
for f in sorted(glob.glob(os.path.join(d, "*.csv"))):
    v, mode, rest = os.path.basename(f)[:-4].split("_", 2)
    model, rep = rest.rsplit("_r", 1)
    for r in csv.DictReader(open(f)):
        for col in ("time_ms", "graph_ms"):
            if r.get(col):
                rows[(model, mode, int(r["T"]))][col].append((v, int(rep), float(r[col])))
print(f"{'model':<16}{'mode':<7}{'T':>6} {'col':<9}{'old ms':>9}{'new ms':>9}{'old/new':>9}{'old/old':>9} reps")
ratios = []
for key in sorted(rows):
    for col, vals in sorted(rows[key].items()):
        o = [x for v, _, x in vals if v == "old"]; n = [x for v, _, x in vals if v == "new"]
        if not o or not n: continue
        oo = [x for v, rp, x in vals if v == "old" and rp % 2], [x for v, rp, x in vals if v == "old" and not rp % 2]
        noise = st.median(oo[0]) / st.median(oo[1]) if oo[0] and oo[1] else float("nan")
        ratio = st.median(o) / st.median(n)
        ratios.append(ratio)
        print(f"{key[0]:<16}{key[1]:<7}{key[2]:>6} {col:<9}{st.median(o):>9.4f}{st.median(n):>9.4f}{ratio:>9.3f}{noise:>9.3f} {len(o)}/{len(n)}")
if ratios:
    print(f"rows {len(ratios)}: median old/new {st.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}")
EOF
cat "$log/ab_table.txt"
(cd "$(dirname "$log")" && tar czf "$out/ab.tgz" ab)
echo "total $(el) s"
