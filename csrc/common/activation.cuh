// The activation types of the EXL2 and MoE kernels (fp16 or bf16 in and out, fp32 accumulation). Their inner loop
// multiplies fp16 weights by fp16 x on tensor cores (exl2/gemm_tiles.cuh), so a bf16 x is converted to fp16 as it
// is staged, saturating at +-65504 like mixq.kernels.ops.to_half; the fp32 results are
// stored in the activation type: fp16 saturates at +-65504 (a finite result never becomes inf), bf16 keeps fp32's
// range. inf and NaN pass through unchanged, so the engine's non-finite check still sees a broken input.
// No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace mixq {

// fp16/bf16 <-> fp32 with torch's rounding (round to nearest even); shared by every kernel family.
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float2 to_float2(__half2 x) { return __half22float2(x); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// A value rounded to T and back: what torch's fp16/bf16 elementwise ops produce (fp32 math, one rounding each).
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

__device__ __forceinline__ float saturate_fp16(float v) {
  constexpr float kMax = 65504.f;
  return v > kMax && v < INFINITY ? kMax : v < -kMax && v > -INFINITY ? -kMax : v;
}

// x as the fp16 the inner loop multiplies.
__device__ __forceinline__ __half staged_half(__half v) { return v; }
__device__ __forceinline__ __half staged_half(__nv_bfloat16 v) {
  return __float2half_rn(saturate_fp16(__bfloat162float(v)));
}

// Four fp32 results to dst[0..3] (8-byte aligned) in the activation type.
__device__ __forceinline__ void store4(__half* dst, float a, float b, float c, float d) {
  __half2* p = reinterpret_cast<__half2*>(dst);
  p[0] = __floats2half2_rn(saturate_fp16(a), saturate_fp16(b));
  p[1] = __floats2half2_rn(saturate_fp16(c), saturate_fp16(d));
}
__device__ __forceinline__ void store4(__nv_bfloat16* dst, float a, float b, float c, float d) {
  __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(dst);
  p[0] = __floats2bfloat162_rn(a, b);
  p[1] = __floats2bfloat162_rn(c, d);
}

// Four activations src[0..3] (8-byte aligned) as fp32.
__device__ __forceinline__ float4 load4(const __half* src) {
  const __half2* p = reinterpret_cast<const __half2*>(src);
  const float2 a = __half22float2(p[0]), b = __half22float2(p[1]);
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 load4(const __nv_bfloat16* src) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(src);
  const float2 a = __bfloat1622float2(p[0]), b = __bfloat1622float2(p[1]);
  return make_float4(a.x, a.y, b.x, b.y);
}

}  // namespace mixq
