#!/usr/bin/env bash
# quickstart.sh — install the Debian dependencies, build, and run the correctness check of both
# tiny models (forward and backward) on the hardware present: the CUDA backend when a GPU is
# usable, else the CPU backend. Exit status 0 only if every stage of every check passes.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/launch/setup.sh" "$here/build"
status=0
for model in tiny-qwen3 tiny-llama4; do
  echo
  "$here/build/moe-ep" check --model "$model" --backward --backend auto || status=1
done
exit $status
