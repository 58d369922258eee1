// Write one step's keys/values into the paged cache (vLLM's reshape_and_cache), quantizing on write.
// No torch headers. Must match mixq.kernels.paged_attention.paged_cache_write_ref.
//
// Inputs k/v [N, Hkv, D] (activation dtype, last dim contiguous); slot_mapping [N] (int32 or int64),
// a negative slot skips the token (padding rows of a CUDA graph). Storage formats: kv_format.cuh.
// Grid: N CTAs of 128 threads, one token each (both K and V).
//   native: 16-byte copies; fp8: 8 values -> 8 bytes with saturation to +-448;
//   Q modes: one warp per 32-value group: Hadamard by shuffles, absmax by shuffles, fp16 scale, clamped to
//   the finite range (the codes are computed with the fp16-rounded scale so dequantization sees exactly
//   what was used).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/kv_format.cuh"

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
  int num_tokens, kv_heads, head_dim;
  float k_inv_scale, v_inv_scale;  // fp8 only: stored = value / scale
};

template <typename scalar_t, CacheMode kMode, typename index_t>
__global__ void __launch_bounds__(kWriteThreads) paged_cache_write_kernel(const CacheWriteParams p) {
  const int n = blockIdx.x;
  const int64_t slot = static_cast<const index_t*>(p.slot_mapping)[n];
  if (slot < 0) return;
  const int tid = threadIdx.x;
  const int D = p.head_dim;
  for (int which = 0; which < 2; ++which) {
    const scalar_t* src = static_cast<const scalar_t*>(which ? p.v : p.k) +
                          static_cast<int64_t>(n) * (which ? p.v_token_stride : p.k_token_stride);
    const int64_t src_head = which ? p.v_head_stride : p.k_head_stride;
    uint8_t* dst = (which ? p.v_cache : p.k_cache) + slot * (which ? p.vc_token_stride : p.kc_token_stride);
    const int64_t dst_head = which ? p.vc_head_stride : p.kc_head_stride;
    if constexpr (kMode == CacheMode::kNative || kMode == CacheMode::kFp8) {
      const int vecs = D / 8;
      const float inv = which ? p.v_inv_scale : p.k_inv_scale;
      for (int i = tid; i < p.kv_heads * vecs; i += kWriteThreads) {
        const int h = i / vecs, c = i % vecs;
        const uint4 raw = *reinterpret_cast<const uint4*>(src + h * src_head + c * 8);
        if constexpr (kMode == CacheMode::kNative) {
          *reinterpret_cast<uint4*>(dst + h * dst_head + c * 16) = raw;
        } else {
          const scalar_t* x = reinterpret_cast<const scalar_t*>(&raw);
          uint32_t w[2] = {0u, 0u};
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const __nv_fp8_e4m3 f(to_float(x[e]) * inv);  // round to nearest even, saturating to finite
            w[e / 4] |= static_cast<uint32_t>(f.__x) << (8 * (e % 4));
          }
          *reinterpret_cast<uint2*>(dst + h * dst_head + c * 8) = make_uint2(w[0], w[1]);
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
        const float y = warp_hadamard32(to_float(src[h * src_head + gi * kQuantGroup + lane]));
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
