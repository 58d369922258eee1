// Schemas and CUDA registrations of the attention ops. A fragment, so it coexists with the main
// TORCH_LIBRARY(mixq) block of csrc/bindings.cpp. Fake (meta) impls live in mixq/kernels/paged_attention.py.
#include <torch/library.h>

#include "attention/attention_ops.h"

TORCH_LIBRARY_FRAGMENT(mixq, m) {
  // q [B, Hq, D] or [B, Tq, Hq, D]; caches [slots, Hkv, row] (fp16/bf16 like q, float8_e4m3fn, or uint8 with
  // row D (q8) or D/2 (q4) plus fp16 scales [slots, Hkv, D/32]); block_tables int32 [B, max_pages];
  // seq_lens int32 [B] including the Tq new tokens; window <= 0 means no sliding window.
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "int page_size, float scale, int window=0, Tensor? k_scales=None, Tensor? v_scales=None, "
      "float k_scale=1.0, float v_scale=1.0) -> Tensor");
  // k/v [N, Hkv, D]; slot_mapping int32/int64 [N], negative = skip. With cos/sin [N, D]: RoPE on k as it is stored
  // and on q [N, Hq, D] in place (RoPE fused into the cache write).
  m.def(
      "paged_cache_write(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
      "Tensor(c!)? k_scales=None, Tensor(d!)? v_scales=None, float k_scale=1.0, float v_scale=1.0, "
      "Tensor(e!)? q=None, Tensor? cos=None, Tensor? sin=None) -> ()");
}

TORCH_LIBRARY_IMPL(mixq, CUDA, m) {
  m.impl("paged_decode_attention", &mixq::attn::paged_decode_attention_cuda);
  m.impl("paged_cache_write", &mixq::attn::paged_cache_write_cuda);
}
