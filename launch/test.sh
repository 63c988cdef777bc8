#!/usr/bin/env bash
# test.sh — build and run the whole test suite in both configurations CI checks:
#   build/         the normal build (with the CUDA backend when a toolkit is found)
#   build-nocuda/  -DMOE_ENABLE_CUDA=OFF, so the CPU-only build stays honest
# GPU tests report "skipped" without a GPU; MOE_REQUIRE_GPU=1 makes that a failure.
# MOE_TEST_CONFIGS="cuda" or "nocuda" runs just one; extra args go to ctest (e.g. -R dtype).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
configs=${MOE_TEST_CONFIGS:-"cuda nocuda"}
jobs=$(nproc)
status=0
for c in $configs; do
  case $c in
    cuda) dir=$here/build; args=() ;;
    nocuda) dir=$here/build-nocuda; args=(-DMOE_ENABLE_CUDA=OFF) ;;
    *) echo "test.sh: unknown configuration '$c' (expected cuda or nocuda)" >&2; exit 2 ;;
  esac
  echo "==== configuration: $c ($dir) ===="
  cmake -S "$here" -B "$dir" "${args[@]}" >/dev/null
  cmake --build "$dir" -j"$jobs"
  (cd "$dir" && ctest --output-on-failure -j"$jobs" "$@") || status=1
done
exit $status
