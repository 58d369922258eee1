// Host launcher of the paged cache write (reshape_and_cache with quantize-on-write). Kernel: cache_write.cuh.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <initializer_list>

#include "attention/attention_ops.h"
#include "attention/cache_write.cuh"

namespace mixq::attn {
namespace {

template <typename scalar_t, CacheMode kMode>
cudaError_t dispatch_index(const CacheWriteParams& p, bool int64_slots, cudaStream_t stream) {
  return int64_slots ? launch_paged_cache_write<scalar_t, kMode, int64_t>(p, stream)
                     : launch_paged_cache_write<scalar_t, kMode, int32_t>(p, stream);
}

template <typename scalar_t>
cudaError_t dispatch_mode(CacheMode mode, const CacheWriteParams& p, bool int64_slots, cudaStream_t stream) {
  switch (mode) {
    case CacheMode::kNative:
      return dispatch_index<scalar_t, CacheMode::kNative>(p, int64_slots, stream);
    case CacheMode::kFp8:
      return dispatch_index<scalar_t, CacheMode::kFp8>(p, int64_slots, stream);
    case CacheMode::kQ8:
      return dispatch_index<scalar_t, CacheMode::kQ8>(p, int64_slots, stream);
    default:
      return dispatch_index<scalar_t, CacheMode::kQ4>(p, int64_slots, stream);
  }
}

bool aligned_rows(const at::Tensor& x) {
  return x.stride(2) == 1 && x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 &&
         reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
}

void check_input(const at::Tensor& x, const at::Tensor& like, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.sizes() == like.sizes() && x.scalar_type() == like.scalar_type() &&
                  aligned_rows(x),
              name, " must be a 16-byte aligned CUDA tensor [N, kv_heads, head_dim] like k, got ", x.sizes());
}

// RoPE inputs: q [N, Hq, D] rotated in place, cos/sin [N, D] contiguous, all in k's dtype on k's device.
void check_rope(const at::Tensor& k, const std::optional<at::Tensor>& q, const std::optional<at::Tensor>& cos,
                const std::optional<at::Tensor>& sin) {
  TORCH_CHECK(cos.has_value() == sin.has_value(), "paged_cache_write: pass both cos and sin, or neither");
  TORCH_CHECK(!q.has_value() || cos.has_value(), "paged_cache_write: q is rotated by RoPE, so it needs cos and sin");
  if (!cos.has_value()) return;
  const int64_t n = k.size(0), d = k.size(2);
  for (const at::Tensor* t : {&*cos, &*sin})
    TORCH_CHECK(t->device() == k.device() && t->scalar_type() == k.scalar_type() && t->dim() == 2 &&
                    t->size(0) == n && t->size(1) == d && t->is_contiguous() &&
                    reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                "paged_cache_write: cos/sin must be contiguous 16-byte aligned ", k.scalar_type(), " [N=", n,
                ", head_dim=", d, "] on ", k.device(), ", got ", t->sizes(), " ", t->scalar_type());
  if (q.has_value())
    TORCH_CHECK(q->device() == k.device() && q->scalar_type() == k.scalar_type() && q->dim() == 3 &&
                    q->size(0) == n && q->size(2) == d && aligned_rows(*q),
                "paged_cache_write: q must be a 16-byte aligned ", k.scalar_type(), " tensor [N=", n,
                ", heads, head_dim=", d, "] on ", k.device(), " with a contiguous last dim, got ", q->sizes());
}

void check_cache(const at::Tensor& c, int64_t kv_heads, int64_t row, at::ScalarType dt, const char* name) {
  TORCH_CHECK(c.is_cuda() && c.dim() == 3 && c.size(1) == kv_heads && c.size(2) == row && c.scalar_type() == dt &&
                  c.stride(2) == 1,
              name, " must be a CUDA ", dt, " tensor [slots, ", kv_heads, ", ", row,
              "] with a contiguous last dim, got ",
              c.sizes(), " ", c.scalar_type());
  const int64_t es = c.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 && (c.stride(0) * es) % 16 == 0 &&
                  (c.stride(1) * es) % 16 == 0,
              name, " rows must be 16-byte aligned");
}

}  // namespace

void paged_cache_write_cuda(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slot_mapping, const std::optional<at::Tensor>& k_scales,
                            const std::optional<at::Tensor>& v_scales, double k_scale, double v_scale,
                            const std::optional<at::Tensor>& q, const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin) {
  const auto act = k.scalar_type();
  TORCH_CHECK(act == at::kHalf || act == at::kBFloat16, "k must be float16 or bfloat16, got ", act);
  check_input(k, k, "k");
  check_input(v, k, "v");
  const int64_t n = k.size(0), kv_heads = k.size(1), head_dim = k.size(2);
  TORCH_CHECK(head_dim % kQuantGroup == 0 && head_dim > 0, "head_dim must be a multiple of 32, got ", head_dim);
  TORCH_CHECK(slot_mapping.is_cuda() && slot_mapping.dim() == 1 && slot_mapping.size(0) == n &&
                  slot_mapping.is_contiguous() &&
                  (slot_mapping.scalar_type() == at::kInt || slot_mapping.scalar_type() == at::kLong),
              "slot_mapping must be a contiguous CUDA int32/int64 [N=", n, "]");
  const auto cdt = k_cache.scalar_type();
  CacheMode mode;
  int64_t row = head_dim;
  if (cdt == act) {
    mode = CacheMode::kNative;
  } else if (cdt == at::kFloat8_e4m3fn) {
    mode = CacheMode::kFp8;
  } else {
    TORCH_CHECK(cdt == at::kByte, "k_cache must be ", act, ", float8_e4m3fn or uint8 (q8/q4), got ", cdt);
    mode = k_cache.size(-1) == head_dim ? CacheMode::kQ8 : CacheMode::kQ4;
    row = mode == CacheMode::kQ8 ? head_dim : head_dim / 2;
  }
  check_cache(k_cache, kv_heads, row, cdt, "k_cache");
  check_cache(v_cache, kv_heads, row, cdt, "v_cache");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&v, &k_cache, &v_cache, &slot_mapping})
    TORCH_CHECK(t->device() == k.device(), "paged_cache_write: all tensors must be on ", k.device());
  CacheWriteParams p{};
  if (is_quant(mode)) {
    TORCH_CHECK(k_scales.has_value() && v_scales.has_value(), "q8/q4 caches need k_scales and v_scales");
    for (const at::Tensor* s : {&*k_scales, &*v_scales})
      TORCH_CHECK(s->is_cuda() && s->dim() == 3 && s->scalar_type() == at::kHalf && s->size(0) == k_cache.size(0) &&
                      s->size(1) == kv_heads && s->size(2) == head_dim / kQuantGroup && s->stride(2) == 1,
                  "cache scales must be float16 [slots, kv_heads, head_dim/32] on ", k.device(), ", got ", s->sizes());
    for (const at::Tensor* s : {&*k_scales, &*v_scales})
      TORCH_CHECK(s->device() == k.device() && reinterpret_cast<uintptr_t>(s->data_ptr()) % 2 == 0,
                  "cache scales must be on ", k.device());
    p.k_scales = static_cast<__half*>(k_scales->data_ptr());
    p.v_scales = static_cast<__half*>(v_scales->data_ptr());
    p.ks_token_stride = k_scales->stride(0);
    p.ks_head_stride = k_scales->stride(1);
    p.vs_token_stride = v_scales->stride(0);
    p.vs_head_stride = v_scales->stride(1);
  }
  TORCH_CHECK(k_scale > 0 && v_scale > 0, "k_scale and v_scale must be positive");
  check_rope(k, q, cos, sin);
  if (n == 0) return;
  if (cos.has_value()) {
    p.cos = cos->data_ptr();
    p.sin = sin->data_ptr();
  }
  if (q.has_value()) {
    p.q = q->data_ptr();
    p.q_token_stride = q->stride(0);
    p.q_head_stride = q->stride(1);
    p.q_heads = static_cast<int>(q->size(1));
  }
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_token_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_token_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.k_cache = static_cast<uint8_t*>(k_cache.data_ptr());
  p.v_cache = static_cast<uint8_t*>(v_cache.data_ptr());
  p.kc_token_stride = k_cache.stride(0) * k_cache.element_size();
  p.kc_head_stride = k_cache.stride(1) * k_cache.element_size();
  p.vc_token_stride = v_cache.stride(0) * v_cache.element_size();
  p.vc_head_stride = v_cache.stride(1) * v_cache.element_size();
  p.slot_mapping = slot_mapping.data_ptr();
  p.num_tokens = static_cast<int>(n);
  p.kv_heads = static_cast<int>(kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.k_inv_scale = static_cast<float>(1.0 / k_scale);
  p.v_inv_scale = static_cast<float>(1.0 / v_scale);

  c10::cuda::CUDAGuard guard(k.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(k.device().index()).stream();
  const bool i64 = slot_mapping.scalar_type() == at::kLong;
  const cudaError_t err = act == at::kHalf ? dispatch_mode<__half>(mode, p, i64, stream)
                                           : dispatch_mode<__nv_bfloat16>(mode, p, i64, stream);
  C10_CUDA_CHECK(err);
}

}  // namespace mixq::attn
