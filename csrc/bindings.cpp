// Op schemas of the `mixq` torch library and their CUDA implementations. Importing mixq._C registers
// them (static initialisers); the Python module itself is an empty stub.

#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(mixq, m) {
  m.def(
      "exl2_gemm(Tensor x, Tensor qweight, Tensor qscale, Tensor scale_max, Tensor tile_group, Tensor? perm, "
      "Tensor? bias, int[] seg_bits, int[] seg_rows, int splits=0, int max_partial_bytes=0) -> Tensor");
  m.def(
      "exl2_gemm_group(Tensor x, Tensor[] qweight, Tensor[] qscale, Tensor[] scale_max, Tensor[] tile_group, "
      "Tensor?[] perm, Tensor?[] bias, int[] seg_bits, int[] seg_rows, int[] num_segments, int splits=0, "
      "int max_partial_bytes=0) -> Tensor[]");
  // Host-only planning query (no tensors, so one kernel for every device): the rows per pass exl2_gemm uses.
  m.def("exl2_gemm_pass_rows(int N, int[] seg_bits, int[] seg_rows, int num_tokens, int splits=0, "
        "int max_partial_bytes=0) -> int",
        &mixq::exl2_gemm_pass_rows_op);
  m.def(
      "exl2_dequant(Tensor qweight, Tensor qscale, Tensor scale_max, Tensor tile_group, Tensor? perm, "
      "int[] seg_bits, int[] seg_rows) -> Tensor");
  m.def("topk_softmax(Tensor logits, int top_k, bool renormalize=True) -> (Tensor, Tensor)");
  m.def("moe_router(Tensor x, Tensor weight, int top_k, bool renormalize=True) -> (Tensor, Tensor, Tensor)");
  m.def("moe_align(Tensor topk_ids, int num_experts, int block_m) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mixq, CUDA, m) {
  m.impl("exl2_gemm", &mixq::exl2_gemm);
  m.impl("exl2_gemm_group", &mixq::exl2_gemm_group);
  m.impl("exl2_dequant", &mixq::exl2_dequant);
  m.impl("topk_softmax", &mixq::topk_softmax);
  m.impl("moe_router", &mixq::moe_router);
  m.impl("moe_align", &mixq::moe_align);
}

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "mixq CUDA ops (registered in torch.ops.mixq)", -1,
                            nullptr};
  return PyModule_Create(&def);
}
