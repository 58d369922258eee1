// Test-only ops of the CPU emulation build (library `mixq_emu`; never in mixq._C): the device helpers and the
// emulated instructions one at a time, so tests/test_dequant_half2.py can compare each with plain torch.
// build.py compiles this file with csrc's sources; the device functions run as host code here.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/mma.cuh"
#include "exl2/dequant_half2.cuh"

namespace {

// words: int32 [n, bits], the planar words of n column tiles -> fp16 [n, 32]: pair p in elements 2p, 2p + 1.
template <int B>
void dequant_rows(const uint32_t* words, int64_t n, __half2* out) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w[B];
    for (int j = 0; j < B; ++j) w[j] = words[i * B + j];
    mixq::exl2::static_for<4>([&](auto gc) {
      __half2 q[4];
      mixq::exl2::dequant_group<B, decltype(gc)::value>(w, q);
      for (int k = 0; k < 4; ++k) out[i * 16 + 4 * decltype(gc)::value + k] = q[k];
    });
  }
}

at::Tensor dequant_half2(const at::Tensor& words, int64_t bits) {
  TORCH_CHECK(words.dtype() == at::kInt && words.dim() == 2 && words.size(1) == bits, "words: int32 [n, bits]");
  const at::Tensor w = words.contiguous();
  at::Tensor out = at::empty({w.size(0), 32}, w.options().dtype(at::kHalf));
  const auto* src = reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>());
  auto* dst = reinterpret_cast<__half2*>(out.data_ptr());
  switch (bits) {
    case 2: dequant_rows<2>(src, w.size(0), dst); break;
    case 3: dequant_rows<3>(src, w.size(0), dst); break;
    case 4: dequant_rows<4>(src, w.size(0), dst); break;
    case 5: dequant_rows<5>(src, w.size(0), dst); break;
    case 6: dequant_rows<6>(src, w.size(0), dst); break;
    case 8: dequant_rows<8>(src, w.size(0), dst); break;
    default: TORCH_CHECK(false, "bits must be one of 2, 3, 4, 5, 6, 8");
  }
  return out;
}

// codes: int32 [n] (4 scale codes in the low 16 bits), scale_max: fp16 [n] -> fp32 [n, 4].
at::Tensor tile_scales(const at::Tensor& codes, const at::Tensor& scale_max, int64_t bits) {
  TORCH_CHECK(codes.dtype() == at::kInt && scale_max.dtype() == at::kHalf && codes.numel() == scale_max.numel());
  const at::Tensor c = codes.contiguous(), m = scale_max.contiguous();
  at::Tensor out = at::empty({c.numel(), 4}, c.options().dtype(at::kFloat));
  const auto* cp = reinterpret_cast<const uint32_t*>(c.data_ptr<int32_t>());
  const auto* mp = reinterpret_cast<const __half*>(m.data_ptr());
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    float s[4];
    switch (bits) {
      case 2: mixq::exl2::tile_scales<2>(cp[i], mp[i], s); break;
      case 3: mixq::exl2::tile_scales<3>(cp[i], mp[i], s); break;
      case 4: mixq::exl2::tile_scales<4>(cp[i], mp[i], s); break;
      case 5: mixq::exl2::tile_scales<5>(cp[i], mp[i], s); break;
      case 6: mixq::exl2::tile_scales<6>(cp[i], mp[i], s); break;
      case 8: mixq::exl2::tile_scales<8>(cp[i], mp[i], s); break;
      default: TORCH_CHECK(false, "bits must be one of 2, 3, 4, 5, 6, 8");
    }
    for (int k = 0; k < 4; ++k) op[4 * i + k] = s[k];
  }
  return out;
}

// Slot of each tile row in the staged activations (mixq::exl2::tile_x_slot) -> int64 [32].
at::Tensor tile_x_slots(int64_t bits) {
  at::Tensor out = at::empty({32}, at::TensorOptions().dtype(at::kLong));
  for (int r = 0; r < 32; ++r) out[r] = mixq::exl2::tile_x_slot(mixq::exl2::pair_period_of((int)bits), r);
  return out;
}

// a, b, c: fp16 [n] with n even, read as n / 2 half2 -> __hfma2 elementwise.
at::Tensor hfma2(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  TORCH_CHECK(a.dtype() == at::kHalf && a.sizes() == b.sizes() && a.sizes() == c.sizes() && a.numel() % 2 == 0);
  const at::Tensor x = a.contiguous(), y = b.contiguous(), z = c.contiguous();
  at::Tensor out = at::empty_like(x);
  const auto* xp = reinterpret_cast<const __half2*>(x.data_ptr());
  const auto* yp = reinterpret_cast<const __half2*>(y.data_ptr());
  const auto* zp = reinterpret_cast<const __half2*>(z.data_ptr());
  auto* op = reinterpret_cast<__half2*>(out.data_ptr());
  for (int64_t i = 0; i < x.numel() / 2; ++i) op[i] = __hfma2(xp[i], yp[i], zp[i]);
  return out;
}

// x, y, s: int32 [n] -> __byte_perm elementwise.
at::Tensor byte_perm(const at::Tensor& x, const at::Tensor& y, const at::Tensor& s) {
  TORCH_CHECK(x.dtype() == at::kInt && x.sizes() == y.sizes() && x.sizes() == s.sizes());
  const at::Tensor a = x.contiguous(), b = y.contiguous(), c = s.contiguous();
  at::Tensor out = at::empty_like(a);
  const auto* ap = reinterpret_cast<const uint32_t*>(a.data_ptr<int32_t>());
  const auto* bp = reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>());
  const auto* cp = reinterpret_cast<const uint32_t*>(c.data_ptr<int32_t>());
  auto* op = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  for (int64_t i = 0; i < a.numel(); ++i) op[i] = __byte_perm(ap[i], bp[i], cp[i]);
  return out;
}

// a, b, c: int32 [n] -> mixq::lop3<lut> elementwise (every truth table 0..255 instantiated).
at::Tensor lop3(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, int64_t lut) {
  TORCH_CHECK(a.dtype() == at::kInt && a.sizes() == b.sizes() && a.sizes() == c.sizes() && lut >= 0 && lut < 256);
  const at::Tensor x = a.contiguous(), y = b.contiguous(), z = c.contiguous();
  at::Tensor out = at::empty_like(x);
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<int32_t>());
  const auto* yp = reinterpret_cast<const uint32_t*>(y.data_ptr<int32_t>());
  const auto* zp = reinterpret_cast<const uint32_t*>(z.data_ptr<int32_t>());
  auto* op = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  mixq::exl2::static_for<256>([&](auto lc) {
    if (lc.value != lut) return;
    for (int64_t i = 0; i < x.numel(); ++i) op[i] = mixq::lop3<decltype(lc)::value>(xp[i], yp[i], zp[i]);
  });
  return out;
}

// One warp's mma_16816 (common/mma.cuh) on per-lane fragments: a int32 [32, 4], b int32 [32, 2] (fp16 pairs),
// c fp32 [32, 4] -> d fp32 [32, 4]. The warp runs as a 32-thread kernel of the emulation.
__global__ void mma_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const int l = threadIdx.x;
  const uint32_t fa[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
  const uint32_t fb[2] = {b[2 * l], b[2 * l + 1]};
  const float fc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
  float fd[4];
  mixq::mma_16816(fd, fa, fb, fc);
  for (int i = 0; i < 4; ++i) d[4 * l + i] = fd[i];
}

at::Tensor mma_16816(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  TORCH_CHECK(a.dtype() == at::kInt && a.sizes() == at::IntArrayRef({32, 4}), "a: int32 [32, 4]");
  TORCH_CHECK(b.dtype() == at::kInt && b.sizes() == at::IntArrayRef({32, 2}), "b: int32 [32, 2]");
  TORCH_CHECK(c.dtype() == at::kFloat && c.sizes() == at::IntArrayRef({32, 4}), "c: fp32 [32, 4]");
  const at::Tensor x = a.contiguous(), y = b.contiguous(), z = c.contiguous();
  at::Tensor d = at::full({32, 4}, NAN, z.options());
  mma_kernel<<<1, 32>>>(reinterpret_cast<const uint32_t*>(x.data_ptr<int32_t>()),
                        reinterpret_cast<const uint32_t*>(y.data_ptr<int32_t>()), z.data_ptr<float>(),
                        d.data_ptr<float>());
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "mma_kernel launch");
  return d;
}

// mma_k32_x2: a int32 [32, 16] (lane's a[i][kb][r] at 8i + 4kb + r), b int32 [32, 4] (b[kb][r] at 2kb + r)
// -> d fp32 [32, 8] (d[i][r] at 4i + r).
__global__ void mma_k32_kernel(const uint32_t* a, const uint32_t* b, float* d) {
  const int l = threadIdx.x;
  uint32_t fa[2][2][4], fb[2][2];
  for (int i = 0; i < 2; ++i)
    for (int kb = 0; kb < 2; ++kb)
      for (int r = 0; r < 4; ++r) fa[i][kb][r] = a[16 * l + 8 * i + 4 * kb + r];
  for (int kb = 0; kb < 2; ++kb)
    for (int r = 0; r < 2; ++r) fb[kb][r] = b[4 * l + 2 * kb + r];
  float fd[2][4];
  mixq::mma_k32_x2(fd, fa, fb);
  for (int i = 0; i < 2; ++i)
    for (int r = 0; r < 4; ++r) d[8 * l + 4 * i + r] = fd[i][r];
}

at::Tensor mma_k32_x2(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dtype() == at::kInt && a.sizes() == at::IntArrayRef({32, 16}), "a: int32 [32, 16]");
  TORCH_CHECK(b.dtype() == at::kInt && b.sizes() == at::IntArrayRef({32, 4}), "b: int32 [32, 4]");
  const at::Tensor x = a.contiguous(), y = b.contiguous();
  at::Tensor d = at::full({32, 8}, NAN, x.options().dtype(at::kFloat));
  mma_k32_kernel<<<1, 32>>>(reinterpret_cast<const uint32_t*>(x.data_ptr<int32_t>()),
                            reinterpret_cast<const uint32_t*>(y.data_ptr<int32_t>()), d.data_ptr<float>());
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "mma_k32_kernel launch");
  return d;
}

}  // namespace

TORCH_LIBRARY(mixq_emu, m) {
  m.def("mma_16816(Tensor a, Tensor b, Tensor c) -> Tensor", &mma_16816);
  m.def("mma_k32_x2(Tensor a, Tensor b) -> Tensor", &mma_k32_x2);
  m.def("lop3(Tensor a, Tensor b, Tensor c, int lut) -> Tensor", &lop3);
  m.def("dequant_half2(Tensor words, int bits) -> Tensor", &dequant_half2);
  m.def("tile_scales(Tensor codes, Tensor scale_max, int bits) -> Tensor", &tile_scales);
  m.def("tile_x_slots(int bits) -> Tensor", &tile_x_slots);
  m.def("hfma2(Tensor a, Tensor b, Tensor c) -> Tensor", &hfma2);
  m.def("byte_perm(Tensor x, Tensor y, Tensor s) -> Tensor", &byte_perm);
}
