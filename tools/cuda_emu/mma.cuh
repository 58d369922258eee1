// CPU emulation's stand-in for csrc/common/mma.cuh: the warp's lanes publish their fragments, meet, and each
// computes its own four outputs from all of them (emu.h, emu::mma_16816), in the fragment layout of the PTX ISA.
#pragma once

#include <stdint.h>

namespace mixq {

inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  ::emu::mma_16816(d, a, b, c);
}

inline void mma_k32_x2(float (&d)[2][4], const uint32_t (&a)[2][2][4], const uint32_t (&b)[2][2]) {
  ::emu::mma_k32_x2(d, a, b);
}

inline void warp_barrier() { ::emu::warp_barrier(); }

}  // namespace mixq
