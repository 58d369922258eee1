"""Build mixq's CUDA extension for the CPU emulation (tools/cuda_emu/emu.h) and print the library's path.

    python tools/cuda_emu/build.py [--out DIR]
    MIXQ_CUDA_EMU=$(python tools/cuda_emu/build.py) python -m pytest -m kernels    # or: make test-kernels-cpu

Under MIXQ_CUDA_EMU every op on CPU tensors goes to the emulated kernels, so run only the `kernels` tests there.

The kernels of csrc/ are compiled by g++ as host code: each block's threads run as fibers, so the GPU tests'
index and arithmetic checks run on a machine without a GPU (slowly; small shapes). The sources are copied with
the only rewrites g++ needs: kernel launches (`k<<<g, b, s, st>>>(...)`) become `emu::Launch(...).run(k, ...)`,
`extern __shared__ T x[]` takes the emulated block's dynamic shared memory, CUDA registrations register for CPU,
torch-facing sources get emu_torch.h after their includes, and what the ops allocate (at::empty, new_empty) starts
poisoned. Headers of inline PTX are replaced by host twins: common/cp_async.cuh by queued copies that land at their
wait, common/ptx.cuh (lop3) by plain C++, common/mma.cuh (mma.sync) by a warp collective in the PTX fragment
layout. tools/cuda_emu/test_ops.cpp adds test-only ops (torch.ops.mixq_emu: single device helpers and emulated
instructions, for tests that compare them with plain torch). A pass here says the logic is
right; only a GPU can say the kernels are (races, timing, alignment).

With --asan the library is built with AddressSanitizer, which turns every out-of-bounds access into a report:

    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
        MIXQ_CUDA_EMU=$(python tools/cuda_emu/build.py --asan) python -m pytest -m kernels
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\[\];")
_IMPL_CUDA = re.compile(r"TORCH_LIBRARY_IMPL\(\s*mixq\s*,\s*CUDA\s*,")
_NEW_EMPTY = re.compile(r"(\w+)\.new_empty\(")
_TORCH_INCLUDE = re.compile(r"#include\s*<(ATen|c10|torch)/")


# Headers of inline PTX replaced by their host twins (same functions, plain C++).
_TWINS = {"common/cp_async.cuh": "cp_async.cuh", "common/ptx.cuh": "ptx.cuh", "common/mma.cuh": "mma.cuh"}


def _rewrite_launches(src: str) -> str:
    out, pos = [], 0
    for m in _LAUNCH.finditer(src):
        rest = src[m.end() :].lstrip()
        sep = "" if rest.startswith(")") else ", "
        out.append(src[pos : m.start()] + f"::emu::Launch({m.group(2).strip()}).run({m.group(1)}{sep}")
        pos = m.end()
    return "".join(out) + src[pos:]


def rewrite(path: Path, text: str) -> str:
    text = _rewrite_launches(text)
    text = _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_smem());", text)
    text = _IMPL_CUDA.sub("TORCH_LIBRARY_IMPL(mixq, CPU,", text)
    text = text.replace("at::empty(", "::emu::poisoned_empty(")
    text = _NEW_EMPTY.sub(r"::emu::poisoned_new_empty(\1, ", text)
    if path.suffix in (".cu", ".cpp") and _TORCH_INCLUDE.search(text):
        lines = text.splitlines(keepends=True)
        last = max(i for i, line in enumerate(lines) if line.lstrip().startswith("#include"))
        lines.insert(last + 1, '#include "emu_torch.h"\n')
        text = "".join(lines)
    return text


def prepare(out: Path) -> list[str]:
    """Write the rewritten tree to out/src; return the sources (as .cpp) to compile."""
    src_dir = out / "src"
    sources = []
    for p in sorted(CSRC.rglob("*")):
        if p.suffix not in (".cu", ".cuh", ".cpp", ".h"):
            continue
        rel = p.relative_to(CSRC)
        twin = _TWINS.get(rel.as_posix())
        text = (HERE / twin).read_text() if twin else p.read_text()
        text = rewrite(p, text)
        dst = src_dir / rel
        if p.suffix in (".cu", ".cpp"):
            dst = dst.with_name(rel.name.replace(".", "_") + ".cpp")
            sources.append(str(dst))
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists() or dst.read_text() != text:  # keep mtimes (ninja) when nothing changed
            dst.write_text(text)
    for name in ("emu.h", "emu_torch.h"):
        shutil.copy2(HERE / name, src_dir / name)
    # Test-only ops (library mixq_emu: device helpers and emulated instructions one at a time), emulation only.
    test_ops = HERE / "test_ops.cpp"
    dst = src_dir / "emu_test_ops.cpp"
    text = rewrite(test_ops, test_ops.read_text())
    if not dst.exists() or dst.read_text() != text:
        dst.write_text(text)
    sources.append(str(dst))
    return sources


# AddressSanitizer: an out-of-bounds read or write of a tensor, of shared memory or of a kernel's stack aborts with
# a report (what compute-sanitizer's memcheck finds on a GPU). Run it with libasan preloaded; see the docstring.
_ASAN = ["-fsanitize=address", "-fno-omit-frame-pointer"]


def asan_runtime() -> str:
    import subprocess

    out = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def build(out: Path, verbose: bool = False, asan: bool = False) -> str:
    import torch.utils.cpp_extension as ce

    sources = prepare(out)
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    src_dir = out / "src"
    digest = hashlib.sha1("".join(sorted(sources) + _ASAN * asan).encode()).hexdigest()[:8]
    name = f"mixq_emu_{digest}" + ("_asan" if asan else "")
    obj = out / ("obj_asan" if asan else "obj")  # separate objects: ninja would not rebuild on a flag change
    obj.mkdir(parents=True, exist_ok=True)
    ce.load(
        name=name,
        sources=sources,
        extra_cflags=["-O1", "-std=c++20", "-w", "-include", str(src_dir / "emu.h")] + _ASAN * asan,
        extra_ldflags=_ASAN[:1] * asan,
        extra_include_paths=[str(src_dir), os.path.join(cuda_home, "include")],
        build_directory=str(obj),
        is_python_module=False,
        verbose=verbose,
    )
    return str(obj / f"{name}.so")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "build" / "cuda_emu"), help="build directory (default build/cuda_emu)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--asan", action="store_true", help="instrument with AddressSanitizer (bounds checks)")
    args = ap.parse_args()
    if args.asan and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        # torch loads the library once built, and ASan's runtime must be the first library of the process.
        env = dict(os.environ, LD_PRELOAD=asan_runtime(), ASAN_OPTIONS="detect_leaks=0")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the path
        lib = build(Path(args.out), args.verbose, args.asan)
    print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
