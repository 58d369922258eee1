#!/usr/bin/env bash
# One GPU call that validates and benchmarks the paged decode attention kernels (csrc/attention):
# build mixq._C, run tests/test_paged_attention_kernel.py, then bench/bench_attention.py; a short table last.
# Run with the device tool: command "bash bench/gpu_attention.sh" (logs and results.jsonl land in $OUT).
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONPATH=$PWD MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
start=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python3 -m pytest -q --maxfail=10 tests/test_paged_attention_kernel.py -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -25 "$OUT/tests.log"
python3 bench/bench_attention.py "$@" 2>&1 | tee "$OUT/bench.log"
cp bench/results.jsonl "$OUT/results.jsonl" 2>/dev/null || true
