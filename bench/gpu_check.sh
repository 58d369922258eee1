#!/usr/bin/env bash
# The GPU machine's script: build mixq._C, run every GPU test (kernels against their references), then the
# benchmarks, copying the new bench/results.jsonl lines to $OUT and printing short tables.
# Device tool, one call each (timeout_s 600; build is cheap again while the machine is warm):
#   1. "bash bench/gpu_check.sh build test"   2. "MIXQ_BENCH_ARGS=--quick bash bench/gpu_check.sh build gemm moe attn"
#   3. "bash bench/gpu_check.sh build e2e"
# Phases (default: build test):
#   build  setup.py build_ext --inplace          test  pytest -m "cuda or kernels" over tests/
#   gemm   bench/bench_kernels.py (EXL2 GEMM)    moe   bench/bench_moe.py (grouped expert matmul)
#   attn   bench/bench_attention.py (paged decode attention)
#   e2e    mixq synth (8x7B at 4.0 bpw, random weights at the real shapes) + mixq bench --record
# e.g. "bash bench/gpu_check.sh build test moe"; MIXQ_BENCH_ARGS="--quick" shortens bench_kernels/bench_moe.
# Full logs in $OUT: gpu.txt, build.log, tests.log, <phase>.log, results.jsonl.
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
PHASES="${*:-build test}"
BUDGET="${MIXQ_BUDGET_S:-580}"   # stay under the device tool's 600 s so the logs come back
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}"
left() { echo $(( BUDGET - SECONDS > 10 ? BUDGET - SECONDS : 10 )); }
has() { [[ " $PHASES " == *" $1 "* ]]; }
status=()
: > "$OUT/results.jsonl"

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/gpu.txt" 2>&1
nvcc --version | tail -1 >> "$OUT/gpu.txt" 2>&1

if has build; then
  t0=$SECONDS
  timeout 300 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  rc=$?
  # mixq.convert is the convert/ folder (setup.py package_dir); an in-place build needs the link that pip makes.
  [ -e mixq/convert ] || ln -s ../convert mixq/convert
  python3 -c "import torch, mixq.kernels.ops as o; assert o.cuda_ops_available(), 'mixq._C not usable'" >> "$OUT/build.log" 2>&1 || rc=1
  status+=("build rc=$rc in $((SECONDS - t0)) s")
  grep -E "error|warning" "$OUT/build.log" | head -20
fi

if has test; then
  t0=$SECONDS
  timeout "$(( $(left) < 300 ? $(left) : 300 ))" python3 -m pytest -q -rfE -p no:cacheprovider -m "cuda or kernels" tests/ \
    --durations=15 --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  rc=$?
  status+=("tests rc=$rc in $((SECONDS - t0)) s: $(tail -1 "$OUT/tests.log")")
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi

# bench_phase NAME CMD...: run CMD with the time left, keep its new results lines, log to $OUT/NAME.log.
bench_phase() {
  local name=$1; shift
  local t0=$SECONDS before
  before=$(wc -l < bench/results.jsonl 2>/dev/null || echo 0)
  timeout "$(left)" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n +"$((before + 1))" bench/results.jsonl > "$OUT/results_$name.jsonl" 2>/dev/null
  cat "$OUT/results_$name.jsonl" >> "$OUT/results.jsonl"
  status+=("$name rc=$rc in $((SECONDS - t0)) s, $(wc -l < "$OUT/results_$name.jsonl") result lines")
  echo "== $name (full output: \$OUT/$name.log) =="
}

if has gemm; then
  bench_phase gemm python3 -m bench.bench_kernels ${MIXQ_BENCH_ARGS:-}
  python3 -m bench.bench_kernels --summary "$OUT/results_gemm.jsonl" 2>&1 | tail -40
fi
if has moe; then
  bench_phase moe python3 -m bench.bench_moe ${MIXQ_BENCH_ARGS:-}
  python3 -m bench.bench_moe --summary "$OUT/results_moe.jsonl" 2>&1 | tail -30
fi
if has attn; then
  bench_phase attn python3 bench/bench_attention.py
  tail -30 "$OUT/attn.log"
fi
if has e2e; then
  model=/tmp/mixq-8x7b-4.0
  [ -f "$model/config.json" ] || timeout "$(left)" python3 -m mixq synth "$model" --arch mixtral-8x7b --bits 4.0 \
    > "$OUT/synth.log" 2>&1
  bench_phase e2e python3 -m mixq bench "$model" --batch 1,4,16 --record
  tail -20 "$OUT/e2e.log"
fi

echo "== gpu_check: $(head -2 "$OUT/gpu.txt" | tail -1) =="
for s in "${status[@]}"; do echo "$s"; done
