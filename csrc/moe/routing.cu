// MoE routing on the GPU, no host synchronisation: router logits, softmax/top-k in fp32, and the grouping
// of (token, slot) assignments by expert that a prefill MoE needs.
//
// Semantics (reference: mixq.kernels.ops.topk_softmax_ref / moe_align_ref):
// - top-k on fp32 logits, ties to the lower expert index (strict '>' while scanning upward);
// - weights: softmax over all E then the k picked, divided by their sum when `renormalize` (equal to a
//   softmax over the k picked logits, which is how it is computed here); without renormalize, the plain
//   softmax probabilities of the picked experts;
// - grouping: stable (ascending flat index t*k+j within an expert), each expert's run padded to block_m.

#include <math.h>

#include <cuda_bf16.h>

#include "common/activation.cuh"
#include "common/cuda_utils.cuh"
#include "kernels.h"

namespace mixq {
namespace {

// Top-k of one row of E fp32 logits (E <= kMaxExperts), by repeated upward scans.
__device__ void topk_row(const float* l, int E, int k, bool renormalize, float* weights, int32_t* ids) {
  uint64_t taken = 0;
  float lmax = -INFINITY;
  for (int j = 0; j < k; ++j) {
    int best = -1;
    float bv = 0.f;
    for (int e = 0; e < E; ++e) {
      if ((taken >> e) & 1ull) continue;
      const float v = l[e];
      if (best < 0 || v > bv) {
        best = e;
        bv = v;
      }
    }
    taken |= 1ull << best;
    ids[j] = best;
    if (j == 0) lmax = bv;
  }
  for (int e = 0; e < E; ++e) lmax = fmaxf(lmax, l[e]);  // max over all: safe for either normaliser
  float denom = 0.f;
  if (renormalize) {
    for (int j = 0; j < k; ++j) denom += expf(l[ids[j]] - lmax);
  } else {
    for (int e = 0; e < E; ++e) denom += expf(l[e] - lmax);
  }
  for (int j = 0; j < k; ++j) weights[j] = expf(l[ids[j]] - lmax) / denom;
}

// One thread per token.
__global__ void topk_softmax_kernel(const float* __restrict__ logits, int T, int E, int k, bool renormalize,
                                    float* __restrict__ weights, int32_t* __restrict__ ids) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  topk_row(logits + (size_t)t * E, E, k, renormalize, weights + (size_t)t * k, ids + (size_t)t * k);
}


// One CTA per token: warp w computes the logits of experts w, w + warps, ... (fp32 dot products over
// H/2 pairs), then thread 0 picks the top k.
template <typename T2>
__global__ void moe_router_kernel(const T2* __restrict__ x, const T2* __restrict__ w, int H2, int E, int k,
                                  bool renormalize, float* __restrict__ logits, float* __restrict__ weights,
                                  int32_t* __restrict__ ids) {
  __shared__ float s_logits[kMaxExperts];
  const int t = blockIdx.x;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const T2* xr = x + (size_t)t * H2;
  for (int e = warp; e < E; e += warps) {
    const T2* wr = w + (size_t)e * H2;
    float acc = 0.f;
    for (int h = lane; h < H2; h += kWarpSize) {
      const float2 a = to_float2(xr[h]), b = to_float2(wr[h]);
      acc = fmaf(a.x, b.x, acc);
      acc = fmaf(a.y, b.y, acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) s_logits[e] = acc;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) logits[(size_t)t * E + e] = s_logits[e];
  if (threadIdx.x == 0) topk_row(s_logits, E, k, renormalize, weights + (size_t)t * k, ids + (size_t)t * k);
}

// One CTA. Warp w handles experts w, w + warps, ...: a ballot over 32 ids at a time counts (pass 1) and
// then places (pass 2) that expert's assignments in ascending flat order; thread 0 forms padded offsets.
__global__ void moe_align_kernel(const int32_t* __restrict__ ids, int n, int E, int block_m, int capacity,
                                 int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                                 int32_t* __restrict__ sorted_ids, int32_t* __restrict__ block_expert,
                                 int32_t* __restrict__ positions) {
  extern __shared__ int32_t s_mem[];  // counts [E], offsets [E + 1]
  int32_t* s_counts = s_mem;
  int32_t* s_offsets = s_mem + E;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;

  for (int i = threadIdx.x; i < n; i += blockDim.x) positions[i] = -1;  // ids outside [0, E) stay -1
  for (int i = threadIdx.x; i < capacity; i += blockDim.x) sorted_ids[i] = n;  // padding sentinel
  for (int i = threadIdx.x; i < capacity / block_m; i += blockDim.x) block_expert[i] = -1;

  for (int e = warp; e < E; e += warps) {
    int c = 0;
    for (int base = 0; base < n; base += kWarpSize) {
      const int i = base + lane;
      c += __popc(__ballot_sync(0xffffffffu, i < n && ids[i] == e));
    }
    if (lane == 0) s_counts[e] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int o = 0;
    for (int e = 0; e < E; ++e) {
      s_offsets[e] = o;
      o += (s_counts[e] + block_m - 1) / block_m * block_m;
    }
    s_offsets[E] = o;
  }
  __syncthreads();
  for (int e = threadIdx.x; e <= E; e += blockDim.x) {
    offsets[e] = s_offsets[e];
    if (e < E) counts[e] = s_counts[e];
  }
  const uint32_t lanes_below = (1u << lane) - 1u;
  for (int e = warp; e < E; e += warps) {
    int pos = s_offsets[e];
    for (int base = 0; base < n; base += kWarpSize) {
      const int i = base + lane;
      const bool hit = i < n && ids[i] == e;
      const uint32_t ballot = __ballot_sync(0xffffffffu, hit);
      if (hit) {
        const int p = pos + __popc(ballot & lanes_below);
        sorted_ids[p] = i;
        positions[i] = p;
      }
      pos += __popc(ballot);
    }
    for (int b = s_offsets[e] / block_m + lane; b < s_offsets[e + 1] / block_m; b += kWarpSize) block_expert[b] = e;
  }
}

}  // namespace

cudaError_t topk_softmax(const float* logits, int T, int E, int k, bool renormalize, float* weights, int32_t* ids,
                         cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const int threads = 128;
  topk_softmax_kernel<<<ceil_div(T, threads), threads, 0, stream>>>(logits, T, E, k, renormalize, weights, ids);
  return cudaGetLastError();
}

cudaError_t moe_router(const void* x, const void* w, bool bf16, int T, int H, int E, int k, bool renormalize,
                       float* logits, float* weights, int32_t* ids, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const int threads = 256;
  if (bf16) {
    moe_router_kernel<__nv_bfloat162><<<T, threads, 0, stream>>>(static_cast<const __nv_bfloat162*>(x),
                                                 static_cast<const __nv_bfloat162*>(w), H / 2, E, k, renormalize,
                                                 logits, weights, ids);
  } else {
    moe_router_kernel<__half2><<<T, threads, 0, stream>>>(static_cast<const __half2*>(x), static_cast<const __half2*>(w),
                                                 H / 2, E, k, renormalize, logits, weights, ids);
  }
  return cudaGetLastError();
}

int moe_align_capacity(int n, int E, int block_m) { return ceil_div(n + E * (block_m - 1), block_m) * block_m; }

cudaError_t moe_align(const int32_t* ids, int n, int E, int block_m, int32_t* counts, int32_t* offsets,
                      int32_t* sorted_ids, int32_t* block_expert, int32_t* positions, cudaStream_t stream) {
  const int capacity = moe_align_capacity(n, E, block_m);
  const size_t smem = sizeof(int32_t) * (2 * E + 1);
  moe_align_kernel<<<1, 1024, smem, stream>>>(ids, n, E, block_m, capacity, counts, offsets, sorted_ids,
                                              block_expert, positions);
  return cudaGetLastError();
}

}  // namespace mixq
