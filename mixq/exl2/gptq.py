"""GPTQ as exllamav2 implements it (docs/exl2-format.md section 5.5), plus a round-to-nearest baseline.

Device-agnostic torch: runs wherever `W` and `H` live (CPU for tests, CUDA for conversion).

* act-order: input rows sorted by the Hessian diagonal, descending, so the recipe's first (widest) rows are
  the most salient ones;
* damping `damp * mean(diag H)` added again (up to 10 times) until the Cholesky factorisation succeeds;
* groups in stored order; each group's scales are searched on its current, error-compensated weights;
  inside the group rows are quantized one by one with GPTQ error feedback; after the group its errors
  update all later rows with one GEMM (block size = group size);
* scales: per column `max|w| / ((2^b - 1) / 2)`, companded to a 4-bit code `round(16 sqrt(base / max))`, and
  one multiplier per group from a 97-point grid on [0.70, 1.20] minimising `sum |w - dq(q(w))|^3.5`.

Scales are rounded with the runtime's fp16 arithmetic before quantizing, and the fake-quantized weight is
formed exactly like `reference.dequantize`, so `dequantize(result.exl2) == result.fake` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.errors import MixqError
from mixq.exl2.format import Exl2Tensors, make_exl2
from mixq.exl2.qparams import QParams

GRID = (0.70, 1.20, 97)
ERR_POWER = 3.5
MAX_DAMP_TRIES = 10


@dataclass
class QuantResult:
    exl2: Exl2Tensors  # packed, ready to write
    fake: torch.Tensor  # [N, K] fp16, original feature order: the weight the quantizer itself produced
    perm: torch.Tensor  # stored row k = original input feature perm[k]
    damp_tries: int = 0  # how many times the damping was added
    gptq_loss: float = 0.0  # sum over rows of err^2 / Hinv_kk^2 / 2 (GPTQ's proxy)
    rel_weight_err: float = 0.0  # ||W - fake||_F / ||W||_F


def accumulate_hessian(H: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`H += X^T X` for activations `x[..., K]` (fp32). Pass `H=None` to start a new one."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    if H is None:
        H = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
    H.addmm_(x2.T, x2)
    return H


def runtime_scales(codes1: torch.Tensor, smax16: torch.Tensor) -> torch.Tensor:
    """fp16 scales from `code+1` (1..16) and fp16 maxima, as the runtime forms them (reference.group_scales).

    Broadcasts: `codes1[..., N]`, `smax16[..., 1]`.
    """
    s256 = (smax16.float() * (1.0 / 256)).half()
    return (codes1.square().half().float() * s256.float()).half()


def _quant(w: torch.Tensor, s16: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp16 fake) for fp32 weights and fp16 scales; a zero scale maps every weight to the zero point."""
    zero = 1 << (bits - 1)
    s = s16.float()
    s = torch.where(s > 0, s, torch.full_like(s, float("inf")))
    q = torch.clamp(torch.round(w / s) + zero, 0, (1 << bits) - 1)
    fake = ((q - zero) * s16.float()).half()
    return q, fake


def find_scales(w: torch.Tensor, bits: int, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale codes+1 `[N]` (int, 1..16) and fp16 `q_scale_max` (0-d) for one group `w[R, N]`."""
    base = w.abs().amax(0) / (((1 << bits) - 1) / 2)
    m = base.max()
    if not torch.isfinite(m):
        raise MixqError("gptq: the weights contain inf or NaN; check the source checkpoint")
    if m <= 0:  # an all-zero group: any scale reproduces it
        return torch.ones_like(base, dtype=torch.int64), torch.tensor(1e-3, device=w.device).half()
    codes1 = torch.clamp(torch.round(16 * torch.sqrt(base / m)), 1, 16).to(torch.int64)
    grid = torch.linspace(*GRID, device=w.device, dtype=torch.float32)
    errs = []
    for i in range(0, grid.numel(), chunk):
        smax16 = (m * grid[i : i + chunk]).half()  # [P]
        s16 = runtime_scales(codes1, smax16.unsqueeze(1))  # [P, N]
        _, fake = _quant(w.unsqueeze(0), s16.unsqueeze(1), bits)  # [P, R, N]
        errs.append((w.unsqueeze(0) - fake.float()).abs().pow(ERR_POWER).sum((1, 2)))
    best = int(torch.argmin(torch.cat(errs)))
    return codes1, (m * grid[best]).half()


def _prepare_hessian(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, int]:
    """Upper Cholesky factor of the damped H^-1, adding the damping again while the factorisation fails."""
    H = H.float().clone()
    d = H.diagonal()
    d[d == 0] = 1.0  # inputs that are always zero: any value works, keep the matrix invertible
    step = max(damp * float(d.mean()), 1e-5)
    for tries in range(1, MAX_DAMP_TRIES + 1):
        d += step
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, tries
    raise MixqError(f"gptq: the Hessian is not invertible even after {MAX_DAMP_TRIES} dampings; add calibration data")


def _check(W: torch.Tensor, qparams: QParams) -> tuple[int, int, int]:
    if W.dim() != 2:
        raise MixqError(f"gptq: weight must be [out, in], got {list(W.shape)}")
    N, K = W.shape
    if K % 32:
        raise MixqError(f"gptq: in_features={K} must be a multiple of 32 for EXL2")
    return N, K, -(-N // 32) * 32


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    qparams: QParams,
    *,
    damp: float = 0.12,
    act_order: bool = True,
    bias: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize `W[N, K]` (HF layout, out x in) with Hessian `H[K, K]` to EXL2 with the recipe `qparams`."""
    N, K, Np = _check(W, qparams)
    dev = W.device
    H = H.to(dev).float()
    if H.shape != (K, K):
        raise MixqError(f"gptq: Hessian is {list(H.shape)} but the weight has {K} inputs")
    if not bool(H.any()):  # no calibration data reached this matrix: plain least squares
        H = torch.eye(K, device=dev)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(K, device=dev)
    Wk = torch.zeros(K, Np, device=dev)  # [K, N_pad], stored row order; zero padding quantizes to the zero point
    Wk[:, :N] = W.T.float()[perm]
    Wk0 = Wk.clone()
    U, tries = _prepare_hessian(H[perm][:, perm], damp)

    gb = qparams.groups(K)
    Q = torch.empty(K, Np, dtype=torch.int32, device=dev)
    F = torch.empty(K, Np, dtype=torch.float16, device=dev)
    codes, smaxs = [], []
    loss = torch.zeros((), device=dev)
    r0 = 0
    for bits, rows in gb:
        r1 = r0 + rows
        c1, smax16 = find_scales(Wk[r0:r1], bits)
        s16 = runtime_scales(c1, smax16)
        codes.append(c1 - 1)
        smaxs.append(smax16)
        err = torch.empty(rows, Np, device=dev)
        for i in range(r0, r1):
            w = Wk[i]
            q, fake = _quant(w, s16, bits)
            Q[i], F[i] = q.to(torch.int32), fake
            e = (w - fake.float()) / U[i, i]
            loss += e.square().sum() / 2
            err[i - r0] = e
            if i + 1 < r1:
                Wk[i + 1 : r1] -= U[i, i + 1 : r1].unsqueeze(1) * e.unsqueeze(0)
        if r1 < K:
            Wk[r1:] -= U[r0:r1, r1:].T @ err
        r0 = r1

    invperm = torch.argsort(perm)
    t = make_exl2(Q, gb, torch.stack(codes), torch.stack(smaxs), invperm, _pad_bias(bias, Np))
    fake = F[invperm][:, :N].T.contiguous()
    rel = float((F[:, :N].float() - Wk0[:, :N]).norm() / Wk0.norm().clamp_min(1e-30))
    return QuantResult(t, fake, perm, tries, float(loss), rel)


def rtn_quantize(
    W: torch.Tensor, qparams: QParams, *, H: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> QuantResult:
    """Round-to-nearest with the same scale search and no error feedback (a baseline for GPTQ).

    With `H` the rows are act-ordered like GPTQ's (so the same rows get the wide widths); without, kept in order.
    """
    N, K, Np = _check(W, qparams)
    dev = W.device
    perm = torch.argsort(H.to(dev).diagonal(), descending=True, stable=True) if H is not None else torch.arange(K)
    perm = perm.to(dev)
    Wk = torch.zeros(K, Np, device=dev)
    Wk[:, :N] = W.T.float()[perm]
    gb = qparams.groups(K)
    Q = torch.empty(K, Np, dtype=torch.int32, device=dev)
    F = torch.empty(K, Np, dtype=torch.float16, device=dev)
    codes, smaxs = [], []
    r0 = 0
    for bits, rows in gb:
        r1 = r0 + rows
        c1, smax16 = find_scales(Wk[r0:r1], bits)
        q, fake = _quant(Wk[r0:r1], runtime_scales(c1, smax16), bits)
        Q[r0:r1], F[r0:r1] = q.to(torch.int32), fake
        codes.append(c1 - 1)
        smaxs.append(smax16)
        r0 = r1
    invperm = torch.argsort(perm)
    t = make_exl2(Q, gb, torch.stack(codes), torch.stack(smaxs), invperm, _pad_bias(bias, Np))
    rel = float((F[:, :N].float() - Wk[:, :N]).norm() / Wk.norm().clamp_min(1e-30))
    return QuantResult(t, F[invperm][:, :N].T.contiguous(), perm, 0, 0.0, rel)


def _pad_bias(bias: torch.Tensor | None, Np: int) -> torch.Tensor | None:
    if bias is None:
        return None
    out = torch.zeros(Np, dtype=torch.float16, device=bias.device)
    out[: bias.numel()] = bias.to(torch.float16)
    return out
