// CPU emulation of the CUDA features mixq's kernels use, so that the kernels (csrc/) run on a machine without a
// GPU and the GPU tests can check their index and arithmetic logic against the PyTorch references.
// Force-included (g++ -include) into every source by tools/cuda_emu/build.py, which also rewrites
// `k<<<grid, block, smem, stream>>>(args)` and `extern __shared__ T name[]` (the only syntax g++ cannot parse).
//
// Model: a launch runs its blocks one after another, in a seeded shuffled order (block_order); the threads of a block are fibers (ucontext) on the
// calling thread, switched at __syncthreads and warp collectives, so runs are deterministic. `__shared__`
// variables become function statics (one block at a time, so one copy suffices). What it cannot show:
// timing, races between warps that a barrier does not order, memory-model and alignment faults, occupancy.
// What it does check: launch limits (grid, block, dynamic shared memory against the opted-in maximum),
// barriers and warp collectives reached by some but not all live threads (a deadlock on a GPU), shuffles
// reading a lane that has exited, cp.async data read before its wait, and a host thread that reads
// device-only state; built with --asan, every out-of-bounds access of a tensor or of shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static

namespace emu {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 64 * 1024;  // kernels keep small per-thread arrays
constexpr size_t kSharedLimit = 48 * 1024;        // without cudaFuncSetAttribute
constexpr size_t kSharedOptInMax = 227 * 1024;    // H100 opt-in maximum per block
constexpr int kSmCount = 132;

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t ctx{};
  std::unique_ptr<char[]> stack;
  Wait wait = Wait::kNone;
};

// An asynchronous copy (cp.async) issued by a thread: it lands only when the thread waits for its group.
struct AsyncCopy {
  void* dst;
  const void* src;  // nullptr: zero-fill
  int bytes;
  long group;  // -1 until committed
};

// One block in flight: its fibers, scheduler context, warp exchange slots and dynamic shared memory.
struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched{};
  int current = 0;
  std::vector<uint64_t> slot;  // one exchange word per thread
  std::vector<std::vector<AsyncCopy>> copies;  // per thread: issued, not yet landed
  std::vector<long> committed;                  // per thread: groups committed so far
  std::vector<char> smem;
  std::vector<uint32_t> mma[2];  // per thread: its lane's A and B fragments of the last two mma calls (parity)
  std::vector<long> mma_calls;   // per thread: mma calls so far
  std::string error;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};

inline thread_local Block* tl_block = nullptr;
inline thread_local cudaError_t tl_last_error = cudaSuccess;
inline thread_local std::string tl_last_message;

// Fiber stacks are reused across launches (a launch of 1024 threads would otherwise allocate 64 MB).
inline thread_local std::vector<std::unique_ptr<char[]>> tl_stacks;
inline std::unique_ptr<char[]> take_stack() {
  if (tl_stacks.empty()) return std::unique_ptr<char[]>(new char[kStackBytes]);
  auto s = std::move(tl_stacks.back());
  tl_stacks.pop_back();
  return s;
}
inline void give_stack(std::unique_ptr<char[]> s) { tl_stacks.push_back(std::move(s)); }

inline std::map<const void*, size_t>& shared_opt_in() {
  static std::map<const void*, size_t> m;
  return m;
}

}  // namespace emu

// Builtin variables: per OS thread, switched by the scheduler before a fiber resumes.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace emu {

inline int linear_tid() { return (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }
inline int block_threads() { return (int)(blockDim.x * blockDim.y * blockDim.z); }

inline void fail(const std::string& msg) {
  Block* b = tl_block;
  if (b != nullptr && b->error.empty()) b->error = msg;
}

inline void set_thread_builtins(int t) {
  const int bx = (int)blockDim.x, by = (int)blockDim.y;
  threadIdx = make_uint3(t % bx, (t / bx) % by, t / (bx * by));
}

// Suspend the current fiber until the scheduler releases it.
inline void park(Wait w) {
  Block* b = tl_block;
  if (b == nullptr) {
    std::fprintf(stderr, "emu: a device barrier or warp collective was called outside a kernel\n");
    std::abort();
  }
  Fiber& f = b->fibers[b->current];
  f.wait = w;
  swapcontext(&f.ctx, &b->sched);
}

inline void fiber_entry() {
  Block* b = tl_block;
  b->body(b->body_arg);
  b->fibers[b->current].wait = Wait::kDone;
  swapcontext(&b->fibers[b->current].ctx, &b->sched);
}

// Run every fiber of the block until all are done: resume runnable fibers in order; when none is runnable,
// release a barrier that every live thread reached (the block barrier, or one warp's collective).
inline void run_block(Block& b, int nthreads) {
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = b.fibers[t];
    f.wait = Wait::kNone;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  const uint3 saved_tid = threadIdx;
  for (;;) {
    bool progressed = false;
    for (int t = 0; t < nthreads; ++t) {
      if (b.fibers[t].wait != Wait::kNone) continue;
      b.current = t;
      set_thread_builtins(t);
      swapcontext(&b.sched, &b.fibers[t].ctx);
      progressed = true;
    }
    if (progressed) continue;
    int live = 0, at_block = 0;
    for (int t = 0; t < nthreads; ++t) {
      live += b.fibers[t].wait != Wait::kDone;
      at_block += b.fibers[t].wait == Wait::kBlock;
    }
    if (live == 0) break;
    if (at_block == live) {
      for (int t = 0; t < nthreads; ++t)
        if (b.fibers[t].wait == Wait::kBlock) b.fibers[t].wait = Wait::kNone;
      continue;
    }
    bool released = false;
    for (int w0 = 0; w0 < nthreads; w0 += kWarp) {
      const int w1 = w0 + kWarp < nthreads ? w0 + kWarp : nthreads;
      int wl = 0, ww = 0;
      for (int t = w0; t < w1; ++t) {
        wl += b.fibers[t].wait != Wait::kDone;
        ww += b.fibers[t].wait == Wait::kWarp;
      }
      if (ww > 0 && ww == wl) {
        for (int t = w0; t < w1; ++t)
          if (b.fibers[t].wait == Wait::kWarp) b.fibers[t].wait = Wait::kNone;
        released = true;
      }
    }
    if (released) continue;
    b.error = "deadlock: some live threads wait at __syncthreads and others at a warp collective (block " +
              std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
    break;  // fibers are abandoned; their stacks are reused by the next launch
  }
  threadIdx = saved_tid;
}

// Warp exchange: every live lane publishes a word, all meet, each reads one, all meet again (so a fast lane
// cannot overwrite its word before the slow ones have read it).
template <typename T>
inline T exchange(T v, int src_lane_in_warp) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp exchange of a word");
  Block* b = tl_block;
  const int tid = linear_tid(), w0 = tid - tid % kWarp;
  uint64_t word = 0;
  std::memcpy(&word, &v, sizeof(T));
  b->slot[tid] = word;
  park(Wait::kWarp);
  const int src = w0 + src_lane_in_warp;
  T out = v;
  if (src < block_threads()) {
    if (b->fibers[src].wait == Wait::kDone)
      fail("warp shuffle reads lane " + std::to_string(src_lane_in_warp) + ", which has exited");
    std::memcpy(&out, &b->slot[src], sizeof(T));
  }
  park(Wait::kWarp);
  return out;
}

inline void* dynamic_smem() { return tl_block->smem.data(); }

// __syncwarp: every live lane of the warp meets (a fiber switch, so shared-memory writes before it are seen).
inline void warp_barrier() { park(Wait::kWarp); }

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 (csrc/common/mma.cuh has the fragment layout), one call or
// mma_k32_x2's four at once: every lane publishes its A and B fragments, the warp meets once, and each lane computes
// its own D elements from all 32 lanes' fragments (products exact, summed in double, rounded once: the hardware's
// accumulation order is unspecified). Fragments alternate between two buffers by call parity, so a lane that runs
// ahead to its next call cannot overwrite what a slower lane is still reading (it waits at that call's meeting
// until every lane has arrived, i.e. finished reading). The whole warp must take part: a missing lane fails.
constexpr int kMmaWords = 20;  // per lane: up to 2 x 2 A fragments of 4 words and 2 B fragments of 2
inline const uint32_t* mma_meet(const uint32_t* words, int count) {
  Block* blk = tl_block;
  const int tid = linear_tid(), w0 = tid - tid % kWarp, n = block_threads();
  if (blk->mma[0].size() < (size_t)n * kMmaWords) {
    blk->mma[0].assign((size_t)n * kMmaWords, 0);
    blk->mma[1].assign((size_t)n * kMmaWords, 0);
  }
  const long call = ++blk->mma_calls[tid];
  std::vector<uint32_t>& buf = blk->mma[call & 1];
  std::memcpy(&buf[(size_t)tid * kMmaWords], words, sizeof(uint32_t) * count);
  park(Wait::kWarp);
  // Every lane of the warp has published this call's fragments (a lane that exited before it has fewer calls).
  for (int l = 0; l < kWarp; ++l)
    if (w0 + l >= n || blk->mma_calls[w0 + l] < call)
      fail("mma.sync without lane " + std::to_string(l) + " of its warp (it has exited or does not exist)");
  return &buf[(size_t)w0 * kMmaWords];
}

inline double mma_half(const uint32_t* warp, int lane, int word, int hi) {
  const uint16_t bits = (uint16_t)(warp[lane * kMmaWords + word] >> (16 * hi));
  __half h;
  std::memcpy(&h, &bits, sizeof h);
  return (double)__half2float(h);
}

// D (this lane's 4 elements) += A * B for the A fragment at word `aw` and the B fragment at word `bw` of every lane.
// A[r][k]: lane 4 (r % 8) + (k % 8) / 2, register (r >= 8) + 2 (k >= 8), half k % 2; B[k][n]: lane 4 n + (k % 8) / 2,
// register (k >= 8), half k % 2; D[r][n] for r = g + 8 (i / 2), n = 2t + i % 2 (lane 4g + t).
inline void mma_accumulate(const uint32_t* warp, int aw, int bw, double (&acc)[4]) {
  const int lane = linear_tid() % kWarp, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    for (int k = 0; k < 16; ++k)
      acc[i] += mma_half(warp, 4 * (row % 8) + (k % 8) / 2, aw + (row >= 8) + 2 * (k >= 8), k % 2) *
                mma_half(warp, 4 * col + (k % 8) / 2, bw + (k >= 8), k % 2);
  }
}

inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  const uint32_t words[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const uint32_t* warp = mma_meet(words, 6);
  double acc[4] = {c[0], c[1], c[2], c[3]};
  mma_accumulate(warp, 0, 4, acc);
  for (int i = 0; i < 4; ++i) d[i] = (float)acc[i];
}

// csrc/common/mma.cuh's mma_k32_x2: d[i] = A_i B over two k16 steps, one meeting for the four mma. (The hardware
// rounds the first step's sum to fp32 before the second; here both steps sum in double: within an ulp of fp32.)
inline void mma_k32_x2(float (&d)[2][4], const uint32_t (&a)[2][2][4], const uint32_t (&b)[2][2]) {
  uint32_t words[20];
  for (int i = 0; i < 2; ++i)
    for (int kb = 0; kb < 2; ++kb)
      for (int r = 0; r < 4; ++r) words[(2 * i + kb) * 4 + r] = a[i][kb][r];
  for (int kb = 0; kb < 2; ++kb)
    for (int r = 0; r < 2; ++r) words[16 + 2 * kb + r] = b[kb][r];
  const uint32_t* warp = mma_meet(words, 20);
  for (int i = 0; i < 2; ++i) {
    double acc[4] = {0, 0, 0, 0};
    for (int kb = 0; kb < 2; ++kb) mma_accumulate(warp, (2 * i + kb) * 4, 16 + 2 * kb, acc);
    for (int r = 0; r < 4; ++r) d[i][r] = (float)acc[r];
  }
}

// cp.async: a copy lands at the wait that covers its group, not before, so reading the destination before
// cp.async.wait_group reads the poisoned shared memory (and a missing commit or wait shows in the results).
inline void async_copy(void* dst, const void* src, int bytes) {
  tl_block->copies[linear_tid()].push_back({dst, src, bytes, -1});
}

inline void async_commit() {
  const int tid = linear_tid();
  const long g = tl_block->committed[tid]++;
  for (AsyncCopy& c : tl_block->copies[tid])
    if (c.group < 0) c.group = g;
}

// cp.async.wait_group: land every committed group but the `pending` most recent ones.
inline void async_wait(int pending) {
  const int tid = linear_tid();
  const long limit = tl_block->committed[tid] - pending;
  std::vector<AsyncCopy>& q = tl_block->copies[tid];
  size_t kept = 0;
  for (AsyncCopy& c : q) {
    if (c.group >= 0 && c.group < limit) {
      if (c.src != nullptr) std::memcpy(c.dst, c.src, c.bytes);
      else std::memset(c.dst, 0, c.bytes);
    } else {
      q[kept++] = c;
    }
  }
  q.resize(kept);
}

// The order blocks run in: a GPU promises none, so a kernel whose result depends on it (a split-K fix-up that
// assumes which CTA arrives last, a block reading another's output) must fail here too. A seeded shuffle per
// launch (MIXQ_EMU_SEED, default 1: reproducible; MIXQ_EMU_SEED=0 runs x, then y, then z in order).
inline std::vector<uint3> block_order(dim3 grid) {
  std::vector<uint3> order;
  order.reserve((size_t)grid.x * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(make_uint3(x, y, z));
  static const unsigned long long seed = [] {
    const char* e = std::getenv("MIXQ_EMU_SEED");
    return e ? std::strtoull(e, nullptr, 10) : 1ull;
  }();
  if (seed == 0) return order;
  static thread_local unsigned long long launches = 0;
  unsigned long long st = seed * 0x9E3779B97F4A7C15ull + ++launches;
  for (size_t i = order.size(); i > 1; --i) {  // Fisher-Yates with splitmix64
    st += 0x9E3779B97F4A7C15ull;
    unsigned long long r = st;
    r = (r ^ (r >> 30)) * 0xBF58476D1CE4E5B9ull;
    r = (r ^ (r >> 27)) * 0x94D049BB133111EBull;
    r ^= r >> 31;
    std::swap(order[i - 1], order[r % i]);
  }
  return order;
}

// Launch: check the configuration as the driver would, then run the blocks (in block_order).
struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}

  template <typename... P, typename... A>
  void run(void (*kernel)(P...), A&&... args) {
    const long threads = (long)block.x * block.y * block.z;
    size_t limit = kSharedLimit;
    auto it = shared_opt_in().find(reinterpret_cast<const void*>(kernel));
    if (it != shared_opt_in().end()) limit = it->second;
    std::string err;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) err = "a grid or block dimension is 0";
    else if (grid.y > 65535 || grid.z > 65535) err = "grid.y or grid.z above 65535";
    else if (threads > 1024 || block.z > 64) err = "more than 1024 threads per block";
    else if (smem > limit)
      err = "dynamic shared memory " + std::to_string(smem) + " B above the limit " + std::to_string(limit) +
            " B (cudaFuncSetAttribute)";
    if (!err.empty()) {
      tl_last_error = cudaErrorInvalidValue;
      tl_last_message = "launch: " + err;
      return;
    }
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // converted like kernel parameters
    struct Call {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...>* params;
      static void invoke(void* self) {
        auto* c = static_cast<Call*>(self);
        std::apply([&](auto&... p) { c->kernel(p...); }, *c->params);
      }
    } call{kernel, &params};
    Block b;
    b.fibers.resize(threads);
    for (auto& f : b.fibers) f.stack = take_stack();
    b.slot.assign(threads, 0);
    b.body = &Call::invoke;
    b.body_arg = &call;
    Block* saved = tl_block;
    const uint3 saved_bid = blockIdx;
    const dim3 saved_bdim = blockDim, saved_gdim = gridDim;
    tl_block = &b;
    blockDim = block;
    gridDim = grid;
    const std::vector<uint3> order = block_order(grid);
    for (size_t i = 0; i < order.size() && b.error.empty(); ++i) {
      blockIdx = order[i];
      b.smem.assign(smem, (char)0xff);  // uninitialised shared memory reads as NaN / -1
      b.copies.assign(threads, {});
      b.committed.assign(threads, 0);
      b.mma_calls.assign(threads, 0);  // every lane starts at the same parity
      run_block(b, (int)threads);
    }
    tl_block = saved;
    blockIdx = saved_bid;
    blockDim = saved_bdim;
    gridDim = saved_gdim;
    for (auto& f : b.fibers) give_stack(std::move(f.stack));
    if (!b.error.empty()) {
      tl_last_error = cudaErrorLaunchFailure;
      tl_last_message = b.error;
    }
  }
};

inline cudaError_t get_last_error() {
  const cudaError_t e = tl_last_error;
  tl_last_error = cudaSuccess;
  if (e != cudaSuccess) std::fprintf(stderr, "emu: %s\n", tl_last_message.c_str());
  return e;
}

template <typename F>
inline cudaError_t func_set_attribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || (size_t)value > kSharedOptInMax) return cudaErrorInvalidValue;
  shared_opt_in()[reinterpret_cast<const void*>(kernel)] = (size_t)value;
  return cudaSuccess;
}

inline cudaError_t get_device(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

inline cudaError_t stream_is_capturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;  // the emulation has no graphs
  return cudaSuccess;
}

// Resident blocks per SM: the emulation knows no register counts, so it answers 3 (what ptxas gives the MoE
// kernel at 1-4 rows on sm_90); the planners only need a consistent positive number.
template <typename F>
inline cudaError_t occupancy_max_active_blocks(int* n, F*, int, size_t) {
  *n = 3;
  return cudaSuccess;
}

inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? kSmCount : 0;
  return cudaSuccess;
}

}  // namespace emu

#define cudaGetLastError emu::get_last_error
#define cudaFuncSetAttribute emu::func_set_attribute
#define cudaGetDevice emu::get_device
#define cudaDeviceGetAttribute emu::device_get_attribute
#define cudaStreamIsCapturing emu::stream_is_capturing
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor emu::occupancy_max_active_blocks

// ---- device intrinsics
inline void __syncthreads() { emu::park(emu::Wait::kBlock); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = emu::kWarp) {
  const int lane = emu::linear_tid() % emu::kWarp;
  const int src = lane ^ lane_mask;
  const bool same_segment = (src & ~(width - 1)) == (lane & ~(width - 1));
  return emu::exchange(v, same_segment ? src : lane);
}

template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = emu::kWarp) {
  const int lane = emu::linear_tid() % emu::kWarp;
  const int src = lane + (int)delta;
  const bool same_segment = (src & ~(width - 1)) == (lane & ~(width - 1));
  return emu::exchange(v, same_segment ? src : lane);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  emu::Block* b = emu::tl_block;
  const int tid = emu::linear_tid(), w0 = tid - tid % emu::kWarp, n = emu::block_threads();
  b->slot[tid] = pred != 0;
  emu::park(emu::Wait::kWarp);
  unsigned bits = 0;
  for (int l = 0; l < emu::kWarp && w0 + l < n; ++l)
    if (b->fibers[w0 + l].wait != emu::Wait::kDone && b->slot[w0 + l]) bits |= 1u << l;
  emu::park(emu::Wait::kWarp);
  return bits & mask;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline int __float2int_rn(float v) { return (int)std::nearbyint(v); }
// prmt.b32 (default mode), as __byte_perm: byte n of the result is byte (s >> 4n) & 7 of the 8 bytes {y:x}
// (x = bytes 0..3); a set bit 3 in the selector nibble replicates that byte's sign bit instead (PTX ISA, prmt).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t src = (uint64_t)y << 32 | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) {
    const unsigned sel = (s >> (4 * n)) & 15u;
    unsigned byte = (unsigned)(src >> (8 * (sel & 7u))) & 0xffu;
    if (sel & 8u) byte = (byte & 0x80u) ? 0xffu : 0u;
    r |= byte << (8 * n);
  }
  return r;
}

namespace emu {
// fp16 a * b + c rounded once (fma.rn.f16): the product of two halves is exact in fp32 (22 bits); the sum is
// rounded to fp32 with its exact error recovered (TwoSum) and made round-to-odd, which has 13 bits more than
// fp16, so the final round to nearest-even is the correctly rounded fma (no double-rounding tie errors).
inline __half hfma_rn(__half a, __half b, __half c) {
  const float p = __half2float(a) * __half2float(b), q = __half2float(c);
  if (!std::isfinite(p) || !std::isfinite(q)) return __float2half_rn(p + q);
  const float s = p + q;
  if (!std::isfinite(s)) return __float2half_rn(s);
  const float bv = s - p, err = (p - (s - bv)) + (q - bv);  // TwoSum: p + q == s + err exactly
  float odd = s;
  if (err != 0.0f) {
    uint32_t bits;
    std::memcpy(&bits, &s, 4);
    if ((bits & 1u) == 0u) odd = std::nextafter(s, err > 0.0f ? INFINITY : -INFINITY);
  }
  return __float2half_rn(odd);
}
}  // namespace emu

inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return __halves2half2(emu::hfma_rn(__low2half(a), __low2half(b), __low2half(c)),
                        emu::hfma_rn(__high2half(a), __high2half(b), __high2half(c)));
}

template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

// Atomics and fences: a block's fibers switch only at barriers and warp collectives, and blocks run one after
// another, so a plain read-modify-write is atomic and every store is already visible.
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
inline void __threadfence() {}

template <typename A, typename B>
inline auto min(A a, B b) -> std::common_type_t<A, B> {
  return a < b ? a : b;
}
template <typename A, typename B>
inline auto max(A a, B b) -> std::common_type_t<A, B> {
  return a < b ? b : a;
}
