#!/usr/bin/env bash
# bench-serve.sh — start `moe-ep serve` under mpirun, measure it with `moe-ep bench-serve`
# (requests/s and p50/p99 latency at each load level, every reply verified, and the overhead
# over calling the engine directly in the same run), then stop it with SIGTERM.
#
#   launch/bench-serve.sh [--np N] [--config C] [--weights W|random:SEED] [--threads T]
#                         [--listen unix|tcp] [--serve-args "..."] [-- bench-serve options]
#
# Defaults: 2 ranks, the tiny HF Qwen3 fixture (the service's own overhead dominates), a Unix
# socket, 1 OpenMP thread per rank (2 ranks on a 2-core machine), and bench-serve's defaults
# (16 rows per request, closed-loop 1,2,4,8 clients). Environment: MOE_EP (default
# build/moe-ep), MPIEXEC (default mpirun), MPIRUN_FLAGS (default --oversubscribe, plus
# --allow-run-as-root as root). Example, a mid-size random block:
#   echo '{"model_type":"qwen3_moe","hidden_size":1024,"moe_intermediate_size":384,
#          "num_experts":16,"num_experts_per_tok":4,"norm_topk_prob":true,
#          "torch_dtype":"float32"}' > /tmp/q.json
#   launch/bench-serve.sh --config /tmp/q.json --weights random:1 -- --tokens 16
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
MOE_EP=${MOE_EP:-$here/build/moe-ep}
MPIEXEC=${MPIEXEC:-mpirun}
if [ -z "${MPIRUN_FLAGS:-}" ]; then
    MPIRUN_FLAGS="--oversubscribe"
    [ "$(id -u)" = 0 ] && MPIRUN_FLAGS="$MPIRUN_FLAGS --allow-run-as-root"
fi
np=2
config=$here/tests/fixtures/hf/qwen3_norm_fp32/config.json
weights=$here/tests/fixtures/hf/qwen3_norm_fp32/weights.safetensors
threads=1
listen=unix
serve_args=""
while [ $# -gt 0 ]; do
    case $1 in
        --np) np=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --weights) weights=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        --listen) listen=$2; shift 2 ;;
        --serve-args) serve_args=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "bench-serve.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -x "$MOE_EP" ] || { echo "bench-serve.sh: $MOE_EP not built (cmake --build build)" >&2; exit 2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe-bench-serve.XXXXXX")
server=""
cleanup() {
    [ -n "$server" ] && kill -9 "$server" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
case $listen in
    unix) addr=unix:$tmp/s.sock ;;
    tcp) addr=tcp:127.0.0.1:0 ;;
    *) echo "bench-serve.sh: --listen unix|tcp" >&2; exit 2 ;;
esac

echo "# $(date -u +%FT%TZ) $(uname -n), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "# load average: $(cut -d" " -f1-3 /proc/loadavg)"
echo "# commit $(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo '?'); $np rank(s) x $threads thread(s); $config; $weights"
# shellcheck disable=SC2086
OMP_NUM_THREADS=$threads $MPIEXEC $MPIRUN_FLAGS -np "$np" "$MOE_EP" serve --listen "$addr" \
    --config "$config" --weights "$weights" --ready-file "$tmp/ready" $serve_args >"$tmp/serve.log" 2>&1 &
server=$!
for _ in $(seq 600); do
    [ -s "$tmp/ready" ] && [ "$(wc -l <"$tmp/ready")" -ge 2 ] && break
    kill -0 "$server" 2>/dev/null || { cat "$tmp/serve.log"; exit 1; }
    sleep 0.1
done
pid=$(sed -n 1p "$tmp/ready")
addr=$(sed -n 2p "$tmp/ready")
status=0
OMP_NUM_THREADS=$threads "$MOE_EP" bench-serve --connect "$addr" --config "$config" --weights "$weights" "$@" || status=$?
kill -TERM "$pid"
wait "$server" || { echo "bench-serve.sh: the server did not exit cleanly" >&2; cat "$tmp/serve.log" >&2; status=1; }
server=""
exit $status
