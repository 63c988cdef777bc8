#!/usr/bin/env bash
# cli_check.sh — `moe-ep check` on the tiny presets (every dtype, forward and backward, CPU) and
# the program's answers to bad arguments (named argument, exit status 2).
set -u
ep=${MOE_EP:?MOE_EP must point at the moe-ep binary}
fail=0
seed=$(( $(date +%s%N) % 1000000007 ))
echo "seed $seed"
expect() { # expect STATUS PATTERN -- command...
  local want=$1 pat=$2; shift 3
  local out; out=$("$@" 2>&1); local got=$?
  if [ "$got" != "$want" ] || ! grep -q -- "$pat" <<<"$out"; then
    echo "FAIL: '$*' exited $got (want $want), output lacks '$pat':"; echo "$out" | tail -5; fail=1
  else
    echo "ok: $*"
  fi
}
for m in tiny-qwen3 tiny-llama4; do
  for d in fp32 fp16 bf16; do
    expect 0 "PASS" -- "$ep" check --model "$m" --dtype "$d" --tokens 37 --backward --backend cpu --seed "$seed"
  done
done
# an HF config.json works as a model, and --sample says it sampled
expect 0 "sampled" -- "$ep" check --model "$MOE_SOURCE_DIR/tests/fixtures/hf/qwen3_norm_fp32/config.json" --tokens 20 --sample 5 --backend cpu --seed "$seed"
# --exact-hf-rounding: accepted everywhere (the CPU twin always rounds where HF does) and
# documented in check's, forward's and backward's --help
expect 0 "PASS" -- "$ep" check --model tiny-llama4 --dtype bf16 --tokens 19 --backend cpu --exact-hf-rounding --seed "$seed"
expect 0 "exact-hf-rounding" -- "$ep" check --help
expect 0 "exact-hf-rounding" -- "$ep" forward --help
expect 0 "exact-hf-rounding" -- "$ep" backward --help
# one layer, one driver: the option reaches the expert-parallel layer as well
expect 0 "PASS" -- "$ep" check --model tiny-llama4 --dtype bf16 --tokens 19 --backend cpu --ep-virtual 2 --exact-hf-rounding --seed "$seed"
expect 0 "usage: moe-ep check" -- "$ep" check --help
expect 0 "usage: moe-ep forward" -- "$ep" forward --help
expect 0 "usage: moe-ep backward" -- "$ep" backward --help
expect 2 "missing required option --model" -- "$ep" check
expect 2 "unknown option '--bogus'" -- "$ep" check --model tiny-qwen3 --bogus
expect 2 "tokens expects an integer >= 1, got 'abc'" -- "$ep" check --model tiny-qwen3 --tokens abc
expect 2 "tokens expects an integer >= 1, got '0'" -- "$ep" check --model tiny-qwen3 --tokens 0
expect 2 "dtype expects bf16, fp16 or fp32, got 'int8'" -- "$ep" check --model tiny-qwen3 --dtype int8
expect 2 "backend expects cpu, cuda or auto" -- "$ep" check --model tiny-qwen3 --backend tpu
expect 2 "no-such-model" -- "$ep" check --model no-such-model
expect 2 "unknown command 'frobnicate'" -- "$ep" frobnicate
expect 2 "missing required option --weights" -- "$ep" forward --config tiny-qwen3 --input x --output y
expect 1 "nope.safetensors" -- "$ep" forward --config tiny-qwen3 --weights /nonexistent/nope.safetensors --input x --output y --backend cpu
# moe-ep info places 8 ranks on the committed 8-GPU, 2-socket topology: GPU i, its NUMA node's cores
expect 0 "rank 0 on .*GPU 0 0000:11:00.0, NUMA 0, cpus 0-7" -- "$ep" info --topology "$MOE_SOURCE_DIR/tests/fixtures/topo/dgx8-2socket.xml"
expect 0 "usage: moe-ep info" -- "$ep" info --help
expect 1 "no-such.xml" -- "$ep" info --topology /nonexistent/no-such.xml
# compare: equal files pass, a wrong tolerance is a usage error
f=$MOE_SOURCE_DIR/tests/fixtures/hf/qwen3_norm_fp32/io.safetensors
expect 0 "PASS" -- "$ep" compare "$f" "$f" --tensor output
expect 1 "FAIL" -- "$ep" compare "$f" "$f" --tensor output --ref-tensor grad_output --tol 1e-3
expect 2 "tol expects a positive number" -- "$ep" compare "$f" "$f" --tol nope
exit $fail
