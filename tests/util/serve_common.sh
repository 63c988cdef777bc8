# serve_common.sh — sourced by tests/cli_serve_*.sh: start a real `moe-ep serve` under
# mpirun, wait for its ready file, stop it, and small checks. Not a test itself (ctest only
# runs tests/cli_*.sh).
#
# Environment (ctest sets it): MOE_EP (the binary), MOE_SOURCE_DIR, MPIEXEC, MPIRUN_FLAGS.
set -u

: "${MOE_EP:?MOE_EP must name the moe-ep binary}"
: "${MOE_SOURCE_DIR:?MOE_SOURCE_DIR must name the source tree}"
MPIEXEC=${MPIEXEC:-mpirun}
MPIRUN_FLAGS=${MPIRUN_FLAGS:---oversubscribe}
FIX=$MOE_SOURCE_DIR/tests/fixtures/hf
QCFG=$FIX/qwen3_norm_fp32/config.json
QW=$FIX/qwen3_norm_fp32/weights.safetensors
QIO=$FIX/qwen3_norm_fp32/io.safetensors

TMP=$(mktemp -d "${TMPDIR:-/tmp}/moe-serve-test.XXXXXX")
SERVER_PID=""   # mpirun's pid
RANK0=""        # rank 0's pid (the ready file's first line)
ADDR=""         # the bound address (its second line)
SERVER_LOG=""

cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -9 "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

fail() {
    echo "FAIL: $*" >&2
    if [ -n "$SERVER_LOG" ] && [ -f "$SERVER_LOG" ]; then
        echo "---- server log (last 40 lines) ----" >&2
        tail -n 40 "$SERVER_LOG" >&2
    fi
    exit 1
}

ok() { echo "ok: $*"; }

# start_server NAME NP ARGS... : launches mpirun in the background, waits for the ready file.
start_server() {
    local name=$1 np=$2
    shift 2
    SERVER_LOG=$TMP/$name.log
    local ready=$TMP/$name.ready
    rm -f "$ready"
    # shellcheck disable=SC2086
    $MPIEXEC $MPIRUN_FLAGS -np "$np" "$MOE_EP" serve --ready-file "$ready" "$@" >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    local i
    for i in $(seq 300); do
        [ -s "$ready" ] && [ "$(wc -l <"$ready")" -ge 2 ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || fail "$name: the server exited before it was ready"
        sleep 0.1
    done
    [ -s "$ready" ] || fail "$name: no ready file after 30 s"
    RANK0=$(sed -n 1p "$ready")
    ADDR=$(sed -n 2p "$ready")
    echo "server $name: mpirun $SERVER_PID, rank 0 pid $RANK0, $ADDR"
}

# wait_exit PID SECONDS : wait for a background job; sets EXIT_RC; fails on a hang.
wait_exit() {
    local pid=$1 secs=$2 i
    for i in $(seq $((secs * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid" 2>/dev/null
        fail "process $pid still running after $secs s"
    fi
    wait "$pid"
    EXIT_RC=$?
}

# stop_server SIGNAL : signal rank 0, expect every rank and mpirun to exit 0.
stop_server() {
    local sig=${1:-TERM}
    kill -"$sig" "$RANK0" || fail "cannot signal rank 0 ($RANK0)"
    wait_exit "$SERVER_PID" 30
    [ "$EXIT_RC" -eq 0 ] || fail "mpirun exited $EXIT_RC after SIG$sig (expected 0)"
    grep -q "drained; exiting" "$SERVER_LOG" || fail "no drain message after SIG$sig"
    SERVER_PID=""
    ok "SIG$sig: drained, mpirun exited 0"
}

# forward_as_served OUT ARGS... : the reference for a server's replies: `moe-ep forward ARGS`
# under mpirun with the server's rank count (SERVE_NP, default 2), so the layer is placed as the
# server places it: expert-parallel (the default for the CPU backend with at least as many
# experts as ranks, even or uneven slices) rounds each owner's partial sum the same way, so the
# served output and router logits equal this file bit for bit. (With --ep off the experts are
# replicated and one rank's forward is the reference.)
forward_as_served() {
    local out=$1
    shift
    # shellcheck disable=SC2086
    $MPIEXEC $MPIRUN_FLAGS -np "${SERVE_NP:-2}" "$MOE_EP" forward --backend cpu "$@" --output "$out" >/dev/null
}

# The ranks: mpirun's children running moe-ep.
rank_pids() {
    local p
    for p in /proc/[0-9]*; do
        [ -r "$p/stat" ] || continue
        local st
        st=$(cat "$p/stat" 2>/dev/null) || continue
        case "$st" in *"(moe-ep)"*) ;; *) continue ;; esac
        local ppid
        ppid=$(echo "${st##*) }" | awk '{print $2}')
        [ "$ppid" = "$SERVER_PID" ] && echo "${p#/proc/}"
    done
}

# CPU time (clock ticks, user + system, all threads) of a pid.
cpu_ticks() { local st; st=$(cat "/proc/$1/stat"); echo "${st##*) }" | awk '{print $12 + $13}'; }

# stat_field NAME : one counter of the running server's STATS.
stat_field() { "$MOE_EP" client --connect "$ADDR" --stats | awk -v k="$1" '$1 == k {print $2}'; }
