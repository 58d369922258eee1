// The weight load pipeline of the EXL2 matmuls (exl2/gemm_tiles.cuh): a ring of kRingStages tiles of weight words
// per thread in shared memory, filled by cp.async kRingAhead tiles ahead of the tile being multiplied.
//
// Why shared memory and cp.async, not registers: a register double buffer (what this replaced) holds one tile
// ahead at B uint4 per thread, and ptxas scheduled its loads into the last few percent of the loop body in most
// widths (the review's finding 2): in effect no load in flight while the math ran. cp.async writes bypass the
// register file, cannot be sunk below the math (its asm statements clobber "memory"), and two tiles ahead cost
// shared memory instead of 2 x 8 x 4 registers. Bytes in flight per SM at 3-4 CTAs of 128 threads and 2 tiles
// ahead: 3-4 x 128 x 2 x B x 16 B = 48-64 KB at 4 bits, well above an H200's latency x bandwidth per SM
// (4.3 TB/s x 630 ns / 132 = 21 KB).
//
// Visibility and reuse: cp.async.wait_group makes a thread's own copies visible to it; the MMA loop reads the
// other lanes' slots of its warp, so it puts a warp barrier after the wait (every lane's copies landed) and one at
// the top of each iteration, before the issue that refills the stage the warp read in the previous iteration
// (tile i + 2 goes into tile i - 1's stage). Warps never read each other's slots: no CTA barrier.
// Layout: uint4 [stage][word j][thread], so a warp's 16-byte copies and reads of one word are 512 contiguous
// bytes (conflict-free, 4 wavefronts). One group per tile, committed even when empty (past the last tile), so
// the wait's count is the same every iteration.
// cp.async.cg caches in L2 only; the evict-first hint of the __ldcs it replaced is not carried over (weights are
// streamed once per step either way).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "common/cp_async.cuh"

namespace mixq::exl2 {

constexpr int kRingStages = 3;
constexpr int kRingAhead = kRingStages - 1;  // tiles in flight while one is multiplied
// Threads of a CTA of the kernels that use the ring (both GEMMs: 128), a constant so that every word's slot is an
// immediate offset (j * 2 KB) from the stage's address: no address arithmetic per copy or read.
constexpr int kRingThreads = 128;

// Shared memory of a ring for widths up to `max_bits`.
__host__ __device__ constexpr size_t ring_bytes(int max_bits) {
  return (size_t)kRingStages * max_bits * kRingThreads * sizeof(uint4);
}

// One thread's view of the ring for a run of `tiles` tiles of one width `bits`, the first at word row `word_row`
// (a tile: `bits` word rows of n4 uint4) of `qweight`, column quad `col4`. The width is a runtime value so that a
// run can be started before the caller dispatches on it (the MoE kernel starts its first run before staging x);
// the hot loop's issue<B>() and wait_oldest<B>() have it as a constant.
struct WeightRing {
  uint4* base;  // ring + threadIdx.x; stage s, word j at base[(s * bits + j) * kRingThreads]
  uint4* wr;    // the stage the next issue fills
  uint4* rd;    // the stage the next wait_oldest returns
  int bits;
  const uint4* src;  // the next tile's word 0 of this thread's columns
  size_t n4;         // uint4 per word row
  size_t step;       // uint4 per tile (bits * n4), kept rather than multiplied out in every issue
  int left;          // tiles not yet issued

  __device__ __forceinline__ WeightRing(uint4* ring, int bits_, const uint4* qweight, int word_row, int n4_,
                                        int col4, int tiles)
      : base(ring + threadIdx.x), wr(base), rd(base), bits(bits_), src(qweight + (size_t)word_row * n4_ + col4),
        n4(n4_), step((size_t)bits_ * n4_), left(tiles) {}

  // Queue the next tile into stage `wr` as one cp.async group; past the last tile, zero-filling copies that read
  // nothing (from the last tile's address, which stays valid). Predicated rather than branched: behind a branch,
  // ptxas hoisted part of the math above the copies (6- and 5-bit: issued 40% into the loop body, not at its top).
  // B = bits, or 0: read `bits` (the prologue's runtime width).
  template <int B = 0>
  __device__ __forceinline__ void issue() {
    const int nb = B > 0 ? B : bits;
    const bool live = left > 0;
#pragma unroll
    for (int j = 0; j < (B > 0 ? B : 8); ++j)
      if (B > 0 || j < nb) cp_async16(wr + j * kRingThreads, src + j * n4, live);
    src += left > 1 ? step : 0;
    --left;
    cp_async_commit();
  }

  // The first kRingAhead tiles, into stages 0 and 1: once per run, as early as possible. The loop's first issue
  // fills stage 2.
  __device__ __forceinline__ void start() {
    const int stage = bits * kRingThreads;
#pragma unroll
    for (int i = 0; i < kRingAhead; ++i) {
      wr = base + i * stage;
      issue();
    }
    wr = base + kRingAhead * stage;
  }

  // Wait for the oldest queued tile (this thread's copies of it have landed); called right after the issue of the
  // tile kRingAhead later (so kRingAhead groups may stay pending), which goes out first, ahead of the wait's stall.
  // Returns the stage's start (the slots of thread 0: thread i's word j at [j * kRingThreads + i]) and makes it the
  // next stage to fill (three stages: the other two hold the tiles in flight). Other threads' slots may be read
  // only after a barrier that every one of them reached after its own wait (the MMA loop: warp_barrier).
  template <int B>
  __device__ __forceinline__ const uint4* wait_oldest() {
    cp_async_wait<kRingAhead>();
    const uint4* s = rd - threadIdx.x;
    wr = rd;
    rd = rd + B * kRingThreads == base + kRingStages * B * kRingThreads ? base : rd + B * kRingThreads;
    return s;
  }
};

}  // namespace mixq::exl2
