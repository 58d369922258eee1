// Device functions shared by the EXL2 kernels: code extraction from the tile layouts, exact int->float,
// and the fp16 scale exactly as exllamav2 forms it. Reference: mixq/exl2/reference.py.
#pragma once

#include "common/cuda_utils.cuh"
#include "exl2/format.h"

namespace mixq::exl2 {

// Code i (0..31) of one column's tile, from its B words w[0..B-1] (planar, or 3/5/6-bit's lane bytes). i must be
// a compile-time constant after unrolling so that w stays in registers and every shift is an immediate.
template <int B>
__device__ __forceinline__ uint32_t extract_code(const uint32_t (&w)[B], int i) {
  if constexpr (B == 3) {  // the lane-byte layout of exl2/dequant_half2.cuh: row i is half i % 2 of pair i / 2
    const int grp = i / 8, k = (i / 2) % 4, h = i % 2;
    const uint32_t xy = w[grp >> 1] >> (16 * (grp & 1));  // X in bits 0..7, Y in bits 8..15
    const uint32_t x = h ? (w[2] >> (8 * grp)) & 0xffu : xy & 0xffu, y = (xy >> 8) & 0xffu;
    if (k < 2) return (x >> (3 * k)) & 7u;
    if (k == 2) return ((x >> 6) & 3u) | ((h ? y >> 7 : y) & 1u) << 2;
    return (y >> (h ? 4 : 1)) & 7u;
  }
  if constexpr (B == 6) {  // lane bytes: word grp = A, word 4 + grp / 2 (half grp % 2) = E0 | E1 << 8
    const int grp = i / 8, k = (i / 2) % 4, h = i % 2;
    const uint32_t a = (w[grp] >> (16 * h)) & 0xffffu;
    const uint32_t e = (w[4 + (grp >> 1)] >> (16 * (grp & 1) + 8 * h)) & 0xffu;
    if (k < 2) return (a >> (6 * k)) & 63u;
    if (k == 2) return e >> 2;
    return ((a >> 12) & 15u) | (e & 3u) << 4;
  }
  if constexpr (B == 5) {  // lane bytes: word grp = A, byte grp of word 4 = X
    const int grp = i / 8, k = (i / 2) % 4, h = i % 2;
    const uint32_t a = (w[grp] >> (16 * h)) & 0xffffu, x = (w[4] >> (8 * grp)) & 0xffu;
    if (k < 3) return (a >> (5 * k)) & 31u;
    return h ? (a >> 15) | (x & 15u) << 1 : (x >> 4) | ((a >> 15) & 1u) << 4;
  }
  constexpr int kPer = 32 / B;  // planar: whole codes
  const uint32_t v = (w[i / kPer] >> (B * (i % kPer))) & ((1u << B) - 1u);
  return v;
}

// 2^23 + z for zero point z = 2^(B-1): OR-ing a code v < 2^23 into the mantissa of 2^23 gives the float
// 2^23 + v exactly, and subtracting this constant leaves v - z exactly (one LOP + one FADD, no I2F).
template <int B>
__device__ __forceinline__ float code_minus_zero(uint32_t v) {
  constexpr float kMagicZero = 8388608.0f + float(1 << (B - 1));
  return __uint_as_float(0x4B000000u | v) - kMagicZero;
}

// fp16((code+1)^2) * fp16(max/256), rounded to fp16 like exllamav2's dq_scale; the fp32 product is exact.
__device__ __forceinline__ float decode_scale(uint32_t code, __half scale_max) {
  const float sq = float((code + 1u) * (code + 1u));
  return __half2float(__float2half_rn(sq * __half2float(scale_max)));
}

// Which segment holds tile kt (at most kMaxSegments entries: a short scan).
__device__ __forceinline__ int segment_of(const Schedule& s, int kt) {
  int seg = 0;
  while (seg + 1 < s.num_segments && kt >= s.tile_begin[seg + 1]) ++seg;
  return seg;
}

}  // namespace mixq::exl2
