#!/usr/bin/env bash
# setup.sh — install moe-ep's Debian dependencies (when run as root with apt-get) and build it.
#   ./launch/setup.sh [build-dir] [extra cmake args...]
# Environment: MOE_SKIP_APT=1 skips the package step (e.g. on a machine without apt).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$here/build}
shift || true
packages=(build-essential cmake pkg-config libopenmpi-dev openmpi-bin libhwloc-dev hwloc
          libcmocka-dev libcjson-dev gnuplot-nox)
if [ "${MOE_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "setup: installing ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "setup: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
      exit 1
    fi
  fi
fi
cmake -S "$here" -B "$build" "$@" >/dev/null
cmake --build "$build" -j"$(nproc)"
echo "setup: built $build/moe-ep"
