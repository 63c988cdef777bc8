#!/usr/bin/env bash
# device_build.sh — configure and build moe-ep for Hopper on the GPU machine, in build-gpu/.
#   ./launch/device_build.sh [extra cmake args]
# BUILD_TARGETS="moe-ep ..." builds only those targets (default: everything, the tests too).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/launch/device_env.sh"
cmake -S "$here" -B "$here/build-gpu" -DCMAKE_BUILD_TYPE=Release \
  -DMOE_CUDA_GENCODE="-gencode=arch=compute_90a,code=sm_90a" "$@" >"$here/build-gpu.cmake.log" 2>&1 \
  || { cat "$here/build-gpu.cmake.log"; exit 1; }
cmake --build "$here/build-gpu" -j16 ${BUILD_TARGETS:+--target $BUILD_TARGETS}
