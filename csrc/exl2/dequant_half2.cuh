// Two weights per instruction: planar-tile codes (exl2/format.h, mixq/exl2/layout.py) to half2 pairs with the
// fp16 "magic number" trick, and the tile's group scales in half2. Used by the matmul loop (exl2/gemm_tiles.cuh).
// No torch headers; tested bit for bit against plain torch under the CPU emulation (tests/test_dequant_half2.py).
//
// The trick: OR-ing an n-bit field into the mantissa of fp16 1024 (0x6400; mantissa bits 0..9, ulp 1) at bit
// position p gives exactly 1024 + v * 2^p, in both halves of a 32-bit register at once (one LOP3 for two codes).
// One HFMA2 with per-half constants then removes the 1024, undoes the 2^p and subtracts the zero point
// z = 2^(B-1); every intermediate is an integer below 2048 times a power of two, so it is exact.
//
// Output: w = (q - z) * 2^-(B-1), i.e. in [-1, 1) for every width (exact: a power-of-two scaling), the A operand
// of the matmul's mma (fp16); the group scale times 2^(B-1) is applied to each tile's fp32 products.
//
// Pairs (planar widths 2, 4, 8): pair p of a tile is the half2 (row a, row b) of one column, rows taken from the
// same word so that no shuffle between words is needed: a word of n-bit codes holds P = 32/n rows and pairs its row
// m with row m + P/2 (the fields at bit 16 + p sit in the high half exactly where the field at p sits in the low
// half).
// The activations are staged in the same order (tile_x_slot), so pair p multiplies the half2 of x slot p.
// Pairs come in groups of 4 (one 16-byte shared-memory load of x per token).
//
// 3-bit tiles have a layout of their own (mixq/exl2/layout.py pack_tiles), built for this loop: pair p of a
// tile is rows (2p, 2p + 1) (so x is staged in row order), and the 8 codes of pairs 4G..4G+3 (a_i = row 8G + 2i,
// b_i = row 8G + 2i + 1) are 3 bytes: X = a0 | a1 << 3 | (a2 & 3) << 6, Z = the same of b, and
// Y = a2 >> 2 | a3 << 1 | b3 << 4 | (b2 >> 2) << 7; word 0 = X0 Y0 X1 Y1, word 1 = X2 Y2 X3 Y3, word 2 = Z0..Z3
// (bytes from low). One PRMT (common/ptx.cuh prmt) makes [X, Y, Z, sign(Y)]: each half then holds a, b's codes
// 0, 1, 2 at bits 0, 3, 6 (code 2's third bit is bit 8: Y's bit 0 in the low half, Y's bit 7 copied by the sign
// mode in the high half); a second PRMT makes [Y, Y, Y, Y] for a3 (bit 1) and b3 (bit 4). Cost per two weights:
// 2 ops, plus 2 PRMT per 4 pairs (the planar 2+1 split this replaced cost 4 ops and a PRMT or shift per pair).
// The selectors depend on the group (the MMA loop's lane), not on the data: registers set once.
//
// 6-bit tiles are laid out the same way (pairs (2p, 2p + 1), a_i / b_i as above): group G's own word G is
// A = a0 | a1 << 6 | (a3 & 15) << 12 | b0 << 16 | b1 << 22 | (b3 & 15) << 28, and its two extra bytes
// E0 = a3 >> 4 | a2 << 2, E1 = b3 >> 4 | b2 << 2 are half G % 2 of word 4 + G / 2. A itself is pair 0 (fields at
// bit 0 of each half), A >> 6 pair 1; one PRMT makes R = [A byte 1, E0, A byte 3, E1], which holds a3 / b3 at bit 4
// of each half (A's free nibble under E's two bits), and R >> 8 holds a2 / b2 at bit 2. Every pair's fields sit at
// the same bit in both halves (immediate HFMA2 constants). Cost per two weights: 2 ops, plus 3 per 4 pairs (the
// planar 4+2 split this replaced cost 5 ops per pair).
//
// 5-bit tiles too: group G's own word G is A = a0 | a1 << 5 | a2 << 10 | (a3 >> 4) << 15 | b0 << 16 | b1 << 21 |
// b2 << 26 | (b3 & 1) << 31 and its byte X = b3 >> 1 | (a3 & 15) << 4 is byte G of word 4. A is pairs 0 and 1
// (fields at bits 0 and 5), A >> 8 pair 2 (bit 2); one PRMT makes U = [X, sign(A byte 1), sign(A byte 3), X], where
// a3 = X's high nibble under A's bit 15 and b3 = A's bit 31 under X's low nibble are contiguous, and U >> 3 holds
// them at bits 1 and 4 (kMagicAt). Cost per two weights: 2 ops, plus 3 per 4 pairs (the planar 4+1 split this
// replaced cost 4 per pair).
//
// Unequal positions (3-bit pair 3, 5-bit pair 3): kMagicAt below keeps one multiplier for both halves.
#pragma once

#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

#include "common/cuda_utils.cuh"
#include "common/half2_magic.cuh"
#include "common/ptx.cuh"
#include "exl2/format.h"

namespace mixq::exl2 {

// Calls f(std::integral_constant<int, I>{}) for I = 0..N-1, so that I can be a template argument (shift
// amounts and magic constants below are compile-time constants, not merely constants after unrolling).
template <typename F, int... I>
__device__ __forceinline__ void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

// fp16 bit pattern of m * 2^e, which must be exactly representable as a normal fp16 (checked by the callers'
// static_asserts through fp16_exact).
__host__ __device__ constexpr bool fp16_exact(long long m, int e) {
  if (m < 0) m = -m;
  if (m == 0) return true;
  while (m % 2 == 0 && m >= 2048) m /= 2, ++e;
  if (m >= 2048) return false;
  while (m < 1024) m *= 2, --e;
  return e + 25 >= 1 && e + 25 <= 30;
}
__host__ __device__ constexpr uint32_t fp16_bits(long long m, int e) {
  const uint32_t sign = m < 0 ? 0x8000u : 0u;
  if (m < 0) m = -m;
  if (m == 0) return sign;
  while (m >= 2048) m /= 2, ++e;
  while (m < 1024) m *= 2, --e;
  return sign | uint32_t(e + 25) << 10 | uint32_t(m - 1024);
}
__host__ __device__ constexpr uint32_t half2_bits(uint32_t lo, uint32_t hi) { return lo | hi << 16; }

// Rows of one planar word (the pairing period) for width B; slot of row r (0..31) of a tile in the staged x.
// (Lane-byte widths 3, 5 and 6: pairs are rows (2p, 2p + 1), period 2, the identity.)
__host__ __device__ constexpr int tile_x_slot(int period, int r) {
  const int m = r & (period - 1);
  return (r & ~(period - 1)) + 2 * (m & (period / 2 - 1)) + m / (period / 2);
}
__host__ __device__ constexpr bool lane_bytes(int bits) { return bits == 3 || bits == 5 || bits == 6; }
__host__ __device__ constexpr int pair_period_of(int bits) {
  return lane_bytes(bits) ? 2 : bits == 2 ? 16 : bits == 8 ? 4 : 8;
}
template <int B>
constexpr int kPairPeriod = pair_period_of(B);
static_assert(kPairPeriod<2> == 16 && kPairPeriod<4> == 8 && kPairPeriod<8> == 4, "a planar word's rows");

// The codes of pair I of group G (pairs 4G..4G+3) of a planar width: which word, how far the word is shifted right
// first, and the bit position of the field in each half afterwards.
template <int B, int G, int I>
struct PlanarPair {
  static constexpr int lo = B;  // planar widths: whole codes
  static constexpr int pair = 4 * G + I;
  static constexpr int word = pair / (kPairPeriod<B> / 2);
  static constexpr int k = pair % (kPairPeriod<B> / 2);  // field index of the low half in its word
  // Fields at bits >= 10 would reach the exponent: the upper fields are read from the word shifted right by 8.
  static constexpr int shift = lo * k >= 10 - lo + 1 ? 8 : 0;
  static constexpr int pos = lo * k - shift;
  static_assert(pos >= 0 && pos + lo <= 10, "field must lie in the fp16 mantissa");
};

// The magic a pair's LOP3 ORs in when its fields sit at bit PA (low half) and PB (high half): 1024 in the low
// half, 1024 * 2^(PA - PB) in the high half, so that the high half's field, PB bits up in a mantissa whose ulp is
// 2^(PA - PB), reads as q' * 2^PA like the low half's: one multiplier for both halves. (With 1024 in both, unequal
// positions need unequal multipliers, a 32-bit constant ptxas re-materialised with a MOV before every use.)
template <int PA, int PB>
constexpr uint32_t kMagicAt = half2_bits(0x6400u, fp16_bits(1, 10 + PA - PB));
static_assert(kMagicAt<0, 0> == kMagic2, "equal positions: 1024 in both halves");

// lm = (lop3 of the fields with kMagicAt<PA, PB>) = 1024 + q * 2^PA in the low half, M + q' * 2^PA in the high
// half (M = 1024 * 2^(PA - PB)) -> (q - z, q' - z) * 2^-norm with z = 2^norm, exactly: one HFMA2 whose multiplier
// has equal halves.
template <int kNorm, int PA, int PB>
__device__ __forceinline__ __half2 magic_to_half2(uint32_t lm) {
  static_assert(PB - PA <= 10 && PA - PB <= 4, "the high half's magic must be a normal fp16 below 2^15");
  constexpr long long mb = PA >= PB ? 1024ll << (PA - PB) : 1024ll >> (PB - PA);
  constexpr long long da = -(1024 + (1ll << kNorm << PA)), db = -(mb + (1ll << kNorm << PA));
  static_assert(fp16_exact(da, -PA - kNorm) && fp16_exact(db, -PA - kNorm), "d");
  constexpr uint32_t c = half2_bits(fp16_bits(1, -PA - kNorm), fp16_bits(1, -PA - kNorm));
  constexpr uint32_t d = half2_bits(fp16_bits(da, -PA - kNorm), fp16_bits(db, -PA - kNorm));
  return __hfma2(bits_as_half2(lm), bits_as_half2(c), bits_as_half2(d));
}

// PRMT selectors of a 3-bit tile's group g (see the file comment): [X, Y, Z, sign(Y)] and [Y, Y, Y, Y] of
// {word g / 2 : word 2}.
__host__ __device__ constexpr uint32_t sel3_v(int g) {
  return uint32_t(2 * (g & 1)) | uint32_t(2 * (g & 1) + 1) << 4 | uint32_t(4 + g) << 8 |
         (uint32_t(2 * (g & 1) + 1) | 8u) << 12;
}
__host__ __device__ constexpr uint32_t sel3_u(int g) { return uint32_t(2 * (g & 1) + 1) * 0x1111u; }

// Pairs 4G..4G+3 of a 3-bit tile from a = its word G / 2 and b = its word 2, with G's selectors.
__device__ __forceinline__ void dequant_group3(uint32_t a, uint32_t b, uint32_t sel_v, uint32_t sel_u,
                                               __half2 (&out)[4]) {
  const uint32_t v = prmt(a, b, sel_v), u = prmt(a, b, sel_u);
  out[0] = magic_to_half2<2, 0, 0>(lop3<kAndOr>(v, 7u | 7u << 16, kMagic2));
  out[1] = magic_to_half2<2, 3, 3>(lop3<kAndOr>(v, 7u << 3 | 7u << 19, kMagic2));
  out[2] = magic_to_half2<2, 6, 6>(lop3<kAndOr>(v, 7u << 6 | 7u << 22, kMagic2));
  out[3] = magic_to_half2<2, 1, 4>(lop3<kAndOr>(u, 7u << 1 | 7u << 20, kMagicAt<1, 4>));
}

// Pairs 4G..4G+3 of a 6-bit tile from a = its word G and e = its word 4 + G / 2, with G's selector sel6(G).
__host__ __device__ constexpr uint32_t sel6(int g) {
  return 1u | uint32_t(4 + 2 * (g & 1)) << 4 | 3u << 8 | uint32_t(5 + 2 * (g & 1)) << 12;
}
__device__ __forceinline__ void dequant_group6(uint32_t a, uint32_t e, uint32_t sel, __half2 (&out)[4]) {
  constexpr uint32_t kField = 0x3fu | 0x3fu << 16;
  const uint32_t r = prmt(a, e, sel);  // [A byte 1, E0, A byte 3, E1]
  out[0] = magic_to_half2<5, 0, 0>(lop3<kAndOr>(a, kField, kMagic2));
  out[1] = magic_to_half2<5, 0, 0>(lop3<kAndOr>(a >> 6, kField, kMagic2));
  out[2] = magic_to_half2<5, 2, 2>(lop3<kAndOr>(r >> 8, kField << 2, kMagic2));
  out[3] = magic_to_half2<5, 4, 4>(lop3<kAndOr>(r, kField << 4, kMagic2));
}

// Pairs 4G..4G+3 of a 5-bit tile from a = its word G and x = its word 4, with G's selector sel5(G).
__host__ __device__ constexpr uint32_t sel5(int g) {
  return uint32_t(4 + g) | 9u << 4 | 11u << 8 | uint32_t(4 + g) << 12;  // [X, sign(A.b1), sign(A.b3), X]
}
__device__ __forceinline__ void dequant_group5(uint32_t a, uint32_t x, uint32_t sel, __half2 (&out)[4]) {
  constexpr uint32_t kField = 0x1fu | 0x1fu << 16;
  const uint32_t u = prmt(a, x, sel);
  out[0] = magic_to_half2<4, 0, 0>(lop3<kAndOr>(a, kField, kMagic2));
  out[1] = magic_to_half2<4, 5, 5>(lop3<kAndOr>(a, kField << 5, kMagic2));
  out[2] = magic_to_half2<4, 2, 2>(lop3<kAndOr>(a >> 8, kField << 2, kMagic2));
  out[3] = magic_to_half2<4, 1, 4>(lop3<kAndOr>(u >> 3, 0x1fu << 1 | 0x1fu << 20, kMagicAt<1, 4>));
}

// The lane-byte widths through one interface: which two of a tile's words group G reads (its own, and the one it
// shares with a neighbouring group), its PRMT selectors (set once per lane: they depend on G, not on the data),
// and the pairs from the two words.
template <int B>
struct LaneBytes;
template <>
struct LaneBytes<3> {
  struct Sel {
    uint32_t v, u;
  };
  __host__ __device__ static constexpr int own_word(int g) { return g >> 1; }
  __host__ __device__ static constexpr int shared_word(int) { return 2; }
  __host__ __device__ static constexpr Sel selectors(int g) { return {sel3_v(g), sel3_u(g)}; }
  __device__ static __forceinline__ void dequant(uint32_t a, uint32_t b, Sel s, __half2 (&out)[4]) {
    dequant_group3(a, b, s.v, s.u, out);
  }
};
template <>
struct LaneBytes<5> {
  struct Sel {
    uint32_t v;
  };
  __host__ __device__ static constexpr int own_word(int g) { return g; }
  __host__ __device__ static constexpr int shared_word(int) { return 4; }
  __host__ __device__ static constexpr Sel selectors(int g) { return {sel5(g)}; }
  __device__ static __forceinline__ void dequant(uint32_t a, uint32_t b, Sel s, __half2 (&out)[4]) {
    dequant_group5(a, b, s.v, out);
  }
};
template <>
struct LaneBytes<6> {
  struct Sel {
    uint32_t v;
  };
  __host__ __device__ static constexpr int own_word(int g) { return g; }
  __host__ __device__ static constexpr int shared_word(int g) { return 4 + (g >> 1); }
  __host__ __device__ static constexpr Sel selectors(int g) { return {sel6(g)}; }
  __device__ static __forceinline__ void dequant(uint32_t a, uint32_t b, Sel s, __half2 (&out)[4]) {
    dequant_group6(a, b, s.v, out);
  }
};

// dequant_group for the planar widths (2, 4, 8).
template <int B, int G>
__device__ __forceinline__ void dequant_group_planar(const uint32_t (&w)[B], __half2 (&out)[4]) {
  static_assert(!lane_bytes(B), "planar widths only");
  constexpr int kLo = B, kNorm = B - 1;
  static_for<4>([&](auto ic) {
    constexpr int I = decltype(ic)::value;
    using L = PlanarPair<B, G, I>;
    uint32_t lm;  // 1024 + code * 2^pos in each half
    if constexpr (kLo == 8) {
      // Bytes k and k + 2 of the word under 0x64 bytes: PRMT builds both magic halves in one instruction.
      lm = __byte_perm(w[L::word], 0x64646464u, L::k == 0 ? 0x4240u : 0x4341u);
    } else {
      constexpr uint32_t field = (1u << kLo) - 1u;
      lm = lop3<kAndOr>(w[L::word] >> L::shift, field << L::pos | field << (16 + L::pos), kMagic2);
    }
    out[I] = magic_to_half2<kNorm, L::pos, L::pos>(lm);
  });
}

// Pairs 4G..4G+3 of one column's tile (w: its B words) as (q - z) * 2^-(B-1) in half2.
template <int B, int G>
__device__ __forceinline__ void dequant_group(const uint32_t (&w)[B], __half2 (&out)[4]) {
  if constexpr (lane_bytes(B)) {
    using L = LaneBytes<B>;
    L::dequant(w[L::own_word(G)], w[L::shared_word(G)], L::selectors(G), out);
  } else {
    dequant_group_planar<B, G>(w, out);
  }
}

// The 4 group scales of a thread's columns (4 scale codes in the low 16 bits of `codes`, column c at bits 4c)
// as fp32 s[c] = fp16(fp16((code + 1)^2) * scale_max) * 2^(B-1): the fp16 product is rounded exactly as
// exllamav2 (and mixq.exl2.reference.group_scales) forms it; the 2^(B-1) undoes dequant_group's normalisation.
// Codes become fp16 by the same magic: code c0 at bit 0 and c1 at bit 20 (4 in the high half), c2 and c3 the
// same after a shift by 8.
template <int B>
__device__ __forceinline__ void tile_scales(uint32_t codes, __half scale_max, float (&s)[kColsPerThread]) {
  const uint32_t dup = __byte_perm(codes, 0u, 0x1010u);  // the 16 code bits in both halves
  constexpr uint32_t kMask = 0x000Fu | 0x00F0u << 16;
  constexpr uint32_t c = half2_bits(fp16_bits(1, 0), fp16_bits(1, -4));
  constexpr uint32_t d = half2_bits(fp16_bits(-1023, 0), fp16_bits(-63, 0));  // (1024 + v) - 1023 = v + 1
  const __half2 sm = __half2half2(scale_max);
  const __half2 c2 = bits_as_half2(c), d2 = bits_as_half2(d);
  const __half2 p01 = __hfma2(bits_as_half2(lop3<kAndOr>(dup, kMask, kMagic2)), c2, d2);
  const __half2 p23 = __hfma2(bits_as_half2(lop3<kAndOr>(dup >> 8, kMask, kMagic2)), c2, d2);
  const float2 s01 = __half22float2(__hmul2(__hmul2(p01, p01), sm));  // (code + 1)^2 <= 256: exact
  const float2 s23 = __half22float2(__hmul2(__hmul2(p23, p23), sm));
  constexpr float kDenorm = float(1 << (B - 1));
  s[0] = s01.x * kDenorm;
  s[1] = s01.y * kDenorm;
  s[2] = s23.x * kDenorm;
  s[3] = s23.y * kDenorm;
}

}  // namespace mixq::exl2
