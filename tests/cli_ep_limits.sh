#!/usr/bin/env bash
# cli_ep_limits.sh — token bounds far beyond the host's memory are refused up front, on every
# rank, with a message naming the option (and, where memory is the limit, how much is needed
# and how much is free), never by trying to allocate: a non-zero exit within seconds, no OOM
# kill, a small peak RSS.
#  * --max-tokens-per-rank 2147483647 (check and forward, 1 and 2 ranks): over the kernels'
#    32-bit row indices (M x top-k) and the host's memory;
#  * --max-tokens-per-rank 700000000 (indexable): the memory shortfall, in GiB;
#  * check --tokens 2147483647 and --tokens 100000000 (1 and 2 ranks, alone and with the
#    option above): the check's own tensors would not fit: the shortfall, naming --tokens.
set -u
ep=${MOE_EP:?MOE_EP must point at the moe-ep binary}
src=${MOE_SOURCE_DIR:?}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
LIMIT=60 # seconds (a refusal takes about one)
D=$src/tests/fixtures/hf/qwen3_norm_fp32
MEM="need about [0-9.]+ GiB (on this rank )?but [0-9.]+ GiB is free on the host"

# each rank's peak RSS (KiB) into $tmp/rss.RANK, where GNU time is there
timer=()
if [ -x /usr/bin/time ]; then
  printf '#!/bin/sh\nexec /usr/bin/time -f %%M -o "%s/rss.${OMPI_COMM_WORLD_RANK:-0}" "$@"\n' "$tmp" > "$tmp/timed"
  chmod +x "$tmp/timed"
  timer=("$tmp/timed")
fi

# refused NP LABEL REGEX -- moe-ep ARGS... : non-zero (not a timeout or a kill) within LIMIT,
# REGEX on every rank, nothing written, peak RSS of a rank under 512 MiB when measurable
refused() {
  local np=$1 what=$2 re=$3; shift 4
  local t0=$SECONDS rc n
  rm -f "$tmp/out.safetensors" "$tmp"/rss.*
  if [ "$np" = 0 ]; then # no mpirun
    np=1
    OMP_NUM_THREADS=1 timeout -k 5 $LIMIT "${timer[@]}" "$ep" "$@" > "$tmp/log" 2>&1; rc=$?
  else
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 timeout -k 5 $LIMIT ${MPIEXEC:-mpirun} ${MPIRUN_FLAGS:-} -np "$np" \
      "${timer[@]}" "$ep" "$@" > "$tmp/log" 2>&1; rc=$?
  fi
  n=$(grep -cE -- "$re" "$tmp/log")
  local rss=0 f r
  for f in "$tmp"/rss.*; do [ -f "$f" ] && r=$(grep -o '^[0-9]*$' "$f" | tail -1) && [ "${r:-0}" -gt $rss ] && rss=$r; done
  if [ $rc = 0 ] || [ $rc = 124 ] || [ $rc -ge 128 ] || [ "$n" -lt "$np" ] || grep -q "PASS" "$tmp/log" ||
     [ -e "$tmp/out.safetensors" ] || [ "$rss" -gt $((512 * 1024)) ] || grep -qi "killed" "$tmp/log"; then
    echo "FAIL: $what: exit $rc after $((SECONDS - t0)) s, peak RSS $rss KiB, /$re/ from $n of $np rank(s)"
    tail -12 "$tmp/log"; fail=1
  else
    echo "ok: $what: refused in $((SECONDS - t0)) s (exit $rc, peak RSS ${rss} KiB): $(grep -m1 -E -- "$re" "$tmp/log" | cut -c1-160)"
  fi
}

M2G="--max-tokens-per-rank 2147483647: .*(32-bit row indices|$MEM)"
FW=(forward --backend cpu --config "$D/config.json" --weights "$D/weights.safetensors" --input "$D/io.safetensors" --output "$tmp/out.safetensors")
refused 0 "check --max-tokens-per-rank 2147483647" "$M2G" -- check --model tiny-qwen3 --backend cpu --max-tokens-per-rank 2147483647
refused 2 "np 2 check --max-tokens-per-rank 2147483647" "$M2G" -- check --model tiny-qwen3 --backend cpu --max-tokens-per-rank 2147483647
refused 0 "forward --max-tokens-per-rank 2147483647" "$M2G" -- "${FW[@]}" --max-tokens-per-rank 2147483647
refused 2 "np 2 forward --max-tokens-per-rank 2147483647" "$M2G" -- "${FW[@]}" --max-tokens-per-rank 2147483647
refused 2 "np 2 backward --max-tokens-per-rank 2147483647" "$M2G" -- backward --backend cpu --config "$D/config.json" \
  --weights "$D/weights.safetensors" --input "$D/io.safetensors" --grad-output "$D/io.safetensors" --output "$tmp/out.safetensors" \
  --max-tokens-per-rank 2147483647
M7="--max-tokens-per-rank 700000000: buffers for that many tokens $MEM; lower --max-tokens-per-rank"
refused 0 "check --max-tokens-per-rank 700000000" "$M7" -- check --model tiny-qwen3 --backend cpu --max-tokens-per-rank 700000000
refused 2 "np 2 forward --max-tokens-per-rank 700000000" "$M7" -- "${FW[@]}" --max-tokens-per-rank 700000000
TK="--tokens [0-9]+: the check's tensors for that many tokens.* $MEM; lower --tokens"
refused 0 "check --tokens 2147483647" "$TK" -- check --model tiny-qwen3 --backend cpu --tokens 2147483647
refused 0 "check --tokens 100000000 --backward" "$TK" -- check --model tiny-qwen3 --backend cpu --tokens 100000000 --backward
refused 2 "np 2 check --tokens 2147483647" "$TK" -- check --model tiny-qwen3 --backend cpu --tokens 2147483647
refused 2 "np 2 check --tokens 2147483647 --max-tokens-per-rank 2147483647" "$TK" -- check --model tiny-qwen3 --backend cpu \
  --tokens 2147483647 --max-tokens-per-rank 2147483647
exit $fail
