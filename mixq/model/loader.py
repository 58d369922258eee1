"""Build a `Mixtral` from a Hugging Face-layout directory of fp16/bf16/fp32 or EXL2 tensors.

Per linear layer the format is detected from the tensor names, as exllamav2 does: `<name>.q_weight`
means EXL2, `<name>.weight` means a plain float matrix. Experts may be stored per expert (hub layout,
`block_sparse_moe.experts.E.w1`) or fused (transformers 5, `mlp.experts.gate_up_proj`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mixq.errors import CheckpointError, MixqError
from mixq.exl2.format import parse_exl2
from mixq.kernels import ops
from mixq.model.checkpoint import TensorIndex
from mixq.model.config import MixtralConfig
from mixq.model.exl2_linear import Exl2Linear
from mixq.model.finite import check_finite
from mixq.model.mixtral import Attention, DecoderLayer, DenseLinear, Expert, Mixtral, MixtralModel, RMSNorm, SparseMoE
from mixq.model.verify import check_shapes

log = logging.getLogger("mixq")

DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MixqError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        # CPU matmuls are fastest (and exact enough for a reference) in fp32.
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MixqError(f"--dtype {dtype}: unknown dtype; use float16, bfloat16 or float32")
    return DTYPES[dtype]


class _Builder:
    """Reads tensors by name, checks their shapes against config.json, and makes the modules."""

    def __init__(self, path: str, cfg: MixtralConfig, device: torch.device, dtype: torch.dtype):
        self.index = TensorIndex(path)
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.fused = "model.layers.0.mlp.experts.gate_up_proj" in self.index
        self.n_exl2 = 0
        self.n_dense = 0

    def tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key in self.index and self.index.shape(key) != list(shape):
            raise CheckpointError(
                f"{key}: shape {self.index.shape(key)} disagrees with config.json (expected {list(shape)}); "
                "the checkpoint and its config.json do not belong together"
            )
        t = self.index.get(key)
        if not t.is_floating_point():
            raise CheckpointError(f"{key}: dtype {t.dtype} is not a float type")
        # One pass over the bytes as read (bench/RESULTS.md, "Load-time checks"); on a GPU after the copy, where
        # the pass costs next to nothing, and before the cast, so the count is of the file's values.
        t = t.to(self.device)
        check_finite(key, t)
        return t.to(self.dtype)

    def linear(self, prefix: str, out_features: int, in_features: int, exl2_device: torch.device | None = None):
        """`exl2_device`: where an EXL2 layer is built (default: the model's device)."""
        if prefix + ".q_weight" in self.index:
            t = parse_exl2(self.index.get_with_prefix(prefix), prefix)
            padded = -(-out_features // 32) * 32  # outputs are stored padded to 32 (an lm_head of any vocab size)
            if (t.in_features, t.out_features) != (in_features, padded):
                raise CheckpointError(
                    f"{prefix}: EXL2 tensors describe a {t.in_features}x{t.out_features} matrix but config.json "
                    f"implies {in_features}x{out_features} (in x out)"
                )
            self.n_exl2 += 1
            lin = Exl2Linear(t, prefix, out_features)
            # Prepared here rather than on the first forward: the model holds its final figure (one copy of each
            # matrix, in the kernels' layout) before the KV cache is sized from the free memory.
            if exl2_device is None and lin.prepare(self.device) is not None:
                return lin
            return lin.to(exl2_device or self.device)
        self.n_dense += 1
        return DenseLinear(self.tensor(prefix + ".weight", (out_features, in_features)))

    def experts(self, layer: int) -> tuple[DenseLinear, list[Expert]]:
        c = self.cfg
        H, I, E = c.hidden_size, c.intermediate_size, c.num_local_experts
        if self.fused:
            p = f"model.layers.{layer}.mlp"
            gate = DenseLinear(self.tensor(f"{p}.gate.weight", (E, H)))
            gate_up = self.tensor(f"{p}.experts.gate_up_proj", (E, 2 * I, H))
            down = self.tensor(f"{p}.experts.down_proj", (E, H, I))
            experts = [
                Expert(
                    DenseLinear(gate_up[e, :I].contiguous()),
                    DenseLinear(down[e].contiguous()),
                    DenseLinear(gate_up[e, I:].contiguous()),
                )
                for e in range(E)
            ]
            return gate, experts
        p = f"model.layers.{layer}.block_sparse_moe"
        gate = DenseLinear(self.tensor(f"{p}.gate.weight", (E, H)))
        # On the kernel device EXL2 experts stay in host memory until `SparseMoE.fuse` stacks them onto the device:
        # the per-expert tensors never take VRAM beside the stack.
        host = torch.device("cpu") if ops.use_kernel(self.device) else None
        experts = [
            Expert(
                self.linear(f"{p}.experts.{e}.w1", I, H, host),
                self.linear(f"{p}.experts.{e}.w2", H, I, host),
                self.linear(f"{p}.experts.{e}.w3", I, H, host),
            )
            for e in range(E)
        ]
        return gate, experts

    def layer(self, i: int) -> DecoderLayer:
        c = self.cfg
        H, p = c.hidden_size, f"model.layers.{i}"
        attn = Attention(
            c,
            i,
            self.linear(f"{p}.self_attn.q_proj", c.q_size, H),
            self.linear(f"{p}.self_attn.k_proj", c.kv_size, H),
            self.linear(f"{p}.self_attn.v_proj", c.kv_size, H),
            self.linear(f"{p}.self_attn.o_proj", H, c.q_size),
        )
        moe = SparseMoE(c, *self.experts(i))
        # Fused here, layer by layer, rather than on the first forward: the model holds its final figure before
        # the KV cache is sized from the free memory, and the stacking's transient never meets a full device.
        if not moe.fuse(self.device):
            moe.experts.to(self.device)
        return DecoderLayer(
            RMSNorm(self.tensor(f"{p}.input_layernorm.weight", (H,)), c.rms_norm_eps),
            attn,
            RMSNorm(self.tensor(f"{p}.post_attention_layernorm.weight", (H,)), c.rms_norm_eps),
            moe,
        )

    def build(self) -> Mixtral:
        c = self.cfg
        embed = self.tensor("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        layers = [self.layer(i) for i in range(c.num_hidden_layers)]
        norm = RMSNorm(self.tensor("model.norm.weight", (c.hidden_size,)), c.rms_norm_eps)
        if c.tie_word_embeddings and "lm_head.weight" not in self.index and "lm_head.q_weight" not in self.index:
            lm_head: nn.Module = DenseLinear(embed)
        else:
            lm_head = self.linear("lm_head", c.vocab_size, c.hidden_size)
        return Mixtral(c, MixtralModel(embed, layers, norm), lm_head)


def load_model(path: str, device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = None) -> Mixtral:
    """Load a Mixtral checkpoint directory; EXL2 and float linears may be mixed freely."""
    cfg = MixtralConfig.from_dir(path)
    dev = resolve_device(device)
    builder = _Builder(path, cfg, dev, resolve_dtype(dtype, dev))
    check_shapes(builder.index, cfg)  # headers only: a wrong shape in the last layer is named before layer 0 loads
    model = builder.build().eval()
    model.source_path = path
    model.exl2_linears = builder.n_exl2
    model.dense_linears = builder.n_dense
    log.info("loaded %s: %d EXL2 and %d float linears on %s", path, builder.n_exl2, builder.n_dense, dev)
    return model
