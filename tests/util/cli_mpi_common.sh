# cli_mpi_common.sh — sourced by the tests/cli_*.sh that run `moe-ep` under mpirun on
# safetensors files they make and read with st_tool.py (cli_checkpoint_dir.sh,
# cli_ep_backward.sh). Not a test itself (ctest only runs tests/cli_*.sh).
#
# Environment (ctest sets it): MOE_EP (the binary), MOE_SOURCE_DIR, MPIEXEC, MPIRUN_FLAGS.
# Sets: ep, src, st (the st_tool.py command), run_mpi NP CMD... (one OpenMP thread a rank: the
# ranks share the machine; 120 s at most, so a hung collective fails instead of stalling ctest),
# tmp (a directory removed on exit) and fail=0. Without python3 the test is skipped (77).
ep=${MOE_EP:?MOE_EP must point at the moe-ep binary}
src=${MOE_SOURCE_DIR:?}
command -v python3 >/dev/null || { echo "SKIP: python3 not installed"; exit 77; }
st="python3 $src/tests/util/st_tool.py"
run_mpi() { local np=$1; shift; OMP_NUM_THREADS=1 timeout 120 ${MPIEXEC:-mpirun} ${MPIRUN_FLAGS:-} -np "$np" "$@"; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
