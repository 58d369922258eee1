// Paged decode attention (flash-decoding) over a block-table KV cache. No torch headers.
//
// Must match mixq.kernels.paged_attention.paged_decode_attention_ref (gather pages, mixq.model.mixtral.sdpa).
// Layout: q/out [B, Tq, Hq, D] contiguous; k/v cache rows as in kv_format.cuh; block_tables [B, max_pages]
// int32; seq_lens [B] int32 counts the tokens in the cache including this step's Tq new ones, so query i of
// sequence b sits at position seq_lens[b] - Tq + i and attends causally (and within `window` if > 0).
// Grid: (partitions, kv_heads, B). One CTA owns one KV head of one sequence and a partition of
// partition_size tokens (<= 512), and handles all R = Tq * (Hq / Hkv) query rows of that head, so K/V are read once.
// CTA = 4 warps. Tokens stream through shared memory in tiles of kTile = 32 with cp.async, two stages deep.
// Per tile (three barriers: tile landed / scores written / p written):
//   scores:  the tile's tokens are split across the warps, 8 each (kTokPerWarp), and each token's row across 4
//            lanes (kSlices): lane = slice * 8 + token, slice = a quarter of D (8, 16 or 32 values; inside one
//            32-value quantization group). Each K value is decoded once per CTA (not once per warp), into
//            registers, and dotted with every query row of the CTA; a Q-mode partial dot is over raw centred
//            codes and multiplied by its group scale once; 2 shuffles sum the 4 slices. q (fp32, pre-scaled by
//            scale * log2 e, Hadamard-rotated for Q modes) is read from shared memory, 8 lanes per address.
//            Raw scores go to shared memory as [token][row].
//   softmax: online, fp32, exp2 domain; warp w owns rows w, w+4, ... with lane = token (masking here).
//   P.V:     thread = (value pair, token split); fp32 accumulators for every row in registers.
// Decoding (kv_format.cuh): q4/q8 by fp16 magic numbers (LOP3/PRMT + one HFMA2 per two values), fp8 by the
// paired e4m3x2 conversion, then widened to fp32.
// With more than one partition, each CTA writes its normalised partial output and (max, sum) to fp32
// scratch, and the last CTA of its (sequence, KV head) to finish combines the partitions that hold tokens
// (bounded by the real seq_len, read on the device; common/split_k.cuh): no reduce kernel. With one partition
// a CTA writes `out` directly.
// Limits: D in {32, 64, 128}; R <= kMaxRows; sm_80+ (cp.async).
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention/kv_format.cuh"
#include "common/cp_async.cuh"
#include "common/split_k.cuh"
#include "common/cuda_utils.cuh"

namespace mixq::attn {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;         // tokens per pipeline stage
constexpr int kTokPerWarp = kTile / kWarps;  // score phase: tokens of a tile decoded by one warp
constexpr int kSlices = 32 / kTokPerWarp;    // score phase: lanes sharing one token's row
constexpr int kMaxPartition = 512;  // tokens per CTA along the sequence (the host may halve it, down to
constexpr int kMinPartition = 64;   // kMinPartition, when too few CTAs would fill the GPU)
constexpr int kRowPad = 16;       // bytes of padding per shared row: 16-byte loads by 8 lanes hit 8 bank quads
constexpr float kLog2e = 1.4426950408889634f;

struct PagedDecodeParams {
  const void* q;             // [B, Tq, Hq, D]
  const uint8_t* k_cache;    // rows of the stored format
  const uint8_t* v_cache;
  const __half* k_scales;    // Q modes: [slots, Hkv, D / 32]
  const __half* v_scales;
  const int* block_tables;   // [B, max_pages]
  const int* seq_lens;       // [B]
  void* out;                 // [B, Tq, Hq, D]
  float* part_out;           // [B, Tq, Hq, P, D] (only when P > 1)
  float* part_ml;            // [B, Tq, Hq, P, 2] running max (log2 domain) and sum
  int* counters;             // [B, Hkv] split-K arrival counters, zeroed (only when P > 1)
  int64_t k_token_stride, k_head_stride;  // bytes
  int64_t v_token_stride, v_head_stride;
  int64_t ks_token_stride, ks_head_stride;  // elements of the scale tensors
  int64_t vs_token_stride, vs_head_stride;
  int q_tokens, q_heads, kv_heads, max_pages, page_size, num_partitions, partition_size, window;
  float q_scale;   // softmax scale * log2 e * k_scale
  float v_scale;
};

// Shared-memory plan of one CTA (bytes); also used by the host to size the launch.
template <typename scalar_t, CacheMode kMode, int kHeadDim, int kMaxRows>
struct DecodeSmem {
  static constexpr int kRowBytes = row_bytes<kMode, kHeadDim, sizeof(scalar_t)>();
  static constexpr int kRowStride = kRowBytes + kRowPad;
  static constexpr int kGroups = kHeadDim / kQuantGroup;
  static constexpr int kScaleRow = is_quant(kMode) ? kGroups : 0;  // halves per token
  static constexpr int kKv = 2 * 2 * kTile * kRowStride;              // [stage][k|v][token][row]
  static constexpr int kScales = (2 * 2 * kTile * kScaleRow * 2 + 15) / 16 * 16;
  // q rows as the score phase reads them: each of the kSlices slices of a row padded by 4 floats, so that the
  // 4 addresses of one float4 load (one per slice, 8 lanes each) fall in different bank quads (slice strides
  // of 12, 20, 36 floats = 3, 5, 9 quads are distinct mod 8); later the output rows, unpadded.
  static constexpr int kSliceVals = kHeadDim / kSlices;
  static constexpr int kQSlice = kSliceVals + 4;
  static constexpr int kQStride = kSlices * kQSlice;
  static constexpr int kQ = kMaxRows * kQStride * 4;
  // Raw scores, then p, as [token][row]; rows padded by 4 floats: keeps float4 reads aligned, cuts the
  // lane-strided accesses of the softmax to 4-way conflicts (the score phase's 8-lane writes have none).
  static constexpr int kPStride = kMaxRows + 4;
  static constexpr int kP = kTile * kPStride * 4;
  static constexpr int kStats = 3 * kMaxRows * 4;                     // alpha, m, l
  static constexpr int kOffScales = kKv;
  static constexpr int kOffQ = kOffScales + kScales;
  static constexpr int kOffP = kOffQ + kQ;
  static constexpr int kOffStats = kOffP + kP;
  static constexpr int kBytes = kOffStats + kStats;
};

// Four output values (d4 .. d4 + 3) of a query row from its partitions 0..used-1 (P allocated): partitions whose
// sum is 0 (no visible tokens) are skipped; a row with none at all gets 0. Vectorised over d and unrolled over
// partitions so a thread keeps 8 loads in flight: the fix-up is latency-bound (one CTA per head), not byte-bound.
// Reads with __ldcg: other CTAs wrote them (split_k.cuh).
__device__ __forceinline__ float4 combine_partitions(const float* part_out, const float* part_ml, int64_t row,
                                                     int used, int num_partitions, int head_dim, int d4) {
  const float2* ml = reinterpret_cast<const float2*>(part_ml + row * num_partitions * 2);
  float m = -INFINITY;
#pragma unroll 8
  for (int i = 0; i < used; ++i) {
    const float2 v = __ldcg(ml + i);
    if (v.y > 0.0f) m = fmaxf(m, v.x);
  }
  float4 num = make_float4(0.f, 0.f, 0.f, 0.f);
  float den = 0.0f;
#pragma unroll 8
  for (int i = 0; i < used; ++i) {
    const float2 v = __ldcg(ml + i);
    const float4 o = __ldcg(reinterpret_cast<const float4*>(part_out + (row * num_partitions + i) * head_dim + d4));
    if (v.y > 0.0f) {
      const float w = v.y * exp2f(v.x - m);
      num.x = fmaf(w, o.x, num.x), num.y = fmaf(w, o.y, num.y);
      num.z = fmaf(w, o.z, num.z), num.w = fmaf(w, o.w, num.w);
      den += w;
    }
  }
  const float inv = den > 0.0f ? 1.0f / den : 0.0f;
  return make_float4(num.x * inv, num.y * inv, num.z * inv, num.w * inv);
}

template <typename scalar_t, CacheMode kMode, int kHeadDim, int kMaxRows>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(const PagedDecodeParams p) {
  using Smem = DecodeSmem<scalar_t, kMode, kHeadDim, kMaxRows>;
  static_assert(kHeadDim == 32 || kHeadDim == 64 || kHeadDim == 128, "head_dim");
  static_assert(kMaxRows % kWarps == 0, "rows per warp");
  static_assert(kTokPerWarp * kWarps == kTile && kTokPerWarp * kSlices == 32, "score-phase lane map");
  constexpr int kRowsPerWarp = kMaxRows / kWarps;  // softmax rows of one warp
  constexpr int kChunks = Smem::kRowBytes / 16;    // 16-byte chunks per stored row
  constexpr int kPairs = kHeadDim / 2;
  constexpr int kSplits = kThreads / kPairs;       // token splits in the P.V phase
  constexpr bool kQuant = is_quant(kMode);
  // Score phase: one lane's slice of its token's row.
  constexpr int kSliceVals = Smem::kSliceVals;     // 8, 16 or 32 values
  constexpr int kSliceBytes = Smem::kRowBytes / kSlices;  // 4 (q4, D 32) .. 64 (fp16, D 128)
  constexpr int kSliceWords = kSliceBytes / 4;
  constexpr int kWordVals = kValsPerWord<kMode>;
  static_assert(kSliceWords * kWordVals == kSliceVals && kSliceVals % 4 == 0, "slice");
  // A slice never straddles two quantization groups, so its partial dot has a single scale.
  static_assert(kQuantGroup % kSliceVals == 0, "slice inside one scale group");

  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* kv_s = smem;
  __half* sc_s = reinterpret_cast<__half*>(smem + Smem::kOffScales);
  float* q_s = reinterpret_cast<float*>(smem + Smem::kOffQ);
  float* p_s = reinterpret_cast<float*>(smem + Smem::kOffP);
  float* alpha_s = reinterpret_cast<float*>(smem + Smem::kOffStats);
  float* m_s = alpha_s + kMaxRows;
  float* l_s = m_s + kMaxRows;

  const int part = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = p.q_heads / p.kv_heads;
  const int rows = p.q_tokens * group;
  const int seq_len = p.seq_lens[b];
  const int first_q = seq_len - p.q_tokens;  // position of query token 0
  int lo = p.window > 0 ? max(0, first_q - p.window + 1) : 0;
  lo = max(lo, part * p.partition_size);
  // Never read past the block table, whatever seq_lens says (the reference raises there instead).
  const int hi = min(min(seq_len, p.max_pages * p.page_size), (part + 1) * p.partition_size);
  const int* table = p.block_tables + static_cast<int64_t>(b) * p.max_pages;

  // q rows -> shared fp32 in the padded slice layout (Smem::kQStride), pre-scaled (and rotated for Q modes:
  // one warp per 32-value group, the butterfly in registers, so no barrier between load and rotation).
  const scalar_t* q = static_cast<const scalar_t*>(p.q);
  auto q_index = [](int r, int d) { return r * Smem::kQStride + d / kSliceVals * Smem::kQSlice + d % kSliceVals; };
  auto q_offset = [&](int r, int d) {
    const int qi = r / group, h = kvh * group + r % group;
    return ((static_cast<int64_t>(b) * p.q_tokens + qi) * p.q_heads + h) * kHeadDim + d;
  };
  if constexpr (kQuant) {
    for (int g = warp; g < rows * Smem::kGroups; g += kWarps) {  // warp-uniform
      const int r = g / Smem::kGroups, d = g % Smem::kGroups * kQuantGroup + lane;
      const float x = to_float(q[q_offset(r, d)]) * p.q_scale;
      q_s[q_index(r, d)] = warp_hadamard32(x) * QuantCode<kMode>::kInvRotation;
    }
  } else {
    for (int i = tid; i < rows * kHeadDim; i += kThreads) {
      const int r = i / kHeadDim, d = i % kHeadDim;
      q_s[q_index(r, d)] = to_float(q[q_offset(r, d)]) * p.q_scale;
    }
  }

  float m_run[kRowsPerWarp], l_run[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) m_run[i] = -INFINITY, l_run[i] = 0.0f;
  float acc[kMaxRows][2];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) acc[r][0] = acc[r][1] = 0.0f;
  const int pair = tid % kPairs, split = tid / kPairs;
  // Score-phase lane map: lanes 0-7 hold slice 0 of the warp's 8 tokens, lanes 8-15 slice 1, ... so that the
  // 8 lanes of one shared-memory phase read one q address (broadcast) and 8 K rows in distinct bank quads
  // (row stride = 16 * odd bytes, kRowPad).
  const int s_tok = warp * kTokPerWarp + lane % kTokPerWarp, slice = lane / kTokPerWarp;

  auto issue_tile = [&](int start, int stage) {
    for (int c = tid; c < 2 * kTile * kChunks; c += kThreads) {
      const int which = c / (kTile * kChunks);  // 0 = K, 1 = V
      const int t = (c / kChunks) % kTile, ch = c % kChunks;
      const int j = start + t;
      const bool ok = j < hi;
      const uint8_t* src = which ? p.v_cache : p.k_cache;
      if (ok) {
        const int64_t slot = static_cast<int64_t>(table[j / p.page_size]) * p.page_size + j % p.page_size;
        src += slot * (which ? p.v_token_stride : p.k_token_stride) +
               kvh * (which ? p.v_head_stride : p.k_head_stride) + ch * 16;
      }
      cp_async16(kv_s + ((stage * 2 + which) * kTile + t) * Smem::kRowStride + ch * 16, src, ok);
    }
    if constexpr (kQuant) {
      constexpr int kScaleBytes = Smem::kGroups * 2;
      if (tid < 2 * kTile) {
        const int which = tid / kTile, t = tid % kTile, j = start + t;
        const bool ok = j < hi;
        const __half* src = which ? p.v_scales : p.k_scales;
        if (ok) {
          const int64_t slot = static_cast<int64_t>(table[j / p.page_size]) * p.page_size + j % p.page_size;
          src += slot * (which ? p.vs_token_stride : p.ks_token_stride) +
                 kvh * (which ? p.vs_head_stride : p.ks_head_stride);
        }
        __half* dst = sc_s + ((stage * 2 + which) * kTile + t) * Smem::kScaleRow;
        if constexpr (kScaleBytes >= 4) {
          cp_async_small<kScaleBytes>(dst, src, ok);
        } else {  // head_dim 32: one 2-byte scale, below cp.async's 4-byte minimum; the same barrier orders it
          *dst = ok ? *src : __float2half(0.0f);
        }
      }
    }
    cp_async_commit();
  };

  // Pipeline: tile t + 1 is issued right after the barrier that publishes tile t. That barrier also retires
  // every read of the other stage (P.V of tile t - 1), so one barrier serves both, and tile t + 1 still
  // loads while tile t is computed; at most one copy group is in flight, hence wait_group 0.
  const int num_tiles = hi > lo ? (hi - lo + kTile - 1) / kTile : 0;
  if (num_tiles > 0) issue_tile(lo, 0);
  for (int tile = 0; tile < num_tiles; ++tile) {
    const int stage = tile & 1, start = lo + tile * kTile;
    cp_async_wait<0>();
    __syncthreads();  // tile landed for everyone; the other stage, p_s and alpha_s are free
    if (tile + 1 < num_tiles) issue_tile(start + kTile, stage ^ 1);

    // Scores: this lane's slice of token s_tok, decoded once, dotted with every query row.
    {
      const uint8_t* krow = kv_s + ((stage * 2 + 0) * kTile + s_tok) * Smem::kRowStride + slice * kSliceBytes;
      uint32_t w[kSliceWords];
      if constexpr (kSliceBytes >= 16) {
#pragma unroll
        for (int i = 0; i < kSliceWords / 4; ++i) {
          const uint4 u = reinterpret_cast<const uint4*>(krow)[i];
          w[4 * i] = u.x, w[4 * i + 1] = u.y, w[4 * i + 2] = u.z, w[4 * i + 3] = u.w;
        }
      } else if constexpr (kSliceBytes == 8) {
        const uint2 u = *reinterpret_cast<const uint2*>(krow);
        w[0] = u.x, w[1] = u.y;
      } else {
        w[0] = *reinterpret_cast<const uint32_t*>(krow);
      }
      float kv[kSliceVals];
#pragma unroll
      for (int i = 0; i < kSliceWords; ++i) decode_word<scalar_t, kMode>(w[i], kv + i * kWordVals);
      float ksc = 1.0f;
      if constexpr (kQuant)
        ksc = __half2float(sc_s[((stage * 2 + 0) * kTile + s_tok) * Smem::kScaleRow + slice * kSliceVals / kQuantGroup]);
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        if (r < rows) {  // block-uniform
          const float4* qv = reinterpret_cast<const float4*>(q_s + r * Smem::kQStride + slice * Smem::kQSlice);
          // Two chains of FFMAs (even / odd float4) halve the dependent latency of one row.
          float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
          for (int v = 0; v < kSliceVals / 4; ++v) {
            const float4 qq = qv[v];
            float& sv = (v & 1) ? s1 : s0;
            sv = fmaf(qq.x, kv[4 * v], sv);
            sv = fmaf(qq.y, kv[4 * v + 1], sv);
            sv = fmaf(qq.z, kv[4 * v + 2], sv);
            sv = fmaf(qq.w, kv[4 * v + 3], sv);
          }
          float sr = s0 + s1;
          if constexpr (kQuant) sr *= ksc;  // the group scale, once per partial dot product
          sr += __shfl_xor_sync(0xffffffffu, sr, 8);   // sum the 4 slices of the token
          sr += __shfl_xor_sync(0xffffffffu, sr, 16);  // (lanes tok, tok + 8, tok + 16, tok + 24)
          if (slice == 0) p_s[s_tok * Smem::kPStride + r] = sr;
        }
      }
    }
    __syncthreads();  // raw scores of the whole tile

    // Online softmax: lane = token, warp owns rows warp + kWarps * i; masking (partial tile, causal, window).
    {
      const int j = start + lane;
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int r = warp + kWarps * i;
        if (r < rows) {  // warp-uniform
          const int qpos = first_q + r / group;
          const bool ok = j < hi && j <= qpos && (p.window <= 0 || qpos - j < p.window);
          float* ps = p_s + lane * Smem::kPStride + r;
          const float si = ok ? *ps : -INFINITY;
          const float m_new = fmaxf(m_run[i], warp_max(si));
          const float pr = m_new == -INFINITY ? 0.0f : exp2f(si - m_new);
          const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m_run[i] - m_new);
          l_run[i] = l_run[i] * alpha + warp_sum(pr);
          m_run[i] = m_new;
          *ps = pr;
          if (lane == 0) alpha_s[r] = alpha;
        }
      }
    }
    __syncthreads();  // p and alpha of every row

    // P.V: thread owns value pair `pair` for all rows over the tokens split, split + kSplits, ...
    // (Q modes: the scale multiplies the decoded pair, 2 FMULs per token; folding it into p instead would
    // cost one multiply per row.)
    {
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        if (r < rows) {
          const float a = alpha_s[r];
          acc[r][0] *= a;
          acc[r][1] *= a;
        }
      }
      for (int t = split; t < kTile; t += kSplits) {
        const uint8_t* vrow = kv_s + ((stage * 2 + 1) * kTile + t) * Smem::kRowStride;
        float2 v = decode_pair<scalar_t, kMode>(vrow, pair);
        if constexpr (kQuant) {
          const float sc = __half2float(sc_s[((stage * 2 + 1) * kTile + t) * Smem::kScaleRow + 2 * pair / kQuantGroup]);
          v.x *= sc;
          v.y *= sc;
        }
        const float4* pv = reinterpret_cast<const float4*>(p_s + t * Smem::kPStride);
#pragma unroll
        for (int r4 = 0; r4 < kMaxRows / 4; ++r4) {
          if (4 * r4 < rows) {
            const float4 pp = pv[r4];
            acc[4 * r4][0] = fmaf(pp.x, v.x, acc[4 * r4][0]);
            acc[4 * r4][1] = fmaf(pp.x, v.y, acc[4 * r4][1]);
            acc[4 * r4 + 1][0] = fmaf(pp.y, v.x, acc[4 * r4 + 1][0]);
            acc[4 * r4 + 1][1] = fmaf(pp.y, v.y, acc[4 * r4 + 1][1]);
            acc[4 * r4 + 2][0] = fmaf(pp.z, v.x, acc[4 * r4 + 2][0]);
            acc[4 * r4 + 2][1] = fmaf(pp.z, v.y, acc[4 * r4 + 2][1]);
            acc[4 * r4 + 3][0] = fmaf(pp.w, v.x, acc[4 * r4 + 3][0]);
            acc[4 * r4 + 3][1] = fmaf(pp.w, v.y, acc[4 * r4 + 3][1]);
          }
        }
      }
    }
  }

  // Epilogue: running stats to shared, accumulators summed over token splits into q_s (now free).
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp + kWarps * i;
      if (r < rows) m_s[r] = m_run[i], l_s[r] = l_run[i];
    }
  }
  __syncthreads();  // q_s reads of the prologue (no tiles) are finished too
  for (int sp = 0; sp < kSplits; ++sp) {
    if (split == sp) {
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        if (r < rows) {
          float2* o = reinterpret_cast<float2*>(q_s + r * kHeadDim) + pair;
          if (sp == 0) {
            *o = make_float2(acc[r][0], acc[r][1]);
          } else {
            o->x += acc[r][0];
            o->y += acc[r][1];
          }
        }
      }
    }
    __syncthreads();
  }
  if constexpr (kQuant) {
    for (int g = warp; g < rows * Smem::kGroups; g += kWarps)
      q_s[g * 32 + lane] = warp_hadamard32(q_s[g * 32 + lane]) * QuantCode<kMode>::kInvRotation;
    __syncthreads();
  }

  const bool split_out = p.num_partitions > 1;
  for (int i = tid; i < rows * kHeadDim; i += kThreads) {
    const int r = i / kHeadDim, d = i % kHeadDim;
    const int qi = r / group, h = kvh * group + r % group;
    const float l = l_s[r];
    const float val = l > 0.0f ? q_s[i] / l * p.v_scale : 0.0f;
    const int64_t row = (static_cast<int64_t>(b) * p.q_tokens + qi) * p.q_heads + h;
    if (split_out) {
      p.part_out[(row * p.num_partitions + part) * kHeadDim + d] = val;
      if (d == 0) {
        p.part_ml[(row * p.num_partitions + part) * 2] = m_s[r];
        p.part_ml[(row * p.num_partitions + part) * 2 + 1] = l;
      }
    } else {
      static_cast<scalar_t*>(p.out)[row * kHeadDim + d] = from_float<scalar_t>(val);
    }
  }
  if (!split_out || !split_k_arrive(p.counters + static_cast<int64_t>(b) * p.kv_heads + kvh, p.num_partitions))
    return;
  // The last partition CTA of this head: combine the partitions that can hold tokens, in partition order.
  const int used = min(p.num_partitions, ceil_div(min(seq_len, p.max_pages * p.page_size), p.partition_size));
  for (int i = tid; i < rows * kHeadDim / 4; i += kThreads) {
    const int r = i / (kHeadDim / 4), d4 = i % (kHeadDim / 4) * 4;
    const int qi = r / group, h = kvh * group + r % group;
    const int64_t row = (static_cast<int64_t>(b) * p.q_tokens + qi) * p.q_heads + h;
    const float4 v = combine_partitions(p.part_out, p.part_ml, row, used, p.num_partitions, kHeadDim, d4);
    scalar_t* o = static_cast<scalar_t*>(p.out) + row * kHeadDim + d4;
    o[0] = from_float<scalar_t>(v.x), o[1] = from_float<scalar_t>(v.y);
    o[2] = from_float<scalar_t>(v.z), o[3] = from_float<scalar_t>(v.w);
  }
}

// Launch (host side, no torch): the caller fills `p`, with the scratch and counters when num_partitions > 1.
template <typename scalar_t, CacheMode kMode, int kHeadDim, int kMaxRows>
cudaError_t launch_paged_decode(const PagedDecodeParams& p, int batch, cudaStream_t stream) {
  using Smem = DecodeSmem<scalar_t, kMode, kHeadDim, kMaxRows>;
  auto kernel = paged_decode_kernel<scalar_t, kMode, kHeadDim, kMaxRows>;
  if constexpr (Smem::kBytes > 48 * 1024) {
    const cudaError_t e = raise_smem_limit<paged_decode_kernel<scalar_t, kMode, kHeadDim, kMaxRows>>(Smem::kBytes);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(p.num_partitions, p.kv_heads, batch);
  kernel<<<grid, kThreads, Smem::kBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace mixq::attn
