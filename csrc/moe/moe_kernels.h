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

// Split-K plan of one projection: every split writes fp32 partials, summed in split order (deterministic) by
// the last CTA of each output tile (common/split_k.cuh), or by finalize_kernel for down in aligned mode.
struct MoePlan {
  int splits, tiles_per_split;
};
MoePlan moe_plan(int K, int N, int rows, int num_blocks, int block_m, int num_proj, int requested_splits);

// Split-K arrival counters a launch needs (zeroed, left zeroed): moe_counters(I, num_blocks) for gate/up,
// moe_counters(H, 1) for down in decode (aligned mode: none).
int moe_counters(int N, int num_blocks);

// inter [num_blocks * block_m, I] fp16 = silu(x W1_e) * (x W3_e) per row (e = the row's expert), one launch;
// x fp16 or bf16 (`bf16`; staged as fp16, common/activation.cuh). partial: fp32 [2 * splits, rows, I] scratch.
cudaError_t moe_gate_up(const void* x, bool bf16, const MoeRouting& r, const MoeExl2Proj& w1, const MoeExl2Proj& w3,
                        const MoePlan& plan, float* partial, int* counters, __half* inter, cudaStream_t stream);

// y [T, H] = sum_j topk_weights[t, j] * (inter[row(t, j)] W2_e) (+ residual), y and residual fp16 or bf16
// (`bf16`): one launch in decode, the GEMM then finalize_kernel in aligned mode. partial: fp32 [splits, rows, H].
cudaError_t moe_down(const __half* inter, const float* topk_weights, const MoeRouting& r, const MoeExl2Proj& w2,
                     const MoePlan& plan, float* partial, int* counters, bool bf16, const void* residual, void* y,
                     cudaStream_t stream);

// y [T, H] fp16 = sum_j topk_weights[t, j] * rows[positions[t, j]] (+ residual), fixed order j = 0..k-1.
cudaError_t moe_finalize(const __half* rows, const float* topk_weights, const int32_t* positions, int T, int top_k,
                         int H, const __half* residual, __half* y, cudaStream_t stream);

}  // namespace mixq
