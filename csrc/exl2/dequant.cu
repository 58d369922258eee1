// EXL2 dequantization to an fp16 [K, N] matrix (the long-prompt path: dequantize, then a dense GEMM).
//
// Mapping: grid.y = 32-row tile, a thread owns 4 adjacent columns of that tile (same 16-byte word loads
// as the gemm kernel) and writes its 32 x 4 values; stored row k goes to row perm[k] (original feature
// order, what cuBLAS needs) or to row k when perm is null.
// Must match mixq.exl2.reference.dequantize bit for bit: fp16((q - z) * scale) with scale rounded to fp16
// as exllamav2 does; (q - z) * scale is exact in fp32, so one rounding gives the same half.

#include "exl2/dequant.cuh"
#include "kernels.h"

namespace mixq {
namespace {

using exl2::kColsPerThread;
using exl2::kTileRows;

constexpr int kThreads = 128;

template <int B>
__device__ __forceinline__ void dequant_tile(const Exl2Matrix& w, int kt, int word_row, int col4, __half* out) {
  const int n4 = w.N / kColsPerThread;
  const uint4* qweight = reinterpret_cast<const uint4*>(w.qweight);
  uint4 words[B];
#pragma unroll
  for (int j = 0; j < B; ++j) words[j] = __ldcs(qweight + (size_t)(word_row + j) * n4 + col4);
  const int g = w.tile_group[kt];
  const uint32_t codes = reinterpret_cast<const uint16_t*>(w.qscale)[(size_t)g * n4 + col4];
  const __half smax = w.scale_max[g];
  float s[kColsPerThread];
  uint32_t cw[kColsPerThread][B];
#pragma unroll
  for (int c = 0; c < kColsPerThread; ++c) {
    s[c] = exl2::decode_scale((codes >> (4 * c)) & 15u, smax);
#pragma unroll
    for (int j = 0; j < B; ++j) cw[c][j] = get_component(words[j], c);
  }
#pragma unroll
  for (int i = 0; i < kTileRows; ++i) {
    const int k = kt * kTileRows + i;
    const int dst_row = w.perm ? w.perm[k] : k;
    __half v[kColsPerThread];
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c)
      v[c] = __float2half_rn(exl2::code_minus_zero<B>(exl2::extract_code<B>(cw[c], i)) * s[c]);
    __half2* dst = reinterpret_cast<__half2*>(out + (size_t)dst_row * w.N + col4 * kColsPerThread);
    dst[0] = __halves2half2(v[0], v[1]);
    dst[1] = __halves2half2(v[2], v[3]);
  }
}

__global__ void __launch_bounds__(kThreads) exl2_dequant_kernel(const __grid_constant__ Exl2Matrix w, __half* __restrict__ out) {
  const int col4 = blockIdx.x * blockDim.x + threadIdx.x;
  if (col4 * kColsPerThread >= w.N) return;
  const int kt = blockIdx.y;
  const int seg = exl2::segment_of(w.sched, kt);
  const int bits = w.sched.bits[seg];
  const int word_row = w.sched.word_row_begin[seg] + (kt - w.sched.tile_begin[seg]) * bits;
  switch (bits) {
    case 8: dequant_tile<8>(w, kt, word_row, col4, out); break;
    case 6: dequant_tile<6>(w, kt, word_row, col4, out); break;
    case 5: dequant_tile<5>(w, kt, word_row, col4, out); break;
    case 4: dequant_tile<4>(w, kt, word_row, col4, out); break;
    case 3: dequant_tile<3>(w, kt, word_row, col4, out); break;
    case 2: dequant_tile<2>(w, kt, word_row, col4, out); break;
    default: break;  // rejected on the host
  }
}

}  // namespace

cudaError_t exl2_dequant(const Exl2Matrix& w, __half* out, cudaStream_t stream) {
  const int tiles = w.K / kTileRows;
  if (tiles == 0 || w.N == 0) return cudaSuccess;
  const dim3 grid(ceil_div(w.N, kThreads * kColsPerThread), tiles);
  exl2_dequant_kernel<<<grid, kThreads, 0, stream>>>(w, out);
  return cudaGetLastError();
}

}  // namespace mixq
