// Which width segment of a matrix's schedule (exl2/format.h) a 32-row tile belongs to. No torch headers.
#pragma once

#include "common/cuda_utils.cuh"
#include "exl2/format.h"

namespace mixq::exl2 {

// Which segment holds tile kt (at most kMaxSegments entries: a short scan).
__device__ __forceinline__ int segment_of(const Schedule& s, int kt) {
  int seg = 0;
  while (seg + 1 < s.num_segments && kt >= s.tile_begin[seg + 1]) ++seg;
  return seg;
}

}  // namespace mixq::exl2
