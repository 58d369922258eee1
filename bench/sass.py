"""Read the built extension without a GPU: per-kernel resource usage and the hot loops of its SASS.

Tools: `cuobjdump` from the CUDA toolkit, or the PyPI package `nvidia-cuda-cuobjdump` (what CI installs with the
`test` extra). A hot loop is an innermost backward branch whose body issues the weight loads (16-byte global loads
or cp.async/LDGSTS); everything here is counted per thread, per iteration of that loop.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Opcode classes (Hopper): fp32 math issues at one warp-instruction per clock per SMSP; the integer ALU pipe at
# half that rate (16 lanes per SMSP), which is what bounds the shift/mask dequantization.
MATH = {"FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "HMMA", "HGMMA", "IDP", "DP4A"}
INT_ALU = {"LOP3", "SHF", "IADD3", "LEA", "PRMT", "SEL", "ISETP", "IABS", "IMNMX", "BMSK", "SGXT", "FLO", "POPC"}
WEIGHT_LOADS = re.compile(r"^(LDG\.E(\.EF|\.EL|\.LU)?(\.CONSTANT)?\.128|LDGSTS\..*128)")


def cuobjdump() -> str | None:
    """Path of a cuobjdump that can disassemble (nvdisasm found): PATH, $CUDA_HOME/bin, then the PyPI wheels'
    nvidia/cu*/bin; None if there is none."""
    found = shutil.which("cuobjdump")
    if found and _has_nvdisasm(found):
        return found
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import nvidia  # the PyPI wheels' namespace package (optional)

        for root in nvidia.__path__:
            cands += sorted(glob.glob(os.path.join(root, "cu*", "bin", "cuobjdump")))
            cands += sorted(glob.glob(os.path.join(root, "cuda_cuobjdump", "bin", "cuobjdump")))
    except ImportError:
        pass
    return next((c for c in cands if os.access(c, os.X_OK) and _has_nvdisasm(c)), None)


def _has_nvdisasm(cuobjdump_path: str) -> bool:
    """`cuobjdump -sass` runs nvdisasm (beside it, on PATH or at $NVDISASM_PATH); without it the SASS is empty."""
    beside = os.path.join(os.path.dirname(cuobjdump_path), "nvdisasm")
    return os.access(beside, os.X_OK) or shutil.which("nvdisasm") is not None or bool(os.environ.get("NVDISASM_PATH"))


def extension() -> str | None:
    """The built mixq._C shared object in this checkout, or None."""
    hits = sorted(glob.glob(os.path.join(REPO, "mixq", "_C*.so")))
    return hits[0] if hits else None


@dataclass
class Resources:
    regs: int
    stack: int  # bytes of stack frame per thread (where spills live)
    shared: int  # static shared memory per CTA, bytes
    local: int


@dataclass
class Instr:
    addr: int
    op: str  # full opcode with modifiers, e.g. LDG.E.EF.128
    text: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


@dataclass
class Loop:
    start: int  # index of the first instruction of the body
    end: int  # index of the backward branch (inclusive)
    body: list[Instr] = field(default_factory=list)

    @property
    def instructions(self) -> int:
        return len(self.body)

    def count(self, names: set[str]) -> int:
        return sum(i.base in names for i in self.body)

    @property
    def weight_loads(self) -> list[int]:
        """Positions (in the body) of the weight loads."""
        return [k for k, i in enumerate(self.body) if WEIGHT_LOADS.match(i.op)]

    @property
    def spill_bytes(self) -> int:
        """Bytes moved by LDL/STL per iteration (spill traffic of one thread)."""
        total = 0
        for i in self.body:
            if i.base in ("LDL", "STL"):
                m = re.search(r"\.(64|128)\b", i.op)
                total += int(m.group(1)) // 8 if m else 4
        return total

    @property
    def math_after_loads(self) -> float:
        """Mean over the weight loads of the fraction of the body's math issued after the load: 1 when the loads
        precede all the math (a whole tile of math overlaps them), 0 when they sit after it."""
        loads, math = self.weight_loads, [k for k, i in enumerate(self.body) if i.base in MATH]
        if not loads or not math:
            return 0.0
        return sum(sum(m > p for m in math) / len(math) for p in loads) / len(loads)

    @property
    def loads_after_wait(self) -> float:
        """Mean over the weight loads of the fraction of the body's math issued after the load, counting only loads
        that follow the cp.async wait (DEPBAR.LE SB0): a copy issued before the wait is one of the groups the wait
        leaves pending (pending_groups), so it is not counted twice. Without cp.async: math_after_loads."""
        waits = [k for k, i in enumerate(self.body) if "DEPBAR.LE SB0" in i.text]
        if not waits:
            return self.math_after_loads
        loads, math = self.weight_loads, [k for k, i in enumerate(self.body) if i.base in MATH]
        if not loads or not math:
            return 0.0
        return sum(sum(m > p for m in math) / len(math) for p in loads if p > waits[0]) / len(loads)

    @property
    def pending_groups(self) -> int:
        """cp.async groups the loop leaves in flight at its wait (DEPBAR.LE SB0, N), 0 without cp.async."""
        ns = [int(m.group(1), 16) for i in self.body if (m := re.search(r"DEPBAR\.LE SB0, 0x([0-9a-f]+)", i.text))]
        return min(ns) if ns else 0


def _run(args: list[str]) -> str:
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True).stdout


@cache
def resource_usage(so: str) -> dict[str, Resources]:
    """Mangled kernel name -> resources, from `cuobjdump --dump-resource-usage`."""
    out, res, name = _run([cuobjdump() or "cuobjdump", "--dump-resource-usage", so]), {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            f = dict(re.findall(r"(\w+):(\d+)", line))
            res[name] = Resources(int(f["REG"]), int(f["STACK"]), int(f["SHARED"]), int(f["LOCAL"]))
            name = None
    return res


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


@cache
def sass(so: str, pattern: str) -> dict[str, list[Instr]]:
    """SASS of every kernel whose mangled name matches `pattern` (regex), as instruction lists."""
    rx = re.compile(pattern)
    names = [n for n in resource_usage(so) if rx.search(n)]
    if not names:
        return {}
    # -fun dumps only these (seconds instead of a minute for the whole .so); it warns once per other cubin.
    out = _run([cuobjdump() or "cuobjdump", "-sass", "-fun", ",".join(names), so])
    kernels: dict[str, list[Instr]] = {}
    cur: list[Instr] | None = None
    for line in out.splitlines():
        if "Function :" in line:
            name = line.split("Function :", 1)[1].strip()
            cur = kernels.setdefault(name, []) if rx.search(name) else None
            continue
        if cur is not None:
            m = _INSTR.search(line)
            if m:
                cur.append(Instr(int(m.group(1), 16), m.group(2), m.group(0)))
    return kernels


def hot_loops(code: list[Instr]) -> list[Loop]:
    """Innermost loops (backward branches containing no other backward branch) that issue weight loads."""
    index = {i.addr: k for k, i in enumerate(code)}
    spans = []
    for k, i in enumerate(code):
        if i.base != "BRA":
            continue
        m = re.search(r"BRA\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", i.text)
        if m and int(m.group(1), 16) < i.addr and int(m.group(1), 16) in index:
            spans.append((index[int(m.group(1), 16)], k))
    loops = []
    for s, e in spans:
        if any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in spans):
            continue  # not innermost
        loop = Loop(s, e, code[s : e + 1])
        if loop.weight_loads:
            loops.append(loop)
    return loops
