// Grouped EXL2 expert matmul for a top-k routed batch: one launch computes every active expert's gate (w1) and
// up (w3) projections, one launch its down projection (w2). Each CTA writes fp32 split-K partials; the last CTA to
// finish an output tile (common/split_k.cuh) sums them in split order and applies the epilogue: SiLU(gate) * up
// for gate/up; for down in decode, the routing weights, the top-k sum and the residual, so a decode MoE layer is
// two launches. Down in aligned mode (prefill) leaves the partials to finalize_kernel. No host sync.
//
// Mapping: a persistent stream-K grid (MoePlan, moe_kernels.h): CTA c takes an equal share of the flattened
// (output tile, K tile) space and walks it as pieces, one per output tile its range touches; an output tile
// ("unit") is a 512-column N-block (128 threads x 4 columns, the planar-tile loads of exl2/gemm.cu) of one
// projection for one row block (one expert, block_m <= 8 rows). Within a piece a CTA walks the width segments
// it crosses, staging x in shared memory 32 tiles at a time. Why stream-K: at 8 tokens gate/up has 448 output
// tiles for 396 resident slots on an H100 (8x7B), and split-K cannot fix that (every split multiplies the
// tiles); equal ranges leave no tail wave. Each piece derives its expert and rows on the device; a block without
// an expert skips the math but still writes (zero) partials and arrives at the fix-up, whose count includes
// every piece of the tile.
// Reading weights: once per row block, i.e. once per step in decode (an expert's tokens share one block).
// Weight words stream through the cp.async ring of exl2/weight_ring.cuh, two tiles ahead, restarted per width
// segment; each chunk's first loads are issued before its x is staged.
// Must match: mixq.kernels.moe.moe_experts_ref (fp32 accumulation; rel. error <= 2e-3, two fp16-partial GEMMs).
// Activations: x of gate/up and y/residual of down fp16 or bf16 (common/activation.cuh); the intermediate is fp16.
// Math: mma.sync m16n8k16 with the weights as A and a block's <= 8 rows as B (exl2/gemm_tiles.cuh), fp32 sums.
// Not tuned: prefill re-reads an expert's weights per 8-row block.

#include <math.h>

#include <algorithm>

#include "common/activation.cuh"
#include "common/cuda_utils.cuh"
#include "common/split_k.cuh"
#include "exl2/schedule.cuh"
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
  MoePlan plan;
  const void* x;        // gate/up: tokens [T, K] (the activation type); down: the intermediate rows [rows, K] fp16
  bool x_by_token;      // row of x: the token of the assignment (gate/up) or the block row itself (down)
  float* partial;       // [num_proj * max_pieces, rows, N]
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
// is lo's segment's, already started (the later segments' rings start here). acc: exl2::accumulate_tiles_mma's
// (MT: the block's rows). Every thread of the CTA calls it (the MMA loop's warp barriers).
template <int MT>
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
#define MIXQ_MOE_CASE(BITS)                                                                                    \
  case BITS:                                                                                                   \
    exl2::accumulate_tiles_mma<BITS, MT>(acc, ring, qscale, smax, tg, n4, col4, active, lo, h, xt, kChunkRows, \
                                         s_scale);                                                             \
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

// y[n..n+3] of one token = sum_j w[j] * row_j[n..n+3] (+ residual), j in order; a row is the sum of its unit's
// fp32 partials in piece order (plan: down's, block_m rows a block) or an fp16 row (rows16, plan unused).
// row_of[j] < 0: an assignment without a row (skipped).
template <typename T>
__device__ __forceinline__ void finalize_cols(const int* row_of, const float* w, int k, const float* partial,
                                              const MoePlan& plan, int block_m, size_t plane,
                                              const __half* rows16, int H, const T* residual, T* y, int n) {
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
      const int pieces = plan.pieces(plan.unit(n / (kThreads * kColsPerThread), 0, row / block_m));
      float4 s = __ldcg(reinterpret_cast<const float4*>(src));  // __ldcg: written by other CTAs (split_k.cuh)
#pragma unroll 8  // independent loads ahead of the in-order adds (latency-bound)
      for (int sp = 1; sp < pieces; ++sp) {
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

// gate/up fix-up: inter[row, n0..n0+3] = silu(gate) * up for the block's MT rows, each summed over its unit's
// pieces (pg, pu: gate's and up's counts) in piece order.
template <int MT>
__device__ __forceinline__ void finish_gate_up(const GemmArgs& a, int z, int n0, int pg, int pu) {
  const int N = a.proj[0].N;
  const size_t plane = (size_t)a.rows * N;
#pragma unroll 1
  for (int t = 0; t < MT; ++t) {
    const int row = z * MT + t;
    const float* g = a.partial + (size_t)row * N + n0;
    const float* u = g + a.plan.max_pieces * plane;
    float4 gs = __ldcg(reinterpret_cast<const float4*>(g)), us = __ldcg(reinterpret_cast<const float4*>(u));
    const int both = pg < pu ? pg : pu;
#pragma unroll 4  // x 2 streams: 8 loads in flight
    for (int s = 1; s < both; ++s) {
      const float4 gv = __ldcg(reinterpret_cast<const float4*>(g + s * plane));
      const float4 uv = __ldcg(reinterpret_cast<const float4*>(u + s * plane));
      gs.x += gv.x, gs.y += gv.y, gs.z += gv.z, gs.w += gv.w;
      us.x += uv.x, us.y += uv.y, us.z += uv.z, us.w += uv.w;
    }
    for (int s = both; s < pg; ++s) {
      const float4 gv = __ldcg(reinterpret_cast<const float4*>(g + s * plane));
      gs.x += gv.x, gs.y += gv.y, gs.z += gv.z, gs.w += gv.w;
    }
    for (int s = both; s < pu; ++s) {
      const float4 uv = __ldcg(reinterpret_cast<const float4*>(u + s * plane));
      us.x += uv.x, us.y += uv.y, us.z += uv.z, us.w += uv.w;
    }
    store4(static_cast<__half*>(a.out) + (size_t)row * N + n0, silu(gs.x) * us.x, silu(gs.y) * us.y,
           silu(gs.z) * us.z, silu(gs.w) * us.w);
  }
}

// down in decode, in the CTA that finishes an N-block: y[t, n0..n0+3] for all T tokens from every row's pieces.
template <typename T>
__device__ __forceinline__ void finish_down(const MoeRouting& r, const GemmArgs& a, int N, int n0, bool active) {
  __shared__ int s_row_of[kMoeMaxDecodeAssignments];
  const int n = r.num_tokens * r.top_k;
  for (int j = threadIdx.x; j < n; j += blockDim.x) s_row_of[j] = decode_row(r, j);
  __syncthreads();
  if (active)
    for (int t = 0; t < r.num_tokens; ++t)
      finalize_cols(s_row_of + t * r.top_k, a.topk_weights + (size_t)t * r.top_k, r.top_k, a.partial, a.plan,
                    r.block_m, (size_t)a.rows * N, nullptr, N,
                    a.residual ? static_cast<const T*>(a.residual) + (size_t)t * N : nullptr,
                    static_cast<T*>(a.out) + (size_t)t * N, n0);
  __syncthreads();  // s_row_of is read before a later piece's finish writes it again
}

// The projection p (0 = gate or down, 1 = up) of one output tile's tiles [lo, hi): stage x 32 tiles at a time and
// stream the weights (see the file comment); acc as exl2::accumulate_tiles_mma's, zeroed by the caller. e: the row
// block's expert (< 0: none, nothing to do); xrow: its rows' x rows (< 0: empty).
template <typename T, int MT>
__device__ __forceinline__ void piece_mma(float (&am)[4][kColsPerThread][2], const GemmArgs& a, int p, int e,
                                          const int* s_xrow, int col4, bool active, int lo, int hi, __half* xs,
                                          uint4* ring_smem, float4* s_scale) {
  const MoeExl2Proj& w = a.proj[p];
  const int32_t* perm = w.perm && e >= 0 ? w.perm + (size_t)e * w.perm_stride : nullptr;
  for (int c_lo = lo; e >= 0 && c_lo < hi; c_lo += kChunkTiles) {
    const int c_hi = min(hi, c_lo + kChunkTiles);
    const int row0 = c_lo * kTileRows, nrows = (c_hi - c_lo) * kTileRows;
    __syncthreads();  // s_xrow written / previous chunk (or piece) consumed
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
    accumulate_range<MT>(am, w, e, col4, active, c_lo, c_hi, xs, ring_smem, ring, s_scale);
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
  const MoePlan& plan = a.plan;
  const long long end = plan.start(blockIdx.x + 1);
  // One piece per output tile this CTA's range touches, in order.
  for (long long i = plan.start(blockIdx.x); i < end;) {
    const int u = (int)(i / plan.unit_tiles);
    const long long unit0 = (long long)u * plan.unit_tiles;
    const int lo = (int)(i - unit0), hi = (int)((end < unit0 + plan.unit_tiles ? end : unit0 + plan.unit_tiles) - unit0);
    i = unit0 + hi;
    const int piece = blockIdx.x - plan.first_cta(u);
    const int x = u % plan.nx, p = u / plan.nx % plan.num_proj, z = u / plan.nx / plan.num_proj;
    __syncthreads();  // the previous piece is done with s_expert / s_rows / s_xrow
    block_rows<MT>(r, z, &s_expert, s_rows);
    __syncthreads();
    // Uniform across the CTA; < 0: an idle block (no expert), whose rows are written as zeros so that no element
    // of the op's outputs is left unset (the later kernels never read them).
    const int e = s_expert;
    if (e >= 0 && threadIdx.x < MT) {
      const int f = s_rows[threadIdx.x];
      s_xrow[threadIdx.x] = f < 0 ? -1 : a.x_by_token ? f / r.top_k : z * MT + (int)threadIdx.x;
    }
    const MoeExl2Proj& w = a.proj[p];
    const int col4 = x * blockDim.x + threadIdx.x;
    const int n0 = col4 * kColsPerThread;
    const bool active = n0 < w.N;

    float am[4][kColsPerThread][2] = {};
    piece_mma<T, MT>(am, a, p, e, s_xrow, col4, active, lo, hi, xs, ring_smem, s_scale);
    float acc[8][kColsPerThread];  // rows MT..7 are the zero rows' (never stored)
    exl2::mma_to_rows(am, reinterpret_cast<float4*>(ring_smem), acc);  // every thread: warp barriers
    // Every piece writes its partial, zeros for an idle block or an empty row (the epilogue reads them all).
    if (active) {
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        const size_t row = (size_t)z * MT + t;
        float4* dst =
            reinterpret_cast<float4*>(a.partial + (((size_t)p * plan.max_pieces + piece) * a.rows + row) * w.N + n0);
        *dst = make_float4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
      }
    }
    if (a.counters != nullptr && a.plan.num_proj == 2) {
      // Both projections' pieces of this (N-block, row block) arrive.
      const int pg = plan.pieces(plan.unit(x, 0, z)), pu = plan.pieces(plan.unit(x, 1, z));
      if (split_k_arrive(a.counters + z * plan.nx + x, pg + pu) && active) finish_gate_up<MT>(a, z, n0, pg, pu);
    } else if (a.counters != nullptr) {
      // down in decode: every piece of every row block of this N-block arrives; the last one forms y for all T
      // tokens. (Aligned mode, no counters: finalize_kernel follows.)
      int arrivals = 0;
      for (int zb = 0; zb < r.num_blocks; ++zb) arrivals += plan.pieces(plan.unit(x, 0, zb));
      if (split_k_arrive(a.counters + x, arrivals)) finish_down<T>(r, a, w.N, n0, active);
    }
  }
}

// One CTA per token: y[t] = sum_j w[t, j] * row(t, j) (+ residual) (finalize_cols). Row of an assignment:
// positions[i] (aligned mode) or derived (decode).
template <typename T>
__global__ void finalize_kernel(const __grid_constant__ MoeRouting r, const float* __restrict__ partial,
                                const MoePlan plan, const __half* __restrict__ rows16, int rows,
                                const float* __restrict__ weights,
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
    finalize_cols(s_row, s_w, k, partial, plan, r.block_m, (size_t)rows * H, rows16, H,
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
cudaError_t launch_gemm(const MoeRouting& r, const GemmArgs& a, cudaStream_t stream) {
  const dim3 grid(a.plan.ctas);
  int max_bits = 2;
  for (int p = 0; p < a.plan.num_proj; ++p)
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

MoePlan moe_plan(int K, int N, int rows, int num_blocks, int block_m, int num_proj, int requested_ctas) {
  MoePlan plan{};
  plan.nx = ceil_div(N, kThreads * kColsPerThread);
  plan.num_proj = num_proj;
  plan.units = plan.nx * num_proj * num_blocks;
  plan.unit_tiles = K / kTileRows;
  const long long total = plan.total();
  long long c;
  if (requested_ctas > 0) {
    c = requested_ctas;
  } else {
    // One wave at the real occupancy, each CTA streaming at least 2 * block_m tiles (the partials it writes and
    // the fix-up reads stay small next to its weights). From two waves of whole units on, the tail is at most a
    // third and prefill's partials would double: one unit per CTA.
    const long long slots = (long long)moe_ctas_per_sm(block_m) * sm_count();
    c = plan.units >= 2 * slots ? plan.units : std::min(slots, total / (2 * block_m));
  }
  c = std::max(1LL, std::min(c, total));
  plan.ctas = (int)c;
  // A unit's pieces: the ranges meeting it, all but the two at its ends inside it (each >= total / ctas tiles).
  const long long len = total / plan.ctas;
  plan.max_pieces = plan.unit_tiles < 2 ? 1 : (int)std::min<long long>((plan.unit_tiles - 2) / len + 2, plan.ctas);
  // fp32 partials <= 64 MB: otherwise one unit per CTA (one piece each).
  if (requested_ctas <= 0 &&
      (size_t)plan.max_pieces * num_proj * rows * N * sizeof(float) > (size_t(64) << 20) && plan.ctas != plan.units) {
    plan.ctas = plan.units;
    plan.max_pieces = 1;
  }
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
  a.plan = plan;
  a.x = x;
  a.x_by_token = true;
  a.rows = rows;
  a.partial = partial;
  a.counters = counters;
  a.out = inter;
  return bf16 ? launch_gemm<__nv_bfloat16>(r, a, stream) : launch_gemm<__half>(r, a, stream);
}

template <typename T>
static cudaError_t down_typed(const __half* inter, const float* topk_weights, const MoeRouting& r,
                              const MoeExl2Proj& w2, const MoePlan& plan, float* partial, int* counters,
                              const T* residual, T* y, cudaStream_t stream) {
  const int rows = r.num_blocks * r.block_m;
  GemmArgs a{};
  a.proj[0] = w2;
  a.proj[1] = w2;
  a.plan = plan;
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
    const cudaError_t err = launch_gemm<T>(r, a, stream);
    if (err != cudaSuccess || decode) return err;
  }
  finalize_kernel<T><<<r.num_tokens, 256, 0, stream>>>(r, partial, plan, nullptr, rows, topk_weights, w2.N,
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
  finalize_kernel<__half><<<T, 256, 0, stream>>>(r, nullptr, MoePlan{}, rows, 0, topk_weights, H, residual, y);
  return cudaGetLastError();
}

}  // namespace mixq
