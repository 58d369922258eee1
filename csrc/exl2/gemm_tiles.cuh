// The inner loop of the EXL2 matmuls over planar tiles (exl2/gemm.cu and the MoE grouped kernel,
// csrc/moe/moe_gemm.cu), on tensor cores: mma.sync m16n8k16 (common/mma.cuh) with the weights as A (16 output
// columns x 16 rows of K), up to 8 tokens as B (fewer: zero rows) and fp32 accumulators. Per tile of 32 rows (one
// width, one scale group) a thread dequantizes 128 weights two per instruction into half2, exactly, as
// (q - z) * 2^-(B-1) (exl2/dequant_half2.cuh), and feeds them to 16 mma; each tile's products are flushed into the
// fp32 accumulators with the column's group scale (times 2^(B-1)), one FFMA per column and token. The weight words
// stream in through a cp.async ring two tiles ahead (exl2/weight_ring.cuh); x is staged in shared memory as fp16
// in each tile's pair order (tile_x_slot), so four pairs of one token are one 16-byte load.
// Accuracy and range: the products are exact in fp32 and summed there (no fp16 partial sums: the CUDA-core loop
// this replaced kept 16-row sums in half2, 6.4e-4 rms relative error and an |x| < 4094 limit); the only roundings
// are x to fp16 (saturating, common/activation.cuh) and the fp32 sums.
#pragma once

#include "common/mma.cuh"
#include "exl2/dequant_half2.cuh"
#include "exl2/weight_ring.cuh"

namespace mixq::exl2 {

// Where row r (0..31) of a tile of width `bits` sits in the staged x (runtime width: the x staging loops).
__device__ __forceinline__ int staged_row(int bits, int r) { return tile_x_slot(pair_period_of(bits), r); }

// Mapping. Thread i of the CTA copies column quad i's words (the ring's mapping, one 16-byte copy per word row,
// coalesced). Lane (g, t) of a warp (g = lane / 4, t = lane % 4) works on the column quads g + 8q (q = 0..3) of
// the warp's 32, and on pairs 4t..4t+3 of each column, which are dequant_group's group G = t: a thread
// dequantizes 4 columns x 4 quads x 4 pairs = 128 weights per tile (the CUDA-core loop's count), multiplied with
// 16 mma (4 mma_k32_x2) instead of 64 HFMA2 per token.
// Fragment mapping: in mma (q, i) (i = 0, 1) A's row g is column 2i of quad g + 8q, row g + 8 column 2i + 1; in
// k16 step kb its k-pair t is the tile's pair 4t + 2kb and k-pair t + 4 is pair 4t + 2kb + 1, which B takes from
// token g's staged x (one 16-byte load holds pairs 4t..4t+3): the order of K inside a tile is free as long as A
// and B agree. D rows g, g + 8 are then columns 2i, 2i + 1 of quad g + 8q, for tokens 2t and 2t + 1.
// The words of a quad were copied by the quad's owner lane (the ring's mapping); after a warp barrier each lane
// reads the ones holding its group from the stage and shifts them so that they sit where group 0's do, so every
// lane runs dequant_group<B, 0>: the same instructions in the whole warp (lane-byte widths 3, 5, 6: no shifts,
// each lane's PRMT selectors pick its group's bytes, LaneBytes<B>::dequant). Each tile's mma start from zero and
// are flushed in fp32 with the column's group scale (each lane forms its own quad's, shared through `s_scale`).
// The scale codes are plain loads one tile ahead (2 bytes per thread: below cp.async's 4-byte minimum), the group
// index two tiles ahead, so neither waits.

// This lane's words of one column quad for group G = t, moved to where dequant_group<B, 0> reads group 0's:
// w[c] is column c's; stage + slot is the quad's owner's word 0.
template <int B>
__device__ __forceinline__ void group_words(const uint4* stage, int slot, int t, uint32_t (&w)[kColsPerThread][B]) {
  constexpr int kLo = B;  // planar widths: whole codes
  const auto put = [&](int index, int row, int shift) {
    const uint4 v = stage[row * kRingThreads + slot];
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) w[c][index] = get_component(v, c) >> shift;
  };
#pragma unroll
  for (int c = 0; c < kColsPerThread; ++c)
#pragma unroll
    for (int j = 0; j < B; ++j) w[c][j] = 0u;
  if constexpr (lane_bytes(B)) {  // the group's own word and its shared one, read with t's PRMT selectors
    put(0, LaneBytes<B>::own_word(t), 0);
    put(1, LaneBytes<B>::shared_word(t), 0);
    return;
  } else if constexpr (kLo == 8) {  // 2 pairs per word: group t is words 2t, 2t + 1
    put(0, 2 * t, 0);
    put(1, 2 * t + 1, 0);
  } else if constexpr (kLo == 4) {  // 4 pairs per word: word t, fields where group 0's are
    put(0, t, 0);
  } else {  // 2-bit codes, 8 pairs per word: word t / 2, the odd group's fields 8 bits up
    put(0, t >> 1, 8 * (t & 1));
  }
}

__device__ __forceinline__ uint32_t half2_as_bits(__half2 h) {
  uint32_t u;
  memcpy(&u, &h, sizeof u);
  return u;
}

// Tiles [lo, hi) of one width segment, their words arriving through `ring` (started on tiles lo.. by the caller);
// xs points at tile lo's staged x, 8 token rows of xs_stride (padding rows zero). tile_group / qscale / scale_max
// are those of one matrix.
// acc[q][c][j]: column c of quad g + 8q of the warp, token 2t + j. Every thread of the warp must call it (warp
// barriers, mma); `active`: this thread's own quad (col4) lies inside the matrix (its ring holds only zeros
// otherwise and its scale codes are not read). s_scale: kRingThreads float4 of shared memory.
// MT: how many of the 8 token rows can be nonzero. At MT = 1 the products of the odd tokens (j = 1) are zeros in
// every lane, and their flush is left out: 16 of the tile's 32 FFMA, 0.125 instructions per weight (acc[..][1]
// keeps the caller's zeros).
template <int B, int MT = 8>
__device__ __forceinline__ void accumulate_tiles_mma(float (&acc)[4][kColsPerThread][2], WeightRing& ring,
                                                     const uint16_t* __restrict__ qscale,
                                                     const __half* __restrict__ scale_max,
                                                     const int32_t* __restrict__ tile_group, int n4, int col4,
                                                     bool active, int lo, int hi, const __half* xs, int xs_stride,
                                                     float4* s_scale) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
  const int warp0 = threadIdx.x - lane;
  // Indices below are unsigned 32-bit (G * N / 4 and K / 32 are far below 2^32): one IMAD.WIDE.U32 per address,
  // where a signed or 64-bit index cost a sign extension and a 64-bit multiply-add per load per tile.
  const auto at = [](uint32_t i) { return i; };
  int gi = tile_group[at(lo)];
  uint32_t code = active ? qscale[at(gi * n4 + col4)] : 0u;
  __half smax = scale_max[at(gi)];
  int g_next = tile_group[at(lo + 1 < hi ? lo + 1 : lo)];
  // This lane's x (token g, pairs 4t..4t+3) of the current tile, advanced by a tile per iteration: an address
  // recomputed from kt cost 3 instructions a tile (exl2_gemm), 7 where xs is static shared memory (moe_gemm).
  const __half* xp = xs + g * xs_stride + 8 * t;
  using Lane = LaneBytes<lane_bytes(B) ? B : 3>;  // (planar widths: unused)
  const typename Lane::Sel sel = Lane::selectors(t);  // lane-byte widths: this lane's group's PRMT selectors
#pragma unroll 1
  for (int kt = lo; kt < hi; ++kt) {
    warp_barrier();  // the warp is done with the stage and s_scale of the previous tile
    ring.issue<B>();
    const uint4* stage = ring.wait_oldest<B>();
    const uint32_t code_next = active ? qscale[at(g_next * n4 + col4)] : 0u;
    const __half smax_next = scale_max[at(g_next)];
    g_next = tile_group[at(kt + 2 < hi ? kt + 2 : hi - 1)];
    {
      float s[kColsPerThread];
      tile_scales<B>(code, smax, s);
      s_scale[threadIdx.x] = make_float4(s[0], s[1], s[2], s[3]);
    }
    warp_barrier();  // every lane's words have landed and its scales are written
    const uint4 xv = *reinterpret_cast<const uint4*>(xp);
    xp += kTileRows;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int slot = warp0 + g + 8 * q;
      uint32_t w[kColsPerThread][B];
      group_words<B>(stage, slot, t, w);
      const float4 sq = s_scale[slot];
      __half2 wq[kColsPerThread][4];
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        if constexpr (lane_bytes(B))
          Lane::dequant(w[c][0], w[c][1], sel, wq[c]);
        else
          dequant_group<B, 0>(w[c], wq[c]);
      }
      uint32_t a[2][2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int kb = 0; kb < 2; ++kb) {
          a[i][kb][0] = half2_as_bits(wq[2 * i][2 * kb]);
          a[i][kb][1] = half2_as_bits(wq[2 * i + 1][2 * kb]);
          a[i][kb][2] = half2_as_bits(wq[2 * i][2 * kb + 1]);
          a[i][kb][3] = half2_as_bits(wq[2 * i + 1][2 * kb + 1]);
        }
      const uint32_t b[2][2] = {{get_component(xv, 0), get_component(xv, 1)},
                                {get_component(xv, 2), get_component(xv, 3)}};
      float d[2][4];
      mma_k32_x2(d, a, b);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float s0 = i == 0 ? sq.x : sq.z, s1 = i == 0 ? sq.y : sq.w;
        acc[q][2 * i][0] = fmaf(s0, d[i][0], acc[q][2 * i][0]);
        acc[q][2 * i + 1][0] = fmaf(s1, d[i][2], acc[q][2 * i + 1][0]);
        if constexpr (MT > 1) {
          acc[q][2 * i][1] = fmaf(s0, d[i][1], acc[q][2 * i][1]);
          acc[q][2 * i + 1][1] = fmaf(s1, d[i][3], acc[q][2 * i + 1][1]);
        }
      }
    }
    code = code_next;
    smax = smax_next;
  }
  // The last kRingAhead issues were zero-filling copies: land them before a caller reuses the ring (the MoE kernel
  // restarts it per segment, mma_to_rows writes into it; copies to one address have no order unless waited for).
  cp_async_wait<0>();
}

// Dynamic shared memory a launch gives the ring for widths up to `max_bits`: at least mma_to_rows's buffer (16 KB),
// which aliases it.
__host__ __device__ constexpr size_t ring_smem_bytes(int max_bits) {
  return ring_bytes(max_bits) > 8 * kRingThreads * sizeof(float4) ? ring_bytes(max_bits)
                                                                   : 8 * kRingThreads * sizeof(float4);
}

// The MMA loop's accumulators to the CUDA-core loop's layout: out[tok][c] of this thread's own quad for the 8
// tokens, through `buf` (8 x kRingThreads float4 of shared memory). A warp writes and reads only the slots of its
// own 32 threads, so `buf` may alias the ring once the warp's copies have landed (accumulate_tiles_mma waits).
__device__ __forceinline__ void mma_to_rows(const float (&acc)[4][kColsPerThread][2], float4* buf,
                                            float (&out)[8][kColsPerThread]) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
  const int warp0 = threadIdx.x - lane;
  warp_barrier();  // the warp is done reading the ring
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      buf[(2 * t + j) * kRingThreads + warp0 + g + 8 * q] =
          make_float4(acc[q][0][j], acc[q][1][j], acc[q][2][j], acc[q][3][j]);
  warp_barrier();
#pragma unroll
  for (int tok = 0; tok < 8; ++tok) {
    const float4 v = buf[tok * kRingThreads + threadIdx.x];
    out[tok][0] = v.x, out[tok][1] = v.y, out[tok][2] = v.z, out[tok][3] = v.w;
  }
}

}  // namespace mixq::exl2
