// The inner loop of the EXL2 CUDA-core matmul over planar tiles, as a header so that kernels other than
// exl2/gemm.cu (the MoE grouped kernel, csrc/moe/moe_gemm.cu) can reuse it. Same math as gemm.cu's loop:
// a thread owns 4 adjacent output columns, per weight (q - z) * scale exactly in fp32, one FMA per token.
#pragma once

#include "exl2/dequant.cuh"

namespace mixq::exl2 {

template <int B>
__device__ __forceinline__ void load_tile_words(uint4 (&dst)[B], const uint4* __restrict__ qweight, int word_row,
                                                int n4, int col4) {
#pragma unroll
  for (int j = 0; j < B; ++j) dst[j] = __ldcs(qweight + (size_t)(word_row + j) * n4 + col4);  // streamed once
}

// Tiles [lo, hi) of one width segment starting at packed word row `word_row`; xs points at tile lo's x rows
// (token t's row at xs + t * xs_stride). tile_group / qscale / scale_max are those of one matrix.
template <int B, int MT>
__device__ __forceinline__ void accumulate_tiles(float (&acc)[MT][kColsPerThread], const uint4* __restrict__ qweight,
                                                 const uint16_t* __restrict__ qscale,
                                                 const __half* __restrict__ scale_max,
                                                 const int32_t* __restrict__ tile_group, int n4, int col4,
                                                 int word_row, int lo, int hi, const float* xs, int xs_stride) {
  uint4 cur[B], nxt[B];
  load_tile_words<B>(cur, qweight, word_row, n4, col4);
#pragma unroll 1
  for (int kt = lo; kt < hi; ++kt) {
    if (kt + 1 < hi) load_tile_words<B>(nxt, qweight, word_row + B, n4, col4);  // next tile in flight
    const int g = tile_group[kt];
    const uint32_t codes = qscale[(size_t)g * n4 + col4];  // 4 nibbles: columns 4*col4 .. +3
    const __half smax = scale_max[g];
    float s[kColsPerThread];
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) s[c] = decode_scale((codes >> (4 * c)) & 15u, smax);
    const float* xt = xs + (kt - lo) * kTileRows;
#pragma unroll
    for (int i4 = 0; i4 < kTileRows / 4; ++i4) {
      float4 xv[MT];
#pragma unroll
      for (int t = 0; t < MT; ++t) xv[t] = *reinterpret_cast<const float4*>(xt + t * xs_stride + i4 * 4);
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        uint32_t w[B];
#pragma unroll
        for (int j = 0; j < B; ++j) w[j] = get_component(cur[j], c);
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) {
          const float wv = code_minus_zero<B>(extract_code<B>(w, i4 * 4 + ii)) * s[c];
#pragma unroll
          for (int t = 0; t < MT; ++t) acc[t][c] = fmaf(wv, get_component(xv[t], ii), acc[t][c]);
        }
      }
    }
    word_row += B;
#pragma unroll
    for (int j = 0; j < B; ++j) cur[j] = nxt[j];
  }
}

}  // namespace mixq::exl2
