"""The `cuda` backend's decode GEMV over a quantized base weight (csrc/lora_qgemv.cu), for cuda_backend.

What it runs: 1 <= M <= 8 rows of x (float16/bfloat16), a packed base (fastpeft.quant.formats.QuantizedWeight:
nf4 with or without double quantization, int4 with or without g_idx, int8, fp8 e4m3fn with block scales), and
one adapter (lora_A/lora_B float32 or x's dtype, r <= 128, no dropout, optionally DoRA's column scale) or none
(r = 0: the quantized GEMV alone). Layout limits of the kernel: nf4 needs an even K (rows start on a byte) and
a power-of-two block size >= 32; the other layouts are formats.py's. Mixed batches over a packed base are left
to the triton backend. cuda_backend's supports() asks call_reason() and quant_reason(); its forward() calls
forward() here; backward is cuda_backend's (the torch backend's math on the saved S).

This module imports no compiled code; the binding (fastpeft._C or the just-in-time build) comes from
cuda_backend.load().
"""
from __future__ import annotations

from typing import Optional

import torch

from .contract import PACKED_FIELDS

# Automatic dispatch picks the quantized CUDA GEMV only up to this many rows. NOT measured (no GPU was at hand
# when it was written): the dense GEMV's measured limit (cuda_backend.AUTO_MAX_M) is kept, the conservative
# choice, until benchmarks/ has numbers for the quantized kernel.
QUANT_AUTO_MAX_M = 4
_FMTS = ("nf4", "int4", "int8", "fp8")


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def quant_reason(qw, x) -> Optional[str]:
    """None when csrc/lora_qgemv.cu takes this packed weight next to x, else why not."""
    fmt, N, K = qw.fmt, qw.N, qw.K
    if fmt not in _FMTS:
        return f"quantization format {fmt!r} has no CUDA decode kernel ({', '.join(_FMTS)})"
    if K < 1:
        return f"the CUDA quantized GEMV needs K >= 1, found K={K}"
    for f in PACKED_FIELDS:
        t = getattr(qw, f)
        if t is not None and t.device != x.device:
            return f"the quantized weight's {f} is on {t.device} but x is on {x.device}"
    if fmt == "nf4":
        if K % 2:
            return f"nf4 with odd K={K} (rows start mid-byte) has no CUDA decode kernel (the triton backend runs it)"
        if qw.blocksize < 32 or not _pow2(qw.blocksize):
            return f"nf4 blocksize must be a power of two >= 32 for the CUDA kernel, found {qw.blocksize}"
        if qw.code is None or qw.code.numel() != 16 or qw.code.dtype != torch.float32:
            return "nf4 weight without its float32 [16] code book"
        if qw.qdata.dtype != torch.uint8 or qw.qdata.numel() != (N * K + 1) // 2 or not qw.qdata.is_contiguous():
            return f"nf4 qdata must be contiguous uint8 with {(N * K + 1) // 2} bytes"
        if qw.double_quant:
            if qw.scales.dtype != torch.uint8 or qw.code2 is None or qw.offset is None or not _pow2(qw.blocksize2):
                return "nf4 double quantization needs uint8 absmax codes, code2, offset and a power-of-two blocksize2"
        elif qw.scales.dtype != torch.float32:
            return f"nf4 absmax must be float32, found {qw.scales.dtype}"
    elif fmt == "int4":
        if qw.zeros is None or qw.blocksize <= 0:
            return "int4 weight needs zeros and a positive group size"
        if qw.qdata.dim() != 2 or qw.qdata.dtype != torch.uint8:
            return f"int4 qdata must be uint8 [N, ceil(K/2)], found {qw.qdata.dtype} {tuple(qw.qdata.shape)}"
        if qw.scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"int4 scales dtype {qw.scales.dtype} not supported (float16, bfloat16, float32)"
        if qw.zeros.dtype != torch.uint8:
            return f"int4 zeros must be uint8, found {qw.zeros.dtype}"
        if qw.g_idx is not None and (qw.g_idx.numel() != K or qw.g_idx.dtype not in (torch.int32, torch.int64)):
            return f"int4 g_idx must be int32/int64 [K={K}], found {qw.g_idx.dtype} {tuple(qw.g_idx.shape)}"
    elif fmt == "int8":
        if qw.qdata.dtype != torch.int8 or qw.scales.dtype != torch.float32:
            return f"int8 needs int8 qdata and float32 scales, found {qw.qdata.dtype} and {qw.scales.dtype}"
    else:
        if qw.qdata.dtype not in (torch.float8_e4m3fn, torch.uint8) or qw.scales.dtype != torch.float32:
            return (f"fp8 needs float8_e4m3fn (or uint8) qdata and float32 scales, found {qw.qdata.dtype} and "
                    f"{qw.scales.dtype}")
        if qw.blocksize <= 0 or qw.blocksize2 <= 0:
            return f"fp8 scale blocks must be positive, found [{qw.blocksize2}, {qw.blocksize}]"
    return None


def call_reason(call) -> Optional[str]:
    """What the quantized decode GEMV cannot take about the call's adapters beyond cuda_backend's single-adapter
    rules (which it shares): mixed batches; no adapter at all is fine (r = 0)."""
    if call.plan is not None:
        return "a mixed batch (row_index) over a quantized base weight has no CUDA kernel (the triton backend runs it)"
    return None


def qgemv(mod, x2d, qw, bias, A, B, scale, use_pdl, out=None, s_out=None, col_scale=None):
    """Run the binding's lora_qgemv: (Y [M, N] in x.dtype, S [M, r] fp32; r = 0 when A is None). Raises the
    binding's message (it returns errors instead of throwing, see csrc/binding.cpp)."""
    if not hasattr(mod, "lora_qgemv"):
        raise RuntimeError("the loaded fastpeft._C predates the quantized decode GEMV (no lora_qgemv); rebuild it "
                           "(FASTPEFT_BUILD_CUDA=1) or remove it to use the just-in-time build")
    qdata = qw.qdata
    blocksize2 = qw.blocksize2 if qw.fmt in ("nf4", "fp8") else 0
    y, s, err = mod.lora_qgemv(x2d, qw.fmt, qdata, qw.scales, qw.zeros, qw.code, qw.code2, qw.absmax2, qw.offset,
                               qw.g_idx, int(qw.N), int(qw.blocksize), int(blocksize2), bias, A, B, float(scale),
                               bool(use_pdl), out=out, s_out=s_out, col_scale=col_scale)
    if err:
        raise RuntimeError(f"fastpeft lora_qgemv: {err}")
    return y, s


def forward(call, mod, use_pdl, col_scale):
    """(Y, S) for a call cuda_backend.supports() accepted: S [M, r] fp32 ([M, 0] without an adapter)."""
    a = call.adapters[0] if call.adapters else None
    return qgemv(mod, call.x, call.base.packed, call.base.bias, a.A if a else None, a.B if a else None,
                 a.scale if a else 0.0, use_pdl, col_scale=col_scale)
