#!/usr/bin/env bash
# cli_ep_gpu.sh — `moe-ep check --backend cuda` under mpirun (src/cli/cli_check_ep.c): the CUDA
# layer created with an EP communicator against the single-rank CUDA layer on the whole batch,
# per rank and stage by stage (router logits, routing, output, dx, router / expert / shared
# gradients):
#  * np 1 with --ep-virtual 4 over NCCL (to itself), also sync-free (--max-tokens-per-rank: no
#    token rows counted on the host) and with forced routing;
#  * np 2 and 4 sharing the GPU over --transport mpi, T not divisible by N, all-to-one routing
#    (ranks receiving nothing) with virtual ranks, buffers sized in advance, an explicit
#    non-contiguous --expert-map, both tiny E=8 configs in fp32 and bf16;
#  * --chunks 3 (the pipelined forward) over NCCL with virtual ranks and over MPI;
#  * the Qwen3-30B-A3B layer at T=256 (np 1 x4 virtual over NCCL with 2 chunks, np 2 over
#    MPI), bf16, forward and backward; the Llama-4-Scout layer at T=128 (np 1 x4 virtual) with
#    MOE_EP_GPU_SCOUT=1.
# Exit 77 (skip) without a usable GPU or a CUDA build — after checking that --backend cuda is
# then a clear error naming the option ("--backend cuda: no usable GPU on this node" / "this
# build has no CUDA backend") — unless MOE_REQUIRE_GPU=1, which makes that a failure.
# Expected runtime on an H100: ~2 min (mostly process start-up and the real layer's weights).
set -u
ep=${MOE_EP:?MOE_EP must point at the moe-ep binary}
src=${MOE_SOURCE_DIR:?}
cores=$(nproc 2>/dev/null || echo 2)
run_mpi() {
  local np=$1; shift
  local t=$(( cores / np )); [ $t -lt 1 ] && t=1
  # passive OpenMP waits: ctest may run other tests beside this one on the same cores
  OMP_NUM_THREADS=$t OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} ${MPIEXEC:-mpirun} ${MPIRUN_FLAGS:-} -np "$np" "$@"
}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
seed=$(( $(date +%s%N) % 1000003 ))
echo "seed $seed"

# Is there a GPU? The plain single-rank EP check on the CUDA backend (N = 1, V = 1).
run_mpi 1 "$ep" check --model tiny-qwen3 --tokens 4 --backend cuda --transport mpi > "$tmp/log" 2>&1
rc=$?
if [ $rc != 0 ]; then
  if grep -qE -- "--backend cuda: (no usable GPU|this build has no CUDA backend)" "$tmp/log"; then
    if [ "${MOE_REQUIRE_GPU:-0}" = 1 ]; then
      echo "FAIL: MOE_REQUIRE_GPU=1 but the CUDA backend is not usable:"; cat "$tmp/log"; exit 1
    fi
    echo "skip: no usable GPU ($(grep -- '--backend cuda' "$tmp/log" | head -1))"
    exit 77
  fi
  echo "FAIL: the single-rank CUDA EP check"; cat "$tmp/log"; exit 1
fi
grep -q "PASS on all 1 ranks" "$tmp/log" || { echo "FAIL: single-rank CUDA check did not pass"; cat "$tmp/log"; exit 1; }
echo "ok: np 1 plain CUDA EP check (N=1, V=1)"

ok_or_fail() { if [ "$1" = 0 ]; then echo "ok: $2"; else echo "FAIL: $2"; tail -40 "$tmp/log"; fail=1; fi; }
# check NP ARGS...: the CUDA EP check must exit 0, say PASS on all ranks, run on the GPU
# ("moe-ep check: cuda: <device>") over the transport asked for
check() {
  local np=$1; shift
  local t0=$(date +%s)
  run_mpi "$np" "$ep" check --backend cuda --seed $seed "$@" > "$tmp/log" 2>&1
  local rc=$?
  grep -q "PASS on all $np ranks" "$tmp/log" || rc=1
  grep -q "moe-ep check: cuda: " "$tmp/log" || rc=1
  case " $* " in
    *" --transport nccl "*) grep -q "transport nccl" "$tmp/log" || rc=1 ;;
    *" --transport mpi "*) grep -q "transport mpi" "$tmp/log" || rc=1 ;;
  esac
  ok_or_fail $rc "np $np check $* ($(( $(date +%s) - t0 )) s)"
}

fx=$src/tests/fixtures/ep
for cfg in qwen3_e8 llama4_e8; do
  m="--model $fx/$cfg.json"
  check 1 $m --tokens 37 --ep-virtual 4 --transport nccl --backward
  check 1 $m --tokens 37 --ep-virtual 4 --transport nccl --backward --dtype bf16 --route skewed
  check 1 $m --tokens 37 --ep-virtual 4 --transport nccl --max-tokens-per-rank 40 --backward --stats
  # sync-free calls keep their row counts on the device: none counted on the host
  grep -q " 0 token rows computed" "$tmp/log" || { echo "FAIL: --max-tokens-per-rank with nccl is not sync-free (rows counted on the host)"; grep "token rows computed" "$tmp/log"; fail=1; }
  for np in 2 4; do
    check $np $m --tokens 37 --transport mpi --backward
    check $np $m --tokens 37 --transport mpi --backward --dtype bf16 --route all-to-one --ep-virtual $(( 4 / np ))
  done
done
check 2 --model "$fx/qwen3_e8.json" --tokens 37 --transport mpi --backward --max-tokens-per-rank 19
# an explicit, non-contiguous placement of the 8 experts (and one where rank 1 owns none)
echo '{"experts_per_rank": [[0, 2, 4, 6], [1, 3, 5, 7]]}' > "$tmp/map2.json"
echo '{"experts_per_rank": [[0, 1, 2, 3, 4, 5, 6, 7], []]}' > "$tmp/map2_none.json"
check 2 --model "$fx/llama4_e8.json" --tokens 37 --transport mpi --backward --expert-map "$tmp/map2.json" --ep-virtual 2
check 2 --model "$fx/qwen3_e8.json" --tokens 37 --transport mpi --backward --expert-map "$tmp/map2_none.json" --dtype bf16
# --chunks 3: the pipelined forward (NCCL stream with virtual ranks; MPI with shared GPUs)
check 1 --model "$fx/llama4_e8.json" --tokens 37 --ep-virtual 4 --transport nccl --backward --chunks 3 --stats
grep -q "last call: 3 chunk(s)" "$tmp/log" || { echo "FAIL: --chunks 3 --stats printed no timeline"; fail=1; }
check 2 --model "$fx/qwen3_e8.json" --tokens 37 --transport mpi --backward --chunks 3 --dtype bf16
check 4 --model "$fx/llama4_e8.json" --tokens 37 --transport mpi --chunks 3 --route skewed
# a real layer shape at modest T (where the time goes: rank 0's timing lines)
timing() { grep -E "generated and placed|EP forward" "$tmp/log" | sed 's/^/    /'; }
check 1 --model qwen3-30b-a3b --tokens 256 --ep-virtual 4 --transport nccl --backward --chunks 2; timing
check 2 --model qwen3-30b-a3b --tokens 256 --transport mpi --backward --stats; timing
grep -q "rows sent" "$tmp/log" || { echo "FAIL: --stats printed no counters"; fail=1; }
# Llama-4-Scout's layer (4.3 GB of bf16 weights, generated twice per rank): opt-in
if [ "${MOE_EP_GPU_SCOUT:-0}" = 1 ]; then
  check 1 --model llama4-scout --tokens 128 --ep-virtual 4 --transport nccl --backward; timing
fi

# NCCL with more ranks than GPUs: a clear error on every rank pointing at --transport mpi
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c GPU)
if [ "${ngpu:-0}" = 1 ]; then
  run_mpi 2 "$ep" check --backend cuda --model "$fx/qwen3_e8.json" --tokens 8 --transport nccl > "$tmp/log" 2>&1; rc=$?
  if [ $rc = 0 ] || ! grep -q "use --transport mpi" "$tmp/log"; then echo "FAIL: np 2 NCCL on one GPU"; cat "$tmp/log"; fail=1
  else echo "ok: np 2 NCCL on one GPU refused"; fi
fi
exit $fail
