#!/usr/bin/env bash
# One GPU call for the exllamav2 interop proof (issue: EXL2 compatibility). Prepare once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl exllamav2==0.3.2 fastparquet
# then run with the device tool: carry [".whl"], command "bash bench/gpu_interop.sh".
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q -e . --no-build-isolation --no-deps 2>&1 | tail -2      # builds mixq._C
time python3 -c "import exllamav2, exllamav2.ext" 2>&1 | tail -3           # JIT-builds exllamav2's kernels
PYTHONUNBUFFERED=1 python3 bench/interop_exllamav2.py 2>&1 | tee "$OUT/interop.log"
cp bench/results.jsonl "$OUT/results.jsonl" 2>/dev/null || true
