"""PyTorch backend for the fused LoRA linear: what CPU users run, and the test oracle (in float64).

Math (design.md, "The math"), x: [M, K], W: [N, K], A: [r, K], B: [N, r], s = scale, D = dropout mask
(keep prob 1 - p, kept entries scaled by 1 / (1 - p)):

    forward   S  = (D * x) A^T                    [M, r]
              Y  = x W^T + s * S B^T (+ bias)      [M, N]
    backward  dS = s * dY B
              dX = dY W + D * (dS A)
              dA = dS^T (D * x)
              dB = s * dY^T S

Where the work is saved over a plain "base(x) + B(A(dropout(x)))": the LoRA add is folded into the
GEMM with ``addmm_`` (Y is the only [M, N] tensor written), and D is regenerated from an integer seed
in backward instead of keeping ``dropout(x)`` alive. The mask comes from a ``torch.Generator`` on x's
device seeded with the seed, so :func:`dropout_mask` reproduces it exactly (tests use it to build
references with the same mask). Other backends use their own RNG (Triton: Philox), so a forward and
its backward must run on the same backend; the ops layer makes sure of that.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def supports(x2d: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], A: Tensor, B: Tensor,
             dropout_p: float) -> Optional[str]:
    """None: this backend can run the call. Any device and float dtype torch itself can do."""
    for name, t in (("x", x2d), ("weight", weight), ("bias", bias), ("lora_A", A), ("lora_B", B)):
        if t is not None and not t.is_floating_point():
            return f"{name} has non-float dtype {t.dtype}"
    return None


def compute_dtype(x_dtype: torch.dtype, A: Tensor, B: Tensor) -> torch.dtype:
    """dtype of the LoRA branch (S, dS, dA, dB): at least fp32, float64 when anything is float64.

    fp16/bf16 x with fp32 adapters (peft's default) gets the adapter math in fp32, like peft does
    by casting x to lora_A's dtype.
    """
    dt = torch.promote_types(torch.promote_types(x_dtype, A.dtype), B.dtype)
    return torch.promote_types(dt, torch.float32)


def _keep01(seed: int, shape, p: float, device) -> Tensor:
    """The keep-mask as an int16 tensor of 0/1, from a fresh Generator on ``device`` seeded with
    ``seed``.

    Each element gets a 16-bit uniform integer u and is kept iff u >= round(p * 65536) (so p is
    resolved to 1/65536). The 16-bit draws are int64 draws viewed as four int16 each: a CPU
    Generator pays per draw, so this is a quarter of the draws ``torch.rand`` would make, and the
    mask costs about half as much (the RNG dominates the dropout overhead on CPU). 0/1 multiplies
    exactly into any dtype; the 1/(1-p) scale is applied to the small [M, r] factors instead.
    """
    shape = tuple(shape)
    n = math.prod(shape)
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), generator=g, device=device,
                         dtype=torch.int64)
    u = bits.view(torch.int16)[:n].view(shape)
    if p >= 1.0:
        return u.zero_()
    # int16 u spans [-32768, 32767]; shift the threshold into that range.
    # Clamp: p within 2**-17 of 1 would round to 65536, past int16's range.
    return u.ge_(min(int(round(p * 65536)), 65535) - 32768)


def dropout_mask(seed: int, shape, p: float, device) -> Tensor:
    """The bool keep-mask (True = kept) the torch backend uses for ``seed``; keep prob 1 - p.

    Regenerated identically in forward and backward, and by tests to build references with the
    same mask. Kept entries are scaled by 1/(1-p) in the op.
    """
    return _keep01(seed, shape, p, device) != 0


def _keep_scale(p: float) -> float:
    # p == 1 drops everything (like nn.Dropout(p=1)): the scale of the (no) kept entries is irrelevant.
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _masked(x2d: Tensor, dtype: torch.dtype, keep: Optional[Tensor]) -> Tensor:
    """keep01 * x in ``dtype`` (x itself, uncopied, without dropout and with matching dtype)."""
    xc = x2d if x2d.dtype == dtype else x2d.to(dtype)
    if keep is None:
        return xc
    return xc * keep  # int16 0/1 promotes to xc's float dtype


def lora_fwd(x2d: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], A: Tensor, B: Tensor,
             scale: float, dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
    """Returns (Y [M, N] in x's dtype, S [M, r] in the compute dtype, fp32 for 16-bit x)."""
    cdt = compute_dtype(x2d.dtype, A, B)
    dt = x2d.dtype
    keep = _keep01(seed, x2d.shape, dropout_p, x2d.device) if dropout_p > 0.0 else None
    S = torch.mm(_masked(x2d, cdt, keep), A.to(cdt).t())
    del keep
    if dropout_p > 0.0:
        S.mul_(_keep_scale(dropout_p))
    # The GEMM's operands must share Y's dtype; S and B are small ([M, r], [N, r]) so casting them
    # down is cheap, while Y itself is never copied to a wider dtype.
    S_o = S if S.dtype == dt else S.to(dt)
    Bt = B.to(dt).t()
    if weight is not None:
        Y = torch.mm(x2d, weight.t()) if bias is None else torch.addmm(bias.to(dt), x2d, weight.t())
        Y.addmm_(S_o, Bt, alpha=scale)
    elif bias is not None:
        Y = torch.addmm(bias.to(dt), S_o, Bt, alpha=scale)
    else:
        Y = torch.mm(S_o, Bt)
        if scale != 1.0:
            Y.mul_(scale)
    return Y, S


def lora_bwd(dY: Tensor, x2d: Tensor, weight: Optional[Tensor], A: Tensor, B: Tensor, S: Tensor,
             scale: float, dropout_p: float, seed: int, needs_dx: bool, needs_dA: bool,
             needs_dB: bool) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Grads of the LoRA linear w.r.t. x (x's dtype), A (A's dtype) and B (B's dtype)."""
    cdt = compute_dtype(x2d.dtype, A, B)
    dt = x2d.dtype
    dY = dY.to(dt) if dY.dtype != dt else dY
    # dY in the compute dtype: the dS and dB GEMMs need it; for 16-bit dY this is the one [M, N] upcast.
    dYc = dY if dY.dtype == cdt else dY.to(cdt)
    Sc = S if S.dtype == cdt else S.to(cdt)
    dX = dA = dB = None
    dS = None
    # One regeneration of the mask serves both dX and dA.
    keep = None
    if dropout_p > 0.0 and (needs_dx or needs_dA):
        keep = _keep01(seed, x2d.shape, dropout_p, x2d.device)
    if needs_dx or needs_dA:
        # dS carries the 1/(1-p) of D too: D * (dS A) = keep * ((dS/(1-p)) A), and likewise for dA.
        dS = torch.mm(dYc, B.to(cdt))
        ds_scale = scale * (_keep_scale(dropout_p) if dropout_p > 0.0 else 1.0)
        if ds_scale != 1.0:
            dS.mul_(ds_scale)
    if needs_dx:
        dS_o = dS.to(dt)
        A_o = A.to(dt)
        if keep is not None:
            # dX = keep * (dS A) + dY W: the masked LoRA term first, then the base GEMM accumulates
            # into it in place (one [M, K] buffer, no extra add pass).
            dX = torch.mm(dS_o, A_o)
            dX.mul_(keep)
            if weight is not None:
                dX.addmm_(dY, weight.to(dt))
        elif weight is not None:
            dX = torch.mm(dY, weight.to(dt))
            dX.addmm_(dS_o, A_o)
        else:
            dX = torch.mm(dS_o, A_o)
    if needs_dA:
        dA = torch.mm(dS.t(), _masked(x2d, cdt, keep)).to(A.dtype)
    del keep
    if needs_dB:
        dB = torch.mm(dYc.t(), Sc)
        if scale != 1.0:
            dB.mul_(scale)
        dB = dB.to(B.dtype)
    return dX, dA, dB
