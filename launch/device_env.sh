#!/usr/bin/env bash
# device_env.sh — source this on a GPU machine that lacks cmocka/cJSON (and maybe hwloc's -dev):
# unpacks the Debian packages carried in .deps/ into /tmp/moe-deps and points pkg-config and the
# loader at them. Also exports the run-as-root and NCCL defaults moe-ep's runs use.
#   source launch/device_env.sh
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
deps=/tmp/moe-deps
if [ -d "$here/.deps" ] && [ ! -f "$deps/.unpacked" ]; then
  mkdir -p "$deps"
  for f in "$here"/.deps/*.deb; do
    case $(basename "$f") in
      libhwloc*) pkg-config --exists hwloc 2>/dev/null && continue ;; # the system's is newer
    esac
    dpkg -x "$f" "$deps"
  done
  # The .pc files name /usr paths; re-root them into the unpacked tree.
  for pc in "$deps"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc; do
    sed -i -e "s#=/usr#=$deps/usr#g" -e "s#-L/usr#-L$deps/usr#g" -e "s#-I/usr#-I$deps/usr#g" "$pc"
  done
  touch "$deps/.unpacked"
fi
export PKG_CONFIG_PATH="$deps/usr/lib/x86_64-linux-gnu/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
export MOE_DEPS_PREFIX="$deps"
export LD_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export NCCL_NVLS_ENABLE=0
