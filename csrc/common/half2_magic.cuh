// The fp16 "magic number" pieces shared by the weight dequantization (exl2/dequant_half2.cuh) and the quantized KV
// cache decoding (attention/kv_format.cuh): OR-ing an n-bit code into the mantissa of fp16 1024 (0x6400, ulp 1)
// at bit p gives exactly 1024 + code * 2^p, in both halves of a register at once. No torch headers.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

namespace mixq {

constexpr uint32_t kMagic2 = 0x64006400u;  // fp16 1024 in both halves
// lop3 truth table of (a & b) | c over a = 0xF0, b = 0xCC, c = 0xAA: mask the code fields, add the magic.
constexpr uint32_t kAndOr = (0xF0 & 0xCC) | 0xAA;

__device__ __forceinline__ __half2 bits_as_half2(uint32_t u) {
  __half2 h;
  memcpy(&h, &u, sizeof h);
  return h;
}

}  // namespace mixq
