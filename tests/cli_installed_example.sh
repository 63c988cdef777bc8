#!/usr/bin/env bash
# cli_installed_example.sh — moe-ep as a user installs it: `cmake --install` of this build into
# a temporary prefix, then, with nothing but that prefix:
#   - the files: libmoe_ep.so -> libmoe_ep.so.1 -> libmoe_ep.so.VERSION (soname libmoe_ep.so.1),
#     the public headers and no other, bin/moe-ep (which runs and says the version), no archive
#   - pkg-config: `pkg-config --modversion moe_ep` is the project version, and a program built
#     with `cc probe.c $(pkg-config --cflags --libs moe_ep)` links libmoe_ep.so.1 and runs
#   - CMake: find_package(moe_ep VERSION) finds the package at the project version, refuses the
#     next major version (SameMajorVersion), and moe_ep::moe_ep builds and runs the same program
#   - examples/minimal.c built both ways (pkg-config and examples/CMakeLists.txt) runs on the
#     CPU, and both builds print the same output.
set -u
src=${MOE_SOURCE_DIR:?MOE_SOURCE_DIR must point at the source tree}
build=${MOE_BUILD_DIR:?MOE_BUILD_DIR must point at the build tree}
version=${MOE_VERSION:?MOE_VERSION must hold the project version}
cc=${MOE_CC:-cc}
bindir=${MOE_INSTALL_BINDIR:-bin} incdir=${MOE_INSTALL_INCLUDEDIR:-include} libdir=${MOE_INSTALL_LIBDIR:-lib}
for d in "$bindir" "$incdir" "$libdir"; do
  case $d in /*) echo "SKIP: install directory $d is absolute; --prefix cannot move it"; exit 77 ;; esac
done
for t in pkg-config readelf cmake; do
  command -v $t >/dev/null || { echo "SKIP: $t not installed"; exit 77; }
done
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
bad() { echo "FAIL: $*"; fail=1; }
prefix=$tmp/prefix
lib=$prefix/$libdir
unset PKG_CONFIG_LIBDIR PKG_CONFIG_SYSROOT_DIR
export PKG_CONFIG_PATH=$lib/pkgconfig
# A user's own environment must not hide a broken install.
unset LD_LIBRARY_PATH CMAKE_PREFIX_PATH

if ! cmake --install "$build" --prefix "$prefix" > "$tmp/install.log" 2>&1; then
  echo "FAIL: cmake --install $build --prefix $prefix:"; tail -20 "$tmp/install.log"; exit 1
fi
echo "ok: installed into $prefix"

# ---- the files ----
for f in "$bindir/moe-ep" "$incdir/moe_ep.h" "$incdir/moe_ep_version.h" "$incdir/moe_ep_mpi.h" \
         "$libdir/libmoe_ep.so.$version" "$libdir/pkgconfig/moe_ep.pc" \
         "$libdir/cmake/moe_ep/moe_epConfig.cmake" "$libdir/cmake/moe_ep/moe_epConfigVersion.cmake" \
         "$libdir/cmake/moe_ep/moe_epTargets.cmake"; do
  [ -f "$prefix/$f" ] || bad "$f is not installed"
done
[ "$(readlink "$lib/libmoe_ep.so")" = libmoe_ep.so.1 ] || bad "libmoe_ep.so does not link to libmoe_ep.so.1"
[ "$(readlink "$lib/libmoe_ep.so.1")" = "libmoe_ep.so.$version" ] ||
  bad "libmoe_ep.so.1 does not link to libmoe_ep.so.$version"
soname=$(readelf -d "$lib/libmoe_ep.so.$version" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ "$soname" = libmoe_ep.so.1 ] || bad "the installed library's SONAME is '$soname', want libmoe_ep.so.1"
extra=$(cd "$prefix/$incdir" && ls | grep -vxE 'moe_ep\.h|moe_ep_version\.h|moe_ep_mpi\.h')
[ -z "$extra" ] || bad "headers that are not public are installed: $extra"
archives=$(find "$prefix" -name '*.a')
[ -z "$archives" ] || bad "static archives are installed (the internal library is not for users): $archives"
got=$("$prefix/$bindir/moe-ep" --version 2>&1) || bad "the installed moe-ep does not run: $got"
[ "$got" = "moe-ep $version" ] || bad "installed moe-ep --version says '$got', want 'moe-ep $version'"
[ $fail = 0 ] && echo "ok: files, SONAME $soname, moe-ep --version"

# ---- pkg-config ----
# probe.c uses what every version of moe_ep.h has: the version macros and moe_strerror.
cat > "$tmp/probe.c" <<'EOC'
#include <moe_ep.h>
#include <moe_ep_version.h>
#include <stdio.h>
int main(void)
{
    printf("%s %d %s\n", MOE_EP_VERSION_STRING, MOE_EP_VERSION_CODE, moe_strerror(MOE_OK));
    return 0;
}
EOC
IFS=. read -r major minor patch <<<"$version"
want_probe="$version $((major * 10000 + minor * 100 + patch)) " # then moe_strerror(MOE_OK)
modversion=$(pkg-config --modversion moe_ep 2>&1)
if [ "$modversion" = "$version" ]; then echo "ok: pkg-config --modversion moe_ep: $modversion"
else bad "pkg-config --modversion moe_ep says '$modversion', want $version"; fi
# shellcheck disable=SC2046
if out=$("$cc" -std=c99 -Wall -Wextra -Werror "$tmp/probe.c" -o "$tmp/probe_pc" $(pkg-config --cflags --libs moe_ep) 2>&1); then
  needed=$(readelf -d "$tmp/probe_pc" | grep -c 'NEEDED.*\[libmoe_ep\.so\.1\]')
  [ "$needed" = 1 ] || bad "the pkg-config build does not record libmoe_ep.so.1 as needed"
  got=$(LD_LIBRARY_PATH=$lib "$tmp/probe_pc" 2>&1)
  if [[ $got == "$want_probe"?* ]]; then echo "ok: built with pkg-config, runs: $got"
  else bad "the pkg-config build prints '$got', want '$want_probe<moe_strerror(MOE_OK)>'"; fi
else
  bad "cc probe.c \$(pkg-config --cflags --libs moe_ep) fails:"; echo "$out" | head -20
fi

# ---- the CMake package ----
mkdir -p "$tmp/cm"
next=$((major + 1))
cat > "$tmp/cm/CMakeLists.txt" <<EOC
cmake_minimum_required(VERSION 3.16)
project(moe_ep_probe LANGUAGES C)
find_package(moe_ep $next.0 QUIET CONFIG)
if(moe_ep_FOUND)
  message(FATAL_ERROR "find_package(moe_ep $next.0) accepted moe_ep \${moe_ep_VERSION}")
endif()
unset(moe_ep_DIR CACHE)
find_package(moe_ep $major.$minor REQUIRED CONFIG)
if(NOT moe_ep_VERSION STREQUAL "$version" OR NOT TARGET moe_ep::moe_ep)
  message(FATAL_ERROR "moe_ep \${moe_ep_VERSION} (want $version) or no target moe_ep::moe_ep")
endif()
message(STATUS "probe: moe_ep \${moe_ep_VERSION} at \${moe_ep_DIR}")
add_executable(probe $tmp/probe.c)
target_link_libraries(probe PRIVATE moe_ep::moe_ep)
EOC
if out=$(cmake -S "$tmp/cm" -B "$tmp/cm/build" -DCMAKE_PREFIX_PATH="$prefix" 2>&1) &&
   out=$(cmake --build "$tmp/cm/build" 2>&1); then
  got=$("$tmp/cm/build/probe" 2>&1) # no LD_LIBRARY_PATH: CMake's build RPATH finds the library
  if [[ $got == "$want_probe"?* ]]; then echo "ok: find_package(moe_ep $major.$minor) and moe_ep::moe_ep: $got"
  else bad "the CMake build prints '$got', want '$want_probe<moe_strerror(MOE_OK)>'"; fi
else
  bad "the CMake package probe fails:"; echo "$out" | tail -20
fi
[ $fail = 0 ] || exit 1

# ---- the example (the v1 API) ----
grep -q moe_layer_create "$prefix/$incdir/moe_ep.h" || { echo "FAIL: the installed moe_ep.h lacks the v1 API (moe_layer_create)"; exit 1; }
# shellcheck disable=SC2046
if ! out=$("$cc" -std=c99 -Wall -Wextra "$src/examples/minimal.c" -o "$tmp/minimal" $(pkg-config --cflags --libs moe_ep) 2>&1); then
  echo "FAIL: cc examples/minimal.c \$(pkg-config --cflags --libs moe_ep):"; echo "$out" | head -20; exit 1
fi
if ! ex_pc=$(LD_LIBRARY_PATH=$lib OMP_NUM_THREADS=2 "$tmp/minimal" 2>&1); then
  echo "FAIL: examples/minimal.c (pkg-config build) fails:"; echo "$ex_pc"; exit 1
fi
echo "$ex_pc"
grep -qx "moe-ep $version" <<<"$ex_pc" || bad "minimal does not print 'moe-ep $version'"
grep -q "sum of the output" <<<"$ex_pc" || bad "minimal does not print the output's sum"
if ! out=$(cmake -S "$src/examples" -B "$tmp/ex" -DCMAKE_PREFIX_PATH="$prefix" 2>&1) ||
   ! out=$(cmake --build "$tmp/ex" 2>&1); then
  echo "FAIL: examples/CMakeLists.txt against the installed package:"; echo "$out" | tail -20; exit 1
fi
ex_cm=$(OMP_NUM_THREADS=2 "$tmp/ex/minimal" 2>&1) || bad "examples/minimal.c (CMake build) fails: $ex_cm"
[ "$ex_cm" = "$ex_pc" ] || { bad "the CMake build of the example prints something else:"; echo "$ex_cm"; }
[ $fail = 0 ] && echo "ok: examples/minimal.c built with pkg-config and with find_package, same output"
exit $fail
