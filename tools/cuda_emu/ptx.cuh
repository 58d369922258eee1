// CPU emulation's stand-in for csrc/common/ptx.cuh (build.py substitutes it): the same functions as plain C++.
#pragma once

#include <stdint.h>

namespace mixq {

// lop3.b32: bit i of the result is bit (a_i << 2 | b_i << 1 | c_i) of the truth table (PTX ISA, lop3).
template <uint32_t kLut>
inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  static_assert(kLut <= 0xFF, "a lop3 truth table has 8 entries");
  uint32_t r = 0;
  for (int i = 0; i < 32; ++i) {
    const uint32_t idx = ((a >> i) & 1u) << 2 | ((b >> i) & 1u) << 1 | ((c >> i) & 1u);
    r |= ((kLut >> idx) & 1u) << i;
  }
  return r;
}

// prmt.b32, generic mode: emu.h's __byte_perm already models the whole selector nibble, sign mode included
// (tested against torch in tests/test_dequant_half2.py::test_emulated_byte_perm).
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) { return __byte_perm(a, b, s); }

}  // namespace mixq
