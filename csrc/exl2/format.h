// Constants and the K schedule of mixq's EXL2 kernel layout ("planar tiles"; see mixq/exl2/layout.py,
// whose PIECES / MAX_SEGMENTS / TILE_ROWS must match this file).
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

// A code of width B is split into a low piece of LO bits and a high piece of HI bits (HI = 0: whole),
// each a power of two so no piece straddles a 32-bit word. 3- and 6-bit tiles are not split this way (their
// lane-byte layouts are in exl2/dequant_half2.cuh); Pieces<3> and Pieces<6> only keep width-generic code compiling.
template <int B> struct Pieces;
template <> struct Pieces<2> { static constexpr int lo = 2, hi = 0; };
template <> struct Pieces<3> { static constexpr int lo = 2, hi = 1; };
template <> struct Pieces<4> { static constexpr int lo = 4, hi = 0; };
template <> struct Pieces<5> { static constexpr int lo = 4, hi = 1; };
template <> struct Pieces<6> { static constexpr int lo = 4, hi = 2; };
template <> struct Pieces<8> { static constexpr int lo = 8, hi = 0; };

}  // namespace mixq::exl2
