// Small device/host helpers shared by all kernels. No torch headers here (build time, see environment.md).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace mixq {

constexpr int kWarpSize = 32;

__host__ __device__ constexpr inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Component c (a compile-time constant after unrolling) of a 4-vector, without taking an address,
// so the vector stays in registers.
__device__ __forceinline__ uint32_t get_component(const uint4& v, int c) {
  return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
}
__device__ __forceinline__ float get_component(const float4& v, int c) {
  return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
}

// Multiprocessor count of the current device, cached per device (a driver query, no stream work).
inline int sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return 132;
  if (cache[dev] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    cache[dev] = n > 0 ? n : 132;
  }
  return cache[dev];
}

// Raise kKernel's dynamic shared-memory limit to `bytes` (needed above 48 KB) once per device: a warm-up call
// before CUDA-graph capture makes the API call, the captured call makes none. Pass the kernel's largest size.
template <auto kKernel>
inline cudaError_t raise_smem_limit(int bytes) {
  constexpr int kMaxDevices = 64;
  static int raised[kMaxDevices] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached && raised[dev] >= bytes) return cudaSuccess;
  e = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess && cached) raised[dev] = bytes;
  return e;
}

}  // namespace mixq
