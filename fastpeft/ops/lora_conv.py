"""LoRA on convolutions (peft's lora.Conv1d / Conv2d / Conv3d): the base conv and the adapters' terms in one op.

Shapes (d = 1, 2, 3 spatial dims; x [N, C_in, *in], g = the base's groups):
    W [C_out, C_in/g, *k]     the base conv (stride, padding, dilation, groups, padding_mode)
    A [r, C_in, *k_A]         peft's lora_A: a conv with the base's kernel size, stride and padding but
                              dilation 1, groups 1 and zero padding (peft builds it that way, whatever the base)
    B [C_out, r/g, 1, ..]     peft's lora_B: a 1x1 conv with the base's groups

    S_i = conv(D_i * x, A_i)                                   [N, r_i, *out]
    y   = conv(x, W) + sum_i s_i * conv1x1_g(S_i, B_i) (+ bias)  [N, C_out, *out]
    (DoRA: y = g * (conv(x, W) + sum_i s_i conv1x1_g(S_i, B_i)) + bias, with g = ``col_scale`` [C_out])

Two ways to run it, picked per call (measured on CPU, see README/report: N=2, C=320, 64x64, 3x3):
- fold: y = conv(x, W + sum_i s_i B_i A_i, bias), one conv. Exact when A's geometry equals the base's
  (dilation 1, zero padding, groups 1) and there is no dropout; used when nothing needs a gradient (inference).
  The [C_out, C_in*k] product costs ~r/(N*out pixels) of the conv.
- separate: the base conv, then each adapter's r-channel conv and its 1x1 conv as one in-place batched GEMM
  into the base output (``baddbmm_``: y is the only [N, C_out, *out] tensor written). Its autograd Function
  saves x (a reference), S and the seed, never the dropout mask or a dropped copy of x (peft keeps dropout(x)):
  the mask is regenerated in backward from the seed, exactly as the linear op's torch backend draws it
  (torch_backend._keep01, adapter i from ``adapter_seed(seed, i)``), so ``dropout_mask`` reproduces it.

    backward  dS_i = s_i * B_i^T dY                     (1x1, per group)
              dB_i = s_i * sum_n dY S_i^T
              dX   = conv_input_grad(dY, W) + sum_i D_i * conv_input_grad(dS_i, A_i)
              dA_i = conv_weight_grad(dS_i, D_i * x)

The separate path is a pair of torch.library custom ops (``fastpeft::lora_conv_fwd`` / ``_bwd``) with fake
impls, so torch.compile(fullgraph=True) traces it; the fold path is plain torch ops. This module imports
nothing above fastpeft.ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import Adapter, adapter_seed, compute_dtype
from .lora_op import draw_seed
from .torch_backend import _keep01, _keep_scale

_MODES = ("zeros", "reflect", "replicate", "circular")


# -- geometry -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvSpec:
    """The base conv's hyperparameters (an nn.ConvNd's, see :meth:`of`). ``padding`` is a tuple or "same"/"valid"."""

    stride: tuple
    padding: Union[tuple, str]
    dilation: tuple
    groups: int = 1
    padding_mode: str = "zeros"

    @staticmethod
    def of(conv) -> "ConvSpec":
        """The spec of a torch.nn.Conv1d/2d/3d (any object with those attributes)."""
        return ConvSpec(tuple(conv.stride), conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                        tuple(conv.dilation), int(conv.groups), str(conv.padding_mode))


def _tup(v, d: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * d


def _pads(padding, kernel: Sequence[int], dilation: Sequence[int]) -> list:
    """[lo_0, hi_0, lo_1, hi_1, ..] per spatial dim (first dim first), as nn.ConvNd resolves ``padding``."""
    out = []
    for i, k in enumerate(kernel):
        if padding == "valid":
            lo = hi = 0
        elif padding == "same":  # nn.ConvNd: the extra pixel of an even total goes to the high side
            total = dilation[i] * (k - 1)
            lo, hi = total // 2, total - total // 2
        else:
            lo = hi = int(padding[i])
        out += [lo, hi]
    return out


def _out_size(size: Sequence[int], kernel, stride, pads, dilation) -> list:
    return [(n + pads[2 * i] + pads[2 * i + 1] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
            for i, n in enumerate(size)]


def _symmetric(pads: Sequence[int]) -> bool:
    return all(pads[2 * i] == pads[2 * i + 1] for i in range(len(pads) // 2))


def _torch_pad(pads: Sequence[int]) -> list:
    """F.pad's order (last dim first) from ours (first dim first)."""
    d = len(pads) // 2
    return [p for i in reversed(range(d)) for p in (pads[2 * i], pads[2 * i + 1])]


# -- conv pieces (the torch implementation, also the custom ops' bodies) ----------------------------------
def _conv(x: Tensor, w: Tensor, bias: Optional[Tensor], stride, pads, dilation, groups: int, mode: str) -> Tensor:
    d = w.dim() - 2
    if mode == "zeros" and _symmetric(pads):
        return torch.ops.aten.convolution(x, w, bias, list(stride), list(pads[::2]), list(dilation), False,
                                          [0] * d, groups)
    xp = F.pad(x, _torch_pad(pads), mode="constant" if mode == "zeros" else mode)
    return torch.ops.aten.convolution(xp, w, bias, list(stride), [0] * d, list(dilation), False, [0] * d, groups)


def _unpad_grad(g: Tensor, x: Tensor, pads, mode: str) -> Tensor:
    """The gradient w.r.t. x of F.pad(x, pads, mode), given the gradient w.r.t. the padded tensor."""
    d = len(pads) // 2
    if mode == "zeros":
        for i in range(d):
            g = g.narrow(2 + i, pads[2 * i], x.shape[2 + i])
        return g.contiguous()
    if mode in ("reflect", "replicate"):
        op = getattr(torch.ops.aten, f"{'reflection' if mode == 'reflect' else 'replication'}_pad{d}d_backward")
        return op(g, x, _torch_pad(pads))
    # circular: each pad strip came from the opposite end of x; fold it back, one dim at a time
    for i in range(d):
        dim, lo, hi, n = 2 + i, pads[2 * i], pads[2 * i + 1], x.shape[2 + i]
        core = g.narrow(dim, lo, n).clone()
        if lo:
            core.narrow(dim, n - lo, lo).add_(g.narrow(dim, 0, lo))
        if hi:
            core.narrow(dim, 0, hi).add_(g.narrow(dim, lo + n, hi))
        g = core
    return g


def _conv_grads(dY: Tensor, x: Tensor, w: Tensor, stride, pads, dilation, groups: int, mode: str,
                need_x: bool, need_w: bool) -> tuple:
    """(dX or None, dW or None) of _conv. For dX alone x's values are not read (only its shape)."""
    d = w.dim() - 2
    if not (need_x or need_w):
        return None, None
    direct = mode == "zeros" and _symmetric(pads)
    shape = list(x.shape[:2]) + [x.shape[2 + i] + (0 if direct else pads[2 * i] + pads[2 * i + 1])
                                 for i in range(d)]
    if not need_w:
        xin = w.new_empty(1).expand(shape)  # what torch.nn.grad.conv*_input passes: no copy of x
    elif direct:
        xin = x
    else:
        xin = F.pad(x, _torch_pad(pads), mode="constant" if mode == "zeros" else mode)
    gi, gw, _ = torch.ops.aten.convolution_backward(dY, xin, w, None, list(stride),
                                                    list(pads[::2]) if direct else [0] * d, list(dilation), False,
                                                    [0] * d, groups, [need_x, need_w, False])
    if need_x and not direct:
        gi = _unpad_grad(gi, x, pads, mode)
    return gi, gw


def _grouped_1x1_add_(Y: Tensor, S: Tensor, B: Tensor, scale: float, groups: int) -> Tensor:
    """Y += scale * conv1x1(S, B, groups) in place: one batched GEMM over (sample, group) into Y's memory
    (contiguous Y); a separate conv and add otherwise (e.g. channels_last)."""
    N, C_out, r = Y.shape[0], Y.shape[1], S.shape[1]
    Bc = B.to(Y.dtype).reshape(groups, C_out // groups, r // groups)
    Sc = S if S.dtype == Y.dtype else S.to(Y.dtype)
    if Y.is_contiguous() and Sc.is_contiguous():
        P = Y[0, 0].numel()
        Y3 = Y.view(N * groups, C_out // groups, P)
        Bb = Bc.unsqueeze(0).expand(N, -1, -1, -1).reshape(N * groups, C_out // groups, r // groups)
        Y3.baddbmm_(Bb, Sc.view(N * groups, r // groups, P), alpha=scale)
        return Y
    return Y.add_(torch.ops.aten.convolution(Sc, B.to(Y.dtype), None, [1] * (Y.dim() - 2), [0] * (Y.dim() - 2),
                                             [1] * (Y.dim() - 2), False, [0] * (Y.dim() - 2), groups), alpha=scale)


def _lora_input(x: Tensor, cdt: torch.dtype, p: float, seed: int, i: int) -> tuple:
    """(D_i x without its 1/(1-p): keep01 * x in cdt, keep01 or None)."""
    xc = x if x.dtype == cdt else x.to(cdt)
    if p <= 0.0:
        return xc, None
    keep = _keep01(adapter_seed(seed, i), x.shape, p, x.device)
    return xc * keep, keep


def _forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], As, Bs, scales, ps, seed: int,
             stride, pads, a_pads, dilation, groups: int, mode: str) -> tuple:
    """(Y [N, C_out, *out] in x's dtype, S [N, sum r, *out] in the compute dtype)."""
    cdt = compute_dtype(x.dtype, *(a.dtype for a in As), *(b.dtype for b in Bs))
    Y = None
    if weight is not None:
        Y = _conv(x, weight, bias, stride, pads, dilation, groups, mode)
    S_parts = []
    ones = [1] * (x.dim() - 2)
    for i, (A, B, s, p) in enumerate(zip(As, Bs, scales, ps)):
        xin, keep = _lora_input(x, cdt, p, seed, i)
        S = _conv(xin, A.to(cdt), None, stride, a_pads, ones, 1, "zeros")
        del xin, keep
        if p > 0.0:
            S.mul_(_keep_scale(p))
        S_parts.append(S)
        if Y is None:
            shape = (x.shape[0], B.shape[0], *S.shape[2:])
            Y = (x.new_zeros(shape) if bias is None
                 else bias.to(x.dtype).view(1, -1, *ones).expand(shape).contiguous())
        _grouped_1x1_add_(Y, S, B, float(s), groups)
    S = torch.cat(S_parts, 1) if len(S_parts) > 1 else S_parts[0] if S_parts else x.new_empty(0, dtype=cdt)
    return Y, S


def _backward(dY: Tensor, x: Tensor, weight: Optional[Tensor], As, Bs, S: Tensor, scales, ps, seed: int,
              stride, pads, a_pads, dilation, groups: int, mode: str, need_x: bool, need_A, need_B) -> tuple:
    cdt = S.dtype if S.numel() else compute_dtype(x.dtype, *(a.dtype for a in As))
    dY = dY.contiguous()
    dX = None
    if need_x and weight is not None:
        dX = _conv_grads(dY, x, weight, stride, pads, dilation, groups, mode, True, False)[0]
    dYc = dY if dY.dtype == cdt else dY.to(cdt)
    N, C_out, P = dY.shape[0], dY.shape[1], dY[0, 0].numel()
    ones = [1] * (x.dim() - 2)
    dAs, dBs, c0 = [], [], 0
    for i, (A, B, s, p) in enumerate(zip(As, Bs, scales, ps)):
        r = A.shape[0]
        Si = S[:, c0:c0 + r]
        c0 += r
        o, rg = C_out // groups, r // groups
        dY3 = dYc.view(N * groups, o, P)
        Bg = B.to(cdt).reshape(groups, o, rg)
        dB = None
        if need_B[i]:  # s * sum_n dY S^T, per group
            S3 = Si.contiguous().view(N * groups, rg, P)
            dB = torch.bmm(dY3, S3.transpose(1, 2)).view(N, groups, o, rg).sum(0).mul_(s)
            dB = dB.reshape(B.shape).to(B.dtype)
        dA = None
        if need_x or need_A[i]:
            Bb = Bg.transpose(1, 2).unsqueeze(0).expand(N, -1, -1, -1).reshape(N * groups, rg, o)
            dS = torch.bmm(Bb, dY3).view(N, r, *dY.shape[2:])
            dS.mul_(s * (_keep_scale(p) if p > 0.0 else 1.0))  # D's 1/(1-p) rides on the small dS
            if need_A[i]:
                xin, keep = _lora_input(x, cdt, p, seed, i)
            else:  # dX only: the mask, not a masked copy of x
                xin, keep = x, (_keep01(adapter_seed(seed, i), x.shape, p, x.device) if p > 0.0 else None)
            gx, gA = _conv_grads(dS, xin, A.to(cdt), stride, a_pads, ones, 1, "zeros", need_x, need_A[i])
            del xin
            if need_x:
                gx = gx.to(x.dtype)
                if keep is not None:
                    gx.mul_(keep)
                dX = gx if dX is None else dX.add_(gx)
            if need_A[i]:
                dA = gA.to(A.dtype)
        dAs.append(dA)
        dBs.append(dB)
    return dX, dAs, dBs


# -- custom ops (torch.compile sees them as opaque, shape-only fakes) --------------------------------------
@torch.library.custom_op("fastpeft::lora_conv_fwd", mutates_args=())
def lora_conv_fwd_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_As: Sequence[Tensor],
                     lora_Bs: Sequence[Tensor], scales: Sequence[float], dropout_ps: Sequence[float],
                     seed: Optional[Tensor], stride: Sequence[int], pads: Sequence[int], a_pads: Sequence[int],
                     dilation: Sequence[int], groups: int, mode: str) -> tuple[Tensor, Tensor]:
    Y, S = _forward(x, weight, bias, lora_As, lora_Bs, scales, dropout_ps, 0 if seed is None else int(seed.item()),
                    stride, pads, a_pads, dilation, groups, mode)
    return Y.to(x.dtype) if Y.dtype != x.dtype else Y, S


@lora_conv_fwd_op.register_fake
def _(x, weight, bias, lora_As, lora_Bs, scales, dropout_ps, seed, stride, pads, a_pads, dilation, groups, mode):
    k = (weight if weight is not None else lora_As[0]).shape[2:]
    dil = dilation if weight is not None else [1] * len(k)
    p = pads if weight is not None else a_pads
    out = _out_size(x.shape[2:], k, stride, p, dil)
    C_out = weight.shape[0] if weight is not None else lora_Bs[0].shape[0]
    cdt = compute_dtype(x.dtype, *(a.dtype for a in lora_As), *(b.dtype for b in lora_Bs))
    r = sum(a.shape[0] for a in lora_As)
    S = x.new_empty((x.shape[0], r, *out), dtype=cdt) if lora_As else x.new_empty(0, dtype=cdt)
    return x.new_empty((x.shape[0], C_out, *out)), S


@torch.library.custom_op("fastpeft::lora_conv_bwd", mutates_args=())
def lora_conv_bwd_op(dY: Tensor, x: Tensor, weight: Optional[Tensor], lora_As: Sequence[Tensor],
                     lora_Bs: Sequence[Tensor], S: Tensor, scales: Sequence[float], dropout_ps: Sequence[float],
                     seed: Optional[Tensor], stride: Sequence[int], pads: Sequence[int], a_pads: Sequence[int],
                     dilation: Sequence[int], groups: int, mode: str, needs_dx: bool, needs_dA: Sequence[bool],
                     needs_dB: Sequence[bool]) -> list[Tensor]:
    """[dX, dA_0.., dB_0..]; empty tensors for the grads not needed (a custom op cannot return None)."""
    dX, dAs, dBs = _backward(dY, x, weight, lora_As, lora_Bs, S, scales, dropout_ps,
                             0 if seed is None else int(seed.item()), stride, pads, a_pads, dilation, groups, mode,
                             needs_dx, list(needs_dA), list(needs_dB))
    out = [dX.to(x.dtype) if needs_dx and dX is not None else
           (torch.zeros_like(x) if needs_dx else x.new_empty(0))]
    out += [g if g is not None else A.new_empty(0) for g, A in zip(dAs, lora_As)]
    out += [g if g is not None else B.new_empty(0) for g, B in zip(dBs, lora_Bs)]
    return out


@lora_conv_bwd_op.register_fake
def _(dY, x, weight, lora_As, lora_Bs, S, scales, dropout_ps, seed, stride, pads, a_pads, dilation, groups, mode,
      needs_dx, needs_dA, needs_dB):
    out = [torch.empty_like(x) if needs_dx else x.new_empty(0)]
    out += [torch.empty_like(A) if n else A.new_empty(0) for A, n in zip(lora_As, needs_dA)]
    out += [torch.empty_like(B) if n else B.new_empty(0) for B, n in zip(lora_Bs, needs_dB)]
    return out


class _LoraConvFunction(torch.autograd.Function):
    """Autograd of the separate path: saves x (a reference), the base weight (a reference), S and the seed."""

    @staticmethod
    def forward(ctx, meta, x, weight, bias, seed, *tensors):
        scales, ps, stride, pads, a_pads, dilation, groups, mode = meta
        n = len(scales)
        As, Bs = list(tensors[:n]), list(tensors[n:])
        Y, S = torch.ops.fastpeft.lora_conv_fwd(x, weight, bias, As, Bs, scales, ps, seed, stride, pads, a_pads,
                                                dilation, groups, mode)
        ctx.meta = meta
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, S, seed, *tensors)
        return Y

    @staticmethod
    def backward(ctx, dY):
        scales, ps, stride, pads, a_pads, dilation, groups, mode = ctx.meta
        n = len(scales)
        x, weight, S, seed, *tensors = ctx.saved_tensors
        As, Bs = tensors[:n], tensors[n:]
        need = ctx.needs_input_grad
        need_x, need_w, need_b = need[1], need[2], need[3]
        need_A, need_B = list(need[5:5 + n]), list(need[5 + n:5 + 2 * n])
        dX = dW = db = None
        dAs, dBs = [None] * n, [None] * n
        if need_x or any(need_A) or any(need_B):
            out = torch.ops.fastpeft.lora_conv_bwd(dY, x, weight, list(As), list(Bs), S, scales, ps, seed, stride,
                                                   pads, a_pads, dilation, groups, mode, need_x, need_A, need_B)
            dX = out[0] if need_x else None
            dAs = [g if nd else None for g, nd in zip(out[1:1 + n], need_A)]
            dBs = [g if nd else None for g, nd in zip(out[1 + n:1 + 2 * n], need_B)]
        if need_w:  # a trainable base conv (rare: LoRA freezes it)
            dW = _conv_grads(dY.contiguous(), x, weight, stride, pads, dilation, groups, mode, False, True)[1]
        if need_b:
            db = dY.sum([0] + list(range(2, dY.dim()))).to(ctx.bias_dtype)
        return (None, dX, dW, db, None, *dAs, *dBs)


# -- the public entry point -------------------------------------------------------------------------------
def _check(fn: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], adapters, spec: ConvSpec,
           col_scale: Optional[Tensor]) -> int:
    """Validate the call; returns d (spatial dims)."""
    ref = weight if weight is not None else (adapters[0].A if adapters else None)
    if ref is None:
        raise ValueError(f"{fn}: need a base weight or at least one adapter")
    d = ref.dim() - 2
    if d not in (1, 2, 3) or x.dim() != d + 2:
        raise ValueError(f"{fn}: x must be [N, C_in, *{d} spatial dims] for a {d}-d conv weight "
                         f"{tuple(ref.shape)}; got x {tuple(x.shape)}")
    if spec.padding_mode not in _MODES:
        raise ValueError(f"{fn}: padding_mode must be one of {_MODES}; got {spec.padding_mode!r}")
    g, C_in = spec.groups, x.shape[1]
    C_out = weight.shape[0] if weight is not None else adapters[0].B.shape[0]
    if weight is not None and (weight.shape[1] * g != C_in or C_out % g):
        raise ValueError(f"{fn}: weight {tuple(weight.shape)} with groups={g} needs x with {weight.shape[1] * g} "
                         f"channels; got x {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (C_out,):
        raise ValueError(f"{fn}: bias must be [{C_out}]; got {tuple(bias.shape)}")
    for i, a in enumerate(adapters):
        r = a.A.shape[0]
        if a.A.dim() != d + 2 or a.A.shape[1] != C_in:
            raise ValueError(f"{fn}: adapter {i}: lora_A must be [r, C_in={C_in}, *kernel] ({d + 2}-d); got "
                             f"{tuple(a.A.shape)}")
        if r % g or tuple(a.B.shape) != (C_out, r // g) + (1,) * d:
            raise ValueError(f"{fn}: adapter {i}: lora_B must be [C_out={C_out}, r/groups={r}/{g}] + 1x1 kernel "
                             f"{(C_out, r / g) + (1,) * d} (r divisible by groups); got {tuple(a.B.shape)}")
    if col_scale is not None and (weight is None or tuple(col_scale.shape) != (C_out,)):
        raise ValueError(f"{fn}: col_scale (DoRA) needs a base weight and shape [{C_out}]; got "
                         f"{None if col_scale is None else tuple(col_scale.shape)}")
    return d


def _foldable(x: Tensor, weight: Optional[Tensor], adapters, spec: ConvSpec, ps: list, dilation) -> bool:
    """One conv with W + sum s B A gives exactly the separate result (A's geometry = the base's)."""
    if weight is None or spec.groups != 1 or spec.padding_mode != "zeros" or any(v != 1 for v in dilation):
        return False
    if any(p > 0.0 for p in ps) or any(a.A.shape[2:] != weight.shape[2:] for a in adapters):
        return False
    cdt = compute_dtype(x.dtype, *(t.dtype for a in adapters for t in (a.A, a.B)))
    return x.dtype == cdt and weight.dtype == cdt  # a 16-bit x would round s B A into W's 16 bits


def _wants_grad(x, weight, bias, adapters, col_scale) -> bool:
    ts = [x, weight, bias, col_scale] + [t for a in adapters for t in (a.A, a.B)]
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def lora_conv(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], adapters: Sequence[Adapter],
              spec: ConvSpec, training: bool = False, col_scale: Optional[Tensor] = None,
              fn: str = "fastpeft.ops.lora_conv") -> Tensor:
    """``conv(x, W) + sum_i s_i conv1x1_g(conv(dropout_i(x), A_i), B_i) + bias`` (module docstring), in x's dtype.

    weight None: the adapters' terms only (+ bias). adapters: :class:`Adapter` entries with peft's conv
    shapes (A [r, C_in, *k], B [C_out, r/groups, 1..]; scale a float). Dropout applies only when ``training``.
    col_scale: DoRA's g [C_out] (may require grad): y = g * (conv(x, W) + LoRA terms) + bias.
    x may be unbatched ([C_in, *spatial]), as nn.ConvNd allows.
    """
    adapters = tuple(adapters)
    ref = weight if weight is not None else (adapters[0].A if adapters else None)
    unbatched = ref is not None and x.dim() == ref.dim() - 1
    if unbatched:
        x = x.unsqueeze(0)
    d = _check(fn, x, weight, bias, adapters, spec, col_scale)
    stride, dilation = _tup(spec.stride, d), _tup(spec.dilation, d)
    padding = spec.padding if isinstance(spec.padding, str) else _tup(spec.padding, d)
    if isinstance(padding, str) and padding not in ("same", "valid"):
        raise ValueError(f"{fn}: padding must be a tuple of ints, 'same' or 'valid'; got {padding!r}")
    if padding == "same" and any(s != 1 for s in stride):
        raise ValueError(f"{fn}: padding='same' is not supported for strided convolutions (stride {stride})")
    ps = [float(a.dropout_p) if training else 0.0 for a in adapters]
    if any(isinstance(a.scale, Tensor) for a in adapters):
        raise TypeError(f"{fn}: adapter scales must be floats for conv layers")
    pads = _pads(padding, weight.shape[2:], dilation) if weight is not None else []
    a_pads = _pads(padding, adapters[0].A.shape[2:], [1] * d) if adapters else []
    out = None
    if weight is not None:
        out = _out_size(x.shape[2:], weight.shape[2:], stride, pads, dilation)
    for i, a in enumerate(adapters):
        a_pads_i = _pads(padding, a.A.shape[2:], [1] * d)
        if a_pads_i != a_pads:
            raise ValueError(f"{fn}: adapter {i}: lora_A kernel {tuple(a.A.shape[2:])} differs from adapter 0's "
                             f"{tuple(adapters[0].A.shape[2:])}")
        a_out = _out_size(x.shape[2:], a.A.shape[2:], stride, a_pads, [1] * d)
        if out is not None and a_out != out:
            # peft builds lora_A with the base's kernel, stride and padding but dilation 1: with a dilated base
            # and explicit padding the two outputs differ in size (peft's forward fails on the add too)
            raise ValueError(f"{fn}: adapter {i}: lora_A's conv (kernel {tuple(a.A.shape[2:])}, stride {stride}, "
                             f"padding {padding}, dilation 1, as peft builds it) gives spatial size {tuple(a_out)} but "
                             f"the base conv (dilation {dilation}) gives {tuple(out)} for input {tuple(x.shape)}; "
                             f"peft cannot add them either. Use padding='same' or do not target this layer.")
        out = a_out if out is None else out

    if adapters and _foldable(x, weight, adapters, spec, ps, dilation) and not _wants_grad(
            x, weight, bias, adapters, col_scale):
        y = _fold(x, weight, bias, adapters, stride, pads, dilation, col_scale)
    else:
        y = _separate(x, weight, bias if col_scale is None else None, adapters, ps, training, stride, pads, a_pads,
                      dilation, spec.groups, spec.padding_mode)
        if col_scale is not None:
            view = (1, -1) + (1,) * d
            gs = col_scale.to(y.dtype).view(view)
            y = y * gs if bias is None else torch.addcmul(bias.to(y.dtype).view(view), y, gs)
    return y.squeeze(0) if unbatched else y


def _fold(x, weight, bias, adapters, stride, pads, dilation, col_scale) -> Tensor:
    """One conv with W + sum_i s_i B_i A_i (times g for DoRA): plain torch ops (autograd and compile follow)."""
    W2 = weight.flatten(1)
    for a in adapters:
        W2 = torch.addmm(W2, a.B.flatten(1).to(W2.dtype), a.A.flatten(1).to(W2.dtype), alpha=float(a.scale))
    if col_scale is not None:
        W2 = W2 * col_scale.to(W2.dtype)[:, None]
    return _conv(x, W2.view(weight.shape), bias, stride, pads, dilation, 1, "zeros")


def _separate(x, weight, bias, adapters, ps, training, stride, pads, a_pads, dilation, groups, mode) -> Tensor:
    scales = tuple(float(a.scale) for a in adapters)
    seed = draw_seed() if training and any(p > 0.0 for p in ps) else None
    meta = (scales, tuple(ps), tuple(stride), tuple(pads), tuple(a_pads), tuple(dilation), int(groups), mode)
    if not _wants_grad(x, weight, bias, adapters, None) and not torch.compiler.is_compiling():
        # eager call without gradients: the implementation directly (no custom op dispatch)
        return _forward(x, weight, bias, [a.A for a in adapters], [a.B for a in adapters], scales, ps,
                        0 if seed is None else int(seed), stride, pads, a_pads, dilation, groups, mode)[0].to(x.dtype)
    return _LoraConvFunction.apply(meta, x, weight, bias, seed, *(a.A for a in adapters), *(a.B for a in adapters))


def lora_conv_delta_weight(lora_A: Tensor, lora_B: Tensor, scale: float, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``scale * B A`` in the conv weight's layout [C_out, C_in, *k] (groups 1), computed in fp32 (fp64 for fp64)."""
    if lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"lora_conv_delta_weight: lora_B {tuple(lora_B.shape)} must have r={lora_A.shape[0]} "
                         f"input channels (groups 1) to match lora_A {tuple(lora_A.shape)}")
    out_dtype = dtype if dtype is not None else torch.promote_types(lora_A.dtype, lora_B.dtype)
    cdt = compute_dtype(lora_A.dtype, lora_B.dtype)
    delta = torch.mm(lora_B.flatten(1).to(cdt), lora_A.flatten(1).to(cdt))
    if scale != 1.0:
        delta = delta * scale
    return delta.view(lora_B.shape[0], *lora_A.shape[1:]).to(out_dtype)


__all__ = ["ConvSpec", "lora_conv", "lora_conv_delta_weight"]
