// Write one step's keys/values into the paged cache (vLLM's reshape_and_cache), quantizing on write, and with RoPE
// tables apply RoPE too: k is rotated as it is stored (k itself is left as it is) and q in place, so a decode step
// has no rope launch of its own (the rotation and its rounding: common/rope.cuh, bit-identical to rope_qk).
// No torch headers. Must match mixq.kernels.paged_attention.paged_cache_write_ref.
//
// Inputs k/v [N, Hkv, D], q [N, Hq, D] (activation dtype, last dim contiguous, 16-byte aligned rows and heads);
// cos/sin [N, D] contiguous; slot_mapping [N] (int32 or int64), a negative slot skips the token's k/v (padding rows
// of a CUDA graph; its q is still rotated). Storage formats: kv_format.cuh.
// Grid: N CTAs of 128 threads, one token each (q, K and V).
//   q: in place, a thread owns 8 pairs (i, i + D/2) of one head (reads both halves before writing either).
//   native: 16-byte copies; fp8: 8 values -> 8 bytes with saturation to +-448; a thread owns 8 pairs here too, so
//   that k's two halves are rotated from registers;
//   Q modes: one warp per 32-value group: Hadamard by shuffles, absmax by shuffles, fp16 scale, clamped to
//   the finite range (the codes are computed with the fp16-rounded scale so dequantization sees exactly
//   what was used).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/kv_format.cuh"
#include "common/rope.cuh"

namespace mixq::attn {

constexpr int kWriteThreads = 128;

struct CacheWriteParams {
  const void* k;
  const void* v;
  int64_t k_token_stride, k_head_stride;  // elements of the inputs
  int64_t v_token_stride, v_head_stride;
  uint8_t* k_cache;
  uint8_t* v_cache;
  int64_t kc_token_stride, kc_head_stride;  // bytes
  int64_t vc_token_stride, vc_head_stride;
  __half* k_scales;
  __half* v_scales;
  int64_t ks_token_stride, ks_head_stride;  // elements
  int64_t vs_token_stride, vs_head_stride;
  const void* slot_mapping;
  void* q;                  // RoPE only (else null): rotated in place
  int64_t q_token_stride, q_head_stride;
  const void* cos;          // RoPE only (else null): [N, D]
  const void* sin;
  int num_tokens, kv_heads, head_dim, q_heads;
  float k_inv_scale, v_inv_scale;  // fp8 only: stored = value / scale
};

// 8 consecutive values as one 16-byte word, and 8 more D/2 further on: one RoPE pair chunk of a head.
struct PairChunk {
  uint4 lo, hi;
};

template <typename scalar_t>
__device__ __forceinline__ PairChunk load_pairs(const scalar_t* head, int i, int half) {
  return {*reinterpret_cast<const uint4*>(head + i), *reinterpret_cast<const uint4*>(head + i + half)};
}

// Rotates a chunk of token n's head by RoPE (the tables' row n, the same columns).
template <typename scalar_t>
__device__ __forceinline__ void rope_chunk(PairChunk& x, const CacheWriteParams& p, int n, int i) {
  const int half = p.head_dim / 2;
  const scalar_t* cos = static_cast<const scalar_t*>(p.cos) + static_cast<int64_t>(n) * p.head_dim;
  const scalar_t* sin = static_cast<const scalar_t*>(p.sin) + static_cast<int64_t>(n) * p.head_dim;
  const PairChunk c = load_pairs(cos, i, half), s = load_pairs(sin, i, half);
  rope_halves<scalar_t, 8>(reinterpret_cast<scalar_t*>(&x.lo), reinterpret_cast<scalar_t*>(&x.hi),
                           reinterpret_cast<const scalar_t*>(&c.lo), reinterpret_cast<const scalar_t*>(&c.hi),
                           reinterpret_cast<const scalar_t*>(&s.lo), reinterpret_cast<const scalar_t*>(&s.hi));
}

// 8 activation values -> 8 e4m3 bytes (value / scale, round to nearest even, saturating to finite).
template <typename scalar_t>
__device__ __forceinline__ uint2 to_fp8x8(const uint4& raw, float inv) {
  const scalar_t* x = reinterpret_cast<const scalar_t*>(&raw);
  uint32_t w[2] = {0u, 0u};
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const __nv_fp8_e4m3 f(to_float(x[e]) * inv);
    w[e / 4] |= static_cast<uint32_t>(f.__x) << (8 * (e % 4));
  }
  return make_uint2(w[0], w[1]);
}

template <typename scalar_t, CacheMode kMode, typename index_t>
__global__ void __launch_bounds__(kWriteThreads) paged_cache_write_kernel(const CacheWriteParams p) {
  const int n = blockIdx.x;
  const int tid = threadIdx.x;
  const int D = p.head_dim, half = D / 2;
  const int chunks = half / 8;  // pair chunks per head
  const bool rope = p.cos != nullptr;
  if (rope) {
    scalar_t* q = static_cast<scalar_t*>(p.q) + static_cast<int64_t>(n) * p.q_token_stride;
    for (int i = tid; i < p.q_heads * chunks; i += kWriteThreads) {
      scalar_t* head = q + i / chunks * p.q_head_stride;
      const int c = i % chunks * 8;
      PairChunk x = load_pairs(head, c, half);
      rope_chunk<scalar_t>(x, p, n, c);
      *reinterpret_cast<uint4*>(head + c) = x.lo;
      *reinterpret_cast<uint4*>(head + c + half) = x.hi;
    }
  }
  const int64_t slot = static_cast<const index_t*>(p.slot_mapping)[n];
  if (slot < 0) return;
  for (int which = 0; which < 2; ++which) {
    const scalar_t* src = static_cast<const scalar_t*>(which ? p.v : p.k) +
                          static_cast<int64_t>(n) * (which ? p.v_token_stride : p.k_token_stride);
    const int64_t src_head = which ? p.v_head_stride : p.k_head_stride;
    uint8_t* dst = (which ? p.v_cache : p.k_cache) + slot * (which ? p.vc_token_stride : p.kc_token_stride);
    const int64_t dst_head = which ? p.vc_head_stride : p.kc_head_stride;
    const bool rotate = rope && which == 0;
    if constexpr (kMode == CacheMode::kNative || kMode == CacheMode::kFp8) {
      const float inv = which ? p.v_inv_scale : p.k_inv_scale;
      for (int i = tid; i < p.kv_heads * chunks; i += kWriteThreads) {
        const int h = i / chunks, c = i % chunks * 8;
        PairChunk x = load_pairs(src + h * src_head, c, half);
        if (rotate) rope_chunk<scalar_t>(x, p, n, c);
        uint8_t* row = dst + h * dst_head;
        if constexpr (kMode == CacheMode::kNative) {
          *reinterpret_cast<uint4*>(row + c * sizeof(scalar_t)) = x.lo;
          *reinterpret_cast<uint4*>(row + (c + half) * sizeof(scalar_t)) = x.hi;
        } else {
          *reinterpret_cast<uint2*>(row + c) = to_fp8x8<scalar_t>(x.lo, inv);
          *reinterpret_cast<uint2*>(row + c + half) = to_fp8x8<scalar_t>(x.hi, inv);
        }
      }
    } else {
      using QC = QuantCode<kMode>;
      const int lane = tid & 31, warp = tid >> 5;
      const int groups = D / kQuantGroup;
      __half* scales = (which ? p.v_scales : p.k_scales) + slot * (which ? p.vs_token_stride : p.ks_token_stride);
      const int64_t scale_head = which ? p.vs_head_stride : p.ks_head_stride;
      for (int g = warp; g < p.kv_heads * groups; g += kWriteThreads / 32) {  // warp-uniform loop
        const int h = g / groups, gi = g % groups;
        const scalar_t* x = src + h * src_head;
        const int j = gi * kQuantGroup + lane;
        float xj = to_float(x[j]);
        if (rotate) {  // warp-uniform; the partner value D/2 away is another lane's, of another group: reread it
          const int64_t t = static_cast<int64_t>(n) * D + j;
          const bool upper = j >= half;
          xj = to_float(rope_value<scalar_t>(xj, to_float(x[upper ? j - half : j + half]),
                                             to_float(static_cast<const scalar_t*>(p.cos)[t]),
                                             to_float(static_cast<const scalar_t*>(p.sin)[t]), upper));
        }
        const float y = warp_hadamard32(xj);
        float amax = fabsf(y);
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, s));
        // Clamped before rounding: an fp16 scale of inf would dequantize as 0 * inf = NaN (kv_format.cuh).
        const __half scale_h = __float2half_rn(fminf(amax / (QC::kQMax * QC::kScaleUnit), kMaxScale));
        const float scale = __half2float(scale_h) * QC::kScaleUnit;  // the step, exact (u is a power of two)
        int code = QC::kZero;
        if (scale > 0.0f) code = min(max(__float2int_rn(y / scale) + QC::kZero, 0), 2 * QC::kZero - 1);
        if (lane == 0) scales[h * scale_head + gi] = scale_h;
        uint8_t* row = dst + h * dst_head;
        if constexpr (kMode == CacheMode::kQ8) {
          row[gi * kQuantGroup + lane] = static_cast<uint8_t>(code);
        } else {
          const int hi_code = __shfl_down_sync(0xffffffffu, code, 1);
          if ((lane & 1) == 0) row[gi * (kQuantGroup / 2) + lane / 2] = static_cast<uint8_t>(code | (hi_code << 4));
        }
      }
    }
  }
}

template <typename scalar_t, CacheMode kMode, typename index_t>
cudaError_t launch_paged_cache_write(const CacheWriteParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  paged_cache_write_kernel<scalar_t, kMode, index_t><<<p.num_tokens, kWriteThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace mixq::attn
