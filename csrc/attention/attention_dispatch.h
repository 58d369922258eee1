// Instantiation lists shared by the launchers (paged_decode.cu, cache_write.cu) and the instance units.
#pragma once

// X(scalar_t, mode, head_dim, max_rows) for every compiled decode kernel, per cache mode.
#define MIXQ_DECODE_SHAPES(X, scalar_t, mode) \
  X(scalar_t, mode, 32, 8)                    \
  X(scalar_t, mode, 32, 32)                   \
  X(scalar_t, mode, 64, 8)                    \
  X(scalar_t, mode, 64, 32)                   \
  X(scalar_t, mode, 128, 8)                   \
  X(scalar_t, mode, 128, 32)

#define MIXQ_DECODE_MODE(X, mode)      \
  MIXQ_DECODE_SHAPES(X, __half, mode) \
  MIXQ_DECODE_SHAPES(X, __nv_bfloat16, mode)

#define MIXQ_DECODE_INSTANCE(scalar_t, mode, head_dim, max_rows)                                          \
  template cudaError_t mixq::attn::launch_paged_decode<scalar_t, mode, head_dim, max_rows>(               \
      const mixq::attn::PagedDecodeParams&, int, cudaStream_t);

#define MIXQ_DECODE_EXTERN(scalar_t, mode, head_dim, max_rows)                                            \
  extern template cudaError_t mixq::attn::launch_paged_decode<scalar_t, mode, head_dim, max_rows>(        \
      const mixq::attn::PagedDecodeParams&, int, cudaStream_t);
