// Split-K without a second kernel (a "serial fix-up"): every CTA of an output tile writes its fp32 partial and
// counts its arrival on the tile's counter; the CTA that arrives last, whichever it is, sums the partials in split
// order and writes the result. The sum's order is fixed, so the result does not depend on which CTA finishes (it
// is bit-identical run to run); the launch saves the reduce kernel and its launch gap.
// The counters live in a per-device buffer that starts zeroed (mixq::split_counters, ops.h) and is left zeroed:
// the finishing CTA resets its counter, so every launch and every CUDA-graph replay starts from zero. Two launches
// may use one buffer only one after the other (one stream), which is how the ops run.
// No torch headers; the CPU emulation runs it as is (atomics and fences have host twins in tools/cuda_emu/emu.h).
#pragma once

#include <cuda_runtime.h>

namespace mixq {

// True in the CTA that must finish the tile, after `arrivals` CTAs (this one included) called it on `counter`.
// Every thread of the CTA calls it (it holds barriers); in the finishing CTA the other CTAs' partials are visible
// to the loads that follow (read them with __ldcg: L1 is not coherent across SMs).
__device__ __forceinline__ bool split_k_arrive(int* counter, int arrivals) {
  __shared__ int s_last;
  __threadfence();  // release: this thread's partial stores reach L2 before the arrival is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    const int last = atomicAdd(counter, 1) == arrivals - 1;
    if (last) atomicExch(counter, 0);  // leave the buffer zeroed for the next launch
    s_last = last;
  }
  __syncthreads();
  const bool last = s_last != 0;
  if (last) __threadfence();  // acquire: order the partial loads after the count
  return last;
}

}  // namespace mixq
