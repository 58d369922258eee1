// Host launcher of paged decode attention: checks, cache-mode inference, scratch, dispatch.
// Kernel: paged_decode.cuh; instances: paged_decode_{native,fp8,q8,q4}.cu. Everything is sized from tensor
// shapes (never from seq_lens values), so a call is CUDA-graph capturable for a fixed max_pages.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <initializer_list>

#include "attention/attention_dispatch.h"
#include "attention/attention_ops.h"
#include "attention/paged_decode.cuh"
#include "ops.h"

MIXQ_DECODE_MODE(MIXQ_DECODE_EXTERN, mixq::attn::CacheMode::kNative)
MIXQ_DECODE_MODE(MIXQ_DECODE_EXTERN, mixq::attn::CacheMode::kFp8)
MIXQ_DECODE_MODE(MIXQ_DECODE_EXTERN, mixq::attn::CacheMode::kQ8)
MIXQ_DECODE_MODE(MIXQ_DECODE_EXTERN, mixq::attn::CacheMode::kQ4)

namespace mixq::attn {
namespace {

constexpr int kMaxRowsSmall = 8;
constexpr int kMaxRowsLarge = 32;

// Mode from the cache dtype and row length (q8 rows hold D bytes, q4 rows D / 2).
CacheMode cache_mode(const at::Tensor& cache, at::ScalarType act, int64_t head_dim, const char* name) {
  const auto dt = cache.scalar_type();
  if (dt == act) {
    TORCH_CHECK(cache.size(-1) == head_dim, name, " last dim ", cache.size(-1), " != head_dim ", head_dim);
    return CacheMode::kNative;
  }
  if (dt == at::kFloat8_e4m3fn) {
    TORCH_CHECK(cache.size(-1) == head_dim, name, " last dim ", cache.size(-1), " != head_dim ", head_dim);
    return CacheMode::kFp8;
  }
  TORCH_CHECK(dt == at::kByte, name, " must be ", act, " (like q), float8_e4m3fn or uint8 (q8/q4), got ", dt);
  if (cache.size(-1) == head_dim) return CacheMode::kQ8;
  TORCH_CHECK(cache.size(-1) * 2 == head_dim, name, " uint8 rows must be head_dim (q8) or head_dim/2 (q4) bytes, got ",
              cache.size(-1));
  return CacheMode::kQ4;
}

void check_rows(const at::Tensor& t, const char* name, int64_t kv_heads, int64_t align_bytes) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 3 && t.size(1) == kv_heads && t.stride(2) == 1, name,
              " must be a CUDA tensor [slots, kv_heads=", kv_heads, ", row] with a contiguous last dim, got ",
              t.sizes(), " strides ", t.strides());
  const int64_t es = t.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % align_bytes == 0 && (t.stride(0) * es) % align_bytes == 0 &&
                  (t.stride(1) * es) % align_bytes == 0,
              name, " rows must be ", align_bytes, "-byte aligned");
}

int sm_count(const at::Tensor& t) {
  static int counts[64] = {};  // per device; a host attribute query, no stream work
  const int dev = t.device().index();
  if (dev < 0 || dev >= 64) return 132;
  if (counts[dev] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[dev], cudaDevAttrMultiProcessorCount, dev));
  return counts[dev];
}

// The instance of the shared list (attention_dispatch.h) for this head_dim and the smallest row capacity that
// holds `rows`; the list is the one place that says which shapes exist.
template <typename scalar_t, CacheMode kMode>
cudaError_t dispatch_shape(const PagedDecodeParams& p, int batch, int64_t head_dim, int rows, cudaStream_t stream) {
  const int max_rows = rows <= kMaxRowsSmall ? kMaxRowsSmall : kMaxRowsLarge;
#define MIXQ_DECODE_CASE(T, mode, hd, mr) \
  if (head_dim == hd && max_rows == mr) return launch_paged_decode<T, mode, hd, mr>(p, batch, stream);
  MIXQ_DECODE_SHAPES(MIXQ_DECODE_CASE, scalar_t, kMode)
#undef MIXQ_DECODE_CASE
  return cudaErrorInvalidValue;  // unreachable: the launcher checked head_dim and rows
}

template <typename scalar_t>
cudaError_t dispatch_mode(CacheMode mode, const PagedDecodeParams& p, int batch, int64_t head_dim, int rows,
                          cudaStream_t stream) {
  switch (mode) {
    case CacheMode::kNative:
      return dispatch_shape<scalar_t, CacheMode::kNative>(p, batch, head_dim, rows, stream);
    case CacheMode::kFp8:
      return dispatch_shape<scalar_t, CacheMode::kFp8>(p, batch, head_dim, rows, stream);
    case CacheMode::kQ8:
      return dispatch_shape<scalar_t, CacheMode::kQ8>(p, batch, head_dim, rows, stream);
    default:
      return dispatch_shape<scalar_t, CacheMode::kQ4>(p, batch, head_dim, rows, stream);
  }
}

}  // namespace

at::Tensor paged_decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t page_size,
                                       double scale, int64_t window, const std::optional<at::Tensor>& k_scales,
                                       const std::optional<at::Tensor>& v_scales, double k_scale, double v_scale) {
  TORCH_CHECK(q_in.is_cuda(), "paged_decode_attention: q must be a CUDA tensor");
  TORCH_CHECK(q_in.dim() == 3 || q_in.dim() == 4, "q must be [B, Hq, D] or [B, Tq, Hq, D], got ", q_in.sizes());
  const auto act = q_in.scalar_type();
  TORCH_CHECK(act == at::kHalf || act == at::kBFloat16, "q must be float16 or bfloat16, got ", act);
  const at::Tensor q = q_in.contiguous();
  const int64_t batch = q.size(0), q_tokens = q.dim() == 4 ? q.size(1) : 1;
  const int64_t q_heads = q.size(-2), head_dim = q.size(-1);
  TORCH_CHECK(head_dim == 32 || head_dim == 64 || head_dim == 128, "head_dim must be 32, 64 or 128, got ", head_dim);
  TORCH_CHECK(k_cache.dim() == 3, "k_cache must be [slots, kv_heads, row], got ", k_cache.sizes());
  const int64_t kv_heads = k_cache.size(1);
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, "q heads ", q_heads, " not a multiple of kv heads ", kv_heads);
  const int64_t rows = q_tokens * (q_heads / kv_heads);
  TORCH_CHECK(rows <= kMaxRowsLarge, "q_tokens * (q_heads / kv_heads) = ", rows, " exceeds ", kMaxRowsLarge);
  const CacheMode mode = cache_mode(k_cache, act, head_dim, "k_cache");
  TORCH_CHECK(cache_mode(v_cache, act, head_dim, "v_cache") == mode && v_cache.scalar_type() == k_cache.scalar_type(),
              "k_cache and v_cache must use the same storage mode");
  check_rows(k_cache, "k_cache", kv_heads, 16);
  check_rows(v_cache, "v_cache", kv_heads, 16);
  TORCH_CHECK(v_cache.size(0) == k_cache.size(0), "k_cache and v_cache have different slot counts");
  TORCH_CHECK(block_tables.is_cuda() && block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.size(0) == batch && block_tables.is_contiguous(),
              "block_tables must be a contiguous CUDA int32 [B=", batch, ", max_pages], got ", block_tables.sizes());
  TORCH_CHECK(seq_lens.is_cuda() && seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 &&
                  seq_lens.size(0) == batch && seq_lens.is_contiguous(),
              "seq_lens must be a contiguous CUDA int32 [B=", batch, "]");
  TORCH_CHECK(page_size > 0, "page_size must be positive");
  for (const at::Tensor* t : {&k_cache, &v_cache, &block_tables, &seq_lens})
    TORCH_CHECK(t->device() == q.device(), "paged_decode_attention: all tensors must be on ", q.device());
  const int64_t max_pages = block_tables.size(1);
  TORCH_CHECK(max_pages * page_size < (int64_t{1} << 30), "max_pages * page_size too large");
  const bool quant = is_quant(mode);
  if (quant) {
    TORCH_CHECK(k_scales.has_value() && v_scales.has_value(), "q8/q4 caches need k_scales and v_scales");
    for (const auto* s : {&*k_scales, &*v_scales}) {
      TORCH_CHECK(s->scalar_type() == at::kHalf && s->size(0) == k_cache.size(0) &&
                      s->size(-1) == head_dim / kQuantGroup,
                  "cache scales must be float16 [slots, kv_heads, head_dim/32], got ", s->sizes());
      check_rows(*s, "cache scales", kv_heads, head_dim / kQuantGroup * 2);
      TORCH_CHECK(s->device() == q.device(), "cache scales must be on ", q.device());
    }
  }

  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = q.new_empty(q.sizes());
  if (batch == 0 || q_heads == 0 || q_tokens == 0) return out;
  TORCH_CHECK(batch <= 65535, "paged_decode_attention: at most 65535 sequences per call (grid.z), got ", batch);
  // Partition size from shapes only (graph-safe): halve it while the grid would not cover the GPU twice.
  const int64_t capacity = max_pages * page_size;
  int64_t partition = kMaxPartition;
  while (partition > kMinPartition && batch * kv_heads * ((capacity + partition - 1) / partition) < 2 * sm_count(q))
    partition /= 2;
  const int num_partitions = static_cast<int>(std::max<int64_t>(1, (capacity + partition - 1) / partition));
  at::Tensor part_out, part_ml;
  PagedDecodeParams p{};
  if (num_partitions > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    part_out = q.new_empty({batch * q_tokens * q_heads * num_partitions * head_dim}, f32);
    part_ml = q.new_empty({batch * q_tokens * q_heads * num_partitions * 2}, f32);
    p.part_out = part_out.data_ptr<float>();
    p.part_ml = part_ml.data_ptr<float>();
    p.counters = mixq::split_counters(q, batch * kv_heads);
  }
  p.q = q.data_ptr();
  p.k_cache = static_cast<const uint8_t*>(k_cache.data_ptr());
  p.v_cache = static_cast<const uint8_t*>(v_cache.data_ptr());
  p.k_token_stride = k_cache.stride(0) * k_cache.element_size();
  p.k_head_stride = k_cache.stride(1) * k_cache.element_size();
  p.v_token_stride = v_cache.stride(0) * v_cache.element_size();
  p.v_head_stride = v_cache.stride(1) * v_cache.element_size();
  if (quant) {
    p.k_scales = static_cast<const __half*>(k_scales->data_ptr());
    p.v_scales = static_cast<const __half*>(v_scales->data_ptr());
    p.ks_token_stride = k_scales->stride(0);
    p.ks_head_stride = k_scales->stride(1);
    p.vs_token_stride = v_scales->stride(0);
    p.vs_head_stride = v_scales->stride(1);
  }
  p.block_tables = block_tables.data_ptr<int>();
  p.seq_lens = seq_lens.data_ptr<int>();
  p.out = out.data_ptr();
  p.q_tokens = static_cast<int>(q_tokens);
  p.q_heads = static_cast<int>(q_heads);
  p.kv_heads = static_cast<int>(kv_heads);
  p.max_pages = static_cast<int>(max_pages);
  p.page_size = static_cast<int>(page_size);
  p.num_partitions = num_partitions;
  p.partition_size = static_cast<int>(partition);
  p.window = window > 0 ? static_cast<int>(std::min<int64_t>(window, int64_t{1} << 30)) : 0;
  p.q_scale = static_cast<float>(scale * k_scale) * kLog2e;
  p.v_scale = static_cast<float>(v_scale);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const int r = static_cast<int>(rows), b = static_cast<int>(batch);
  const cudaError_t err = act == at::kHalf ? dispatch_mode<__half>(mode, p, b, head_dim, r, stream)
                                           : dispatch_mode<__nv_bfloat16>(mode, p, b, head_dim, r, stream);
  C10_CUDA_CHECK(err);
  return out;
}

}  // namespace mixq::attn
