// Torch-facing side of every op: argument checks, allocation, device guard and stream; then the
// torch-free launchers of kernels.h.

#include "ops.h"

#include <algorithm>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels.h"

namespace mixq {

exl2::Schedule make_schedule(c10::IntArrayRef seg_bits, c10::IntArrayRef seg_rows, const char* name, int* word_rows) {
  TORCH_CHECK(seg_bits.size() == seg_rows.size() && !seg_bits.empty() &&
                  (int)seg_bits.size() <= exl2::kMaxSegments,
              "mixq: ", name, " seg_bits/seg_rows must have the same length, 1..", exl2::kMaxSegments);
  exl2::Schedule s{};
  s.num_segments = (int)seg_bits.size();
  int tile = 0, wrow = 0;
  for (int i = 0; i < s.num_segments; ++i) {
    const int b = (int)seg_bits[i], r = (int)seg_rows[i];
    TORCH_CHECK(b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8, "mixq: bit width ", b, " is not EXL2");
    TORCH_CHECK(r > 0 && r % exl2::kTileRows == 0, "mixq: segment rows must be positive multiples of 32");
    s.bits[i] = b;
    s.tile_begin[i] = tile;
    s.word_row_begin[i] = wrow;
    tile += r / exl2::kTileRows;
    wrow += r * b / 32;
  }
  s.tile_begin[s.num_segments] = tile;
  *word_rows = wrow;
  return s;
}

int* split_counters(const at::Tensor& like, int64_t n) {
  constexpr int kMaxDevices = 64;
  static at::Tensor buffers[kMaxDevices];
  static std::vector<at::Tensor> outgrown;  // kept alive: captured graphs may still point at them
  const int dev = like.device().index() < 0 ? 0 : like.device().index();
  TORCH_CHECK(dev < kMaxDevices, "mixq: device index ", dev, " out of range");
  at::Tensor& buf = buffers[dev];
  if (!buf.defined() || buf.numel() < n) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status));
    TORCH_CHECK(status == cudaStreamCaptureStatusNone, "mixq: the split-K counters must grow to ", n,
                " entries during CUDA-graph capture; run the same step once eagerly before capturing it");
    if (buf.defined()) outgrown.push_back(buf);
    buf = at::zeros({std::max<int64_t>(n, 1 << 14)}, like.options().dtype(at::kInt));
  }
  return buf.data_ptr<int32_t>();
}

namespace {

// `align`: bytes the kernels' vector loads need at the start of the tensor (a view may start anywhere).
void check_cuda(const at::Tensor& t, const char* name, at::ScalarType dtype, uintptr_t align = 1) {
  TORCH_CHECK(t.is_cuda(), "mixq: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "mixq: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "mixq: ", name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % align == 0, "mixq: ", name, " must be ", align,
              "-byte aligned (a fresh tensor is)");
}

Exl2Matrix make_matrix(const at::Tensor& qweight, const at::Tensor& qscale, const at::Tensor& scale_max,
                       const at::Tensor& tile_group, const std::optional<at::Tensor>& perm,
                       c10::IntArrayRef seg_bits, c10::IntArrayRef seg_rows) {
  check_cuda(qweight, "qweight", at::kInt, 16);  // read as uint4
  check_cuda(qscale, "qscale", at::kInt);
  check_cuda(scale_max, "scale_max", at::kHalf);
  check_cuda(tile_group, "tile_group", at::kInt);
  TORCH_CHECK(qweight.dim() == 2, "mixq: qweight must be 2-D [word rows, N]");
  Exl2Matrix m{};
  m.N = (int)qweight.size(1);
  TORCH_CHECK(m.N % 32 == 0 && m.N > 0, "mixq: EXL2 width N must be a positive multiple of 32, got ", m.N);
  int wrow = 0;
  m.sched = make_schedule(seg_bits, seg_rows, "EXL2 matrix", &wrow);
  const int tile = m.sched.tile_begin[m.sched.num_segments];
  m.K = tile * exl2::kTileRows;
  TORCH_CHECK(qweight.size(0) == wrow, "mixq: qweight has ", qweight.size(0), " word rows, segments need ", wrow);
  TORCH_CHECK(tile_group.dim() == 1 && tile_group.size(0) == tile, "mixq: tile_group must have K/32 entries");
  TORCH_CHECK(qscale.dim() == 2 && qscale.size(1) == m.N / 8 && scale_max.dim() == 1 &&
                  scale_max.size(0) == qscale.size(0),
              "mixq: qscale must be [G, N/8] and scale_max [G]");
  TORCH_CHECK(qscale.device() == qweight.device() && scale_max.device() == qweight.device() &&
                  tile_group.device() == qweight.device(),
              "mixq: all EXL2 tensors must be on one device");
  m.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  m.qscale = reinterpret_cast<const uint32_t*>(qscale.data_ptr<int32_t>());
  m.scale_max = reinterpret_cast<const __half*>(scale_max.data_ptr<at::Half>());
  m.tile_group = tile_group.data_ptr<int32_t>();
  m.perm = nullptr;
  if (perm.has_value()) {
    check_cuda(*perm, "perm", at::kInt);
    TORCH_CHECK(perm->dim() == 1 && perm->size(0) == m.K, "mixq: perm must have K entries");
    TORCH_CHECK(perm->device() == qweight.device(), "mixq: perm must be on the weights' device");
    m.perm = perm->data_ptr<int32_t>();
  }
  return m;
}

// exl2_gemm's split-K partial cap from its op argument (0: the default).
size_t partial_cap(int64_t max_partial_bytes) {
  TORCH_CHECK(max_partial_bytes >= 0, "mixq: max_partial_bytes must be >= 0 (0: the default ",
              kExl2MaxPartialBytes, "), got ", max_partial_bytes);
  return max_partial_bytes == 0 ? kExl2MaxPartialBytes : (size_t)max_partial_bytes;
}

}  // namespace

namespace {

const __half* bias_of(const std::optional<at::Tensor>& bias, const Exl2Matrix& m) {
  if (!bias.has_value()) return nullptr;
  check_cuda(*bias, "bias", at::kHalf);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == m.N, "mixq: bias must have N entries");
  return reinterpret_cast<const __half*>(bias->data_ptr<at::Half>());
}

// Packed weight words of a matrix, for a group's split of the GPU between its matrices.
int64_t weight_words(const Exl2Matrix& m) {
  int64_t rows = 0;
  for (int s = 0; s < m.sched.num_segments; ++s)
    rows += (int64_t)(m.sched.tile_begin[s + 1] - m.sched.tile_begin[s]) * m.sched.bits[s];
  return rows * m.N;
}

// y_j = x @ W_j (+ bias_j) for every matrix, one launch per pass of rows.
std::vector<at::Tensor> run_exl2_gemm(const at::Tensor& x, const std::vector<Exl2Matrix>& ms,
                                      const std::vector<const __half*>& biases, int64_t splits,
                                      int64_t max_partial_bytes) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "mixq: x must be float16 or "
              "bfloat16, got ", x.scalar_type());
  check_cuda(x, "x", x.scalar_type());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int K = ms[0].K;
  for (const Exl2Matrix& m : ms) TORCH_CHECK(m.K == K, "mixq: the matrices of one exl2_gemm group need one K");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "mixq: x must be [M, K=", K, "], got ", x.sizes());
  TORCH_CHECK(x.size(0) <= 8 * 65535, "mixq: exl2_gemm takes at most ", 8 * 65535, " rows per call (grid.z); "
              "use exl2_dequant + matmul for more");
  const int M = (int)x.size(0);
  const int n = (int)ms.size();
  std::vector<at::Tensor> ys;
  for (const Exl2Matrix& m : ms) ys.push_back(at::empty({M, m.N}, x.options()));
  if (M == 0) return ys;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Passes of at most `pass` rows keep every matrix's split-K partials within the cap whatever M is. The cap is
  // an op argument (0: the 64 MB default) rather than a constant so that a test can make a small matrix take
  // several passes, and a caller short of memory can lower it; the schema stays backward compatible.
  const size_t cap = partial_cap(max_partial_bytes);
  int pass = M;
  for (const Exl2Matrix& m : ms) pass = std::min(pass, exl2_gemm_pass_rows(m, M, (int)splits, cap));
  // A group shares the GPU: each matrix's automatic plan aims at its share of the CTAs, by weight bytes.
  int64_t total_words = 0;
  for (const Exl2Matrix& m : ms) total_words += weight_words(m);
  const char* x_ptr = static_cast<const char*>(x.data_ptr());
  const size_t es = x.element_size();
  for (int r0 = 0; r0 < M; r0 += pass) {
    const int rows = std::min(pass, M - r0);
    Exl2GemmJob jobs[kExl2MaxGroup] = {};
    std::vector<at::Tensor> partials;
    int counters_needed = 0;
    for (int j = 0; j < n; ++j) {
      const Exl2Matrix& m = ms[j];
      const int target = n == 1 ? 0 : std::max<int>(1, (int)(exl2_gemm_target_ctas(rows) * weight_words(m) / total_words));
      const Exl2GemmPlan plan = exl2_gemm_plan(m, rows, (int)splits, target);
      const size_t partial_bytes = plan.splits > 1 ? (size_t)plan.splits * rows * m.N * sizeof(float) : 0;
      // The promise the passes exist for (a pass of one 8-token chunk is the floor exl2_gemm_pass_rows allows).
      TORCH_CHECK(partial_bytes <= cap || rows <= 8, "mixq: exl2_gemm pass of ", rows, " rows needs ", partial_bytes,
                  " bytes of split-K partials, over the cap of ", cap, " (a bug in exl2_gemm_pass_rows)");
      jobs[j].w = m;
      jobs[j].plan = plan;
      jobs[j].bias = biases[j];
      jobs[j].y = static_cast<char*>(ys[j].data_ptr()) + (size_t)r0 * m.N * es;
      if (plan.splits > 1) {
        partials.push_back(at::empty({plan.splits, rows, m.N}, x.options().dtype(at::kFloat)));
        jobs[j].partial = partials.back().data_ptr<float>();
        counters_needed += exl2_gemm_counters(m, rows);
      }
    }
    // One counter buffer, carved per job in order (each job's column blocks x token chunks).
    int* counters = counters_needed > 0 ? split_counters(x, counters_needed) : nullptr;
    for (int j = 0; j < n; ++j)
      if (jobs[j].partial != nullptr) {
        jobs[j].counters = counters;
        counters += exl2_gemm_counters(ms[j], rows);
      }
    C10_CUDA_CHECK(mixq::exl2_gemm_group(x_ptr + (size_t)r0 * K * es, bf16, rows, jobs, n, stream));
  }
  return ys;
}

}  // namespace

at::Tensor exl2_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qscale,
                     const at::Tensor& scale_max, const at::Tensor& tile_group, const std::optional<at::Tensor>& perm,
                     const std::optional<at::Tensor>& bias, c10::IntArrayRef seg_bits, c10::IntArrayRef seg_rows,
                     int64_t splits, int64_t max_partial_bytes) {
  const c10::cuda::CUDAGuard guard(qweight.device());
  const Exl2Matrix m = make_matrix(qweight, qscale, scale_max, tile_group, perm, seg_bits, seg_rows);
  TORCH_CHECK(x.device() == qweight.device(), "mixq: x must be on the weights' device");
  return run_exl2_gemm(x, {m}, {bias_of(bias, m)}, splits, max_partial_bytes)[0];
}

std::vector<at::Tensor> exl2_gemm_group(const at::Tensor& x, at::TensorList qweight, at::TensorList qscale,
                                        at::TensorList scale_max, at::TensorList tile_group,
                                        const c10::List<std::optional<at::Tensor>>& perm,
                                        const c10::List<std::optional<at::Tensor>>& bias, c10::IntArrayRef seg_bits,
                                        c10::IntArrayRef seg_rows, c10::IntArrayRef num_segments, int64_t splits,
                                        int64_t max_partial_bytes) {
  const size_t n = qweight.size();
  TORCH_CHECK(n >= 1 && n <= (size_t)kExl2MaxGroup, "mixq: exl2_gemm_group takes 1..", kExl2MaxGroup,
              " matrices, got ", n);
  TORCH_CHECK(qscale.size() == n && scale_max.size() == n && tile_group.size() == n && perm.size() == n &&
                  bias.size() == n && num_segments.size() == n,
              "mixq: exl2_gemm_group needs one qweight, qscale, scale_max, tile_group, perm, bias and num_segments "
              "entry per matrix");
  const c10::cuda::CUDAGuard guard(qweight[0].device());
  std::vector<Exl2Matrix> ms;
  std::vector<const __half*> biases;
  size_t seg0 = 0;
  for (size_t j = 0; j < n; ++j) {
    const size_t ns = (size_t)num_segments[j];
    TORCH_CHECK(seg0 + ns <= seg_bits.size() && seg0 + ns <= seg_rows.size(),
                "mixq: num_segments sums past seg_bits/seg_rows");
    ms.push_back(make_matrix(qweight[j], qscale[j], scale_max[j], tile_group[j], perm.get(j),
                             seg_bits.slice(seg0, ns), seg_rows.slice(seg0, ns)));
    TORCH_CHECK(qweight[j].device() == x.device(), "mixq: x and every matrix must be on one device");
    biases.push_back(bias_of(bias.get(j), ms.back()));
    seg0 += ns;
  }
  TORCH_CHECK(seg0 == seg_bits.size() && seg0 == seg_rows.size(), "mixq: num_segments must sum to len(seg_bits)");
  return run_exl2_gemm(x, ms, biases, splits, max_partial_bytes);
}

int64_t exl2_gemm_pass_rows_op(int64_t N, c10::IntArrayRef seg_bits, c10::IntArrayRef seg_rows, int64_t num_tokens,
                               int64_t splits, int64_t max_partial_bytes) {
  TORCH_CHECK(N > 0 && N % 32 == 0, "mixq: EXL2 width N must be a positive multiple of 32, got ", N);
  TORCH_CHECK(num_tokens > 0 && num_tokens <= 8 * 65535, "mixq: num_tokens must be 1..", 8 * 65535);
  Exl2Matrix m{};  // the planners read only the shape and the schedule
  int wrow = 0;
  m.sched = make_schedule(seg_bits, seg_rows, "EXL2 matrix", &wrow);
  m.K = m.sched.tile_begin[m.sched.num_segments] * exl2::kTileRows;
  m.N = (int)N;
  return exl2_gemm_pass_rows(m, (int)num_tokens, (int)splits, partial_cap(max_partial_bytes));
}

at::Tensor exl2_dequant(const at::Tensor& qweight, const at::Tensor& qscale, const at::Tensor& scale_max,
                        const at::Tensor& tile_group, const std::optional<at::Tensor>& perm,
                        c10::IntArrayRef seg_bits, c10::IntArrayRef seg_rows) {
  const c10::cuda::CUDAGuard guard(qweight.device());
  const Exl2Matrix m = make_matrix(qweight, qscale, scale_max, tile_group, perm, seg_bits, seg_rows);
  at::Tensor out = at::empty({m.K, m.N}, qweight.options().dtype(at::kHalf));
  C10_CUDA_CHECK(mixq::exl2_dequant(m, reinterpret_cast<__half*>(out.data_ptr<at::Half>()),
                                    c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_softmax(const at::Tensor& logits, int64_t top_k, bool renormalize) {
  const c10::cuda::CUDAGuard guard(logits.device());
  check_cuda(logits, "logits", at::kFloat);
  TORCH_CHECK(logits.dim() == 2, "mixq: logits must be [T, E]");
  const int T = (int)logits.size(0), E = (int)logits.size(1);
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "mixq: 1..", kMaxExperts, " experts supported, got ", E);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "mixq: top_k must be in 1..E");
  at::Tensor weights = at::empty({T, top_k}, logits.options());
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  C10_CUDA_CHECK(mixq::topk_softmax(logits.data_ptr<float>(), T, E, (int)top_k, renormalize,
                                    weights.data_ptr<float>(), ids.data_ptr<int32_t>(),
                                    c10::cuda::getCurrentCUDAStream()));
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_router(const at::Tensor& x, const at::Tensor& weight,
                                                          int64_t top_k, bool renormalize) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "mixq: x must be fp16 or bf16");
  check_cuda(x, "x", x.scalar_type(), 4);  // read as half2 / bfloat162
  check_cuda(weight, "router weight", x.scalar_type(), 4);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) && x.size(1) % 2 == 0,
              "mixq: x [T, H] and weight [E, H] with even H expected");
  TORCH_CHECK(weight.device() == x.device(), "mixq: router weight must be on x's device");
  const int T = (int)x.size(0), H = (int)x.size(1), E = (int)weight.size(0);
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "mixq: 1..", kMaxExperts, " experts supported, got ", E);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "mixq: top_k must be in 1..E");
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor logits = at::empty({T, E}, f32);
  at::Tensor weights = at::empty({T, top_k}, f32);
  at::Tensor ids = at::empty({T, top_k}, x.options().dtype(at::kInt));
  C10_CUDA_CHECK(mixq::moe_router(x.data_ptr(), weight.data_ptr(), x.scalar_type() == at::kBFloat16, T, H, E,
                                  (int)top_k, renormalize, logits.data_ptr<float>(), weights.data_ptr<float>(),
                                  ids.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream()));
  return {logits, weights, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align(const at::Tensor& topk_ids,
                                                                                 int64_t num_experts,
                                                                                 int64_t block_m) {
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  check_cuda(topk_ids, "topk_ids", at::kInt);
  TORCH_CHECK(num_experts >= 1 && num_experts <= 4096, "mixq: num_experts must be in 1..4096");
  TORCH_CHECK(block_m >= 1 && block_m <= 1024, "mixq: block_m must be in 1..1024");
  const int n = (int)topk_ids.numel(), E = (int)num_experts, bm = (int)block_m;
  const int cap = moe_align_capacity(n, E, bm);
  const auto i32 = topk_ids.options();
  at::Tensor counts = at::empty({E}, i32);
  at::Tensor offsets = at::empty({E + 1}, i32);
  at::Tensor sorted_ids = at::empty({cap}, i32);
  at::Tensor block_expert = at::empty({cap / bm}, i32);
  at::Tensor positions = at::empty(topk_ids.sizes(), i32);
  C10_CUDA_CHECK(mixq::moe_align(topk_ids.data_ptr<int32_t>(), n, E, bm, counts.data_ptr<int32_t>(),
                                 offsets.data_ptr<int32_t>(), sorted_ids.data_ptr<int32_t>(),
                                 block_expert.data_ptr<int32_t>(), positions.data_ptr<int32_t>(),
                                 c10::cuda::getCurrentCUDAStream()));
  return {counts, offsets, sorted_ids, block_expert, positions};
}

}  // namespace mixq
