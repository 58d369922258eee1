// Torch-free launch API of every kernel: raw pointers, ints and a stream. The torch-facing checks and
// allocation live in ops.cpp; keeping torch out of the .cu files keeps nvcc's host pass short.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "exl2/format.h"

namespace mixq {

// ---- EXL2 (csrc/exl2/) ----
struct Exl2Matrix {
  const uint32_t* qweight;     // [word rows, N] planar tiles
  const uint32_t* qscale;      // [G, N/8] 4-bit scale codes
  const __half* scale_max;     // [G] fp16(max / 256)
  const int32_t* tile_group;   // [K / 32]
  const int32_t* perm;         // [K] input feature of each stored row, or nullptr (input already permuted)
  exl2::Schedule sched;
  int K, N;
};

// The split-K plan of the gemm kernel (which runs chunks of 8 tokens, grid.z).
struct Exl2GemmPlan {
  int tiles_per_split;
  int splits;                                   // grid.y: splits never cross a width segment
  int split_begin[exl2::kMaxSegments + 1];      // first split of each segment
};
// target_ctas: the CTAs the automatic plan aims at (0: one wave, exl2_gemm_target_ctas; a group gives each
// matrix its share by weight bytes).
Exl2GemmPlan exl2_gemm_plan(const Exl2Matrix& w, int num_tokens, int requested_splits, int target_ctas = 0);
int exl2_gemm_target_ctas(int num_tokens);  // resident CTA slots of the kernel (the same for any token count)

// Rows of x per exl2_gemm call so that its fp32 partials (splits * rows * N * 4 B) stay within the cap (64 MB,
// as moe_plan's): callers run more rows in passes of this many (whole 8-token chunks; at least 8 rows, so a
// caller that forces a huge `splits` gets one chunk per pass, not a refusal). The last, shorter pass fits too.
// Only w.K, w.N and w.sched are read.
constexpr size_t kExl2MaxPartialBytes = size_t(64) << 20;
int exl2_gemm_pass_rows(const Exl2Matrix& w, int num_tokens, int requested_splits,
                        size_t max_partial_bytes = kExl2MaxPartialBytes);

// One matrix of a (grouped) exl2_gemm launch: y[M, N] = x[M, K] @ W (+ bias), x and y fp16 or bf16 (fp16 bias;
// the inner loop multiplies in fp16, common/activation.cuh), fp32 accumulation. With plan.splits > 1:
// `partial` is fp32 [splits, M, N] scratch and `counters` exl2_gemm_counters(w, M) zeroed ints
// (common/split_k.cuh), left zeroed; both unused when splits == 1.
struct Exl2GemmJob {
  Exl2Matrix w;
  Exl2GemmPlan plan;
  const __half* bias;
  void* y;  // the activation type
  float* partial;
  int* counters;
};
constexpr int kExl2MaxGroup = 4;  // matrices per launch (q, k, v)
int exl2_gemm_counters(const Exl2Matrix& w, int num_tokens);

// Every job's y from the same x in one launch (jobs[j].w.K equal); num_jobs <= kExl2MaxGroup; x/y bf16 or fp16.
cudaError_t exl2_gemm_group(const void* x, bool bf16, int num_tokens, const Exl2GemmJob* jobs, int num_jobs,
                            cudaStream_t stream);

// W fp16 [K, N]: row perm[k] (or k when perm is null) = dequantized stored row k.
cudaError_t exl2_dequant(const Exl2Matrix& w, __half* out, cudaStream_t stream);

// ---- MoE routing (csrc/moe/routing.cu) ----
constexpr int kMaxExperts = 64;

// logits fp32 [T, E] -> weights fp32 [T, k], ids int32 [T, k].
cudaError_t topk_softmax(const float* logits, int T, int E, int k, bool renormalize, float* weights,
                         int32_t* ids, cudaStream_t stream);

// x [T, H] (fp16 or bf16 per `bf16`), router weight [E, H] same dtype -> logits fp32 [T, E] + top-k.
cudaError_t moe_router(const void* x, const void* w, bool bf16, int T, int H, int E, int k, bool renormalize,
                       float* logits, float* weights, int32_t* ids, cudaStream_t stream);

// Group n = T*k assignments by expert. capacity = moe_align_capacity(n, E, block_m).
int moe_align_capacity(int n, int E, int block_m);
cudaError_t moe_align(const int32_t* ids, int n, int E, int block_m, int32_t* counts, int32_t* offsets,
                      int32_t* sorted_ids, int32_t* block_expert, int32_t* positions, cudaStream_t stream);

}  // namespace mixq
