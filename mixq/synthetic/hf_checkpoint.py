"""Random Mixtral checkpoints in the Hugging Face hub layout, with a small Mistral-style tokenizer.

Used by tests that must not depend on transformers, by `mixq demo` when no trained model ships, and
as the float starting point of synthetic full-size checkpoints.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch
from safetensors.torch import save_file

from mixq.model.config import MixtralConfig

# Mistral's [INST] format; a system message is folded into the first user turn.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters.\n"
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > ! ? , . ; : ' \"\n"
    "def forward(self, x):\n    return self.w2(silu(self.w1(x)) * self.w3(x))\n"
)

BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def build_tokenizer(texts: list[str], vocab_size: int):
    """A Llama/Mistral-style BPE: Metaspace pre-tokenizer, byte fallback (`<0xNN>` as ordinary vocab),
    `<unk>`=0, `<s>`=1, `</s>`=2, BOS added by the post-processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    base = specials + BYTE_TOKENS
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(base), 1), special_tokens=[], show_progress=False, max_token_length=16
    )
    trainer_tok.train_from_iterator(texts, trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(base)}
    for tok in sorted(learned["vocab"], key=learned["vocab"].get):
        if tok not in vocab and len(vocab) < vocab_size:
            vocab[tok] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in learned["merges"]]
    merges = [m for m in merges if m.replace(" ", "", 1) in vocab and all(p in vocab for p in m.split(" ", 1))]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ", 1)) for m in merges],
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def save_tokenizer(path: str, tokenizer, max_length: int, chat_template: str = MISTRAL_CHAT_TEMPLATE) -> None:
    """tokenizer.json + tokenizer_config.json + chat_template.jinja + special_tokens_map.json."""
    os.makedirs(path, exist_ok=True)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    cfg = {
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_length,
        "tokenizer_class": "LlamaTokenizerFast",
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(specials, f, indent=2)
    with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(chat_template)


def hf_config_dict(cfg: MixtralConfig, dtype: torch.dtype) -> dict:
    """config.json contents for `cfg` as transformers writes them for MixtralForCausalLM."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_local_experts": cfg.num_local_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else cfg.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "attention_dropout": 0.0,
        "router_aux_loss_coef": 0.02,
        "output_router_logits": False,
        "router_jitter_noise": 0.0,
    }


def random_state_dict(cfg: MixtralConfig, seed: int = 0, dtype: torch.dtype = torch.float16, std: float = 0.05):
    """Random weights under hub-layout names (norms around 1 so activations stay in range)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=std):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    H, I = cfg.hidden_size, cfg.intermediate_size
    sd = {
        "model.embed_tokens.weight": rnd(cfg.vocab_size, H, scale=1.0),
        "model.norm.weight": (1 + rnd(H, scale=0.1).float()).to(dtype),
    }
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = rnd(cfg.vocab_size, H)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = (1 + rnd(H, scale=0.1).float()).to(dtype)
        sd[f"{p}.post_attention_layernorm.weight"] = (1 + rnd(H, scale=0.1).float()).to(dtype)
        sd[f"{p}.self_attn.q_proj.weight"] = rnd(cfg.q_size, H)
        sd[f"{p}.self_attn.k_proj.weight"] = rnd(cfg.kv_size, H)
        sd[f"{p}.self_attn.v_proj.weight"] = rnd(cfg.kv_size, H)
        sd[f"{p}.self_attn.o_proj.weight"] = rnd(H, cfg.q_size)
        sd[f"{p}.block_sparse_moe.gate.weight"] = rnd(cfg.num_local_experts, H, scale=0.5)
        for e in range(cfg.num_local_experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            sd[f"{q}.w1.weight"], sd[f"{q}.w3.weight"], sd[f"{q}.w2.weight"] = rnd(I, H), rnd(I, H), rnd(H, I)
    return sd


def write_random_checkpoint(
    path: str,
    cfg: MixtralConfig | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    shard_layers: int | None = None,
) -> MixtralConfig:
    """Write config.json, safetensors shard(s) with an index, and a tokenizer whose vocab fits `cfg`."""
    cfg = cfg or MixtralConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        max_position_embeddings=2048,
        rope_theta=10000.0,
    )
    cfg = replace(cfg, raw={})
    os.makedirs(path, exist_ok=True)
    sd = random_state_dict(cfg, seed, dtype)
    if shard_layers:
        groups: dict[int, dict] = {}
        for k, v in sd.items():
            layer = int(k.split(".")[2]) if k.startswith("model.layers.") else cfg.num_hidden_layers
            groups.setdefault(min(layer, cfg.num_hidden_layers) // shard_layers, {})[k] = v
        n = len(groups)
        weight_map = {}
        for j, (_, part) in enumerate(sorted(groups.items())):
            name = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
            save_file(part, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    else:
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config_dict(cfg, dtype), f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id[0]}, f, indent=2)
    save_tokenizer(path, build_tokenizer([SAMPLE_TEXT] * 4, min(cfg.vocab_size, 4096)), cfg.max_position_embeddings)
    return cfg
