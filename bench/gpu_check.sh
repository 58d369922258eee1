#!/usr/bin/env bash
# ONE call on the GPU machine for the CUDA kernels (issue: CUDA kernels, part 1): build mixq._C, run the
# kernel tests, run the kernel benchmark, copy the new bench/results.jsonl lines to $OUT, print a short table.
# Part 2 (grouped expert matmul): tests/test_moe_kernels.py runs with the tests; phase "moe" runs bench/bench_moe.py.
# Device tool: command "bash bench/gpu_check.sh" (timeout_s 600). Phases can be picked: build, test, bench, moe
# (e.g. "bash bench/gpu_check.sh build test moe"); MIXQ_BENCH_ARGS="--quick" shortens the benchmarks.
# Full logs: $OUT/build.log, $OUT/tests.log, $OUT/bench.log, $OUT/bench_moe.log, $OUT/results.jsonl, $OUT/gpu.txt.
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
PHASES="${*:-build test bench moe}"
BUDGET="${MIXQ_BUDGET_S:-580}"   # stay under the device tool's 600 s so the logs come back
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}"
left() { echo $(( BUDGET - SECONDS > 10 ? BUDGET - SECONDS : 10 )); }
status=()

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/gpu.txt" 2>&1
nvcc --version | tail -1 >> "$OUT/gpu.txt" 2>&1

if [[ " $PHASES " == *" build "* ]]; then
  t0=$SECONDS
  timeout 300 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  rc=$?
  python3 -c "import torch, mixq._ops as o; assert o.cuda_ops_available(), 'mixq._C not usable'" >> "$OUT/build.log" 2>&1 || rc=1
  status+=("build rc=$rc in $((SECONDS - t0)) s")
  grep -E "error|warning" "$OUT/build.log" | head -20
fi

if [[ " $PHASES " == *" test "* ]]; then
  t0=$SECONDS
  timeout "$(( $(left) < 300 ? $(left) : 300 ))" python3 -m pytest -q -rfEs -p no:cacheprovider \
    tests/test_kernels_exl2.py tests/test_kernels_routing.py tests/test_layout.py tests/test_routing.py \
    tests/test_moe_kernels.py \
    --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  rc=$?
  status+=("tests rc=$rc in $((SECONDS - t0)) s: $(tail -1 "$OUT/tests.log")")
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi

if [[ " $PHASES " == *" bench "* ]]; then
  t0=$SECONDS
  before=$(wc -l < bench/results.jsonl 2>/dev/null || echo 0)
  timeout "$(left)" python3 -m bench.bench_kernels ${MIXQ_BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  rc=$?
  tail -n +"$((before + 1))" bench/results.jsonl > "$OUT/results.jsonl" 2>/dev/null
  status+=("bench rc=$rc in $((SECONDS - t0)) s, $(wc -l < "$OUT/results.jsonl") result lines")
  echo "== summary (full table: \$OUT/bench.log) =="
  python3 -m bench.bench_kernels --summary "$OUT/results.jsonl" 2>&1 | tail -40
  grep -E "^note:|switch|tokens +[0-9]+:" "$OUT/bench.log" | tail -12
fi

if [[ " $PHASES " == *" moe "* ]]; then
  t0=$SECONDS
  before=$(wc -l < bench/results.jsonl 2>/dev/null || echo 0)
  timeout "$(left)" python3 -m bench.bench_moe ${MIXQ_BENCH_ARGS:-} > "$OUT/bench_moe.log" 2>&1
  rc=$?
  tail -n +"$((before + 1))" bench/results.jsonl > "$OUT/results_moe.jsonl" 2>/dev/null
  cat "$OUT/results_moe.jsonl" >> "$OUT/results.jsonl"
  status+=("bench_moe rc=$rc in $((SECONDS - t0)) s, $(wc -l < "$OUT/results_moe.jsonl") result lines")
  echo "== MoE layer summary (full table: \$OUT/bench_moe.log) =="
  python3 -m bench.bench_moe --summary "$OUT/results_moe.jsonl" 2>&1 | tail -30
  grep -E "skipped|Error" "$OUT/bench_moe.log" | tail -6
fi

echo "== gpu_check: $(head -2 "$OUT/gpu.txt" | tail -1) =="
for s in "${status[@]}"; do echo "$s"; done
