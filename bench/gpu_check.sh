#!/usr/bin/env bash
# The first GPU run as ONE device call (issue 18): build, kernel tests, sanitizers, kernel benchmarks, ncu, end to
# end, exllamav2 interop; the most important facts first, every phase under its own `timeout`, a table printed last.
#
#   device tool:  command "bash bench/gpu_check.sh", timeout_s 600 (carry [".whl"] when the exllamav2 wheels are there)
#   rehearsal:    bash bench/gpu_check.sh --dry-run    (no GPU: tiny shapes on the CPU; add MIXQ_CUDA_EMU=<lib> to
#                 run the kernels under the emulation; results checked against shared/docs/results-format.md)
#   some phases:  bash bench/gpu_check.sh [--dry-run] build test gemm      (names below; default all, in this order)
#
# Budgets (seconds; the whole call <= 560 s with the build). Each phase may use its own budget plus whatever the
# phases before it left unused, never more, so a hang in one still leaves every later phase its own time:
#   env 10 | build 140 | test 80 | sanitize 60 (memcheck 30, racecheck 30; "plain" 60 without compute-sanitizer) |
#   gemm 45 | moe 55 | attn 30 | ncu 25 |
#   e2e 75 (8x7B at 4.0 bpw built in memory on the GPU: decode b1/b8 graphs and eager, prefill 2048, VRAM 32k q8/q4)
#   | e2e22 35 (8x22B VRAM at 64k, q4) | interop: what is left (only when .whl/ holds exllamav2) | report 5
# Output (at most 8 files, the device tool's limit), in $OUT, else bench/out/: summary.txt (the table, also
# printed), results.jsonl (every figure; bench/results.jsonl is NOT touched: after a GPU run append with
# `python -m bench.check_results <dir>/results.jsonl --append bench/results.jsonl`), build.log, tests.log,
# sanitize.log, bench.log (gemm, moe, attn, ncu), e2e.log, interop.log.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
ALL="env build test sanitize gemm moe attn ncu e2e e2e22 interop"
PHASES=" ${*:-$ALL} "
OUT="${OUT:-$PWD/bench/out}"; mkdir -p "$OUT"
WORK=$(mktemp -d)   # scratch (junit xml, per-phase results, interop's work): only the 8 files above go to $OUT
TOTAL=${MIXQ_CHECK_TOTAL_S:-560}
declare -A BUDGET=([env]=10 [build]=140 [test]=80 [memcheck]=30 [racecheck]=30 [plain]=60 [gemm]=45 [moe]=55
                   [attn]=30 [ncu]=25 [e2e]=75 [e2e22]=35 [interop]=0)
# The metrics each phase must write (checked on its new lines, against shared/docs/results-format.md's fields).
declare -A EXPECT=(
  [gemm]=copy_bandwidth,kernel_us,expert_matmul_bw_fraction
  [moe]=kernel_us,moe_layer_bw_fraction,moe_layer_vs_fp16
  [attn]=copy_bandwidth,kernel_us,decode_attention_bw_fraction
  [e2e]=prefill_tokens_per_s,decode_tokens_per_s,decode_bw_fraction
  [e2e22]=prefill_tokens_per_s
  [interop]=interop_logits_rel_err
)
if [ $DRY = 1 ]; then   # the budgets are the GPU's; under the CPU emulation the kernels run ~100x slower
  SCALE=${MIXQ_CHECK_SCALE:-$([ -n "${MIXQ_CUDA_EMU:-}" ] && echo 5 || echo 1)}
  for k in "${!BUDGET[@]}"; do BUDGET[$k]=$(( BUDGET[$k] * SCALE )); done
  TOTAL=$(( TOTAL * SCALE ))
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MIXQ_RESULTS="$OUT/results.jsonl"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}"
PY=${PYTHON:-python3}
if [ $DRY = 1 ]; then
  [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
  export CUDA_VISIBLE_DEVICES=""   # the rehearsal never touches a GPU, even where there is one
fi
export PY
for d in /usr/local/cuda/bin /opt/nvidia/nsight-compute/*; do   # nvcc, compute-sanitizer, ncu if not on PATH
  [ -d "$d" ] && PATH="$PATH:$d"
done
for f in summary.txt results.jsonl build.log tests.log sanitize.log bench.log e2e.log interop.log; do
  : > "$OUT/$f"
done

rows=()
failed=()
scheduled=0   # end of the current phase's slot, seconds since the start
has() { [[ "$PHASES" == *" $1 "* ]]; }
# slot NAME: sets T to this phase's timeout, its budget plus what earlier phases left, within the call's TOTAL.
slot() {
  scheduled=$(( scheduled + ${BUDGET[$1]} ))
  local end=$(( scheduled < TOTAL - 5 ? scheduled : TOTAL - 5 ))
  [ "$1" = interop ] && end=$(( TOTAL - 5 ))
  T=$(( end - SECONDS > 5 ? end - SECONDS : 5 ))
}
# run NAME LOG CMD...: CMD under its slot's timeout, stdout+stderr appended to $OUT/LOG, one row of the table.
run() {
  local name=$1 log=$2; shift 2
  slot "$name"
  local t=$T t0=$SECONDS before rc
  before=$(wc -l < "$MIXQ_RESULTS")
  echo "=== $name (timeout ${t} s): $*" >> "$OUT/$log"
  timeout -k 5 "$t" "$@" >> "$OUT/$log" 2>&1
  rc=$?
  local note="$(( $(wc -l < "$MIXQ_RESULTS") - before )) results"
  [ $rc = 124 ] || [ $rc = 137 ] && note="TIMEOUT after ${t} s; $note"
  if [ -n "${EXPECT[$name]:-}" ]; then   # its lines parse and carry the metrics it exists for
    local want=${EXPECT[$name]}
    [ $DRY = 0 ] && [[ $name == e2e* ]] && want+=,peak_vram_gib   # no VRAM figure on CPU
    tail -n +"$((before + 1))" "$MIXQ_RESULTS" > "$WORK/$name.jsonl"
    if ! $PY -m bench.check_results "$WORK/$name.jsonl" --expect "$want" >> "$OUT/$log" 2>&1; then
      note="BAD RESULTS (see $log); $note"; [ $rc = 0 ] && rc=65
    fi
  fi
  [ $rc = 0 ] || failed+=("$name")
  local status=ok; [ $rc = 0 ] || status=rc=$rc
  rows+=("$(printf '%-9s %-6s %4d s  %s' "$name" "$status" $((SECONDS - t0)) "$note")")
  echo "== $name rc=$rc in $((SECONDS - t0)) s" >&2
  return $rc
}
skip() {
  rows+=("$(printf '%-9s %-6s %4s    %s' "$1" skip - "$2")")
  scheduled=$(( scheduled + ${BUDGET[$1]} ))
}

ENV_INFO='
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>&1 | head -3
$PY -c "import sys, torch as t; print(sys.version.split()[0], t.__version__, t.version.cuda, t.cuda.is_available())"
nvcc --version 2>&1 | tail -1; command -v ncu compute-sanitizer; ls .whl 2>/dev/null | head
nproc; df -h /tmp | tail -1'
has env && run env build.log bash -c "$ENV_INFO"

# 1. Build (GPU: nvcc for sm_90a; dry run: the CPU emulation's library only when MIXQ_CUDA_EMU asks for it).
if has build; then
  if [ $DRY = 1 ]; then
    run build build.log bash -c "echo 'dry run: no nvcc build'; ${MIXQ_CUDA_EMU:+ls -la \$MIXQ_CUDA_EMU}"
  else
    # mixq.convert is the convert/ folder (setup.py package_dir); an in-place build needs the link pip makes.
    [ -e mixq/convert ] || ln -s ../convert mixq/convert
    run build build.log bash -c "$PY setup.py build_ext --inplace && $PY -c 'import mixq.kernels.ops as o; \
      assert o.cuda_ops_available(), \"mixq._C built but not usable\"; print(\"mixq._C ok\")'"
  fi
  grep -E "error|warning: .*(spill|stack)" "$OUT/build.log" | head -10
fi

# 2. Kernel tests against their references (fail-fast off), one summary line per file.
if has test; then
  # The kernels' own files first, the whole-model ones (slowest) last: a timeout then costs the fewest answers.
  files=$(grep -lE "mark\.(cuda|kernels)" tests/test_*.py | grep -vE "model|demo" | tr '\n' ' ')
  files+=$(grep -lE "mark\.(cuda|kernels)" tests/test_*.py | grep -E "model|demo" | sed 's/^/ /' | tr -d '\n')
  # The rehearsal: one quick file (every kernel test under the emulation is make test-kernels-cpu's 15+ minutes).
  [ $DRY = 1 ] && files=${MIXQ_CHECK_TESTS:-tests/test_kernels_routing.py}
  run test tests.log $PY -m pytest -v -rfE -p no:cacheprovider -m "cuda or kernels" --continue-on-collection-errors \
    --durations=10 --junitxml="$WORK/tests.xml" $files
  # -v so that a killed run still gives its per-file counts from the log
  { echo "--- per file"; $PY -m bench.junit_summary "$WORK/tests.xml" --log "$OUT/tests.log"; } >> "$OUT/tests.log" 2>&1
  sed -n '/^--- per file/,$p' "$OUT/tests.log"
fi

# 3. compute-sanitizer over one small launch of every kernel (the dry run runs the same script without it).
if has sanitize; then
  if command -v compute-sanitizer > /dev/null && [ $DRY = 0 ]; then
    run memcheck sanitize.log compute-sanitizer --tool memcheck --error-exitcode 1 $PY bench/launch_kernels.py
    run racecheck sanitize.log compute-sanitizer --tool racecheck --error-exitcode 1 $PY bench/launch_kernels.py
  else
    run plain sanitize.log $PY bench/launch_kernels.py
  fi
  grep -E "FAILED|ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race" "$OUT/sanitize.log" | head -10
fi

# 4. Kernel benchmarks at Mixtral 8x7B / 8x22B shapes (copy bandwidth first, in bench_kernels), fp16 beside each.
TINY=$([ $DRY = 1 ] && echo --tiny)
has gemm && run gemm bench.log $PY -m bench.bench_kernels $TINY --arch mixtral-8x7b,mixtral-8x22b --bpw 4.0 \
  --tokens 1,4,16 --reps 10 --no-exllamav2
has moe && run moe bench.log $PY -m bench.bench_moe $TINY --arch mixtral-8x7b,mixtral-8x22b --bpw 4.0 \
  --tokens 1,8,64,1024 --reps 5
has attn && run attn bench.log $PY bench/bench_attention.py $TINY --contexts 4096 32768 --batches 1 8 --modes fp16 q4 \
  --iters 10

# ncu: DRAM throughput % of peak, warps active, waves, for the 1-token GEMM and the 1-token MoE layer.
if has ncu; then
  if command -v ncu > /dev/null && [ $DRY = 0 ]; then
    metrics=dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active
    metrics+=,launch__waves_per_multiprocessor,gpu__time_duration.sum
    run ncu bench.log ncu --clock-control none --target-processes all --kernel-name-base function \
      --kernel-name "regex:exl2|moe|finalize|rms|rope" --metrics "$metrics" \
      $PY bench/launch_kernels.py --size mixtral --only gemm1,moe1
  else
    run ncu bench.log $PY bench/launch_kernels.py --only gemm1,moe1   # the target alone (no ncu here)
  fi
fi

# 5. End to end on synthetic models built in memory on the device (seconds there; `mixq synth` to disk is minutes).
has e2e && run e2e e2e.log $PY -m bench.bench_e2e $TINY --arch mixtral-8x7b --bits 4.0 --batch 1,8 --prompt-len 2048 \
  --gen-len 32 --context 32768 --vram-cache q8,q4
has e2e22 && run e2e22 e2e.log $PY -m bench.bench_e2e $TINY --arch mixtral-8x22b --bits 4.0 --steps vram \
  --context 65536 --vram-cache q4

# 6. exllamav2 on the same tensors, when its wheels were carried (.whl/, see bench/gpu_interop.sh).
if has interop; then
  if ls .whl/exllamav2-*.whl > /dev/null 2>&1 && [ $DRY = 0 ]; then
    run interop interop.log bash -c "$PY -m pip install -q --no-index --no-deps --no-compile --target $WORK/site \
      .whl/*.whl && PYTHONPATH=$WORK/site:\$PYTHONPATH $PY bench/interop_exllamav2.py --bits 4.0 --work $WORK/interop"
  elif [ $DRY = 1 ]; then   # its imports and arguments at least (exllamav2 itself needs CUDA)
    EXPECT[interop]=""
    run interop interop.log $PY bench/interop_exllamav2.py --help
  else
    skip interop "no .whl/exllamav2-*.whl carried"
  fi
fi

# The table, most important first: each phase, then the key figures, then every results line checked.
check=$($PY -m bench.check_results "$MIXQ_RESULTS" 2>&1) || failed+=(results)
rows+=("$(printf '%-9s %-6s %4s    %s' results - - "$(echo "$check" | tail -1)")")
{
  gpu=$(grep -m1 -E "^NVIDIA|H200|H100" "$OUT/build.log" || echo no GPU)
  echo "== gpu_check$([ $DRY = 1 ] && echo ' --dry-run'): $gpu"
  echo "phase     rc      time    note"
  printf '%s\n' "${rows[@]}"
  echo "== key figures ($MIXQ_RESULTS)"
  $PY -m bench.check_results "$MIXQ_RESULTS" --summary 2>/dev/null | head -45
  [ "$(echo "$check" | wc -l)" -gt 1 ] && echo "$check" | tail -12
  echo "== total $SECONDS s; ${#failed[@]} failed${failed[*]:+: ${failed[*]}}"
} | tee "$OUT/summary.txt"
rm -rf "$WORK"
[ ${#failed[@]} = 0 ]   # exit 1 when a phase failed (the rehearsal's test relies on it)
