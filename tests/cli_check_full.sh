#!/usr/bin/env bash
# cli_check_full.sh — the issue's full-size CPU acceptance runs: `moe-ep check --tokens 64
# --backward --backend cpu` for the real Qwen3-30B-A3B and Llama-4-Scout layer shapes, bf16
# weights. The fused path runs in full; the reference verifies 16 (Qwen3) / 4 (Scout) random
# tokens, rows and experts per stage (--sample), the router and shared-expert gradients in full.
# Peak memory must stay under CI's 24 GiB.
set -u
ep=${MOE_EP:?MOE_EP must point at the moe-ep binary}
fail=0
run() {
  local start=$SECONDS
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f "peak RSS %M KiB" -o /tmp/moe_check_full_rss.$$ "$@" || fail=1
    cat /tmp/moe_check_full_rss.$$
    rss=$(grep -o '[0-9]*' /tmp/moe_check_full_rss.$$ | head -1); rm -f /tmp/moe_check_full_rss.$$
    if [ "${rss:-0}" -gt $((24 * 1024 * 1024)) ]; then echo "FAIL: over 24 GiB"; fail=1; fi
  else
    "$@" || fail=1
  fi
  echo "took $((SECONDS - start)) s: $*"
}
run "$ep" check --model qwen3-30b-a3b --tokens 64 --backward --backend cpu --dtype bf16 --sample 16
run "$ep" check --model llama4-scout --tokens 64 --backward --backend cpu --dtype bf16 --sample 4
exit $fail
