// Tensor-core matrix multiply-accumulate (sm_80+): one warp computes D = A * B + C with A 16x16 and B 16x8 in
// fp16 and C, D 16x8 in fp32 (mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32), and the warp barrier the
// kernels pair with it. In a header of their own so that the CPU emulation (tools/cuda_emu) can substitute a
// host twin; tests/test_mma_emu.py checks the twin against torch with the fragment layout below.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"); lane = 4 * g + t with
// g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group); a register's low half holds the lower index:
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   c[0], c[1] = C[g][2t], C[g][2t+1]                 c[2], c[3] = C[g+8][2t], C[g+8][2t+1]   (and D alike)
#pragma once

#include <stdint.h>

namespace mixq {

__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          const float (&c)[4]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

// The matmul loop's unit: two 16x8 products over K = 32 that share B, d[i] = A_i * B with A_i 16x32 and B 32x8,
// each two chained m16n8k16 from zero: a[i][kb] and b[kb] are the fragments of k16 step kb. One call, four mma
// (the emulation's twin meets the warp once per call instead of once per mma).
__device__ __forceinline__ void mma_k32_x2(float (&d)[2][4], const uint32_t (&a)[2][2][4], const uint32_t (&b)[2][2]) {
  const float zero[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float t[4];
    mma_16816(t, a[i][0], b[0], zero);
    mma_16816(d[i], a[i][1], b[1], t);
  }
}

// Every lane of the warp waits here; shared-memory writes before it are visible to the warp's reads after it.
__device__ __forceinline__ void warp_barrier() { __syncwarp(); }

}  // namespace mixq
