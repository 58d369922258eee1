"""The emulated mma.sync.m16n8k16 (tools/cuda_emu, the twin of csrc/common/mma.cuh) against plain torch: random
A (16x16) and B (16x8) in fp16 and C (16x8) in fp32 are cut into the 32 lanes' fragments as the PTX ISA lays
them out ("Matrix Fragments for mma.m16n8k16 with floating point type"), one warp multiplies, and D, gathered
back from the lanes by the same layout, must equal A @ B + C in fp32.

Only the CPU emulation build has the test op (torch.ops.mixq_emu): skipped elsewhere. The layout is written
here from the ISA's tables independently of the emulator's indexing (lane, register and half for each element),
so a mistake in either shows; whether the hardware agrees only a GPU can say (bench/gpu_check.sh runs the kernels).
"""

import pytest
import torch

from mixq.kernels import ops

pytestmark = pytest.mark.kernels


def _emu():
    if not ops.emulated():
        pytest.skip("test-only ops exist in the CPU emulation build only (MIXQ_CUDA_EMU)")
    return torch.ops.mixq_emu


def _pack(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two fp16 tensors -> int32 registers holding lo in bits 0-15 and hi in bits 16-31."""
    lo16 = lo.half().view(torch.int16).to(torch.int32) & 0xFFFF
    hi16 = hi.half().view(torch.int16).to(torch.int32) & 0xFFFF
    return (lo16 | (hi16 << 16)).to(torch.int32)


def fragments(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """Per-lane fragments [32, 4], [32, 2], [32, 4]: lane = 4 g + t; the ISA's element tables, row by row."""
    a = torch.zeros(32, 4, dtype=torch.int32)
    b = torch.zeros(32, 2, dtype=torch.int32)
    c = torch.zeros(32, 4)
    for lane in range(32):
        g, t = divmod(lane, 4)
        rows = (g, g + 8, g, g + 8)  # a0/a1 at row g, a2/a3 at g + 8, a4/a5 at g, a6/a7 at g + 8
        cols = (2 * t, 2 * t, 2 * t + 8, 2 * t + 8)  # ... columns 2t(+1), 2t(+1), 2t+8(+1), 2t+8(+1)
        for r in range(4):
            a[lane, r] = _pack(A[rows[r], cols[r]], A[rows[r], cols[r] + 1])
        for r, k in enumerate((2 * t, 2 * t + 8)):  # b0/b1 at rows 2t(+1), b2/b3 at rows 2t+8(+1); column g
            b[lane, r] = _pack(B[k, g], B[k + 1, g])
        for i in range(4):  # c0/c1 at row g, c2/c3 at row g + 8; columns 2t, 2t + 1
            c[lane, i] = C[g + 8 * (i // 2), 2 * t + i % 2]
    return a, b, c


def gather(d: torch.Tensor) -> torch.Tensor:
    D = torch.full((16, 8), float("nan"))
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i in range(4):
            D[g + 8 * (i // 2), 2 * t + i % 2] = d[lane, i]
    return D


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_mma_16816_matches_torch(scale):
    emu = _emu()
    g = torch.Generator().manual_seed(torch.seed())
    A = (torch.randn(16, 16, generator=g) * scale).half()
    B = torch.randn(16, 8, generator=g).half()
    C = torch.randn(16, 8, generator=g) * scale
    D = gather(emu.mma_16816(*fragments(A, B, C)))
    ref = A.float() @ B.float() + C
    assert torch.isfinite(D).all(), "a D element was not written"
    torch.testing.assert_close(D, ref, rtol=1e-5, atol=1e-6 * scale)


def test_every_element_lands_in_its_place():
    """A one-hot A and B pick out single products: D[r][n] = A[r][k] * B[k][n] for exactly one k, so an element
    that the emulator reads from the wrong lane, register or half moves the 1 elsewhere."""
    emu = _emu()
    g = torch.Generator().manual_seed(torch.seed())
    for _ in range(8):
        r, k, n = (int(torch.randint(0, m, (1,), generator=g)) for m in (16, 16, 8))
        A = torch.zeros(16, 16).half()
        B = torch.zeros(16, 8).half()
        A[r, k], B[k, n] = 2.0, 3.0
        D = gather(emu.mma_16816(*fragments(A, B, torch.zeros(16, 8))))
        want = torch.zeros(16, 8)
        want[r, n] = 6.0
        assert torch.equal(D, want), (r, k, n)


def test_mma_k32_x2_matches_torch():
    """The kernels' unit (csrc/common/mma.cuh mma_k32_x2): two 16x32 A sharing one 32x8 B, each as two k16 steps
    of the fragments above, in one meeting of the warp."""
    emu = _emu()
    g = torch.Generator().manual_seed(torch.seed())
    A = [torch.randn(16, 32, generator=g).half() for _ in range(2)]
    B = torch.randn(32, 8, generator=g).half()
    a = torch.zeros(32, 16, dtype=torch.int32)
    b = torch.zeros(32, 4, dtype=torch.int32)
    zero = torch.zeros(16, 8)
    for kb in range(2):
        for i in range(2):
            fa, fb, _ = fragments(A[i][:, 16 * kb : 16 * kb + 16], B[16 * kb : 16 * kb + 16], zero)
            a[:, 8 * i + 4 * kb : 8 * i + 4 * kb + 4] = fa
        b[:, 2 * kb : 2 * kb + 2] = fb
    d = emu.mma_k32_x2(a, b)
    for i in range(2):
        D = gather(d[:, 4 * i : 4 * i + 4])
        torch.testing.assert_close(D, A[i].float() @ B.float(), rtol=1e-5, atol=1e-6)
