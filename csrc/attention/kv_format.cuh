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
#include <type_traits>

#include "common/activation.cuh"

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

__device__ __forceinline__ float fp8_to_float(uint8_t b) {
  __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3);
  return __half2float(__half(h));
}

// 16 bytes of a stored row -> the floats they encode (8 native, 16 fp8/q8, 32 q4). Q modes return the
// rotated-domain value in code units, (code - kZero); the caller multiplies by the group scale.
template <typename scalar_t, CacheMode kMode>
struct Chunk {
  static constexpr int kVals = kMode == CacheMode::kNative ? 8 : kMode == CacheMode::kQ4 ? 32 : 16;

  __device__ __forceinline__ static void decode(const uint4& raw, float* v) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
    if constexpr (kMode == CacheMode::kNative) {
      using pair_t = std::conditional_t<std::is_same_v<scalar_t, __half>, __half2, __nv_bfloat162>;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = to_float2(*reinterpret_cast<const pair_t*>(&w[i]));
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
      }
    } else if constexpr (kMode == CacheMode::kFp8) {
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = fp8_to_float(static_cast<uint8_t>(w[i / 4] >> (8 * (i % 4))));
    } else if constexpr (kMode == CacheMode::kQ8) {
#pragma unroll
      for (int i = 0; i < 16; ++i)
        v[i] = static_cast<float>(static_cast<int>((w[i / 4] >> (8 * (i % 4))) & 0xffu) - QuantCode<kMode>::kZero);
    } else {
#pragma unroll
      for (int i = 0; i < 32; ++i)
        v[i] = static_cast<float>(static_cast<int>((w[i / 8] >> (4 * (i % 8))) & 0xfu) - QuantCode<kMode>::kZero);
    }
  }
};

// Two consecutive values (2i, 2i+1) of a stored row held in shared memory; `row` points at the row start.
template <typename scalar_t, CacheMode kMode>
__device__ __forceinline__ float2 decode_pair(const uint8_t* row, int pair) {
  if constexpr (kMode == CacheMode::kNative) {
    using pair_t = std::conditional_t<std::is_same_v<scalar_t, __half>, __half2, __nv_bfloat162>;
    return to_float2(reinterpret_cast<const pair_t*>(row)[pair]);
  } else if constexpr (kMode == CacheMode::kFp8) {
    const uint16_t b = reinterpret_cast<const uint16_t*>(row)[pair];
    return make_float2(fp8_to_float(b & 0xff), fp8_to_float(b >> 8));
  } else if constexpr (kMode == CacheMode::kQ8) {
    const uint16_t b = reinterpret_cast<const uint16_t*>(row)[pair];
    constexpr int z = QuantCode<kMode>::kZero;
    return make_float2(static_cast<float>(static_cast<int>(b & 0xff) - z),
                       static_cast<float>(static_cast<int>(b >> 8) - z));
  } else {
    const uint8_t b = row[pair];
    constexpr int z = QuantCode<kMode>::kZero;
    return make_float2(static_cast<float>(static_cast<int>(b & 0xf) - z),
                       static_cast<float>(static_cast<int>(b >> 4) - z));
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
