// EXL2 dequantization to an fp16 [K, N] matrix (the long-prompt path: dequantize, then a dense GEMM).
//
// Mapping: grid.y = 32-row tile, a thread owns 4 adjacent columns of that tile (same 16-byte word loads
// as the gemm kernel) and writes its 32 x 4 values; stored row k goes to row perm[k] (original feature
// order, what cuBLAS needs) or to row k when perm is null.
// Must match mixq.exl2.reference.dequantize bit for bit: fp16((q - z) * scale) with scale rounded to fp16
// as exllamav2 does. The codes are read by the matmul's own decoder (exl2/dequant_half2.cuh dequant_group: every
// layout in one place), which gives (q - z) * 2^-(B-1) exactly, and tile_scales gives scale * 2^(B-1) exactly, so
// their fp32 product is (q - z) * scale exactly (< 2^19 significant bits) and one rounding gives the same half.

#include "exl2/schedule.cuh"
#include "exl2/dequant_half2.cuh"
#include "kernels.h"

namespace mixq {
namespace {

using exl2::kColsPerThread;
using exl2::kTileRows;

constexpr int kThreads = 128;

// Row (0..31) of a tile held by staged-x slot s: the inverse of tile_x_slot (pair p = slots 2p, 2p + 1).
__host__ __device__ constexpr int tile_slot_row(int period, int s) {
  const int m = s & (period - 1);
  return (s & ~(period - 1)) + m / 2 + (m & 1) * (period / 2);
}
static_assert(exl2::tile_x_slot(16, tile_slot_row(16, 5)) == 5 && exl2::tile_x_slot(4, tile_slot_row(4, 30)) == 30,
              "tile_slot_row inverts tile_x_slot");

template <int B>
__device__ __forceinline__ void dequant_tile(const Exl2Matrix& w, int kt, int word_row, int col4, __half* out) {
  const int n4 = w.N / kColsPerThread;
  const uint4* qweight = reinterpret_cast<const uint4*>(w.qweight);
  uint4 words[B];
#pragma unroll
  for (int j = 0; j < B; ++j) words[j] = __ldcs(qweight + (size_t)(word_row + j) * n4 + col4);
  const int g = w.tile_group[kt];
  float s[kColsPerThread];
  exl2::tile_scales<B>(reinterpret_cast<const uint16_t*>(w.qscale)[(size_t)g * n4 + col4], w.scale_max[g], s);
  __half v[kTileRows][kColsPerThread];
#pragma unroll
  for (int c = 0; c < kColsPerThread; ++c) {
    uint32_t cw[B];
#pragma unroll
    for (int j = 0; j < B; ++j) cw[j] = get_component(words[j], c);
    exl2::static_for<4>([&](auto gc) {
      constexpr int G = decltype(gc)::value;
      __half2 pairs[4];
      exl2::dequant_group<B, G>(cw, pairs);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int slot = 2 * (4 * G + i);
        const float2 f = __half22float2(pairs[i]);
        v[tile_slot_row(exl2::kPairPeriod<B>, slot)][c] = __float2half_rn(f.x * s[c]);
        v[tile_slot_row(exl2::kPairPeriod<B>, slot + 1)][c] = __float2half_rn(f.y * s[c]);
      }
    });
  }
#pragma unroll
  for (int i = 0; i < kTileRows; ++i) {
    const int k = kt * kTileRows + i;
    const int dst_row = w.perm ? w.perm[k] : k;
    __half2* dst = reinterpret_cast<__half2*>(out + (size_t)dst_row * w.N + col4 * kColsPerThread);
    dst[0] = __halves2half2(v[i][0], v[i][1]);
    dst[1] = __halves2half2(v[i][2], v[i][3]);
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
