// Torch-facing side of the grouped EXL2 expert matmul: schemas (a TORCH_LIBRARY_FRAGMENT next to bindings.cpp's
// block), argument checks, allocation and stream; then the torch-free launchers of moe/moe_kernels.h.
// Python wrappers, fake impls and the reference: mixq/kernels/moe.py.

#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include "moe/moe_kernels.h"
#include "ops.h"

namespace mixq {
namespace {

void check_cuda(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda() && t.device() == dev, "mixq: ", name, " must be a CUDA tensor on ", dev);
  TORCH_CHECK(t.scalar_type() == dtype, "mixq: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "mixq: ", name, " must be contiguous");
  // Rows are read with 8/16-byte vector loads.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "mixq: ", name, " must be 16-byte aligned");
}

// One projection of E stacked experts: qweight [E, W, N], qscale [E, G, N/8], scale_max [E, G],
// tile_group [E, K/32], perm [E, K] or none.
MoeExl2Proj make_proj(const char* name, const at::Tensor& qweight, const at::Tensor& qscale,
                      const at::Tensor& scale_max, const at::Tensor& tile_group, const std::optional<at::Tensor>& perm,
                      c10::IntArrayRef seg_bits, c10::IntArrayRef seg_rows) {
  const at::Device dev = qweight.device();
  check_cuda(qweight, "qweight", at::kInt, dev);
  check_cuda(qscale, "qscale", at::kInt, dev);
  check_cuda(scale_max, "scale_max", at::kHalf, dev);
  check_cuda(tile_group, "tile_group", at::kInt, dev);
  TORCH_CHECK(qweight.dim() == 3, "mixq: ", name, " qweight must be [E, word rows, N]");
  const int E = (int)qweight.size(0);
  TORCH_CHECK(E >= 1 && E <= kMoeMaxExperts, "mixq: 1..", kMoeMaxExperts, " experts supported, got ", E);
  MoeExl2Proj p{};
  p.N = (int)qweight.size(2);
  TORCH_CHECK(p.N % 32 == 0 && p.N > 0, "mixq: ", name, " N must be a positive multiple of 32, got ", p.N);
  int wrow = 0;
  p.sched = make_schedule(seg_bits, seg_rows, name, &wrow);
  const int tile = p.sched.tile_begin[p.sched.num_segments];
  p.K = tile * exl2::kTileRows;
  p.word_rows = wrow;
  TORCH_CHECK(qweight.size(1) == wrow, "mixq: ", name, " qweight has ", qweight.size(1), " word rows, need ", wrow);
  TORCH_CHECK(tile_group.dim() == 2 && tile_group.size(0) == E && tile_group.size(1) == tile,
              "mixq: ", name, " tile_group must be [E, K/32]");
  TORCH_CHECK(qscale.dim() == 3 && qscale.size(0) == E && qscale.size(2) == p.N / 8 && scale_max.dim() == 2 &&
                  scale_max.size(0) == E && scale_max.size(1) == qscale.size(1),
              "mixq: ", name, " qscale must be [E, G, N/8] and scale_max [E, G]");
  p.G = (int)qscale.size(1);
  p.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  p.qscale = reinterpret_cast<const uint32_t*>(qscale.data_ptr<int32_t>());
  p.scale_max = reinterpret_cast<const __half*>(scale_max.data_ptr<at::Half>());
  p.tile_group = tile_group.data_ptr<int32_t>();
  p.perm = nullptr;
  if (perm.has_value()) {
    check_cuda(*perm, "perm", at::kInt, dev);
    TORCH_CHECK(perm->dim() == 2 && (perm->size(0) == E || perm->size(0) == 1) && perm->size(1) == p.K, "mixq: ",
                name, " perm must be [E, K], or [1, K] shared by every expert");
    p.perm = perm->data_ptr<int32_t>();
    p.perm_stride = perm->size(0) == 1 ? 0 : p.K;
  }
  return p;
}

// Routing of one call: decode (no sorted_ids) or aligned (moe_align's sorted_ids / block_expert / positions).
MoeRouting make_routing(const at::Tensor& topk_ids, const std::optional<at::Tensor>& sorted_ids,
                        const std::optional<at::Tensor>& block_expert, const std::optional<at::Tensor>& positions,
                        int64_t block_m, int E, bool need_positions) {
  const at::Device dev = topk_ids.device();
  check_cuda(topk_ids, "topk_ids", at::kInt, dev);
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(1) >= 1 && topk_ids.size(1) <= E,
              "mixq: topk_ids must be [T, k] with 1 <= k <= E");
  TORCH_CHECK(block_m == 1 || block_m == 2 || block_m == 4 || block_m == 8, "mixq: block_m must be 1, 2, 4 or 8");
  MoeRouting r{};
  r.topk_ids = topk_ids.data_ptr<int32_t>();
  r.num_tokens = (int)topk_ids.size(0);
  r.top_k = (int)topk_ids.size(1);
  r.num_experts = E;
  r.block_m = (int)block_m;
  TORCH_CHECK(sorted_ids.has_value() == block_expert.has_value(),
              "mixq: sorted_ids and block_expert come together (moe_align)");
  if (sorted_ids.has_value()) {
    check_cuda(*sorted_ids, "sorted_ids", at::kInt, dev);
    check_cuda(*block_expert, "block_expert", at::kInt, dev);
    TORCH_CHECK(sorted_ids->numel() == block_expert->numel() * block_m,
                "mixq: sorted_ids must have block_m rows per block_expert entry (moe_align with the same block_m)");
    r.sorted_ids = sorted_ids->data_ptr<int32_t>();
    r.block_expert = block_expert->data_ptr<int32_t>();
    r.num_blocks = (int)block_expert->numel();
    TORCH_CHECK(r.num_blocks <= 65535, "mixq: ", r.num_blocks, " row blocks exceed the grid (65535); "
                "use the dense path for this many tokens");
    if (need_positions) {
      TORCH_CHECK(positions.has_value(), "mixq: positions (moe_align) are needed with sorted_ids");
      check_cuda(*positions, "positions", at::kInt, dev);
      TORCH_CHECK(positions->numel() == topk_ids.numel(), "mixq: positions must have T * k entries");
      r.positions = positions->data_ptr<int32_t>();
    }
  } else {
    TORCH_CHECK(r.num_tokens <= block_m,
                "mixq: without moe_align (decode), tokens (", r.num_tokens, ") must be <= block_m (", block_m, ")");
    const int n = r.num_tokens * r.top_k;
    r.num_blocks = n < E ? n : E;
  }
  return r;
}

const __half* half_ptr(const at::Tensor& t) { return reinterpret_cast<const __half*>(t.data_ptr<at::Half>()); }

at::Tensor moe_gate_up_op(const at::Tensor& x, const at::Tensor& topk_ids, const std::optional<at::Tensor>& sorted_ids,
                       const std::optional<at::Tensor>& block_expert, int64_t block_m, const at::Tensor& w1_qweight,
                       const at::Tensor& w1_qscale, const at::Tensor& w1_scale_max, const at::Tensor& w1_tile_group,
                       const std::optional<at::Tensor>& w1_perm, c10::IntArrayRef w1_seg_bits,
                       c10::IntArrayRef w1_seg_rows, const at::Tensor& w3_qweight, const at::Tensor& w3_qscale,
                       const at::Tensor& w3_scale_max, const at::Tensor& w3_tile_group,
                       const std::optional<at::Tensor>& w3_perm, c10::IntArrayRef w3_seg_bits,
                       c10::IntArrayRef w3_seg_rows, int64_t ctas) {
  const c10::cuda::CUDAGuard guard(w1_qweight.device());
  const MoeExl2Proj w1 = make_proj("w1", w1_qweight, w1_qscale, w1_scale_max, w1_tile_group, w1_perm, w1_seg_bits,
                                   w1_seg_rows);
  const MoeExl2Proj w3 = make_proj("w3", w3_qweight, w3_qscale, w3_scale_max, w3_tile_group, w3_perm, w3_seg_bits,
                                   w3_seg_rows);
  TORCH_CHECK(w1.K == w3.K && w1.N == w3.N && w1_qweight.size(0) == w3_qweight.size(0),
              "mixq: w1 and w3 must have the same shape and expert count");
  TORCH_CHECK(w3_qweight.device() == w1_qweight.device(), "mixq: w1 and w3 must be on one device");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "mixq: x must be float16 or "
              "bfloat16, got ", x.scalar_type());
  check_cuda(x, "x", x.scalar_type(), w1_qweight.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w1.K, "mixq: x must be [T, K=", w1.K, "], got ", x.sizes());
  const MoeRouting r = make_routing(topk_ids, sorted_ids, block_expert, std::nullopt, block_m,
                                    (int)w1_qweight.size(0), false);
  TORCH_CHECK(topk_ids.size(0) == x.size(0), "mixq: topk_ids must have one row per token of x");
  const int rows = r.num_blocks * r.block_m;
  at::Tensor inter = at::empty({rows, w1.N}, x.options().dtype(at::kHalf));
  if (rows == 0) return inter;
  const MoePlan plan = moe_plan(w1.K, w1.N, rows, r.num_blocks, r.block_m, 2, (int)ctas);
  at::Tensor partial = at::empty({2 * plan.max_pieces, rows, w1.N}, x.options().dtype(at::kFloat));
  int* counters = split_counters(x, moe_counters(w1.N, r.num_blocks));
  C10_CUDA_CHECK(mixq::moe_gate_up(x.data_ptr(), x.scalar_type() == at::kBFloat16, r, w1, w3, plan,
                                   partial.data_ptr<float>(), counters,
                                   reinterpret_cast<__half*>(inter.data_ptr<at::Half>()),
                                   c10::cuda::getCurrentCUDAStream()));
  return inter;
}

at::Tensor moe_down_op(const at::Tensor& inter, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                    const std::optional<at::Tensor>& sorted_ids, const std::optional<at::Tensor>& block_expert,
                    const std::optional<at::Tensor>& positions, int64_t block_m, const at::Tensor& w2_qweight,
                    const at::Tensor& w2_qscale, const at::Tensor& w2_scale_max, const at::Tensor& w2_tile_group,
                    c10::IntArrayRef w2_seg_bits, c10::IntArrayRef w2_seg_rows,
                    const std::optional<at::Tensor>& residual, int64_t ctas,
                    std::optional<at::ScalarType> out_dtype) {
  const c10::cuda::CUDAGuard guard(w2_qweight.device());
  const MoeExl2Proj w2 = make_proj("w2", w2_qweight, w2_qscale, w2_scale_max, w2_tile_group, std::nullopt,
                                   w2_seg_bits, w2_seg_rows);
  const at::Device dev = w2_qweight.device();
  const MoeRouting r = make_routing(topk_ids, sorted_ids, block_expert, positions, block_m,
                                    (int)w2_qweight.size(0), true);
  check_cuda(inter, "inter", at::kHalf, dev);
  check_cuda(topk_weights, "topk_weights", at::kFloat, dev);
  const int rows = r.num_blocks * r.block_m;
  TORCH_CHECK(inter.dim() == 2 && inter.size(0) == rows && inter.size(1) == w2.K,
              "mixq: inter must be [", rows, ", ", w2.K, "] (moe_gate_up's output), got ", inter.sizes());
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes(), "mixq: topk_weights must be shaped like topk_ids");
  const int T = r.num_tokens;
  // The output (and residual) type: out_dtype, else the residual's, else fp16.
  const at::ScalarType act = out_dtype.value_or(residual.has_value() ? residual->scalar_type() : at::kHalf);
  TORCH_CHECK(act == at::kHalf || act == at::kBFloat16, "mixq: moe_down out_dtype must be float16 or bfloat16");
  const void* res = nullptr;
  if (residual.has_value()) {
    check_cuda(*residual, "residual", act, dev);
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == T && residual->size(1) == w2.N,
                "mixq: residual must be [T, H]");
    res = residual->data_ptr();
  }
  at::Tensor y = at::empty({T, w2.N}, inter.options().dtype(act));
  if (T == 0) return y;
  const MoePlan plan = moe_plan(w2.K, w2.N, rows, r.num_blocks, r.block_m, 1, (int)ctas);
  at::Tensor partial = at::empty({plan.max_pieces, rows, w2.N}, inter.options().dtype(at::kFloat));
  int* counters = r.sorted_ids == nullptr ? split_counters(inter, moe_counters(w2.N, 1)) : nullptr;
  C10_CUDA_CHECK(mixq::moe_down(half_ptr(inter), topk_weights.data_ptr<float>(), r, w2, plan,
                                partial.data_ptr<float>(), counters, act == at::kBFloat16, res, y.data_ptr(),
                                c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor moe_finalize_op(const at::Tensor& rows, const at::Tensor& topk_weights, const at::Tensor& positions,
                        const std::optional<at::Tensor>& residual) {
  const c10::cuda::CUDAGuard guard(rows.device());
  const at::Device dev = rows.device();
  check_cuda(rows, "rows", at::kHalf, dev);
  check_cuda(topk_weights, "topk_weights", at::kFloat, dev);
  check_cuda(positions, "positions", at::kInt, dev);
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) % 4 == 0, "mixq: rows must be [R, H] with H % 4 == 0");
  TORCH_CHECK(topk_weights.dim() == 2 && positions.sizes() == topk_weights.sizes() &&
                  topk_weights.size(1) <= kMoeMaxExperts,
              "mixq: topk_weights and positions must both be [T, k], k <= ", kMoeMaxExperts);
  const int T = (int)topk_weights.size(0), k = (int)topk_weights.size(1), H = (int)rows.size(1);
  const __half* res = nullptr;
  if (residual.has_value()) {
    check_cuda(*residual, "residual", at::kHalf, dev);
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == T && residual->size(1) == H,
                "mixq: residual must be [T, H]");
    res = half_ptr(*residual);
  }
  at::Tensor y = at::empty({T, H}, rows.options());
  C10_CUDA_CHECK(mixq::moe_finalize(half_ptr(rows), topk_weights.data_ptr<float>(), positions.data_ptr<int32_t>(), T,
                                    k, H, res, reinterpret_cast<__half*>(y.data_ptr<at::Half>()),
                                    c10::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace
}  // namespace mixq

TORCH_LIBRARY_FRAGMENT(mixq, m) {
  // Grouped EXL2 expert matmul (csrc/moe/moe_kernels.h): decode mode without sorted_ids/block_expert
  // (tokens <= block_m), aligned mode with moe_align's outputs for the same block_m. Experts stacked [E, ...].
  m.def(
      "moe_gate_up(Tensor x, Tensor topk_ids, Tensor? sorted_ids, Tensor? block_expert, int block_m, "
      "Tensor w1_qweight, Tensor w1_qscale, Tensor w1_scale_max, Tensor w1_tile_group, Tensor? w1_perm, "
      "int[] w1_seg_bits, int[] w1_seg_rows, Tensor w3_qweight, Tensor w3_qscale, Tensor w3_scale_max, "
      "Tensor w3_tile_group, Tensor? w3_perm, int[] w3_seg_bits, int[] w3_seg_rows, int ctas=0) -> Tensor");
  m.def(
      "moe_down(Tensor inter, Tensor topk_weights, Tensor topk_ids, Tensor? sorted_ids, Tensor? block_expert, "
      "Tensor? positions, int block_m, Tensor w2_qweight, Tensor w2_qscale, Tensor w2_scale_max, "
      "Tensor w2_tile_group, int[] w2_seg_bits, int[] w2_seg_rows, Tensor? residual=None, int ctas=0, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def("moe_finalize(Tensor rows, Tensor topk_weights, Tensor positions, Tensor? residual=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixq, CUDA, m) {
  m.impl("moe_gate_up", &mixq::moe_gate_up_op);
  m.impl("moe_down", &mixq::moe_down_op);
  m.impl("moe_finalize", &mixq::moe_finalize_op);
}
