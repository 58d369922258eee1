// Torch-facing side of the per-layer kernels (RMSNorm, RoPE): schemas (a TORCH_LIBRARY_FRAGMENT next to
// bindings.cpp's block), argument checks, allocation and stream; then the torch-free launchers of
// layers/layer_kernels.h. Python wrappers, fake impls and the references: mixq/kernels/layers.py.
#include <climits>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "layers/layer_kernels.h"

namespace mixq::layers {
namespace {

void check_act(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "mixq: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, "mixq: ", name,
              " must be float16 or bfloat16, got ", t.scalar_type());
}

// Same device and dtype as `like` (named `like_name`).
void check_like(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), "mixq: ", name, " must be on ", like_name, "'s device ", like.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "mixq: ", name, " must be ", like.scalar_type(), " like ",
              like_name, ", got ", t.scalar_type());
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// out (and h = x + residual when residual is given), both new [N, H] tensors.
std::tuple<at::Tensor, at::Tensor> norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                        const at::Tensor& weight, double eps) {
  check_act(x, "x");
  TORCH_CHECK(x.dim() == 2, "mixq: x must be [N, H], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "mixq: x must be contiguous");
  const int64_t N = x.size(0), H = x.size(1);
  TORCH_CHECK(H >= 1 && H <= kRmsNormMaxHidden, "mixq: x's hidden size must be 1..", kRmsNormMaxHidden, ", got ", H);
  TORCH_CHECK(N <= INT_MAX, "mixq: x has too many rows (", N, ")");
  check_like(weight, "weight", x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && weight.is_contiguous(),
              "mixq: weight must be a contiguous [H=", H, "], got ", weight.sizes());
  if (residual.has_value()) {
    check_like(*residual, "residual", x, "x");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous(), "mixq: residual must be a contiguous ",
                x.sizes(), " like x, got ", residual->sizes());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor h = residual.has_value() ? at::empty(x.sizes(), x.options()) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    return rms_norm<T>(ptr<T>(x), residual.has_value() ? ptr<T>(*residual) : nullptr, ptr<T>(weight), ptr<T>(out),
                       residual.has_value() ? ptr<T>(h) : nullptr, (int)N, (int)H, (float)eps, stream);
  };
  C10_CUDA_CHECK(x.scalar_type() == at::kHalf ? run(__half()) : run(__nv_bfloat16()));
  return {out, h};
}

at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return std::get<0>(norm(x, std::nullopt, weight, eps));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_op(const at::Tensor& x, const at::Tensor& residual,
                                                   const at::Tensor& weight, double eps) {
  return norm(x, residual, weight, eps);
}

void check_heads(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, "mixq: ", name, " must be [N, heads, head_dim], got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1, "mixq: ", name, "'s head_dim must be contiguous (stride 1), got strides ",
              t.strides());
}

// cos/sin: [N, head_dim] contiguous, q's dtype and device.
void check_table(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_like(t, name, q, "q");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == q.size(0) && t.size(1) == q.size(2) && t.is_contiguous(), "mixq: ", name,
              " must be a contiguous [N=", q.size(0), ", head_dim=", q.size(2), "], got ", t.sizes());
}

void rope_qk_op(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  check_act(q, "q");
  check_heads(q, "q");
  check_like(k, "k", q, "q");
  check_heads(k, "k");
  const int64_t N = q.size(0), D = q.size(2);
  TORCH_CHECK(k.size(0) == N && k.size(2) == D, "mixq: k must be [N=", N, ", kv_heads, head_dim=", D, "] like q, got ",
              k.sizes());
  TORCH_CHECK(D > 0 && D % 2 == 0, "mixq: head_dim must be even, got ", D);
  TORCH_CHECK(N <= INT_MAX && (q.size(1) + k.size(1)) * (D / 2) <= 65535LL * 256,
              "mixq: q/k too large for rope_qk: ", q.sizes(), ", ", k.sizes());
  check_table(cos, "cos", q);
  check_table(sin, "sin", q);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    RopeParams<T> p{ptr<T>(q), ptr<T>(k), ptr<T>(cos), ptr<T>(sin), q.stride(0), q.stride(1), k.stride(0),
                    k.stride(1), (int)N, (int)q.size(1), (int)k.size(1), (int)D};
    return rope_qk<T>(p, stream);
  };
  C10_CUDA_CHECK(q.scalar_type() == at::kHalf ? run(__half()) : run(__nv_bfloat16()));
}

}  // namespace
}  // namespace mixq::layers

TORCH_LIBRARY_FRAGMENT(mixq, m) {
  // x, residual [N, H] fp16/bf16 contiguous, weight [H] of x's dtype. rms_norm: out = RMSNorm(x);
  // add_rms_norm: h = x + residual, out = RMSNorm(h), returns (out, h). Two ops rather than one with an optional
  // residual: without it there is no h to return other than x itself, which an op may not return (an alias).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // q [N, Hq, D], k [N, Hkv, D] (any row/head strides, head_dim contiguous), rotated in place; cos/sin [N, D].
  m.def("rope_qk(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
}

TORCH_LIBRARY_IMPL(mixq, CUDA, m) {
  m.impl("rms_norm", &mixq::layers::rms_norm_op);
  m.impl("add_rms_norm", &mixq::layers::add_rms_norm_op);
  m.impl("rope_qk", &mixq::layers::rope_qk_op);
}
