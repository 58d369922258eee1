"""Train the embedded demo model: a small Mixtral-architecture MoE on public-domain English (mostly Jane Austen).

The training model below is a compact batched implementation of exactly Mixtral's math (RMSNorm, RoPE in the
rotate_half convention, GQA causal attention, fp32 router softmax -> top-k -> renormalise, SiLU-gated experts) plus
Mixtral's load-balancing aux loss. The export goes through `transformers.MixtralForCausalLM` and is checked
against it (same held-out loss).

Reproduce (data + tokenizer first, see tools/fetch_text.py and tools/train_tokenizer.py):

    python tools/fetch_text.py
    python tools/train_tokenizer.py
    python tools/train_demo.py train --steps 1500 --minutes 20 --threads 2   # resumable: run again to continue
    python tools/train_demo.py export --out mixq/models/demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
SCRATCH = "/tmp/demo_scratch"


@dataclass
class Dims:
    vocab_size: int = 2048
    hidden_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 64
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 1024


# --------------------------------------------------------------------------------------------- model
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_tables(d: Dims, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (d.rope_theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.float32, device=device) / d.head_dim))
    f = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class Layer(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        H, E, I, hd = d.hidden_size, d.num_local_experts, d.intermediate_size, d.head_dim
        self.d = d
        self.input_layernorm = nn.Parameter(torch.ones(H))
        self.post_attention_layernorm = nn.Parameter(torch.ones(H))
        self.q_proj = nn.Parameter(torch.empty(d.num_attention_heads * hd, H))
        self.k_proj = nn.Parameter(torch.empty(d.num_key_value_heads * hd, H))
        self.v_proj = nn.Parameter(torch.empty(d.num_key_value_heads * hd, H))
        self.o_proj = nn.Parameter(torch.empty(H, d.num_attention_heads * hd))
        self.gate = nn.Parameter(torch.empty(E, H))
        self.w1 = nn.Parameter(torch.empty(E, I, H))
        self.w3 = nn.Parameter(torch.empty(E, I, H))
        self.w2 = nn.Parameter(torch.empty(E, H, I))

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        d, (B, S, _) = self.d, x.shape
        q = F.linear(x, self.q_proj).view(B, S, d.num_attention_heads, d.head_dim).transpose(1, 2)
        k = F.linear(x, self.k_proj).view(B, S, d.num_key_value_heads, d.head_dim).transpose(1, 2)
        v = F.linear(x, self.v_proj).view(B, S, d.num_key_value_heads, d.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = d.num_attention_heads // d.num_key_value_heads  # q head h reads kv head h // rep (HF repeat_kv)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.linear(o.transpose(1, 2).reshape(B, S, -1), self.o_proj)

    def moe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, shape = self.d, x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(F.linear(x, self.gate).float(), dim=-1)
        top_w, top_i = probs.topk(d.num_experts_per_tok, dim=-1)
        top_w = (top_w / top_w.sum(-1, keepdim=True)).to(x.dtype)
        # Mixtral's load-balancing loss: E * sum_e (fraction of routed slots to e) * (mean router prob of e).
        E = d.num_local_experts
        frac = F.one_hot(top_i, E).float().sum(1).mean(0) / d.num_experts_per_tok
        aux = E * (frac * probs.mean(0)).sum()
        # Group (token, slot) pairs by expert, run each expert once on its rows, scatter-add back.
        flat_e = top_i.reshape(-1)
        order = flat_e.argsort()
        counts = torch.bincount(flat_e, minlength=E).tolist()
        tok = (order // d.num_experts_per_tok).split(counts)
        wts = top_w.reshape(-1)[order].split(counts)
        out = torch.zeros_like(x)
        for e in range(E):
            if counts[e] == 0:
                continue
            xe = x.index_select(0, tok[e])
            h = F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e])
            out.index_add_(0, tok[e], F.linear(h, self.w2[e]) * wts[e][:, None])
        return out.view(shape), aux

    def forward(self, x, cos, sin):
        x = x + self.attention(rms_norm(x, self.input_layernorm, self.d.rms_norm_eps), cos, sin)
        m, aux = self.moe(rms_norm(x, self.post_attention_layernorm, self.d.rms_norm_eps))
        return x + m, aux


class DemoMixtral(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        self.d = d
        self.embed_tokens = nn.Parameter(torch.empty(d.vocab_size, d.hidden_size))
        self.layers = nn.ModuleList([Layer(d) for _ in range(d.num_hidden_layers)])
        self.norm = nn.Parameter(torch.ones(d.hidden_size))
        self.lm_head = nn.Parameter(torch.empty(d.vocab_size, d.hidden_size))
        out_std = 0.02 / math.sqrt(2 * d.num_hidden_layers)  # residual-branch outputs start small
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=out_std if name.endswith(("o_proj", "w2")) else 0.02)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_tables(self.d, ids.shape[1], ids.device)
        x, aux = F.embedding(ids, self.embed_tokens), 0.0
        for layer in self.layers:
            x, a = layer(x, cos, sin)
            aux = aux + a
        return F.linear(rms_norm(x, self.norm, self.d.rms_norm_eps), self.lm_head), aux / len(self.layers)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under the Hugging Face hub names (per-expert w1/w2/w3, block_sparse_moe.gate)."""
        sd = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm}
        sd["lm_head.weight"] = self.lm_head
        for i, L in enumerate(self.layers):
            p = f"model.layers.{i}."
            sd[p + "input_layernorm.weight"] = L.input_layernorm
            sd[p + "post_attention_layernorm.weight"] = L.post_attention_layernorm
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                sd[p + f"self_attn.{n}.weight"] = getattr(L, n)
            sd[p + "block_sparse_moe.gate.weight"] = L.gate
            for e in range(self.d.num_local_experts):
                for n in ("w1", "w2", "w3"):
                    sd[p + f"block_sparse_moe.experts.{e}.{n}.weight"] = getattr(L, n)[e]
        return {k: v.detach().contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------------------------- data
def encode_file(tok_dir: str, path: str) -> torch.Tensor:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    text = open(path, encoding="utf-8").read()
    # Encode paragraph blocks (much faster than one giant string), no BOS inside the stream.
    ids = []
    for enc in tok.encode_batch([c + "\n\n" for c in text.split("\n\n")], add_special_tokens=False):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def heldout_windows(ids: torch.Tensor, seq: int) -> torch.Tensor:
    """Non-overlapping windows of seq+1 tokens, each starting with <s> (as an evaluator would feed them)."""
    n = (len(ids) - 1) // seq
    rows = [torch.cat([torch.tensor([1]), ids[i * seq : i * seq + seq]]) for i in range(n)]
    return torch.stack(rows)


@torch.no_grad()
def eval_loss(model: DemoMixtral, windows: torch.Tensor, bs: int = 16) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(windows), bs):
        w = windows[i : i + bs].to(next(model.parameters()).device)
        logits, _ = model(w[:, :-1])
        tot += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        n += w[:, 1:].numel()
    model.train()
    return tot / n


# --------------------------------------------------------------------------------------------- training
def lr_at(progress: float, peak: float, warmup_frac: float) -> float:
    """Linear warm-up, then cosine decay to 10% of `peak`; `progress` runs from 0 to 1 over the run."""
    if progress < warmup_frac:
        return peak * max(progress, 1e-3) / warmup_frac
    t = min(1.0, (progress - warmup_frac) / (1 - warmup_frac))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    d = Dims()
    os.makedirs(args.work, exist_ok=True)
    train_ids = encode_file(args.tok, os.path.join(args.data, "train.txt"))
    held = heldout_windows(encode_file(args.tok, os.path.join(args.data, "heldout.txt")), args.seq)
    held_quick = held[:: max(1, len(held) // 12)]
    print(f"train tokens {len(train_ids):,}  heldout windows {len(held)} x {args.seq}", flush=True)

    model = DemoMixtral(d).to(dev)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "embed_tokens"]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n != "embed_tokens")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95)
    )
    ckpt_path = os.path.join(args.work, "ckpt.pt")
    log = {"dims": asdict(d), "args": vars(args), "train": [], "heldout": []}
    step, total, elapsed = 0, args.steps, 0.0
    gen = torch.Generator().manual_seed(args.seed)
    if os.path.exists(ckpt_path) and not args.fresh:
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, total, elapsed, log = ck["step"], ck["total"], ck["elapsed"], ck["log"]
        gen.set_state(ck["gen"])
        print(f"resumed at step {step}/{total}", flush=True)

    def save() -> None:
        ck = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "total": total}
        ck.update(elapsed=elapsed, log=log, gen=gen.get_state(), dims=asdict(d))
        torch.save(ck, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)
        with open(os.path.join(args.work, "log.json"), "w") as f:
            json.dump(log, f)

    budget = args.minutes * 60 if args.minutes else float("inf")

    def progress(step: int, el: float) -> float:
        # The schedule ends at --steps or at the --minutes budget, whichever comes first (on a shared CPU the
        # budget usually decides; with --minutes 0 the run is step-exact and reproducible).
        return max(step / total, el / budget)

    t_start, t_save, run_loss = time.time(), time.time(), None
    while progress(step, elapsed + time.time() - t_start) < 1:
        lr = lr_at(progress(step, elapsed + time.time() - t_start), args.lr, args.warmup / total)
        x0 = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[i : i + args.seq + 1] for i in x0.tolist()]).to(dev)
        for g in opt.param_groups:
            g["lr"] = lr
        logits, aux = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss = loss.item() if run_loss is None else 0.95 * run_loss + 0.05 * loss.item()
        now = time.time()
        el = elapsed + now - t_start
        if step % args.log_every == 0:
            log["train"].append([step, loss.item(), aux.item(), el])
            print(
                f"step {step} ({100 * progress(step, el):.0f}%) loss {loss.item():.3f} (avg {run_loss:.3f}) "
                f"aux {aux.item():.3f} lr {lr:.2e} {el / 60:.1f} min {step * args.batch * args.seq / el:.0f} tok/s",
                flush=True,
            )
        if step % args.eval_every == 0:
            log["heldout"].append([step, eval_loss(model, held_quick)])
            print(f"  heldout loss {log['heldout'][-1][1]:.3f}", flush=True)
        if now - t_save > 120:
            elapsed += time.time() - t_start
            t_start = t_save = time.time()
            save()
    elapsed += time.time() - t_start
    final = eval_loss(model, held)
    log["final_heldout"] = final
    log["heldout"].append([step, final])
    log["final_step"] = step
    save()
    torch.save({"dims": asdict(d), "model": model.state_dict()}, os.path.join(args.work, "final.pt"))
    print(f"done: heldout loss {final:.4f} ppl {math.exp(final):.2f}", flush=True)
    plot(log, os.path.join(HERE, "demo_loss.png"))
    with open(os.path.join(HERE, "demo_train_log.json"), "w") as f:
        json.dump(log, f)


def plot(log: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = log["train"]
    ax.plot([r[0] for r in tr], [r[1] for r in tr], label="train (batch)", alpha=0.7)
    ax.plot([r[0] for r in log["heldout"]], [r[1] for r in log["heldout"]], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("mixq demo Mixtral: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------- export
def export(args: argparse.Namespace) -> None:
    import safetensors.torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.set_num_threads(args.threads)
    path = os.path.join(args.work, "final.pt")
    if not os.path.exists(path):  # a run stopped by --minutes: export its latest checkpoint
        path = os.path.join(args.work, "ckpt.pt")
        print(f"no final.pt in {args.work}; exporting the latest checkpoint {path}")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    d = Dims(**ck["dims"])
    model = DemoMixtral(d)
    model.load_state_dict(ck["model"])
    cfg = MixtralConfig(
        **{k: v for k, v in asdict(d).items()},
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        sliding_window=None,
        router_aux_loss_coef=args.aux_coef,
        torch_dtype="float16",
    )
    hf = MixtralForCausalLM(cfg).eval()
    sd = model.hf_state_dict()
    fused = {}
    for i in range(d.num_hidden_layers):
        p, q = f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp."
        E = range(d.num_local_experts)
        w1 = torch.stack([sd.pop(p + f"experts.{e}.w1.weight") for e in E])
        w3 = torch.stack([sd.pop(p + f"experts.{e}.w3.weight") for e in E])
        fused[q + "experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        fused[q + "experts.down_proj"] = torch.stack([sd.pop(p + f"experts.{e}.w2.weight") for e in E])
        fused[q + "gate.weight"] = sd.pop(p + "gate.weight")
    sd.update(fused)
    hf.load_state_dict(sd, strict=True)
    out = args.out
    os.makedirs(out, exist_ok=True)
    hf.half().save_pretrained(out, safe_serialization=True)
    os.chmod(os.path.join(out, "model.safetensors"), 0o644)
    keys = set(safetensors.torch.load_file(os.path.join(out, "model.safetensors")).keys())
    want = set(model.hf_state_dict().keys())
    if keys != want:
        raise SystemExit(f"saved key names differ from the hub layout: {sorted(keys ^ want)[:6]}")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copy(os.path.join(args.tok, name), os.path.join(out, name))
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.8}, f, indent=2)
    shutil.copy(os.path.join(args.data, "heldout.txt"), os.path.join(out, "heldout.txt"))
    verify(args, model, out)


@torch.no_grad()
def verify(args: argparse.Namespace, model: DemoMixtral, out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    held = heldout_windows(encode_file(out, os.path.join(out, "heldout.txt")), args.seq)
    model.half().float()  # compare the exported fp16 weights under both implementations
    mine = eval_loss(model, held)
    tot, n = 0.0, 0
    for i in range(0, len(held), 16):
        w = held[i : i + 16]
        lg = hf(input_ids=w[:, :-1]).logits
        tot += F.cross_entropy(lg.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        n += w[:, 1:].numel()
    theirs = tot / n
    print(f"held-out loss: training model {mine:.5f}  transformers {theirs:.5f}  ppl {math.exp(theirs):.2f}")
    if abs(mine - theirs) > 1e-3:
        raise SystemExit("exported model disagrees with the training model")
    torch.manual_seed(0)
    for prompt in ("It is a truth universally acknowledged, that", "Elizabeth was", "The weather was"):
        ids = tok(prompt, return_tensors="pt").input_ids
        for label, kw in (("greedy", {"do_sample": False}), ("T=0.8", {"do_sample": True, "temperature": 0.8})):
            g = hf.generate(ids, max_new_tokens=48, **kw)
            print(f"[{label}] {tok.decode(g[0], skip_special_tokens=True)!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["train", "export"])
    ap.add_argument("--data", default=os.path.join(SCRATCH, "splits"), help="train.txt / heldout.txt directory")
    ap.add_argument("--tok", default=os.path.join(SCRATCH, "tok"), help="tokenizer directory (train_tokenizer.py)")
    ap.add_argument("--work", default=os.path.join(SCRATCH, "run"), help="checkpoints and logs")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "mixq", "models", "demo"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=1500, help="schedule length in steps")
    ap.add_argument("--minutes", type=float, default=0.0, help="training-time budget (summed over resumes); 0: none")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    args = ap.parse_args()
    train(args) if args.cmd == "train" else export(args)


if __name__ == "__main__":
    main()
