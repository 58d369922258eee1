// Torch-free launch API of the grouped EXL2 expert matmul (csrc/moe/moe_gemm.cu); torch-facing side in
// csrc/moe/moe_ops.cpp, Python side in mixq/kernels/moe.py.
//
// Row space. The kernels work on "blocks" of block_m rows; block z's rows are z * block_m + r. A row is one
// (token, slot) assignment, i.e. flat index i = t * top_k + j of topk_ids, or empty (-1). Two ways to form
// the blocks, both on the device (no host synchronisation):
// - decode (sorted_ids == nullptr): block z is the z-th smallest expert id present in topk_ids, its rows the
//   assignments to that expert in ascending flat order; needs every expert's count <= block_m (tokens <=
//   block_m, as top-k ids of one token are distinct); num_blocks = min(E, T * top_k), surplus blocks idle;
// - aligned: the output of moe_align with the same block_m (block_expert[z], sorted_ids[z * block_m + r]).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "exl2/format.h"

namespace mixq {

constexpr int kMoeMaxExperts = 64;  // the decode derivation keeps a 64-bit mask of the experts present
constexpr int kMoeMaxDecodeAssignments = 8 * kMoeMaxExperts;  // decode: tokens <= block_m <= 8, top_k <= E

// One projection of all E experts, stacked along a leading expert dimension (identical K schedule).
struct MoeExl2Proj {
  const uint32_t* qweight;    // [E, word_rows, N] planar tiles
  const uint32_t* qscale;     // [E, G, N / 8] 4-bit scale codes
  const __half* scale_max;    // [E, G]
  const int32_t* tile_group;  // [E, K / 32]
  const int32_t* perm;        // [E, K] input feature of each stored row, or nullptr (x already in stored order)
  int perm_stride;            // K, or 0: one permutation [1, K] shared by every expert (the act-order gather of x)
  exl2::Schedule sched;
  int K, N, G, word_rows;
};

struct MoeRouting {
  const int32_t* topk_ids;      // [T, top_k]
  const int32_t* sorted_ids;    // aligned: [num_blocks * block_m] flat index per row (>= T * top_k: empty)
  const int32_t* block_expert;  // aligned: [num_blocks], -1 = empty block
  const int32_t* positions;     // aligned: [T * top_k] row of each assignment (finalize)
  int num_tokens, top_k, num_experts, block_m, num_blocks;
};

// Stream-K plan of one launch (a persistent grid; moe_plan). Its work is `units` output tiles, unit
// u = (z * num_proj + p) * nx + x being N-block x (512 columns) of projection p for row block z, each of
// unit_tiles K tiles. The flattened (unit, tile) space is cut into `ctas` equal contiguous ranges, one per CTA, so
// every CTA streams the same number of weight tiles (no tail wave whatever units / resident slots is) and crosses
// unit boundaries where its range does: a unit is covered by pieces(u) consecutive CTAs (its pieces, in tile
// order). Every piece writes fp32 partials (plane p * max_pieces + piece); the last CTA of each output tile to
// arrive sums them in piece order (common/split_k.cuh), or finalize_kernel does for down in aligned mode, so
// the sums are deterministic. With ctas a multiple of units and unit_tiles divisible, this is plain split-K.
struct MoePlan {
  int nx, num_proj, units, unit_tiles, ctas, max_pieces;
  __host__ __device__ long long total() const { return (long long)units * unit_tiles; }
  __host__ __device__ long long start(int c) const { return (long long)c * total() / ctas; }  // CTA c's 1st tile
  // The CTA whose range holds flat tile i: the largest c with start(c) <= i.
  __host__ __device__ int owner(long long i) const { return (int)(((i + 1) * ctas - 1) / total()); }
  __host__ __device__ int unit(int x, int p, int z) const { return (z * num_proj + p) * nx + x; }
  __host__ __device__ int first_cta(int u) const { return owner((long long)u * unit_tiles); }
  __host__ __device__ int pieces(int u) const {
    return owner((long long)(u + 1) * unit_tiles - 1) - first_cta(u) + 1;
  }
};
// requested_ctas > 0 forces the grid (capped at one tile per CTA; tests: ranges that cross units anywhere);
// 0: one wave at the real occupancy, or one unit per CTA when the units fill >= 2 waves.
MoePlan moe_plan(int K, int N, int rows, int num_blocks, int block_m, int num_proj, int requested_ctas);

// Split-K arrival counters a launch needs (zeroed, left zeroed): moe_counters(I, num_blocks) for gate/up,
// moe_counters(H, 1) for down in decode (aligned mode: none).
int moe_counters(int N, int num_blocks);

// inter [num_blocks * block_m, I] fp16 = silu(x W1_e) * (x W3_e) per row (e = the row's expert), one launch;
// x fp16 or bf16 (`bf16`; staged as fp16, common/activation.cuh). partial: fp32 [2 * max_pieces, rows, I] scratch.
cudaError_t moe_gate_up(const void* x, bool bf16, const MoeRouting& r, const MoeExl2Proj& w1, const MoeExl2Proj& w3,
                        const MoePlan& plan, float* partial, int* counters, __half* inter, cudaStream_t stream);

// y [T, H] = sum_j topk_weights[t, j] * (inter[row(t, j)] W2_e) (+ residual), y and residual fp16 or bf16
// (`bf16`): one launch in decode, the GEMM then finalize_kernel in aligned mode. partial: fp32 [max_pieces, rows,
// H].
cudaError_t moe_down(const __half* inter, const float* topk_weights, const MoeRouting& r, const MoeExl2Proj& w2,
                     const MoePlan& plan, float* partial, int* counters, bool bf16, const void* residual, void* y,
                     cudaStream_t stream);

// y [T, H] fp16 = sum_j topk_weights[t, j] * rows[positions[t, j]] (+ residual), fixed order j = 0..k-1.
cudaError_t moe_finalize(const __half* rows, const float* topk_weights, const int32_t* positions, int T, int top_k,
                         int H, const __half* residual, __half* y, cudaStream_t stream);

}  // namespace mixq
