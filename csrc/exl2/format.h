// Constants and the K schedule of mixq's EXL2 kernel layout ("planar tiles"; see mixq/exl2/layout.py,
// whose MAX_SEGMENTS / TILE_ROWS must match this file).
#pragma once

namespace mixq::exl2 {

constexpr int kTileRows = 32;     // rows of one tile: one width, one scale group (EXL2 groups are 32-aligned)
constexpr int kMaxSegments = 6;   // one contiguous segment per bit width, in stored (decreasing width) order
constexpr int kColsPerThread = 4; // one 16-byte load per word row covers 4 output columns

// Where each width segment starts, in 32-row tiles and in packed word rows. Passed by value to kernels.
struct Schedule {
  int num_segments;
  int bits[kMaxSegments];
  int tile_begin[kMaxSegments + 1];  // tile_begin[num_segments] = K / 32
  int word_row_begin[kMaxSegments];
};

// Widths and layouts: 2-, 4- and 8-bit tiles are planar (code i of a column's tile whole in word i / (32 / B), at bit
// B * (i % (32 / B))); 3-, 5- and 6-bit tiles have lane-byte layouts (exl2/dequant_half2.cuh, LaneBytes).

}  // namespace mixq::exl2
