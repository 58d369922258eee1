// Wrappers for PTX instructions that CUDA C++ does not expose or that the compiler does not reliably form.
// In a header of their own so that the CPU emulation (tools/cuda_emu/ptx.cuh) can substitute a host twin.
#pragma once

#include <stdint.h>

namespace mixq {

// lop3.b32: any 3-input bitwise function, given as its truth table over a = 0xF0, b = 0xCC, c = 0xAA (e.g.
// (a & b) | c is 0xEA). Explicit because for `(x & mask) | magic` with two constants nvcc emits two LOP3s
// (one immediate each); with the magic in a register (loaded once outside the loop) ptxas keeps it to one.
template <uint32_t kLut>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  static_assert(kLut <= 0xFF, "a lop3 truth table has 8 entries");
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c), "n"(kLut));
  return r;
}

// prmt.b32, generic mode: byte n of the result is byte (s >> 4n) & 7 of {b:a} (a = bytes 0..3), or, when bit 3
// of that selector nibble is set, that byte's sign bit replicated over all 8 bits (PTX ISA, prmt). Explicit
// because __byte_perm is documented on the low 3 bits of each nibble only; the 3-bit dequantization
// (exl2/dequant_half2.cuh) uses the sign mode to copy one bit into a whole byte.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(s));
  return r;
}

}  // namespace mixq
