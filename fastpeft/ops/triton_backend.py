"""Triton backend of fastpeft.ops: the LoRA linear forward/backward on the kernels in
`fastpeft.kernels` (repo folder kernels/).

Protocol (spec.md): supports() -> None | reason, lora_fwd() -> (Y, S), lora_bwd() -> (dX, dA, dB).
Runs CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter: slow, for CI).
The dropout mask comes from Philox in the kernels (seed + element index), so it differs from the
torch backend's mask for the same seed; forward and backward of this backend always agree.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dispatch import triton_interpreting

try:
    import triton  # noqa: F401
    _TRITON_ERROR = None
except Exception as e:  # not installed, or a broken install: the backend reports it in supports()
    _TRITON_ERROR = f"triton is not importable ({type(e).__name__}: {e})"

MAX_R = 256
_ACT = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    # Imported on first use: importing defines the @triton.jit functions (cheap), and keeps
    # `import fastpeft.ops` working where triton is missing.
    from fastpeft.kernels import lora_bwd, lora_fwd

    return lora_fwd, lora_bwd


def _fp32_tf32(x: Tensor) -> bool:
    """fp32 dots use TF32 exactly when torch's own fp32 matmuls would (F.linear parity)."""
    return x.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32


def supports(x2d: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], A: Tensor, B: Tensor,
             dropout_p: float) -> Optional[str]:
    """None when the Triton kernels can run this call, else why not."""
    if _TRITON_ERROR is not None:
        return _TRITON_ERROR
    dev = x2d.device.type
    if dev == "cpu" and not triton_interpreting():
        return "x is a CPU tensor and TRITON_INTERPRET=1 is not set (Triton kernels need CUDA tensors)"
    if dev not in ("cuda", "cpu"):
        return f"x is on {x2d.device}; the triton backend runs on CUDA (or CPU under TRITON_INTERPRET=1)"
    if x2d.dim() != 2:
        return f"x must be 2-D [M, K], found shape {tuple(x2d.shape)}"
    if x2d.dtype not in _ACT:
        return f"x dtype {x2d.dtype} not supported (fp16, bf16, fp32)"
    m, k = x2d.shape
    if A.dim() != 2 or A.shape[1] != k:
        return f"lora_A must be [r, K={k}], found {tuple(A.shape)}"
    r = A.shape[0]
    if not 1 <= r <= MAX_R:
        return f"r={r} is outside the kernels' range 1..{MAX_R}"
    if B.dim() != 2 or B.shape[1] != r:
        return f"lora_B must be [N, r={r}], found {tuple(B.shape)}"
    n = B.shape[0]
    for name, t in (("lora_A", A), ("lora_B", B)):
        if t.dtype not in (torch.float32, x2d.dtype):
            return f"{name} dtype {t.dtype} not supported with x {x2d.dtype} (fp32 or x's dtype)"
    if weight is not None:
        if weight.dim() != 2 or tuple(weight.shape) != (n, k):
            return f"weight must be [N={n}, K={k}], found {tuple(weight.shape)}"
        if weight.dtype != x2d.dtype:
            return f"weight dtype {weight.dtype} differs from x dtype {x2d.dtype}"
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or bias.dtype not in _ACT):
        return f"bias must be a float [N={n}] vector, found {bias.dtype} {tuple(bias.shape)}"
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", A), ("lora_B", B)):
        if t is not None and t.device != x2d.device:
            return f"{name} is on {t.device} but x on {x2d.device}"
    if not 0.0 <= float(dropout_p) < 1.0:
        return f"dropout_p={dropout_p} outside [0, 1) (p = 1 drops the whole LoRA branch; use torch)"
    return None


def lora_fwd(x2d: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], A: Tensor, B: Tensor,
             scale: float, dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
    """(Y [M, N] in x's dtype, S [M, r] fp32). Y = x W^T + scale * ((D x) A^T) B^T (+ bias)."""
    fwd, _ = _kernels()
    return fwd.lora_fwd(x2d, weight, bias, A, B, float(scale), float(dropout_p), int(seed),
                        fp32_tf32=_fp32_tf32(x2d))


def lora_bwd(dY: Tensor, x2d: Tensor, weight: Optional[Tensor], A: Tensor, B: Tensor, S: Tensor,
             scale: float, dropout_p: float, seed: int, needs_dx: bool, needs_dA: bool,
             needs_dB: bool) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dX in x's dtype | None, dA in A's dtype | None, dB in B's dtype | None).

    dA/dB reductions over M are deterministic (fixed-order sum of per-split fp32 partials)."""
    _, bwd = _kernels()
    if dY.dtype != x2d.dtype:
        dY = dY.to(x2d.dtype)
    if S.dtype != torch.float32:
        S = S.float()
    return bwd.lora_bwd(dY, x2d, weight, A, B, S, float(scale), float(dropout_p), int(seed),
                        needs_dx=needs_dx, needs_da=needs_dA, needs_db=needs_dB, deterministic=True,
                        fp32_tf32=_fp32_tf32(x2d))


# -- quantized base weights (QLoRA): the contract of fastpeft/ops/lora_quant.py --------------------
def _quant_kernels():
    from fastpeft.kernels import lora_quant

    return lora_quant


def supports_quant(x2d: Tensor, qw, bias: Optional[Tensor], A: Tensor, B: Tensor, dropout_p: float) -> Optional[str]:
    """None when the quantized-weight kernel can run this call (W = qw dequantized), else why not."""
    reason = supports(x2d, None, bias, A, B, dropout_p)
    if reason is not None:
        return reason
    if x2d.shape[1] != qw.K or B.shape[0] != qw.N:
        return f"quantized weight is [N={qw.N}, K={qw.K}] but x is {tuple(x2d.shape)} and lora_B {tuple(B.shape)}"
    for name in ("qdata", "scales", "zeros", "code", "absmax2", "code2", "offset", "g_idx"):
        t = getattr(qw, name)
        if t is not None and t.device != x2d.device:
            return f"quantized weight field {name} is on {t.device} but x on {x2d.device}"
    return _quant_kernels().quant_reason(qw, x2d.dtype)


def lora_quant_fwd(x2d: Tensor, qw, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float, dropout_p: float,
                   seed: int) -> tuple[Tensor, Tensor]:
    """(Y [M, N] in x's dtype, S [M, r] fp32); W is dequantized in registers inside the GEMM."""
    return _quant_kernels().lora_quant_fwd(x2d, qw, bias, A, B, float(scale), float(dropout_p), int(seed),
                                           fp32_tf32=_fp32_tf32(x2d))


def lora_quant_bwd(dY: Tensor, x2d: Tensor, qw, A: Tensor, B: Tensor, S: Tensor, scale: float, dropout_p: float,
                   seed: int, needs_dx: bool, needs_dA: bool,
                   needs_dB: bool) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dX | None, dA | None, dB | None); dX = dY deq(W) + D * (dS A) in one quantized GEMM."""
    if dY.dtype != x2d.dtype:
        dY = dY.to(x2d.dtype)
    if S.dtype != torch.float32:
        S = S.float()
    return _quant_kernels().lora_quant_bwd(dY, x2d, qw, A, B, S, float(scale), float(dropout_p), int(seed),
                                           needs_dx=needs_dx, needs_da=needs_dA, needs_db=needs_dB,
                                           fp32_tf32=_fp32_tf32(x2d))
