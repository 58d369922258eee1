// CPU emulation's stand-in for csrc/common/cp_async.cuh: the copies are queued per thread and land at the
// cp.async.wait_group that covers their group (emu.h); zero-fill when `pred` is false, as cp.async does.
#pragma once

namespace mixq {

inline void cp_async16(void* smem, const void* gmem, bool pred) { ::emu::async_copy(smem, pred ? gmem : nullptr, 16); }

template <int kBytes>
inline void cp_async_small(void* smem, const void* gmem, bool pred) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async size");
  ::emu::async_copy(smem, pred ? gmem : nullptr, kBytes);
}

inline void cp_async_commit() { ::emu::async_commit(); }

template <int kPending>
inline void cp_async_wait() {
  ::emu::async_wait(kPending);
}

}  // namespace mixq
