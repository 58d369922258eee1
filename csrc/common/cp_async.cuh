// cp.async helpers (sm_80+): global -> shared copies that bypass registers, with zero-fill when `pred` is false.
// In a header of their own so that the CPU emulation (tools/cuda_emu) can substitute synchronous copies.
// Every statement clobbers "memory": the compiler must neither move shared-memory reads above the wait that
// lands the data nor sink stores below an issue, even where no __syncthreads() (itself a fence) follows.
#pragma once

#include <cuda_runtime.h>

namespace mixq {

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;  // 0 bytes read: the destination is zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}

template <int kBytes>
__device__ __forceinline__ void cp_async_small(void* smem, const void* gmem, bool pred) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async size");
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = pred ? kBytes : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(gmem), "n"(kBytes), "r"(n) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace mixq
