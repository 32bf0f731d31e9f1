"""``lora_quant_linear``: LoRA linear over a quantized base weight (QLoRA), as torch.library custom ops.

    Y  = x W^T (+ bias) + scale * dropout(x) A^T B^T,   W = dequantize(qweight)
    dX = dY W + D * (dS A)        (through the dequantized W; the packed weight gets no gradient)

Packed fields per format: :class:`fastpeft.quant.formats.QuantizedWeight` (and design.md). The
custom ops take the fields flattened (custom ops accept tensors, ints, floats and strings only):

    fastpeft::lora_quant_fwd(x, qdata, scales, zeros?, code?, absmax2?, code2?, offset?, g_idx?,
                             fmt, N, K, blocksize, blocksize2, bias?, lora_A, lora_B, scale,
                             dropout_p, seed?) -> (Y [..., N] in x.dtype, S [M, r] fp32/f64)
    fastpeft::lora_quant_bwd(dY, x, <same packed fields>, lora_A, lora_B, S, scale, dropout_p, seed?,
                             backend, needs_dx, needs_dA, needs_dB) -> (dX, dA, dB)

Backends plug in with three functions (same contract as the 16-bit lora_fwd/lora_bwd, with the
weight replaced by a QuantizedWeight ``qw``; W is never materialized by a fused kernel):

    supports_quant(x2d, qw, bias, A, B, dropout_p) -> None | str
    lora_quant_fwd(x2d, qw, bias, A, B, scale, dropout_p, seed) -> (Y [M, N], S [M, r])
    lora_quant_bwd(dY, x2d, qw, A, B, S, scale, dropout_p, seed, needs_dx, needs_dA, needs_dB)
        -> (dX | None, dA | None, dB | None)

A backend module ``fastpeft.ops.<name>_backend`` that defines them is picked up automatically
(cuda > triton > torch, FASTPEFT_BACKEND forces one); :func:`register_quant_backend` plugs in any
object with them without editing another file. The torch path here dequantizes W (fresh each call, in
x's dtype) and runs the 16-bit torch backend; its backward dequantizes again instead of keeping W
alive between forward and backward (QLoRA's memory saving: only packed weights persist).
Saved for backward: x (reference), S, the seed, references to the packed tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..quant.formats import QuantizedWeight, check_format, dequantize
from . import dispatch, torch_backend
from .lora_linear import _seed_int, draw_seed
from .torch_backend import compute_dtype

_QUANT_FUNCS = ("supports_quant", "lora_quant_fwd", "lora_quant_bwd")
_registered: dict[str, object] = {}


class _TorchQuant:
    """The reference backend: dequantize, then the 16-bit torch backend."""

    @staticmethod
    def supports_quant(x2d, qw, bias, A, B, dropout_p):
        return torch_backend.supports(x2d, None, bias, A, B, dropout_p)

    @staticmethod
    def lora_quant_fwd(x2d, qw, bias, A, B, scale, dropout_p, seed):
        W = dequantize(qw, x2d.dtype)
        return torch_backend.lora_fwd(x2d, W, bias, A, B, scale, dropout_p, seed)

    @staticmethod
    def lora_quant_bwd(dY, x2d, qw, A, B, S, scale, dropout_p, seed, needs_dx, needs_dA, needs_dB):
        W = dequantize(qw, x2d.dtype) if needs_dx else None
        return torch_backend.lora_bwd(dY, x2d, W, A, B, S, scale, dropout_p, seed, needs_dx, needs_dA, needs_dB)


def register_quant_backend(name: str, impl) -> None:
    """Use ``impl`` (module or object with supports_quant/lora_quant_fwd/lora_quant_bwd) as backend
    ``name`` (one of dispatch.BACKENDS) for quantized calls; None removes a registration."""
    if name not in dispatch.BACKENDS:
        raise ValueError(f"unknown fastpeft backend {name!r}; expected one of {', '.join(dispatch.BACKENDS)}")
    if impl is None:
        _registered.pop(name, None)
        return
    missing = [f for f in _QUANT_FUNCS if not callable(getattr(impl, f, None))]
    if missing:
        raise TypeError(f"quant backend {name!r} must define {', '.join(missing)}")
    _registered[name] = impl


def _quant_impl(name: str) -> tuple[Optional[object], Optional[str]]:
    if name in _registered:
        return _registered[name], None
    if name == "torch":
        return _TorchQuant, None
    mod, reason = dispatch.load_backend(name)
    if mod is None:
        return None, reason
    missing = [f for f in _QUANT_FUNCS if not callable(getattr(mod, f, None))]
    if missing:
        return None, f"fastpeft.ops.{name}_backend has no quantized kernels (does not define {', '.join(missing)})"
    return mod, None


def _why_not(name: str, x2d: Tensor, qw: QuantizedWeight, bias, A, B, dropout_p: float, forced: bool) -> Optional[str]:
    reason = dispatch.device_reason(name, x2d, forced)
    if reason is not None:
        return reason
    impl, reason = _quant_impl(name)
    if impl is None:
        return reason
    try:
        return impl.supports_quant(x2d, qw, bias, A, B, dropout_p)
    except Exception as e:  # a backend bug must not take down the automatic fallback
        return f"{name}.supports_quant raised {type(e).__name__}: {e}"


def choose(x2d: Tensor, qw: QuantizedWeight, bias, A, B, dropout_p: float) -> str:
    """Backend for a quantized call (dispatch.pick's rules: forced, else cuda > triton > torch)."""
    return dispatch.pick(lambda name, forced: _why_not(name, x2d, qw, bias, A, B, dropout_p, forced),
                         f"lora_quant_linear call ({qw.fmt} weight [{qw.N}, {qw.K}], x {tuple(x2d.shape)} "
                         f"{x2d.dtype} on {x2d.device})")


def _qw(qdata, scales, zeros, code, absmax2, code2, offset, g_idx, fmt, N, K, blocksize, blocksize2):
    return QuantizedWeight(fmt, N, K, qdata, scales, zeros, code, absmax2, code2, offset, g_idx, blocksize, blocksize2)


@torch.library.custom_op("fastpeft::lora_quant_fwd", mutates_args=())
def lora_quant_fwd_op(x: Tensor, qdata: Tensor, scales: Tensor, zeros: Optional[Tensor], code: Optional[Tensor],
                      absmax2: Optional[Tensor], code2: Optional[Tensor], offset: Optional[Tensor],
                      g_idx: Optional[Tensor], fmt: str, N: int, K: int, blocksize: int, blocksize2: int,
                      bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scale: float, dropout_p: float,
                      seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    qw = _qw(qdata, scales, zeros, code, absmax2, code2, offset, g_idx, fmt, N, K, blocksize, blocksize2)
    x2d = x.reshape(-1, K)
    name = choose(x2d, qw, bias, lora_A, lora_B, dropout_p)
    impl, _ = _quant_impl(name)
    Y, S = impl.lora_quant_fwd(x2d, qw, bias, lora_A, lora_B, scale, dropout_p, _seed_int(seed))
    cdt = compute_dtype(x.dtype, lora_A, lora_B)
    return Y.to(x.dtype).reshape(*x.shape[:-1], N), S.to(cdt)


@lora_quant_fwd_op.register_fake
def _(x, qdata, scales, zeros, code, absmax2, code2, offset, g_idx, fmt, N, K, blocksize, blocksize2, bias,
      lora_A, lora_B, scale, dropout_p, seed):
    M = math.prod(x.shape[:-1])
    return (x.new_empty((*x.shape[:-1], N)),
            x.new_empty((M, lora_A.shape[0]), dtype=compute_dtype(x.dtype, lora_A, lora_B)))


@torch.library.custom_op("fastpeft::lora_quant_bwd", mutates_args=())
def lora_quant_bwd_op(dY: Tensor, x: Tensor, qdata: Tensor, scales: Tensor, zeros: Optional[Tensor],
                      code: Optional[Tensor], absmax2: Optional[Tensor], code2: Optional[Tensor],
                      offset: Optional[Tensor], g_idx: Optional[Tensor], fmt: str, N: int, K: int, blocksize: int,
                      blocksize2: int, lora_A: Tensor, lora_B: Tensor, S: Tensor, scale: float, dropout_p: float,
                      seed: Optional[Tensor], backend: str, needs_dx: bool, needs_dA: bool,
                      needs_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dA, dB); a grad that is not needed comes back as an empty tensor (custom ops cannot return None)."""
    qw = _qw(qdata, scales, zeros, code, absmax2, code2, offset, g_idx, fmt, N, K, blocksize, blocksize2)
    impl, reason = _quant_impl(backend)
    if impl is None:
        raise RuntimeError(f"fastpeft quant backend {backend!r} is unavailable: {reason}")
    dX, dA, dB = impl.lora_quant_bwd(dY.reshape(-1, N), x.reshape(-1, K), qw, lora_A, lora_B, S, scale, dropout_p,
                                     _seed_int(seed), needs_dx, needs_dA, needs_dB)
    # a separate empty tensor for each grad not needed: outputs of a custom op must not alias each other
    dX = dX.to(x.dtype).reshape(x.shape) if needs_dx else x.new_empty(0)
    dA = dA.to(lora_A.dtype) if needs_dA else lora_A.new_empty(0)
    dB = dB.to(lora_B.dtype) if needs_dB else lora_B.new_empty(0)
    return dX, dA, dB


@lora_quant_bwd_op.register_fake
def _(dY, x, qdata, scales, zeros, code, absmax2, code2, offset, g_idx, fmt, N, K, blocksize, blocksize2, lora_A,
      lora_B, S, scale, dropout_p, seed, backend, needs_dx, needs_dA, needs_dB):
    return (torch.empty_like(x) if needs_dx else x.new_empty(0),
            torch.empty_like(lora_A) if needs_dA else lora_A.new_empty(0),
            torch.empty_like(lora_B) if needs_dB else lora_B.new_empty(0))


# positions of the inputs of lora_quant_fwd_op (for the autograd functions below)
_PACKED = slice(1, 9)          # qdata .. g_idx
_META = slice(9, 14)           # fmt, N, K, blocksize, blocksize2
_IX, _IBIAS, _IA, _IB = 0, 14, 15, 16


def _setup_context(ctx, inputs, output):
    x = inputs[_IX]
    bias, A, B, scale, dropout_p, seed = inputs[_IBIAS:]
    _, S = output
    ctx.mark_non_differentiable(S)
    ctx.meta = tuple(inputs[_META])
    qw = _qw(*inputs[_PACKED], *ctx.meta)
    # backward must run on the backend whose RNG made the dropout mask
    ctx.backend = choose(x.reshape(-1, qw.K), qw, bias, A, B, dropout_p)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.bias_dtype = None if bias is None else bias.dtype
    # references to the packed fields (absent ones are saved as None); W itself is not kept
    ctx.save_for_backward(x, A, B, S, seed, *inputs[_PACKED])


def _backward(ctx, dY, _dS):
    x, A, B, S, seed, *packed = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_b, need_A, need_B = need[_IX], need[_IBIAS], need[_IA], need[_IB]
    dX = db = dA = dB = None
    if need_x or need_A or need_B:
        dX, dA, dB = torch.ops.fastpeft.lora_quant_bwd(dY, x, *packed, *ctx.meta, A, B, S, ctx.scale, ctx.dropout_p,
                                                       seed, ctx.backend, bool(need_x), bool(need_A), bool(need_B))
        dX = dX if need_x else None
        dA = dA if need_A else None
        dB = dB if need_B else None
    if need_b:
        db = dY.reshape(-1, dY.shape[-1]).sum(0).to(ctx.bias_dtype)
    # no gradient ever for the packed weight fields (they are integer codes and frozen statistics)
    return (dX, *([None] * 8), *([None] * 5), db, dA, dB, None, None, None)


lora_quant_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x: Tensor, qw: QuantizedWeight, bias: Optional[Tensor], A: Tensor, B: Tensor, dropout_p: float) -> None:
    check_format(qw.fmt)
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"lora_quant_linear: lora_A must be [r, K] and lora_B [N, r]; got lora_A "
                         f"{tuple(A.shape)}, lora_B {tuple(B.shape)}")
    if A.shape[1] != qw.K or B.shape[0] != qw.N:
        raise ValueError(f"lora_quant_linear: quantized weight is [N={qw.N}, K={qw.K}] but lora_A is "
                         f"{tuple(A.shape)} and lora_B {tuple(B.shape)}")
    if x.dim() < 1 or x.shape[-1] != qw.K:
        raise ValueError(f"lora_quant_linear: x's last dim must be K={qw.K}; got x {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"lora_quant_linear: x must be a float tensor; got {x.dtype}")
    if bias is not None and tuple(bias.shape) != (qw.N,):
        raise ValueError(f"lora_quant_linear: bias must be [N={qw.N}]; got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"lora_quant_linear: dropout_p must be in [0, 1]; got {dropout_p}")


def lora_quant_linear(x: Tensor, qweight: QuantizedWeight, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                      scale: float, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """``x W^T + bias + scale * dropout(x) A^T B^T`` with W = dequantize(qweight); [..., N] in x's dtype.

    W is dequantized into x's dtype (under autocast: the autocast dtype, like the base nn.Linear).
    Gradients go to x, lora_A, lora_B (and bias when it requires grad), never to the packed weight.
    """
    dropout_p = float(dropout_p)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        adt = torch.get_autocast_dtype(dev)
        x = x.to(adt)
        bias = bias.to(adt) if bias is not None else None
    elif bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    _check(x, qweight, bias, lora_A, lora_B, dropout_p)
    if training and dropout_p > 0.0:
        seed = draw_seed()
    else:
        dropout_p, seed = 0.0, None
    q = qweight
    Y, _ = torch.ops.fastpeft.lora_quant_fwd(x, q.qdata, q.scales, q.zeros, q.code, q.absmax2, q.code2, q.offset,
                                             q.g_idx, q.fmt, q.N, q.K, q.blocksize, q.blocksize2, bias, lora_A,
                                             lora_B, float(scale), dropout_p, seed)
    return Y


__all__ = ["lora_quant_linear", "register_quant_backend", "choose", "QuantizedWeight"]
