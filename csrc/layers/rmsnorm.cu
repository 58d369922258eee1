// Fused RMSNorm with an optional residual add (vLLM's fused_add_rms_norm, except that the sum is returned in a new
// tensor instead of overwriting the residual). Per row, exactly RMSNorm.forward of mixq/model/mixtral.py
// (reference: mixq.kernels.layers.rms_norm_ref):
//   h   = dtype(x + residual)                                  torch's fp16/bf16 add: fp32 sum, one rounding
//   out = dtype(w * dtype(h * 1 / sqrt(mean(float(h)^2) + eps)))  fp32 statistics of the rounded h
// The only difference from torch is the order of the fp32 sum of squares (and torch's GPU rsqrt), so the
// normalised value may round to the neighbouring value of the dtype: <= 2 ulps after the weight (the tests' bound).
//
// Grid: one row per blockDim.x threads, blockDim.y rows per CTA (short rows share a CTA so it has >= 8 warps).
// Each thread holds its <= 16 values of the row (x + residual) in registers from the load to the store: one read of
// x, residual and weight, one write of h and out, and a single barrier for the block reduction.
#include <algorithm>

#include "common/cuda_utils.cuh"
#include "layers/layer_kernels.h"
#include "layers/vec.cuh"

namespace mixq::layers {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kValuesPerThread = kRmsNormMaxHidden / kMaxThreads;  // 16: 64 registers at most, no spills (ptxas)
constexpr int kCtaThreads = 256;  // target for short rows (several rows per CTA)

// kVec values per load (8: 16-byte vectors; 1: any hidden size or alignment); kLoads = loads per thread.
template <typename T, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
                    T* __restrict__ out, T* __restrict__ h_out, int rows, int hidden, float eps) {
  using V = Vec<T, kVec>;
  constexpr int kLoads = kValuesPerThread / kVec;
  const int units = hidden / kVec;
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  // Threads of a tail row past `rows` still reach the barrier (with zeros), so they stay until it.
  const bool active = row < rows;
  const int64_t base = static_cast<int64_t>(active ? row : 0) * hidden;

  V h[kLoads], w[kLoads];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const int u = threadIdx.x + j * blockDim.x;
    if (!active || u >= units) continue;
    const int64_t off = base + static_cast<int64_t>(u) * kVec;
    h[j] = load_vec<T, kVec>(x + off);
    w[j] = load_vec<T, kVec>(weight + u * kVec);  // issued before the reduction, so its latency is hidden
    if (residual != nullptr) {
      const V r = load_vec<T, kVec>(residual + off);
#pragma unroll
      for (int e = 0; e < kVec; ++e) h[j].v[e] = from_float<T>(to_float(h[j].v[e]) + to_float(r.v[e]));
      store_vec<T, kVec>(h_out + off, h[j]);
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float f = to_float(h[j].v[e]);
      ss += f * f;
    }
  }

  // Block reduction per row: warps shuffle, then each thread adds its row's <= 32 warp sums in a fixed order
  // (deterministic; a broadcast read of shared memory). blockDim.x is a multiple of 32: a warp is in one row.
  __shared__ float warp_ss[kMaxThreads / kWarpSize];
  ss = warp_sum(ss);
  const int warps = blockDim.x / kWarpSize;
  float* row_ss = warp_ss + threadIdx.y * warps;
  if (threadIdx.x % kWarpSize == 0) row_ss[threadIdx.x / kWarpSize] = ss;
  __syncthreads();
  if (!active) return;
  float total = 0.f;
  for (int i = 0; i < warps; ++i) total += row_ss[i];
  // Correctly rounded sqrt and division (not rsqrtf's approximation): the same fp32 value as torch on CPU.
  const float inv_rms = 1.f / sqrtf(total / static_cast<float>(hidden) + eps);

#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const int u = threadIdx.x + j * blockDim.x;
    if (u >= units) continue;
    V o;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float n = round_to<T>(to_float(h[j].v[e]) * inv_rms);  // `.to(x.dtype)` before the weight
      o.v[e] = from_float<T>(to_float(w[j].v[e]) * n);
    }
    store_vec<T, kVec>(out + base + static_cast<int64_t>(u) * kVec, o);
  }
}

template <typename T, int kVec>
cudaError_t launch(const T* x, const T* residual, const T* weight, T* out, T* h_out, int rows, int hidden, float eps,
                   cudaStream_t stream) {
  const int units = hidden / kVec;
  // One value (or vector) per thread up to 1024 threads (lowest latency for a decode step's single row); longer
  // rows take up to kValuesPerThread values per thread.
  const int tx = std::min(kMaxThreads, ceil_div(units, kWarpSize) * kWarpSize);
  const int ty = std::max(1, std::min(kCtaThreads / tx, rows));
  const dim3 block(tx, ty);
  rms_norm_kernel<T, kVec><<<ceil_div(rows, ty), block, 0, stream>>>(x, residual, weight, out, h_out, rows, hidden,
                                                                     eps);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t rms_norm(const T* x, const T* residual, const T* weight, T* out, T* h_out, int rows, int hidden,
                     float eps, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (hidden < 1 || hidden > kRmsNormMaxHidden || (residual != nullptr && h_out == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const bool vec = hidden % 8 == 0 && aligned16(x) && aligned16(weight) && aligned16(out) &&
                   (residual == nullptr || (aligned16(residual) && aligned16(h_out)));
  return vec ? launch<T, 8>(x, residual, weight, out, h_out, rows, hidden, eps, stream)
             : launch<T, 1>(x, residual, weight, out, h_out, rows, hidden, eps, stream);
}

template cudaError_t rms_norm<__half>(const __half*, const __half*, const __half*, __half*, __half*, int, int, float,
                                      cudaStream_t);
template cudaError_t rms_norm<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*,
                                             __nv_bfloat16*, __nv_bfloat16*, int, int, float, cudaStream_t);

}  // namespace mixq::layers
