// The inner loop of the EXL2 CUDA-core matmul over planar tiles, as a header so that kernels other than
// exl2/gemm.cu (the MoE grouped kernel, csrc/moe/moe_gemm.cu) can reuse it. A thread owns 4 adjacent output
// columns; per tile of 32 rows (one width, one scale group) and column:
//   - the codes become 16 half2 pairs of normalised weights (q - z) * 2^-(B-1), two weights per instruction
//     (exl2/dequant_half2.cuh), exact;
//   - one HFMA2 per pair and token accumulates pair * (x_a, x_b) into a half2 partial sum: 16 rows per half;
//   - at the end of the tile the partial is flushed: its two halves converted to fp32, added, and multiplied by
//     the group scale (times 2^(B-1)) into the fp32 accumulator (one FFMA), so the scale costs nothing per weight.
//     In fp32, not with one HADD: two halves near the limit below would sum past 65504 (inf; found by the bf16
//     test with |x| = 4000).
// Why flush every tile: the scale changes per tile anyway, and fp16 partial sums of 16 terms keep the rounding
// error near 1.3 * 2^-11 (6.4e-4) of the result's magnitude (rms; 16 roundings of sums that grow like sqrt(n);
// a bit-exact simulation of this loop in torch gives 6.4e-4 for any activation scale from 1e-4 to 100), inside the
// 1e-3 relative error the tests allow against the fp32 reference (the fp32 loop it replaced: ~1e-4). Halving the
// chains (8 rows) would give 5.2e-4 for another MT x 4 registers, not worth it. Range: a half of a partial sums
// 16 terms |w * x| with |w| <= 1, so it cannot overflow while |x| < 4094 (65504 / 16). Inputs clipped to 65504
// (bf16 outliers) overflow it; staging x * 2^-5 would remove the limit but push activations below ~2e-3 into fp16
// subnormals (simulated: 1.1e-3 at |x| ~ 1e-3, 1e-2 at 1e-4), so the limit is kept and documented instead.
// x is staged in shared memory as fp16 in each tile's pair order (tile_x_slot), so pair p's activations are one
// half2 and four pairs one 16-byte load per token.
#pragma once

#include "exl2/dequant_half2.cuh"

namespace mixq::exl2 {

template <int B>
__device__ __forceinline__ void load_tile_words(uint4 (&dst)[B], const uint4* __restrict__ qweight, int word_row,
                                                int n4, int col4) {
#pragma unroll
  for (int j = 0; j < B; ++j) dst[j] = __ldcs(qweight + (size_t)(word_row + j) * n4 + col4);  // streamed once
}

// Where row r (0..31) of a tile of width `bits` sits in the staged x (runtime width: the x staging loops).
__device__ __forceinline__ int staged_row(int bits, int r) { return tile_x_slot(pair_period_of(bits), r); }

// Tiles [lo, hi) of one width segment starting at packed word row `word_row`; xs points at tile lo's staged x
// (fp16, pair order; token t's at xs + t * xs_stride). tile_group / qscale / scale_max are those of one matrix.
template <int B, int MT, bool kAlwaysPrefetch = false>
__device__ __forceinline__ void accumulate_tiles(float (&acc)[MT][kColsPerThread], const uint4* __restrict__ qweight,
                                                 const uint16_t* __restrict__ qscale,
                                                 const __half* __restrict__ scale_max,
                                                 const int32_t* __restrict__ tile_group, int n4, int col4,
                                                 int word_row, int lo, int hi, const __half* xs, int xs_stride) {
  uint4 cur[B], nxt[B];
  load_tile_words<B>(cur, qweight, word_row, n4, col4);
#pragma unroll 1
  for (int kt = lo; kt < hi; ++kt) {
    // Next tile in flight. kAlwaysPrefetch: at the last tile load the current one again (an L2 hit) so the load
    // is unconditional; predicated, ptxas keeps the prefetched words in local memory in the MoE kernel (up to 176 B
    // of spills per tile at 1-8 rows), while in exl2_gemm the predicated form is the shorter loop.
    if (kAlwaysPrefetch || kt + 1 < hi)
      load_tile_words<B>(nxt, qweight, kt + 1 < hi ? word_row + B : word_row, n4, col4);
    const int g = tile_group[kt];
    float s[kColsPerThread];
    tile_scales<B>(qscale[(size_t)g * n4 + col4], scale_max[g], s);  // 4 nibbles: columns 4*col4 .. +3
    const __half* xt = xs + (kt - lo) * kTileRows;
    __half2 part[MT][kColsPerThread];
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) part[t][c] = __float2half2_rn(0.f);
    static_for<4>([&](auto gc) {
      constexpr int G = decltype(gc)::value;
      uint4 xv[MT];  // pairs 4G..4G+3 of each token
#pragma unroll
      for (int t = 0; t < MT; ++t) xv[t] = *reinterpret_cast<const uint4*>(xt + t * xs_stride + 8 * G);
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        uint32_t w[B];
#pragma unroll
        for (int j = 0; j < B; ++j) w[j] = get_component(cur[j], c);
        __half2 wq[4];
        dequant_group<B, G>(w, wq);
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
          for (int i = 0; i < 4; ++i) part[t][c] = __hfma2(wq[i], bits_as_half2(get_component(xv[t], i)), part[t][c]);
      }
    });
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c)
        acc[t][c] = fmaf(s[c], __low2float(part[t][c]) + __high2float(part[t][c]), acc[t][c]);  // halves in fp32
    word_row += B;
#pragma unroll
    for (int j = 0; j < B; ++j) cur[j] = nxt[j];
  }
}

}  // namespace mixq::exl2
