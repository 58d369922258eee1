// Rotary position embedding in Hugging Face's rotate-half convention, rounded as torch rounds
// `x * cos + rotate_half(x) * sin` in the activation type T (mixq.kernels.layers.apply_rope_ref): fp32 math, one
// rounding to T per op (negation is exact), so every kernel that rotates is bit-identical to the reference
// (layers/rope.cu on q and k; attention/cache_write.cuh, which rotates k as it stores it and q in place). For a
// pair (i, i + D/2), i < D/2:
//   y[i]       = x[i] * cos[i]             - x[i + D/2] * sin[i]
//   y[i + D/2] = x[i + D/2] * cos[i + D/2] + x[i] * sin[i + D/2]
// Both halves of cos/sin are read, so any table works, not only HF's cat(freqs, freqs). No torch headers.
#pragma once

#include "common/activation.cuh"

namespace mixq {

// y[i] from x = x[i] and its partner x[i + D/2] (upper = false) or x[i - D/2] (upper = true), c = cos[i], s = sin[i].
template <typename T>
__device__ __forceinline__ T rope_value(float x, float partner, float c, float s, bool upper) {
  return from_float<T>(round_to<T>(x * c) + round_to<T>((upper ? partner : -partner) * s));
}

// N pairs in registers: x1 = x[i .. i+N), x2 = x[i + D/2 .. i + D/2 + N), each with its cos/sin, rotated in place.
template <typename T, int N>
__device__ __forceinline__ void rope_halves(T* x1, T* x2, const T* c1, const T* c2, const T* s1, const T* s2) {
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const float a = to_float(x1[e]), b = to_float(x2[e]);
    x1[e] = rope_value<T>(a, b, to_float(c1[e]), to_float(s1[e]), false);
    x2[e] = rope_value<T>(b, a, to_float(c2[e]), to_float(s2[e]), true);
  }
}

}  // namespace mixq
