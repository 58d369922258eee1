// EXL2 matmul for few tokens (decode, 1..32 per call; any M works, weights are re-read per 8-token chunk).
//
// Layout: planar tiles (mixq/exl2/layout.py): per 32-row tile of width B, B word rows of N int32.
// Mapping: a thread copies 4 adjacent output columns' words (one 16-byte load per word row, coalesced: a warp
// reads 512 contiguous bytes), a CTA of kThreads threads owns 4*kThreads columns and a contiguous range of
// `tiles_per_split` tiles (split-K); grid.z walks chunks of 8 tokens. One launch may run up to kExl2MaxGroup
// matrices that read the same x (q, k and v: one launch instead of three, and k/v's few CTAs share the GPU with
// q's): grid.x enumerates every matrix's (column block, split) CTAs, matrix after matrix.
// Per tile (exl2/gemm_tiles.cuh): weights dequantized two at a time into half2 and multiplied on tensor cores
// (mma.sync m16n8k16, weights as A, the chunk's 8 tokens as B; fewer tokens are zero rows), fp32 sums flushed per
// tile with the group scale. x is staged once per CTA in shared memory as fp16 in the width's pair order, gathered
// through `perm` unless the caller folded the permutation. The weight words stream through a 3-stage cp.async ring
// in shared memory, two tiles ahead of the math, the first two issued before x is staged (exl2/weight_ring.cuh).
// Splits write fp32 partials; the last CTA of a column block to finish sums them in split order and adds the bias
// (common/split_k.cuh: deterministic, no reduce kernel).
// Must match: mixq.exl2.reference.exl2_matmul_ref (fp32 accumulation; rel. error <= 1e-3).
// Limits: N % 4 == 0 (EXL2 guarantees 32), K % 32 == 0, widths {2,3,4,5,6,8}, <= 6 width segments; fp16 or bf16
// in and out (common/activation.cuh: x staged as fp16, saturating; fp16 outputs saturate at +-65504); sm_80+.

#include <algorithm>

#include "common/activation.cuh"
#include "common/split_k.cuh"
#include "exl2/gemm_tiles.cuh"
#include "kernels.h"

namespace mixq {
namespace {

using exl2::kColsPerThread;
using exl2::kTileRows;
using exl2::Schedule;

// 128 threads, launch bounds 3 CTAs/SM (<= 168 registers; ptxas sm_90: ~150, no spills); the planner sizes each
// grid to one wave at whatever occupancy the runtime reports.
constexpr int kThreads = 128;
static_assert(kThreads == exl2::kRingThreads, "the weight ring's slots assume the CTA size");
constexpr int kTokenTile = 8;  // tokens per CTA (grid.z walks chunks): the MMA loop's n8; fewer are zero rows
constexpr int kMaxTilesPerSplit = 32;  // shared x: 8 tokens * 32 tiles * 32 rows * 2 B = 16 KB

// The most dynamic shared memory a launch asks for: the ring at 8 bits (48 KB) and x at 32 tiles (64 KB in all:
// 3 CTAs/SM fit in an SM's 228 KB, so registers, not shared memory, set the occupancy).
constexpr size_t kMaxSmemBytes = exl2::ring_bytes(8) + sizeof(__half) * kTokenTile * kMaxTilesPerSplit * kTileRows;

// y = bias + the sum over splits of this CTA's columns' partials (split order), for its kTokenTile tokens.
template <typename T>
__device__ __forceinline__ void finish_split_k(const float* __restrict__ partial, int splits, int num_tokens, int N,
                                               int n0, const __half* __restrict__ bias, T* __restrict__ y) {
  const int tok0 = blockIdx.z * kTokenTile;
  const size_t stride = (size_t)num_tokens * N;  // one split's plane
#pragma unroll 1
  for (int t = 0; t < kTokenTile && tok0 + t < num_tokens; ++t) {
    const float* p = partial + (size_t)(tok0 + t) * N + n0;
    float4 s = __ldcg(reinterpret_cast<const float4*>(p));
#pragma unroll 16  // independent loads issued ahead of the in-order adds (the fix-up is latency-bound)
    for (int k = 1; k < splits; ++k) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(p + k * stride));
      s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
    }
    if (bias) {
      s.x += __half2float(bias[n0]), s.y += __half2float(bias[n0 + 1]);
      s.z += __half2float(bias[n0 + 2]), s.w += __half2float(bias[n0 + 3]);
    }
    store4(y + (size_t)(tok0 + t) * N + n0, s.x, s.y, s.z, s.w);
  }
}

// One CTA: x staging, the tiles [tile_lo, tile_hi) of one width B of column block `bx` of one matrix, and the
// write-out (or, split-K, its partial and, in the last CTA of the column block, the fix-up). Each width has its
// own complete body (selected once per CTA) so the register allocation of one width does not burden another.
// MT: 1 for a one-token call (the MMA loop then skips the odd tokens' flush), else kTokenTile.
template <typename T, int B, int MT>
__device__ __forceinline__ void gemm_cta(const T* __restrict__ x, int num_tokens, const Exl2GemmJob& job,
                                         int bx, int split, int seg, int tile_lo, int tile_hi, int xs_stride,
                                         __half* xs, uint4* ring_smem, float4* s_scale) {
  const Exl2Matrix& w = job.w;
  const int row0 = tile_lo * kTileRows;
  const int nrows = (tile_hi - tile_lo) * kTileRows;
  const int tok0 = blockIdx.z * kTokenTile;
  const int col4 = bx * blockDim.x + threadIdx.x;
  const int n0 = col4 * kColsPerThread;
  const bool active = n0 < w.N;  // the CTA stays whole: split_k_arrive below has barriers
  const int n4 = w.N / kColsPerThread;
  // The first tiles' weight loads go out before x is staged: their latency overlaps the staging's.
  const int word_row = w.sched.word_row_begin[seg] + (tile_lo - w.sched.tile_begin[seg]) * B;
  exl2::WeightRing ring(ring_smem, B, reinterpret_cast<const uint4*>(w.qweight), word_row, n4, col4,
                        active ? tile_hi - tile_lo : 0);  // inactive: empty groups only
  ring.start();
  for (int idx = threadIdx.x; idx < kTokenTile * nrows; idx += blockDim.x) {
    const int t = idx / nrows, r = idx - t * nrows;
    const int tok = tok0 + t;
    __half v = __float2half(0.f);  // padding tokens read zeros; their outputs are never written
    if (tok < num_tokens) {
      const int k = row0 + r;
      v = staged_half(x[(size_t)tok * w.K + (w.perm ? w.perm[k] : k)]);
    }
    xs[t * xs_stride + (r & ~(kTileRows - 1)) + exl2::tile_x_slot(exl2::kPairPeriod<B>, r & (kTileRows - 1))] = v;
  }
  __syncthreads();

  // Every thread takes part, active or not (the MMA loop's warp barriers and mma).
  float am[4][kColsPerThread][2] = {};
  exl2::accumulate_tiles_mma<B, MT>(am, ring, reinterpret_cast<const uint16_t*>(w.qscale), w.scale_max,
                                    w.tile_group, n4, col4, active, tile_lo, tile_hi, xs, xs_stride, s_scale);
  float acc[kTokenTile][kColsPerThread];
  exl2::mma_to_rows(am, reinterpret_cast<float4*>(ring_smem), acc);

  const bool split_k = job.plan.splits > 1;
#pragma unroll
  for (int t = 0; t < kTokenTile; ++t) {
    const int tok = tok0 + t;
    if (!active || tok >= num_tokens) break;
    if (!split_k) {
      float v[kColsPerThread];
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) v[c] = acc[t][c] + (job.bias ? __half2float(job.bias[n0 + c]) : 0.f);
      store4(static_cast<T*>(job.y) + (size_t)tok * w.N + n0, v[0], v[1], v[2], v[3]);
    } else {
      float4* dst = reinterpret_cast<float4*>(job.partial + ((size_t)split * num_tokens + tok) * w.N + n0);
      *dst = make_float4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
    }
  }
  if (!split_k) return;
  // Split-K: every split of this column block arrives; the last one sums them.
  const int cols = ceil_div(w.N, kThreads * kColsPerThread);
  if (split_k_arrive(job.counters + blockIdx.z * cols + bx, job.plan.splits) && active)
    finish_split_k<T>(job.partial, job.plan.splits, num_tokens, w.N, n0, job.bias, static_cast<T*>(job.y));
}

// The jobs of one launch and where each one's CTAs start in grid.x (cta_begin[num_jobs] = gridDim.x).
struct GroupArgs {
  Exl2GemmJob job[kExl2MaxGroup];
  int cta_begin[kExl2MaxGroup + 1];
  int num_jobs;
  int xs_offset;  // uint4 of dynamic shared memory before the staged x: the weight ring, sized for the widest width
};

// A CTA's job, column block and split from blockIdx.x; splits never cross a width segment (plan.split_begin),
// so a CTA has one width.
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, 3)
    exl2_gemm_kernel(const T* __restrict__ x, int num_tokens, const __grid_constant__ GroupArgs g) {
  // The weight ring (exl2/weight_ring.cuh), then x: __half [8][tiles_per_split * 32], read 16 bytes at a time.
  extern __shared__ __align__(16) uint4 smem[];
  __half* xs = reinterpret_cast<__half*>(smem + g.xs_offset);
  __shared__ float4 s_scale[kThreads];  // the MMA loop's per-tile column scales
  int j = 0;
  while (j + 1 < g.num_jobs && (int)blockIdx.x >= g.cta_begin[j + 1]) ++j;
  const Exl2GemmJob& job = g.job[j];
  const Exl2Matrix& w = job.w;
  const int cols = ceil_div(w.N, kThreads * kColsPerThread);
  const int local = blockIdx.x - g.cta_begin[j];
  const int bx = local % cols, split = local / cols;
  int seg = 0;
  while (seg + 1 < w.sched.num_segments && split >= job.plan.split_begin[seg + 1]) ++seg;
  const int tile_lo = w.sched.tile_begin[seg] + (split - job.plan.split_begin[seg]) * job.plan.tiles_per_split;
  const int tile_hi = min(w.sched.tile_begin[seg + 1], tile_lo + job.plan.tiles_per_split);
  const int xs_stride = job.plan.tiles_per_split * kTileRows;
#define MIXQ_GEMM_CASE(BITS)                                                                                       \
  case BITS:                                                                                                       \
    gemm_cta<T, BITS, MT>(x, num_tokens, job, bx, split, seg, tile_lo, tile_hi, xs_stride, xs, smem, s_scale); \
    break;
  switch (w.sched.bits[seg]) {
    MIXQ_GEMM_CASE(8)
    MIXQ_GEMM_CASE(6)
    MIXQ_GEMM_CASE(5)
    MIXQ_GEMM_CASE(4)
    MIXQ_GEMM_CASE(3)
    MIXQ_GEMM_CASE(2)
    default:
      break;  // rejected on the host
  }
#undef MIXQ_GEMM_CASE
}

template <typename T, int MT>
cudaError_t launch_kernel(const T* x, int num_tokens, const GroupArgs& g, dim3 grid, size_t smem,
                          cudaStream_t stream) {
  const cudaError_t e = raise_smem_limit<exl2_gemm_kernel<T, MT>>((int)kMaxSmemBytes);
  if (e != cudaSuccess) return e;
  exl2_gemm_kernel<T, MT><<<grid, kThreads, smem, stream>>>(x, num_tokens, g);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gemm(const T* x, int num_tokens, const Exl2GemmJob* jobs, int num_jobs, cudaStream_t stream) {
  GroupArgs g{};
  g.num_jobs = num_jobs;
  int ctas = 0, tps_max = 1;
  for (int j = 0; j < num_jobs; ++j) {
    g.job[j] = jobs[j];
    g.cta_begin[j] = ctas;
    ctas += ceil_div(jobs[j].w.N, kThreads * kColsPerThread) * jobs[j].plan.splits;
    tps_max = jobs[j].plan.tiles_per_split > tps_max ? jobs[j].plan.tiles_per_split : tps_max;
  }
  g.cta_begin[num_jobs] = ctas;
  int max_bits = 2;
  for (int j = 0; j < num_jobs; ++j)
    for (int s = 0; s < jobs[j].w.sched.num_segments; ++s) max_bits = std::max(max_bits, jobs[j].w.sched.bits[s]);
  const size_t ring = exl2::ring_smem_bytes(max_bits);
  g.xs_offset = (int)(ring / sizeof(uint4));
  const dim3 grid(ctas, 1, ceil_div(num_tokens, kTokenTile));
  const size_t smem = ring + sizeof(__half) * kTokenTile * tps_max * kTileRows;
  return num_tokens == 1 ? launch_kernel<T, 1>(x, num_tokens, g, grid, smem, stream)
                         : launch_kernel<T, kTokenTile>(x, num_tokens, g, grid, smem, stream);
}

}  // namespace

Exl2GemmPlan exl2_gemm_plan(const Exl2Matrix& w, int num_tokens, int requested_splits, int target_ctas) {
  const int total_tiles = w.K / kTileRows;
  const int mt = num_tokens < kTokenTile ? num_tokens : kTokenTile;  // tokens in a chunk
  int tps;
  if (requested_splits > 0) {
    tps = ceil_div(total_tiles, requested_splits);
  } else {
    // One wave of CTAs at the kernel's real occupancy (a group's matrices share it: target_ctas), but at least
    // as many tiles per split as a chunk has tokens, so the fp32 partials (splits * M * N * 4 B) stay within a
    // quarter of the weight bytes of a 4-bit matrix whatever M (the fix-up reads them back from L2).
    const int ctas_per_split = ceil_div(w.N, kThreads * kColsPerThread) * ceil_div(num_tokens, kTokenTile);
    const int target = target_ctas > 0 ? target_ctas : exl2_gemm_target_ctas(num_tokens);
    const int target_splits = target > ctas_per_split ? target / ctas_per_split : 1;  // <= one wave
    tps = ceil_div(total_tiles, target_splits);
    tps = tps < mt ? mt : tps;
  }
  tps = tps < 1 ? 1 : tps > kMaxTilesPerSplit ? kMaxTilesPerSplit : tps;
  Exl2GemmPlan plan{};
  plan.tiles_per_split = tps;
  int splits = 0;
  for (int s = 0; s < w.sched.num_segments; ++s) {
    plan.split_begin[s] = splits;
    splits += ceil_div(w.sched.tile_begin[s + 1] - w.sched.tile_begin[s], tps);
  }
  plan.split_begin[w.sched.num_segments] = splits;
  plan.splits = splits;
  return plan;
}

int exl2_gemm_pass_rows(const Exl2Matrix& w, int num_tokens, int requested_splits, size_t max_partial_bytes) {
  // A call of `rows` rows fits when its partials do (none without split-K); one 8-token chunk always does.
  const auto fits = [&](int rows) {
    const Exl2GemmPlan plan = exl2_gemm_plan(w, rows, requested_splits);
    return rows <= 8 || plan.splits == 1 || (size_t)plan.splits * rows * w.N * sizeof(float) <= max_partial_bytes;
  };
  int rows = num_tokens;
  // The last, shorter pass is checked too: its plan may have more splits per row (fewer CTAs per split).
  while (rows > 8 && !(fits(rows) && (num_tokens % rows == 0 || fits(num_tokens % rows)))) {
    rows = ceil_div(ceil_div(rows, 2), 8) * 8;  // halve, keeping whole 8-token chunks
  }
  return rows;
}

// Resident CTAs per SM of exl2_gemm_kernel at its largest shared memory (registers decide: 3 on sm_90, the bound
// both token instantiations are compiled for), asked of the runtime once per device (a host query: safe during graph
// capture).
static int exl2_ctas_per_sm() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= kMaxDevices) return 2;
  if (cache[dev] == 0) {
    int n = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, exl2_gemm_kernel<__half, kTokenTile>, kThreads, kMaxSmemBytes);
    cache[dev] = n > 0 ? n : 1;
  }
  return cache[dev];
}

int exl2_gemm_target_ctas(int) { return exl2_ctas_per_sm() * sm_count(); }

int exl2_gemm_counters(const Exl2Matrix& w, int num_tokens) {
  return ceil_div(w.N, kThreads * kColsPerThread) * ceil_div(num_tokens, kTokenTile);
}

cudaError_t exl2_gemm_group(const void* x, bool bf16, int num_tokens, const Exl2GemmJob* jobs, int num_jobs,
                            cudaStream_t stream) {
  if (num_tokens <= 0 || num_jobs <= 0) return cudaSuccess;
  if (num_jobs > kExl2MaxGroup) return cudaErrorInvalidValue;  // checked on the host
  return bf16 ? launch_gemm(static_cast<const __nv_bfloat16*>(x), num_tokens, jobs, num_jobs, stream)
              : launch_gemm(static_cast<const __half*>(x), num_tokens, jobs, num_jobs, stream);
}

}  // namespace mixq
