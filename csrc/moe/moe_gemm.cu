// Grouped EXL2 expert matmul for a top-k routed batch: one launch computes every active expert's gate (w1) and
// up (w3) projections, one launch its down projection (w2). Each CTA writes fp32 split-K partials; the last CTA to
// finish an output tile (common/split_k.cuh) sums them in split order and applies the epilogue: SiLU(gate) * up
// for gate/up; for down in decode, the routing weights, the top-k sum and the residual, so a decode MoE layer is
// two launches. Down in aligned mode (prefill) leaves the partials to finalize_kernel. No host sync.
//
// Mapping: grid.x = 512-column N-blocks (128 threads x 4 columns, the planar-tile loads of exl2/gemm.cu),
// grid.y = projection x split-K range (any tile range: a CTA walks the width segments it crosses, staging x
// in shared memory 32 tiles at a time), grid.z = row block (one expert, block_m <= 8 rows; see moe_kernels.h).
// Each CTA derives its expert and rows on the device; a block without an expert skips the math but still writes
// (zero) partials and arrives at the fix-up, whose count includes every CTA of the tile.
// Reading weights: once per row block, i.e. once per step in decode (an expert's tokens share one block).
// Weight words stream through the cp.async ring of exl2/weight_ring.cuh, two tiles ahead, restarted per width
// segment; each chunk's first loads are issued before its x is staged.
// Must match: mixq.kernels.moe.moe_experts_ref (fp32 accumulation; rel. error <= 2e-3, two fp16-partial GEMMs).
// Activations: x of gate/up and y/residual of down fp16 or bf16 (common/activation.cuh); the intermediate is fp16.
// Math: mma.sync m16n8k16 with the weights as A and a block's <= 8 rows as B (exl2/gemm_tiles.cuh), fp32 sums.
// Not tuned: prefill re-reads an expert's weights per 8-row block.

#include <math.h>

#include "common/activation.cuh"
#include "common/cuda_utils.cuh"
#include "common/split_k.cuh"
#include "exl2/dequant.cuh"
#include "exl2/gemm_tiles.cuh"
#include "moe/moe_kernels.h"

namespace mixq {
namespace {

using exl2::kColsPerThread;
using exl2::kTileRows;

constexpr int kThreads = 128;  // launch bounds 3 CTAs/SM (<= 168 registers; ptxas sm_90 ~165, no spills)
static_assert(kThreads == exl2::kRingThreads, "the weight ring's slots assume the CTA size");
constexpr int kChunkTiles = 32;  // x staged per chunk: 8 rows * 32 tiles * 32 rows * 2 B = 16 KB
constexpr int kChunkRows = kChunkTiles * kTileRows;

__device__ __forceinline__ uint64_t experts_present(const MoeRouting& r) {
  uint64_t present = 0;
  const int n = r.num_tokens * r.top_k;
  for (int i = 0; i < n; ++i) {
    const int e = r.topk_ids[i];
    if (e >= 0 && e < r.num_experts) present |= 1ull << e;
  }
  return present;
}

// Row (z * block_m + rank) of assignment i in decode mode, or -1.
__device__ int decode_row(const MoeRouting& r, int i) {
  const int e = r.topk_ids[i];
  if (e < 0 || e >= r.num_experts) return -1;
  const uint64_t below = e == 0 ? 0ull : (experts_present(r) & ((1ull << e) - 1ull));
  int rank = 0;
  for (int i2 = 0; i2 < i; ++i2) rank += r.topk_ids[i2] == e;
  return rank < r.block_m ? __popcll(below) * r.block_m + rank : -1;
}

// Thread 0 fills the block's expert (-1: idle) and its rows' flat assignment indices (-1: empty).
template <int MT>
__device__ void block_rows(const MoeRouting& r, int z, int* s_expert, int* s_rows) {
  if (threadIdx.x != 0) return;
  const int n = r.num_tokens * r.top_k;
  int expert = -1;
  for (int i = 0; i < MT; ++i) s_rows[i] = -1;
  if (r.sorted_ids != nullptr) {
    expert = r.block_expert[z];
    if (expert >= r.num_experts) expert = -1;
    if (expert >= 0) {
      for (int i = 0; i < MT; ++i) {
        const int f = r.sorted_ids[z * MT + i];
        s_rows[i] = (f >= 0 && f < n) ? f : -1;
      }
    }
  } else {
    const uint64_t present = experts_present(r);
    int s = z;
    for (int e = 0; e < r.num_experts; ++e) {
      if (!((present >> e) & 1ull)) continue;
      if (s == 0) {
        expert = e;
        break;
      }
      --s;
    }
    if (expert >= 0) {
      int c = 0;
      for (int i = 0; i < n && c < MT; ++i)
        if (r.topk_ids[i] == expert) s_rows[c++] = i;
    }
  }
  *s_expert = expert;
}

struct GemmArgs {
  MoeExl2Proj proj[2];  // gate, up (num_proj = 2) or down (num_proj = 1)
  int num_proj, splits, tiles_per_split;
  const void* x;        // gate/up: tokens [T, K] (the activation type); down: the intermediate rows [rows, K] fp16
  bool x_by_token;      // row of x: the token of the assignment (gate/up) or the block row itself (down)
  float* partial;       // [num_proj * splits, rows, N]
  int rows;             // num_blocks * block_m
  // The fix-up (nullptr: none, the partials are the output). gate/up: one counter per (N-block, row block), out =
  // inter [rows, N]. down in decode: one counter per N-block, out = y [T, N] from weights and residual.
  int* counters;
  void* out;                  // inter fp16 (gate/up) or y in the activation type (down)
  const float* topk_weights;  // down: [T, top_k]
  const void* residual;       // down: [T, N] in the activation type, or nullptr
};

// The weight ring (exl2/weight_ring.cuh) of the tiles of [lo, hi) of expert e's projection that lie in lo's width
// segment, not started (inactive: a thread whose columns lie outside the matrix, which copies nothing).
__device__ __forceinline__ exl2::WeightRing segment_ring(uint4* ring, const MoeExl2Proj& w, int e, int col4,
                                                        bool active, int lo, int hi) {
  const int seg = exl2::segment_of(w.sched, lo);
  const int h = min(hi, w.sched.tile_begin[seg + 1]);
  const int bits = w.sched.bits[seg];
  const int word_row = w.sched.word_row_begin[seg] + (lo - w.sched.tile_begin[seg]) * bits;
  const uint4* qweight = reinterpret_cast<const uint4*>(w.qweight + (size_t)e * w.word_rows * w.N);
  return exl2::WeightRing(ring, bits, qweight, word_row, w.N / kColsPerThread, col4, active ? h - lo : 0);
}

// Tiles [lo, hi) of one expert's projection (crossing width segments as needed), x staged at xs (8 rows); `ring`
// is lo's segment's, already started (the later segments' rings start here). acc: exl2::accumulate_tiles_mma's.
// Every thread of the CTA calls it (the MMA loop's warp barriers).
__device__ __forceinline__ void accumulate_range(float (&acc)[4][kColsPerThread][2], const MoeExl2Proj& w, int e,
                                                 int col4, bool active, int lo, int hi, const __half* xs,
                                                 uint4* ring_smem, exl2::WeightRing ring, float4* s_scale) {
  const int n4 = w.N / kColsPerThread;
  const int tiles = w.K / kTileRows;
  const uint16_t* qscale = reinterpret_cast<const uint16_t*>(w.qscale + (size_t)e * w.G * (w.N / 8));
  const __half* smax = w.scale_max + (size_t)e * w.G;
  const int32_t* tg = w.tile_group + (size_t)e * tiles;
  int seg = exl2::segment_of(w.sched, lo);
  const int base = lo;
  while (lo < hi) {
    const int seg_end = w.sched.tile_begin[seg + 1];
    const int h = hi < seg_end ? hi : seg_end;
    const int bits = w.sched.bits[seg];
    if (lo != base) {
      ring = segment_ring(ring_smem, w, e, col4, active, lo, hi);
      ring.start();
    }
    const __half* xt = xs + (lo - base) * kTileRows;
#define MIXQ_MOE_CASE(BITS)                                                                                   \
  case BITS:                                                                                                  \
    exl2::accumulate_tiles_mma<BITS>(acc, ring, qscale, smax, tg, n4, col4, active, lo, h, xt, kChunkRows,    \
                                     s_scale);                                                                \
    break;
    switch (bits) {
      MIXQ_MOE_CASE(8)
      MIXQ_MOE_CASE(6)
      MIXQ_MOE_CASE(5)
      MIXQ_MOE_CASE(4)
      MIXQ_MOE_CASE(3)
      MIXQ_MOE_CASE(2)
      default:
        break;  // rejected on the host
    }
#undef MIXQ_MOE_CASE
    lo = h;
    ++seg;
  }
}

// y[n..n+3] of one token = sum_j w[j] * row_j[n..n+3] (+ residual), j in order; a row is the sum over splits of
// its fp32 partials (split order) or an fp16 row (rows16). row_of[j] < 0: an assignment without a row (skipped).
template <typename T>
__device__ __forceinline__ void finalize_cols(const int* row_of, const float* w, int k, const float* partial,
                                              int splits, size_t plane, const __half* rows16, int H,
                                              const T* residual, T* y, int n) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int j = 0; j < k; ++j) {
    const int row = row_of[j];
    if (row < 0) continue;
    float v[4];
    if (rows16 != nullptr) {
      const __half2* src = reinterpret_cast<const __half2*>(rows16 + (size_t)row * H + n);
      const float2 a = __half22float2(src[0]), b = __half22float2(src[1]);
      v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
    } else {
      const float* src = partial + (size_t)row * H + n;
      float4 s = __ldcg(reinterpret_cast<const float4*>(src));  // __ldcg: written by other CTAs (split_k.cuh)
#pragma unroll 8  // independent loads ahead of the in-order adds (latency-bound)
      for (int sp = 1; sp < splits; ++sp) {
        const float4 q = __ldcg(reinterpret_cast<const float4*>(src + sp * plane));
        s.x += q.x, s.y += q.y, s.z += q.z, s.w += q.w;
      }
      v[0] = s.x, v[1] = s.y, v[2] = s.z, v[3] = s.w;
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[c] = fmaf(w[j], v[c], acc[c]);
  }
  if (residual != nullptr) {
    const float4 res = load4(residual + n);
    acc[0] += res.x, acc[1] += res.y, acc[2] += res.z, acc[3] += res.w;
  }
  store4(y + n, acc[0], acc[1], acc[2], acc[3]);
}

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

// gate/up fix-up: inter[row, n0..n0+3] = silu(gate) * up for the block's MT rows, both summed over splits.
template <int MT>
__device__ __forceinline__ void finish_gate_up(const GemmArgs& a, int z, int n0) {
  const int N = a.proj[0].N;
  const size_t plane = (size_t)a.rows * N;
#pragma unroll 1
  for (int t = 0; t < MT; ++t) {
    const int row = z * MT + t;
    const float* g = a.partial + (size_t)row * N + n0;
    const float* u = g + a.splits * plane;
    float4 gs = __ldcg(reinterpret_cast<const float4*>(g)), us = __ldcg(reinterpret_cast<const float4*>(u));
#pragma unroll 4  // x 2 streams: 8 loads in flight
    for (int s = 1; s < a.splits; ++s) {
      const float4 gv = __ldcg(reinterpret_cast<const float4*>(g + s * plane));
      const float4 uv = __ldcg(reinterpret_cast<const float4*>(u + s * plane));
      gs.x += gv.x, gs.y += gv.y, gs.z += gv.z, gs.w += gv.w;
      us.x += uv.x, us.y += uv.y, us.z += uv.z, us.w += uv.w;
    }
    store4(static_cast<__half*>(a.out) + (size_t)row * N + n0, silu(gs.x) * us.x, silu(gs.y) * us.y,
           silu(gs.z) * us.z, silu(gs.w) * us.w);
  }
}

// T: the activation type (x of gate/up, y and the residual of down); the intermediate rows are fp16.
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, 3)
    moe_gemm_kernel(const __grid_constant__ MoeRouting r, const __grid_constant__ GemmArgs a) {
  // x: 8 rows (the MMA loop's n8; rows past the block's MT are zeros), fp16 in each tile's pair order.
  __shared__ __align__(16) __half xs[8 * kChunkRows];
  extern __shared__ __align__(16) uint4 ring_smem[];  // the weight ring, sized for the widest width (launch)
  __shared__ float4 s_scale[kThreads];                // the MMA loop's per-tile column scales
  __shared__ int s_expert;
  __shared__ int s_rows[MT];
  __shared__ int s_xrow[MT];
  const int z = blockIdx.z;
  block_rows<MT>(r, z, &s_expert, s_rows);
  __syncthreads();
  // Uniform across the CTA; < 0: an idle block (no expert), whose rows are written as zeros so that no element
  // of the op's outputs is left unset (the later kernels never read them).
  const int e = s_expert;
  if (e >= 0 && threadIdx.x < MT) {
    const int f = s_rows[threadIdx.x];
    s_xrow[threadIdx.x] = f < 0 ? -1 : a.x_by_token ? f / r.top_k : z * MT + (int)threadIdx.x;
  }

  const int p = blockIdx.y / a.splits, split = blockIdx.y - p * a.splits;
  const MoeExl2Proj& w = a.proj[p];
  const int tiles = w.K / kTileRows;
  const int tile_lo = split * a.tiles_per_split;
  const int tile_hi = min(tiles, tile_lo + a.tiles_per_split);
  const int col4 = blockIdx.x * blockDim.x + threadIdx.x;
  const int n0 = col4 * kColsPerThread;
  const bool active = n0 < w.N;
  const int32_t* perm = w.perm && e >= 0 ? w.perm + (size_t)e * w.perm_stride : nullptr;

  float am[4][kColsPerThread][2] = {};
  for (int c_lo = tile_lo; e >= 0 && c_lo < tile_hi; c_lo += kChunkTiles) {
    const int c_hi = min(tile_hi, c_lo + kChunkTiles);
    const int row0 = c_lo * kTileRows, nrows = (c_hi - c_lo) * kTileRows;
    __syncthreads();  // s_xrow written / previous chunk consumed
    // The chunk's first weight loads go out before its x is staged: their latency overlaps the staging's.
    exl2::WeightRing ring = segment_ring(ring_smem, w, e, col4, active, c_lo, c_hi);
    ring.start();
    for (int idx = threadIdx.x; idx < 8 * nrows; idx += blockDim.x) {
      const int t = idx / nrows, rr = idx - t * nrows;
      const int xr = t < MT ? s_xrow[t] : -1;
      __half v = __float2half(0.f);  // empty rows read zeros; their outputs are written as zeros and never read
      if (xr >= 0) {
        const int k = row0 + rr;
        const size_t at = (size_t)xr * w.K + (perm ? perm[k] : k);
        v = a.x_by_token ? staged_half(static_cast<const T*>(a.x)[at]) : static_cast<const __half*>(a.x)[at];
      }
      // The chunk may cross width segments: each tile is staged in its own width's pair order.
      const int bits = w.sched.bits[exl2::segment_of(w.sched, c_lo + rr / kTileRows)];
      xs[t * kChunkRows + (rr & ~(kTileRows - 1)) + exl2::staged_row(bits, rr & (kTileRows - 1))] = v;
    }
    __syncthreads();
    accumulate_range(am, w, e, col4, active, c_lo, c_hi, xs, ring_smem, ring, s_scale);
  }
  float acc[8][kColsPerThread];  // rows MT..7 are the zero rows' (never stored)
  exl2::mma_to_rows(am, reinterpret_cast<float4*>(ring_smem), acc);  // every thread: warp barriers
  // Every CTA writes its partial, zeros for an idle block or an empty row (the epilogue reads them all).
  if (active) {
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      const size_t row = (size_t)z * MT + t;
      float4* dst = reinterpret_cast<float4*>(a.partial + (((size_t)p * a.splits + split) * a.rows + row) * w.N + n0);
      *dst = make_float4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
    }
  }
  if (a.counters == nullptr) return;  // down in aligned mode: finalize_kernel follows
  if (a.num_proj == 2) {
    // Both projections' splits of this (N-block, row block) arrive (grid.y).
    if (split_k_arrive(a.counters + blockIdx.z * gridDim.x + blockIdx.x, gridDim.y) && active)
      finish_gate_up<MT>(a, z, n0);
    return;
  }
  // down in decode: every (split, row block) of this N-block arrives; the last one forms y for all T tokens.
  if (!split_k_arrive(a.counters + blockIdx.x, gridDim.y * gridDim.z)) return;
  __shared__ int s_row_of[kMoeMaxDecodeAssignments];
  const int n = r.num_tokens * r.top_k;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s_row_of[i] = decode_row(r, i);
  __syncthreads();
  if (!active) return;
  for (int t = 0; t < r.num_tokens; ++t)
    finalize_cols(s_row_of + t * r.top_k, a.topk_weights + (size_t)t * r.top_k, r.top_k, a.partial, a.splits,
                  (size_t)a.rows * w.N, nullptr, w.N,
                  a.residual ? static_cast<const T*>(a.residual) + (size_t)t * w.N : nullptr,
                  static_cast<T*>(a.out) + (size_t)t * w.N, n0);
}

// One CTA per token: y[t] = sum_j w[t, j] * row(t, j) (+ residual) (finalize_cols). Row of an assignment:
// positions[i] (aligned mode) or derived (decode).
template <typename T>
__global__ void finalize_kernel(const __grid_constant__ MoeRouting r, const float* __restrict__ partial, int splits,
                                const __half* __restrict__ rows16, int rows, const float* __restrict__ weights,
                                int H, const T* __restrict__ residual, T* __restrict__ y) {
  __shared__ int s_row[kMoeMaxExperts];
  __shared__ float s_w[kMoeMaxExperts];
  const int t = blockIdx.x, k = r.top_k;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const int i = t * k + j;
    s_row[j] = r.positions ? r.positions[i] : decode_row(r, i);
    s_w[j] = weights[i];
  }
  __syncthreads();
  for (int n = threadIdx.x * 4; n < H; n += blockDim.x * 4)
    finalize_cols(s_row, s_w, k, partial, splits, (size_t)rows * H, rows16, H,
                  residual ? residual + (size_t)t * H : nullptr, y + (size_t)t * H, n);
}

constexpr size_t kMaxRingBytes = exl2::ring_bytes(8);  // 48 KB, + x's 2-16 KB static: 3 (2) CTAs/SM fit

template <typename T, int MT>
cudaError_t launch_rows(const dim3& grid, size_t ring, const MoeRouting& r, const GemmArgs& a, cudaStream_t stream) {
  const cudaError_t e = raise_smem_limit<moe_gemm_kernel<T, MT>>((int)kMaxRingBytes);
  if (e != cudaSuccess) return e;
  moe_gemm_kernel<T, MT><<<grid, kThreads, ring, stream>>>(r, a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gemm(const MoeRouting& r, const GemmArgs& a, int n_max, cudaStream_t stream) {
  const dim3 grid(ceil_div(n_max, kThreads * kColsPerThread), a.num_proj * a.splits, r.num_blocks);
  int max_bits = 2;
  for (int p = 0; p < a.num_proj; ++p)
    for (int s = 0; s < a.proj[p].sched.num_segments; ++s)
      max_bits = a.proj[p].sched.bits[s] > max_bits ? a.proj[p].sched.bits[s] : max_bits;
  const size_t ring = exl2::ring_smem_bytes(max_bits);
  switch (r.block_m) {
    case 1:
      return launch_rows<T, 1>(grid, ring, r, a, stream);
    case 2:
      return launch_rows<T, 2>(grid, ring, r, a, stream);
    case 4:
      return launch_rows<T, 4>(grid, ring, r, a, stream);
    case 8:
      return launch_rows<T, 8>(grid, ring, r, a, stream);
    default:
      return cudaErrorInvalidValue;  // checked on the host
  }
}

}  // namespace

// Resident CTAs per SM of moe_gemm_kernel<block_m> at its largest ring (registers decide: 3, or 2 at 8 rows on
// sm_90), asked of the
// runtime once per device and block_m (a host query, no stream work: safe during graph capture).
static int moe_ctas_per_sm(int block_m) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices][4] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  const int b = block_m == 1 ? 0 : block_m == 2 ? 1 : block_m == 4 ? 2 : 3;
  if (dev < 0 || dev >= kMaxDevices) return 2;
  if (cache[dev][b] == 0) {
    int n = 0;
    switch (block_m) {
      case 1:
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, moe_gemm_kernel<__half, 1>, kThreads, kMaxRingBytes);
        break;
      case 2:
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, moe_gemm_kernel<__half, 2>, kThreads, kMaxRingBytes);
        break;
      case 4:
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, moe_gemm_kernel<__half, 4>, kThreads, kMaxRingBytes);
        break;
      default:
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, moe_gemm_kernel<__half, 8>, kThreads, kMaxRingBytes);
        break;
    }
    cache[dev][b] = n > 0 ? n : 1;
  }
  return cache[dev][b];
}

MoePlan moe_plan(int K, int N, int rows, int num_blocks, int block_m, int num_proj, int requested_splits) {
  const int tiles = K / kTileRows;
  int s;
  if (requested_splits > 0) {
    s = requested_splits;
  } else {
    // One wave: as many splits as the resident CTA slots hold (the real occupancy), no tail wave; at least
    // 2 * block_m tiles per split; fp32 partials <= 64 MB.
    const int ctas_per_split = ceil_div(N, kThreads * kColsPerThread) * num_blocks * num_proj;
    s = moe_ctas_per_sm(block_m) * sm_count() / ctas_per_split;
    const int by_tiles = tiles / (2 * block_m);
    s = s < by_tiles ? s : by_tiles;
    while (s > 1 && (size_t)s * num_proj * rows * N * sizeof(float) > (size_t(64) << 20)) --s;
  }
  s = s < 1 ? 1 : s > tiles ? tiles : s;
  MoePlan plan{};
  plan.tiles_per_split = ceil_div(tiles, s);
  plan.splits = ceil_div(tiles, plan.tiles_per_split);
  return plan;
}

int moe_counters(int N, int num_blocks) { return ceil_div(N, kThreads * kColsPerThread) * num_blocks; }

cudaError_t moe_gate_up(const void* x, bool bf16, const MoeRouting& r, const MoeExl2Proj& w1, const MoeExl2Proj& w3,
                        const MoePlan& plan, float* partial, int* counters, __half* inter, cudaStream_t stream) {
  const int rows = r.num_blocks * r.block_m;
  if (rows == 0 || w1.N == 0) return cudaSuccess;
  GemmArgs a{};
  a.proj[0] = w1;
  a.proj[1] = w3;
  a.num_proj = 2;
  a.splits = plan.splits;
  a.tiles_per_split = plan.tiles_per_split;
  a.x = x;
  a.x_by_token = true;
  a.rows = rows;
  a.partial = partial;
  a.counters = counters;
  a.out = inter;
  return bf16 ? launch_gemm<__nv_bfloat16>(r, a, w1.N, stream) : launch_gemm<__half>(r, a, w1.N, stream);
}

template <typename T>
static cudaError_t down_typed(const __half* inter, const float* topk_weights, const MoeRouting& r,
                              const MoeExl2Proj& w2, const MoePlan& plan, float* partial, int* counters,
                              const T* residual, T* y, cudaStream_t stream) {
  const int rows = r.num_blocks * r.block_m;
  GemmArgs a{};
  a.proj[0] = w2;
  a.proj[1] = w2;
  a.num_proj = 1;
  a.splits = plan.splits;
  a.tiles_per_split = plan.tiles_per_split;
  a.x = inter;
  a.x_by_token = false;
  a.rows = rows;
  a.partial = partial;
  const bool decode = r.sorted_ids == nullptr && rows > 0;
  if (decode) {  // the epilogue runs in the last CTA of each N-block: one launch
    a.counters = counters;
    a.out = y;
    a.topk_weights = topk_weights;
    a.residual = residual;
  }
  if (rows > 0) {
    const cudaError_t err = launch_gemm<T>(r, a, w2.N, stream);
    if (err != cudaSuccess || decode) return err;
  }
  finalize_kernel<T><<<r.num_tokens, 256, 0, stream>>>(r, partial, plan.splits, nullptr, rows, topk_weights, w2.N,
                                                       residual, y);
  return cudaGetLastError();
}

cudaError_t moe_down(const __half* inter, const float* topk_weights, const MoeRouting& r, const MoeExl2Proj& w2,
                     const MoePlan& plan, float* partial, int* counters, bool bf16, const void* residual, void* y,
                     cudaStream_t stream) {
  if (r.num_tokens == 0) return cudaSuccess;
  if (bf16)
    return down_typed(inter, topk_weights, r, w2, plan, partial, counters,
                      static_cast<const __nv_bfloat16*>(residual), static_cast<__nv_bfloat16*>(y), stream);
  return down_typed(inter, topk_weights, r, w2, plan, partial, counters, static_cast<const __half*>(residual),
                    static_cast<__half*>(y), stream);
}

cudaError_t moe_finalize(const __half* rows, const float* topk_weights, const int32_t* positions, int T, int top_k,
                         int H, const __half* residual, __half* y, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  MoeRouting r{};
  r.positions = positions;
  r.num_tokens = T;
  r.top_k = top_k;
  finalize_kernel<__half><<<T, 256, 0, stream>>>(r, nullptr, 1, rows, 0, topk_weights, H, residual, y);
  return cudaGetLastError();
}

}  // namespace mixq
