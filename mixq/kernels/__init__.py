"""The ops of the CUDA extension `mixq._C` (csrc/): typed wrappers, fake impls, and the PyTorch reference each
kernel must match (also the CPU path). `ops` EXL2 GEMM and routing, `moe` the grouped expert matmul,
`attention` / `paged_attention` attention and the paged decode kernel, `kv_quant` the quantized KV formats."""
