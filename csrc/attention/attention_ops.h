// Host entry points of the attention ops (registered in attention_ops.cpp; schemas there).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace mixq::attn {

at::Tensor paged_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t page_size,
                                       double scale, int64_t window, const std::optional<at::Tensor>& k_scales,
                                       const std::optional<at::Tensor>& v_scales, double k_scale, double v_scale);

void paged_cache_write_cuda(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slot_mapping, const std::optional<at::Tensor>& k_scales,
                            const std::optional<at::Tensor>& v_scales, double k_scale, double v_scale,
                            const std::optional<at::Tensor>& q, const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin);

}  // namespace mixq::attn
