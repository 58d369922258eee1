// Every torch op of mixq._C (schemas in bindings.cpp; Python wrappers and fake impls in mixq/kernels/ops.py).
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/ArrayRef.h>

#include "exl2/format.h"

namespace mixq {

// The K schedule of an EXL2 matrix from its width segments (widths and row counts checked); `name` prefixes
// the error messages, `word_rows` receives the number of packed int32 rows. Shared by every EXL2 launcher.
exl2::Schedule make_schedule(c10::IntArrayRef seg_bits, c10::IntArrayRef seg_rows, const char* name, int* word_rows);

// `n` split-K arrival counters on `like`'s device (common/split_k.cuh): a per-device buffer zeroed once, on first
// use, and left zeroed by every kernel that uses it, so no launch needs a memset. It grows only outside CUDA-graph
// capture (a graph keeps pointing at the buffer it captured, so an outgrown buffer is kept, not freed).
int* split_counters(const at::Tensor& like, int64_t n);

// y[M, N] fp16 = x[M, K] fp16 @ W (+ bias), W an EXL2 matrix prepared by mixq.exl2.layout.prepare_exl2.
// M runs in passes whose fp32 split-K partials stay within `max_partial_bytes` (0: kExl2MaxPartialBytes).
at::Tensor exl2_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qscale,
                     const at::Tensor& scale_max, const at::Tensor& tile_group, const std::optional<at::Tensor>& perm,
                     const std::optional<at::Tensor>& bias, c10::IntArrayRef seg_bits, c10::IntArrayRef seg_rows,
                     int64_t splits, int64_t max_partial_bytes);

// exl2_gemm of up to kExl2MaxGroup matrices that read the same x, in one launch per pass (q/k/v). The segments
// of all matrices are concatenated in seg_bits/seg_rows, num_segments[j] of them for matrix j.
std::vector<at::Tensor> exl2_gemm_group(const at::Tensor& x, at::TensorList qweight, at::TensorList qscale,
                                        at::TensorList scale_max, at::TensorList tile_group,
                                        const c10::List<std::optional<at::Tensor>>& perm,
                                        const c10::List<std::optional<at::Tensor>>& bias, c10::IntArrayRef seg_bits,
                                        c10::IntArrayRef seg_rows, c10::IntArrayRef num_segments, int64_t splits,
                                        int64_t max_partial_bytes);

// Rows per exl2_gemm pass for an N-wide matrix of these segments at M = num_tokens (the op's own arithmetic).
int64_t exl2_gemm_pass_rows_op(int64_t N, c10::IntArrayRef seg_bits, c10::IntArrayRef seg_rows, int64_t num_tokens,
                               int64_t splits, int64_t max_partial_bytes);

// W fp16 [K, N]; rows in original feature order when perm is given, else in stored order.
at::Tensor exl2_dequant(const at::Tensor& qweight, const at::Tensor& qscale, const at::Tensor& scale_max,
                        const at::Tensor& tile_group, const std::optional<at::Tensor>& perm,
                        c10::IntArrayRef seg_bits, c10::IntArrayRef seg_rows);

// logits fp32 [T, E] -> (weights fp32 [T, k], ids int32 [T, k]).
std::tuple<at::Tensor, at::Tensor> topk_softmax(const at::Tensor& logits, int64_t top_k, bool renormalize);

// x [T, H], weight [E, H] (fp16/bf16) -> (logits fp32 [T, E], weights fp32 [T, k], ids int32 [T, k]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_router(const at::Tensor& x, const at::Tensor& weight,
                                                          int64_t top_k, bool renormalize);

// ids int32 [T, k] -> (counts [E], offsets [E + 1], sorted_ids [cap], block_expert [cap / block_m],
// positions [T * k]), all int32; cap = ceil((T*k + E*(block_m-1)) / block_m) * block_m.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align(const at::Tensor& topk_ids,
                                                                                 int64_t num_experts,
                                                                                 int64_t block_m);

}  // namespace mixq
