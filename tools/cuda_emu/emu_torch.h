// Injected by tools/cuda_emu/build.py after the last #include of each torch-facing source: the ops take CPU
// tensors, the CUDA guard and stream become no-ops, and a failed (emulated) launch raises with its reason.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace c10::cuda {
struct EmuGuard {
  explicit EmuGuard(c10::Device) {}
};
struct EmuStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline EmuStream emu_current_stream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda

namespace emu {
// What the ops allocate starts as 0xff bytes (NaN as fp16/fp32, -1 as an integer), so an output element a
// kernel forgets to write is visible (build.py routes at::empty here).
inline at::Tensor poisoned_empty(at::IntArrayRef size, at::TensorOptions options = {}) {
  at::Tensor t = at::empty(size, options);
  if (t.numel() > 0) std::memset(t.data_ptr(), 0xff, t.nbytes());
  return t;
}
inline at::Tensor poisoned_new_empty(const at::Tensor& like, at::IntArrayRef size, at::TensorOptions options = {}) {
  return poisoned_empty(size, like.options().merge_in(options));
}
}  // namespace emu

#define CUDAGuard EmuGuard
#define getCurrentCUDAStream emu_current_stream
#define is_cuda is_cpu
#undef C10_CUDA_CHECK
#define C10_CUDA_CHECK(expr)                                                                      \
  do {                                                                                            \
    const cudaError_t emu_err_ = (expr);                                                          \
    TORCH_CHECK(emu_err_ == cudaSuccess, "mixq (CPU emulation): ", ::emu::tl_last_message);       \
  } while (0)
