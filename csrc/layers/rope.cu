// Rotary position embedding on q and k in one launch, in place (reference: mixq.kernels.layers.apply_rope_ref, the
// HF rotate-half convention; the math and its rounding, bit-identical to the reference: common/rope.cuh). Used
// where attention does not rotate on its own: a decode step over the paged cache rotates q and k inside the cache
// write instead (attention/cache_write.cuh).
//
// Grid: x = token, y = chunks of the token's (q_heads + kv_heads) * D/2 pairs. A thread owns kVec consecutive
// pairs (i, i + D/2) of one head: it reads both elements of each pair before writing either, and no other thread
// touches them, so rotating in place is safe. q and k are usually views of projection outputs: any row and head
// stride, a head's D values contiguous.
#include <algorithm>

#include "common/cuda_utils.cuh"
#include "common/rope.cuh"
#include "layers/layer_kernels.h"
#include "layers/vec.cuh"

namespace mixq::layers {
namespace {

constexpr int kRopeThreads = 256;

template <typename T, int kVec>
__global__ void __launch_bounds__(kRopeThreads) rope_qk_kernel(const RopeParams<T> p) {
  using V = Vec<T, kVec>;
  const int n = blockIdx.x;
  const int half = p.head_dim / 2;
  const int chunks = half / kVec;  // per head
  const int item = blockIdx.y * blockDim.x + threadIdx.x;
  if (item >= (p.q_heads + p.kv_heads) * chunks) return;
  const int head = item / chunks;
  const int i = (item - head * chunks) * kVec;
  T* x = head < p.q_heads ? p.q + n * p.q_row_stride + head * p.q_head_stride
                          : p.k + n * p.k_row_stride + (head - p.q_heads) * p.k_head_stride;
  const int64_t t = static_cast<int64_t>(n) * p.head_dim;
  const V c1 = load_vec<T, kVec>(p.cos + t + i), c2 = load_vec<T, kVec>(p.cos + t + i + half);
  const V s1 = load_vec<T, kVec>(p.sin + t + i), s2 = load_vec<T, kVec>(p.sin + t + i + half);
  V x1 = load_vec<T, kVec>(x + i), x2 = load_vec<T, kVec>(x + i + half);
  rope_halves<T, kVec>(x1.v, x2.v, c1.v, c2.v, s1.v, s2.v);
  store_vec<T, kVec>(x + i, x1);
  store_vec<T, kVec>(x + i + half, x2);
}

template <typename T, int kVec>
cudaError_t launch(const RopeParams<T>& p, cudaStream_t stream) {
  const int items = (p.q_heads + p.kv_heads) * (p.head_dim / 2 / kVec);
  const int threads = std::min(kRopeThreads, ceil_div(items, kWarpSize) * kWarpSize);
  const dim3 grid(p.num_tokens, ceil_div(items, threads));
  if (grid.y > 65535) return cudaErrorInvalidValue;
  rope_qk_kernel<T, kVec><<<grid, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t rope_qk(const RopeParams<T>& p, cudaStream_t stream) {
  if (p.num_tokens <= 0 || p.q_heads + p.kv_heads <= 0) return cudaSuccess;
  if (p.head_dim <= 0 || p.head_dim % 2 != 0 || p.q_heads < 0 || p.kv_heads < 0) return cudaErrorInvalidValue;
  // 16-byte vectors: 8 pairs per thread when both halves of every head start on a 16-byte boundary.
  const bool vec = p.head_dim % 16 == 0 && aligned16(p.q) && aligned16(p.k) && aligned16(p.cos) &&
                   aligned16(p.sin) && p.q_row_stride % 8 == 0 && p.q_head_stride % 8 == 0 &&
                   p.k_row_stride % 8 == 0 && p.k_head_stride % 8 == 0;
  return vec ? launch<T, 8>(p, stream) : launch<T, 1>(p, stream);
}

template cudaError_t rope_qk<__half>(const RopeParams<__half>&, cudaStream_t);
template cudaError_t rope_qk<__nv_bfloat16>(const RopeParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace mixq::layers
