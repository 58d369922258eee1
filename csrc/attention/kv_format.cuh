// KV cache storage formats shared by the decode-attention and cache-write kernels (no torch headers).
//
// Every mode stores one layer's keys (and, separately, values) as `[slots, kv_heads, row]` with the last
// dimension contiguous; slot = page * page_size + offset (mixq/engine/kv_cache.py). Per (slot, head) row:
//   kNative  head_dim values of the activation dtype (fp16 or bf16)
//   kFp8     head_dim float8_e4m3fn bytes (value = fp8 * per-tensor scale)
//   kQ8      head_dim uint8 codes      + an fp16 scale per 32 values in a separate [slots, kv_heads, D/32]
//   kQ4      head_dim/2 uint8 (element 2i in the low nibble, 2i+1 in the high nibble) + the same scales
// Q modes (mixq/kernels/kv_quant.py is the reference): each group of 32 values x is rotated, y = H x, with the
// unnormalised 32-point Sylvester-Hadamard matrix H (H[i][j] = (-1)^popcount(i & j), H H = 32 I), then
// quantized symmetrically with a step of u * scale, u = kScaleUnit: scale = fp16(min(max|y| / (kQMax u), 65504)),
// code = clamp(round(y / (u scale)) + kZero, 0, 2 kZero - 1). Dequantization: y' = (code - kZero) * u * scale,
// x' = H y' / 32. u (a power of two, so exact) keeps the fp16 scale finite for every fp16 input: |y| <= 32 * 65504,
// and 32 * 65504 / (kQMax u) < 65504 needs u > 32 / kQMax (q8: 1, q4: 8); the clamp bounds bf16 inputs beyond
// that (their codes saturate) instead of an inf scale whose 0 * inf would turn a later read into NaN.
// The attention kernel never inverts the rotation per token: with c = code - kZero,
// q.x' = (H q).(c scale) * u / 32 and sum_t p_t x'_t = H (sum_t p_t c_t scale_t) * u / 32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/activation.cuh"
#include "common/half2_magic.cuh"
#include "common/ptx.cuh"

namespace mixq::attn {

enum class CacheMode : int { kNative = 0, kFp8 = 1, kQ8 = 2, kQ4 = 3 };

constexpr int kQuantGroup = 32;       // values per scale / per Hadamard block
constexpr float kHadamardInv = 1.0f / 32.0f;  // H^-1 = H / 32
constexpr float kMaxScale = 65504.0f;  // the largest finite fp16

template <CacheMode kMode>
struct QuantCode;
template <>
struct QuantCode<CacheMode::kQ8> {
  static constexpr int kZero = 128;
  static constexpr float kQMax = 127.0f;
  static constexpr float kScaleUnit = 1.0f;
  static constexpr float kInvRotation = kScaleUnit * kHadamardInv;  // the u / 32 of the header comment
};
template <>
struct QuantCode<CacheMode::kQ4> {
  static constexpr int kZero = 8;
  static constexpr float kQMax = 7.0f;
  static constexpr float kScaleUnit = 8.0f;
  static constexpr float kInvRotation = kScaleUnit * kHadamardInv;
};

// Bytes of one (slot, head) row of `head_dim` values.
template <CacheMode kMode, int kHeadDim, int kNativeBytes>
constexpr int row_bytes() {
  return kMode == CacheMode::kNative ? kHeadDim * kNativeBytes
         : kMode == CacheMode::kQ4   ? kHeadDim / 2
                                     : kHeadDim;
}

constexpr bool is_quant(CacheMode m) { return m == CacheMode::kQ8 || m == CacheMode::kQ4; }

using mixq::from_float;  // common/activation.cuh
using mixq::to_float;
using mixq::to_float2;

// ---- Decoding: stored words -> fp32 values, two per fp16 instruction ("magic numbers", as exl2/dequant_half2.cuh).
// OR-ing an n-bit code c into the mantissa of fp16 1024 (0x6400, ulp 1) at bit p gives exactly 1024 + c * 2^p,
// in both halves of a register at once (one LOP3, or one PRMT for whole bytes); one HFMA2 with constants that
// are exact in fp16 then gives c - kZero (every intermediate is an integer below 2048 times a power of two, so
// nothing rounds). The scores and P.V stay in fp32, so each pair is then widened to fp32 (2 HADD2.F32). That
// still beats the integer path it replaces (per value: shift, mask, I2F, which issues at a quarter of the FFMA
// rate, and an FADD of -kZero). A fp32 magic (2^23 = 0x4B000000, one LOP3/PRMT + one FFMA per value) would
// cost the same 2 instructions per value; the half2 form is kept for its one-instruction PRMT of two q8 bytes
// and to share the project's conventions.
// Q modes return codes centred on 0, (code - kZero), never multiplied by the group scale: the score phase
// multiplies a whole partial dot product by the scale, P.V multiplies the pair (paged_decode.cuh).

__device__ __forceinline__ __half2 splat_half2(float x) { return __float2half2_rn(x); }  // x exact in fp16

// Two fp8 e4m3 bytes (the low 16 bits of `b`) -> fp32: one cvt.rn.f16x2.e4m3x2 on sm_89+ (exact: every e4m3
// value, NaN included, is an fp16 value) instead of one conversion per byte.
__device__ __forceinline__ float2 fp8x2_to_float2(uint32_t b) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(b & 0xffffu), __NV_E4M3);
  return __half22float2(__half2(h));
}

// Values per 32-bit word of a stored row.
template <CacheMode kMode>
constexpr int kValsPerWord = kMode == CacheMode::kNative ? 2 : kMode == CacheMode::kQ4 ? 8 : 4;

// One 32-bit word of a stored row -> its kValsPerWord<kMode> values in row order (v[i] = element i of the word).
template <typename scalar_t, CacheMode kMode>
__device__ __forceinline__ void decode_word(uint32_t w, float* v) {
  if constexpr (kMode == CacheMode::kNative) {
    using pair_t = std::conditional_t<std::is_same_v<scalar_t, __half>, __half2, __nv_bfloat162>;
    pair_t h;
    memcpy(&h, &w, sizeof h);
    const float2 f = to_float2(h);
    v[0] = f.x, v[1] = f.y;
  } else if constexpr (kMode == CacheMode::kFp8) {
    const float2 a = fp8x2_to_float2(w), b = fp8x2_to_float2(w >> 16);
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
  } else if constexpr (kMode == CacheMode::kQ8) {
    // Bytes 0 and 2 (then 1 and 3) under 0x64 bytes: one PRMT builds both 1024 + code halves; - (1024 + 128).
    const __half2 z = splat_half2(-(1024.0f + QuantCode<kMode>::kZero));
    const float2 a = __half22float2(__hadd2(bits_as_half2(__byte_perm(w, 0x64646464u, 0x4240u)), z));
    const float2 b = __half22float2(__hadd2(bits_as_half2(__byte_perm(w, 0x64646464u, 0x4341u)), z));
    v[0] = a.x, v[2] = a.y, v[1] = b.x, v[3] = b.y;
  } else {
    // Nibble k in the low half pairs with nibble k + 4 in the high half (bits 4k and 16 + 4k): nibbles 0, 1 (and
    // 4, 5) are read in place at p = 0 and 4; nibbles 2, 3 (6, 7) would reach the exponent (bits 8..15 of a
    // half), so they are read from w >> 8, one shift for four values. c = h * 2^-p - (1024 * 2^-p + 8): one
    // HFMA2 whose two constants are the same in both halves (immediates).
    constexpr float z = QuantCode<kMode>::kZero;
    const uint32_t w8 = w >> 8;
    const __half2 one = splat_half2(1.0f), sixteenth = splat_half2(1.0f / 16.0f);
    const __half2 d0 = splat_half2(-(1024.0f + z)), d4 = splat_half2(-(64.0f + z));
    const float2 a = __half22float2(__hfma2(bits_as_half2(lop3<kAndOr>(w, 0x000F000Fu, kMagic2)), one, d0));
    const float2 b = __half22float2(__hfma2(bits_as_half2(lop3<kAndOr>(w, 0x00F000F0u, kMagic2)), sixteenth, d4));
    const float2 c = __half22float2(__hfma2(bits_as_half2(lop3<kAndOr>(w8, 0x000F000Fu, kMagic2)), one, d0));
    const float2 d = __half22float2(__hfma2(bits_as_half2(lop3<kAndOr>(w8, 0x00F000F0u, kMagic2)), sixteenth, d4));
    v[0] = a.x, v[4] = a.y, v[1] = b.x, v[5] = b.y, v[2] = c.x, v[6] = c.y, v[3] = d.x, v[7] = d.y;
  }
}

// Two consecutive values (2i, 2i+1) of a stored row held in shared memory; `row` points at the row start.
template <typename scalar_t, CacheMode kMode>
__device__ __forceinline__ float2 decode_pair(const uint8_t* row, int pair) {
  if constexpr (kMode == CacheMode::kNative) {
    using pair_t = std::conditional_t<std::is_same_v<scalar_t, __half>, __half2, __nv_bfloat162>;
    return to_float2(reinterpret_cast<const pair_t*>(row)[pair]);
  } else if constexpr (kMode == CacheMode::kFp8) {
    return fp8x2_to_float2(reinterpret_cast<const uint16_t*>(row)[pair]);
  } else if constexpr (kMode == CacheMode::kQ8) {
    const uint32_t b = reinterpret_cast<const uint16_t*>(row)[pair];
    const __half2 h = bits_as_half2(__byte_perm(b, 0x64646464u, 0x4140u));  // (1024 + b0, 1024 + b1)
    return __half22float2(__hadd2(h, splat_half2(-(1024.0f + QuantCode<kMode>::kZero))));
  } else {
    // b * 0x1001 = b | b << 12 (no overlapping bits): the low nibble at bit 0, the high one at bit 16, both at
    // p = 0, so one LOP3 and one HADD2 with an immediate give both codes.
    const uint32_t b = row[pair];
    const __half2 h = bits_as_half2(lop3<kAndOr>(b * 0x1001u, 0x000F000Fu, kMagic2));
    return __half22float2(__hadd2(h, splat_half2(-(1024.0f + QuantCode<kMode>::kZero))));
  }
}

// In-warp unnormalised 32-point Hadamard transform: lane i holds x[i] and gets (H x)[i].
__device__ __forceinline__ float warp_hadamard32(float x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int s = 1; s < 32; s <<= 1) {
    const float y = __shfl_xor_sync(0xffffffffu, x, s);
    x = (lane & s) ? (y - x) : (x + y);
  }
  return x;
}

}  // namespace mixq::attn
