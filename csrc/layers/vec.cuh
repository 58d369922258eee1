// Activation values as the layer kernels load them: fixed-size vectors of fp16/bf16 (one 16-byte load for 8
// values); the conversions to and from fp32 are common/activation.cuh's. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common/activation.cuh"

namespace mixq::layers {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

using mixq::from_float;  // common/activation.cuh
using mixq::round_to;
using mixq::to_float;

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace mixq::layers
