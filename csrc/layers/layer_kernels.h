// Torch-free launch API of the small per-layer kernels of a decoder layer (csrc/layers/): the fused RMSNorm
// (+ residual add) and RoPE on q and k in one launch. Torch-facing side: csrc/layers/layer_ops.cpp; Python wrappers
// and the references they must match: mixq/kernels/layers.py.
//
// T is the activation dtype, __half or __nv_bfloat16 (the two instantiations). Every launcher returns the launch's
// cudaError_t, does no host synchronisation and nothing for zero rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace mixq::layers {

// Up to 16 values per thread and 1024 threads: the whole row stays in registers between the two passes.
constexpr int kRmsNormMaxHidden = 16 * 1024;

// out = w * dtype(h * 1/sqrt(mean(h^2) + eps)) per row of h = dtype(x + residual), or h = x without a residual
// (residual == nullptr: h_out is not written and may be nullptr). x, residual, out, h_out: [rows, hidden]
// contiguous; weight [hidden]. 1 <= hidden <= kRmsNormMaxHidden. 16-byte vectors when hidden % 8 == 0 and every
// pointer is 16-byte aligned, else one value per load.
template <typename T>
cudaError_t rms_norm(const T* x, const T* residual, const T* weight, T* out, T* h_out, int rows, int hidden,
                     float eps, cudaStream_t stream);

// q [N, q_heads, D] and k [N, kv_heads, D], rotated in place; strides in elements (a head's D values contiguous).
// cos/sin [N, D] contiguous. D even.
template <typename T>
struct RopeParams {
  T* q;
  T* k;
  const T* cos;
  const T* sin;
  int64_t q_row_stride, q_head_stride;
  int64_t k_row_stride, k_head_stride;
  int num_tokens, q_heads, kv_heads, head_dim;
};

// x * cos + rotate_half(x) * sin (rotate_half(x) = cat(-x[D/2:], x[:D/2])) on every head of q and k, rounded like
// torch's three elementwise ops (bit-identical to mixq.kernels.layers.apply_rope_ref).
template <typename T>
cudaError_t rope_qk(const RopeParams<T>& p, cudaStream_t stream);

}  // namespace mixq::layers
