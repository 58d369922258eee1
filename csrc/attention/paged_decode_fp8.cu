// Explicit instances of the paged decode kernels for the fp8 cache mode (one unit per mode builds in parallel).
#include "attention/attention_dispatch.h"
#include "attention/paged_decode.cuh"

MIXQ_DECODE_MODE(MIXQ_DECODE_INSTANCE, mixq::attn::CacheMode::kFp8)
