"""The LoRA op: ``fastpeft::lora_fwd`` / ``fastpeft::lora_bwd``, torch.library custom ops for every base
(dense, quantized, none) and every adapter set (see contract.py for the contract).

The ops are opaque to torch.compile (fake impls give shapes), so ``torch.compile(fullgraph=True)``
traces a LoRA model without graph breaks, and the autograd formula is registered on the op
(register_autograd), not in a Python autograd.Function that dynamo would have to inline.

Custom ops take tensors, lists of tensors, numbers and strings, so a call travels flattened:

    fastpeft::lora_fwd(x, weight?, bias?, packed: Tensor?[], fmt, qmeta: int[],
                       lora_As: Tensor[], lora_Bs: Tensor[], scales: float[], dropout_ps: float[],
                       magnitudes: Tensor?[], seed?, row_index?)
                       -> (Y [..., N] in x's dtype, S [M, sum r] in the compute dtype)
    fastpeft::lora_bwd(dY, x, <same base and adapters>, S, backend, needs_dx, needs_dA: bool[],
                       needs_dB: bool[]) -> [dX, dA_0.., dB_0..]   (empty tensors for grads not needed)

packed: the QuantizedWeight fields in PACKED_FIELDS order ([] for a dense base, fmt ""), qmeta: its
[N, K, blocksize, blocksize2]. Saved for backward: x (a reference to the caller's tensor, so q/k/v
projections of one input keep one copy), S = (D*x) A^T [M, sum r], the seed, references to the
weights. The dropout masks are regenerated from the seed in backward. The seed is drawn from torch's
default CPU generator, so ``torch.utils.checkpoint`` (which restores that RNG state before
recomputing) reproduces it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..quant.formats import QuantizedWeight
from . import dispatch
from .contract import SEED_HIGH, Adapter, AdapterSet, Base, LoraCall, compute_dtype, prepare, validate

PACKED_FIELDS = ("qdata", "scales", "zeros", "code", "absmax2", "code2", "offset", "g_idx")


def draw_seed() -> Tensor:
    """A fresh dropout seed (0-dim int64 CPU tensor) from torch's default CPU generator.

    A tensor, not a Python int, so that torch.compile keeps it in the graph instead of breaking on
    ``.item()``. Tests call this right after ``torch.manual_seed`` to learn the seed a call will use.
    """
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device="cpu")


# -- flattening a call for the custom ops, and back ---------------------------------------------------
def _flatten_base(base: Base) -> tuple:
    q = base.packed
    if q is None:
        return base.weight, base.bias, [], "", []
    return None, base.bias, [getattr(q, f) for f in PACKED_FIELDS], q.fmt, [q.N, q.K, q.blocksize, q.blocksize2]


def _base(weight, bias, packed, fmt, qmeta) -> Base:
    if not fmt:
        return Base(weight=weight, bias=bias)
    N, K, blocksize, blocksize2 = qmeta
    return Base(packed=QuantizedWeight(fmt, N, K, *packed, blocksize, blocksize2), bias=bias)


def _call(x, weight, bias, packed, fmt, qmeta, lora_As, lora_Bs, scales, dropout_ps, magnitudes, seed,
          row_index) -> LoraCall:
    adapters = tuple(Adapter(A, B, float(s), float(p), m)
                     for A, B, s, p, m in zip(lora_As, lora_Bs, scales, dropout_ps, magnitudes))
    return LoraCall(x.reshape(-1, x.shape[-1]), _base(weight, bias, packed, fmt, qmeta), adapters,
                    0 if seed is None else int(seed.item()), row_index)


def _out_features(weight, bias, qmeta, lora_Bs) -> int:
    if weight is not None:
        return weight.shape[0]
    if qmeta:
        return qmeta[0]
    return lora_Bs[0].shape[0] if lora_Bs else bias.shape[0]


# -- forward ------------------------------------------------------------------------------------------
@torch.library.custom_op("fastpeft::lora_fwd", mutates_args=())
def lora_fwd_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], packed: Sequence[Optional[Tensor]],
                fmt: str, qmeta: Sequence[int], lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor],
                scales: Sequence[float], dropout_ps: Sequence[float], magnitudes: Sequence[Optional[Tensor]],
                seed: Optional[Tensor], row_index: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    call = _call(x, weight, bias, packed, fmt, qmeta, lora_As, lora_Bs, scales, dropout_ps, magnitudes, seed,
                 row_index)
    Y, S = dispatch.get(dispatch.choose(call)).forward(call)
    # The fake impl promises these dtypes; keep real outputs identical whatever a backend returned.
    cdt = call.compute_dtype()
    Y = Y if Y.dtype == x.dtype else Y.to(x.dtype)
    S = S if S.dtype == cdt else S.to(cdt)
    return Y.reshape(*x.shape[:-1], Y.shape[-1]), S


@lora_fwd_op.register_fake
def _(x, weight, bias, packed, fmt, qmeta, lora_As, lora_Bs, scales, dropout_ps, magnitudes, seed, row_index):
    M = math.prod(x.shape[:-1])
    N = _out_features(weight, bias, qmeta, lora_Bs)
    R = sum(A.shape[0] for A in lora_As)
    cdt = compute_dtype(x.dtype, *(t.dtype for t in (*lora_As, *lora_Bs)))
    return x.new_empty((*x.shape[:-1], N)), x.new_empty((M, R), dtype=cdt)


# -- backward -----------------------------------------------------------------------------------------
@torch.library.custom_op("fastpeft::lora_bwd", mutates_args=())
def lora_bwd_op(dY: Tensor, x: Tensor, weight: Optional[Tensor], packed: Sequence[Optional[Tensor]], fmt: str,
                qmeta: Sequence[int], lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor], S: Tensor,
                scales: Sequence[float], dropout_ps: Sequence[float], magnitudes: Sequence[Optional[Tensor]],
                seed: Optional[Tensor], row_index: Optional[Tensor], backend: str, needs_dx: bool,
                needs_dA: Sequence[bool], needs_dB: Sequence[bool]) -> list[Tensor]:
    """[dX, dA_0, .., dB_0, ..]; a grad that is not needed comes back as an empty tensor (custom ops
    cannot return None), each its own (outputs of a custom op must not alias each other)."""
    call = _call(x, weight, None, packed, fmt, qmeta, lora_As, lora_Bs, scales, dropout_ps, magnitudes, seed,
                 row_index)
    dX, dAs, dBs = dispatch.get(backend).backward(call, dY.reshape(-1, dY.shape[-1]), S, needs_dx,
                                                  list(needs_dA), list(needs_dB))
    out = [dX.to(x.dtype).reshape(x.shape) if needs_dx else x.new_empty(0)]
    out += [g.to(A.dtype) if need else A.new_empty(0) for g, A, need in zip(dAs, lora_As, needs_dA)]
    out += [g.to(B.dtype) if need else B.new_empty(0) for g, B, need in zip(dBs, lora_Bs, needs_dB)]
    return out


@lora_bwd_op.register_fake
def _(dY, x, weight, packed, fmt, qmeta, lora_As, lora_Bs, S, scales, dropout_ps, magnitudes, seed, row_index,
      backend, needs_dx, needs_dA, needs_dB):
    out = [torch.empty_like(x) if needs_dx else x.new_empty(0)]
    out += [torch.empty_like(A) if need else A.new_empty(0) for A, need in zip(lora_As, needs_dA)]
    out += [torch.empty_like(B) if need else B.new_empty(0) for B, need in zip(lora_Bs, needs_dB)]
    return out


def _grad_structure(v) -> Optional[int]:
    """How autograd expects the grad of one custom-op input: a list of this length for a list of tensors
    (empty lists included), else one value (torch/_library/autograd.py flattens only such lists)."""
    if isinstance(v, (list, tuple)) and all(isinstance(e, Tensor) for e in v):
        return len(v)
    return None


def _setup_context(ctx, inputs, output):
    (x, weight, bias, packed, fmt, qmeta, lora_As, lora_Bs, scales, dropout_ps, magnitudes, seed,
     row_index) = inputs
    _, S = output
    ctx.mark_non_differentiable(S)
    # The backward must run on the backend that made the masks (torch and Triton RNGs differ); the
    # choice is a pure function of these inputs and the environment, so it is redone here. (Without the
    # seed's value: no backend choice depends on it, and reading it would stop torch.compile's trace.)
    call = _call(x, weight, bias, packed, fmt, qmeta, lora_As, lora_Bs, scales, dropout_ps, magnitudes, None,
                 row_index)
    ctx.backend = dispatch.choose(call)
    ctx.meta = (fmt, list(qmeta), list(scales), list(dropout_ps))
    ctx.n_adapters = len(lora_As)
    ctx.n_packed = len(packed)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.structure = [_grad_structure(v) for v in inputs]
    ctx.save_for_backward(x, weight, S, seed, row_index, *lora_As, *lora_Bs, *magnitudes, *packed)


def _backward(ctx, dY, _dS):
    x, weight, S, seed, row_index, *rest = ctx.saved_tensors
    n, fmt, qmeta, scales, dropout_ps = ctx.n_adapters, *ctx.meta
    lora_As, lora_Bs, magnitudes, packed = list(rest[:n]), list(rest[n:2 * n]), list(rest[2 * n:3 * n]), \
        list(rest[3 * n:])
    need = ctx.needs_input_grad
    need_x, need_w, need_b = bool(need[0]), bool(need[1]), bool(need[2])
    need_A = [bool(v) for v in need[6]] if isinstance(need[6], (list, tuple)) else [bool(need[6])] * n
    need_B = [bool(v) for v in need[7]] if isinstance(need[7], (list, tuple)) else [bool(need[7])] * n
    grads = [None if s is None else [None] * s for s in ctx.structure]
    if need_x or any(need_A) or any(need_B):
        out = torch.ops.fastpeft.lora_bwd(dY, x, weight, packed, fmt, qmeta, lora_As, lora_Bs, S, scales,
                                          dropout_ps, magnitudes, seed, row_index, ctx.backend, need_x, need_A,
                                          need_B)
        grads[0] = out[0] if need_x else None
        grads[6] = [g if nd else None for g, nd in zip(out[1:1 + n], need_A)]
        grads[7] = [g if nd else None for g, nd in zip(out[1 + n:], need_B)]
    if need_w or need_b:  # a trainable dense base (rare: LoRA freezes it); packed weights never get grads
        dY2 = dY.reshape(-1, dY.shape[-1])
        if need_w:
            grads[1] = torch.mm(dY2.t(), x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if need_b:
            grads[2] = dY2.sum(0).to(ctx.bias_dtype)
    return tuple(grads)


lora_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# -- the public entry points ---------------------------------------------------------------------------
def lora(x: Tensor, base: Base, adapters: Union[AdapterSet, Sequence[Adapter]] = (), training: bool = False,
         fn: str = "fastpeft.ops.lora") -> Tensor:
    """``base(x) + sum_i s_i * dropout_i(x) A_i^T B_i^T`` as one op; returns [..., N] in x's dtype.

    base: :class:`Base` (dense weight, packed weight, or none; with an optional bias). adapters: an
    :class:`AdapterSet` or a sequence of :class:`Adapter`, applied together (zero adapters: the base
    alone, through the same kernels). Dropout applies to each adapter's input only, and only when
    ``training``. ``fn`` names the caller in error messages.
    """
    aset = adapters if isinstance(adapters, AdapterSet) else AdapterSet(tuple(adapters))
    x, base = prepare(x, base)
    validate(fn, x, base, aset)
    ads = aset.adapters
    if training and any(a.dropout_p > 0.0 for a in ads):
        seed = draw_seed()
        ps = [float(a.dropout_p) for a in ads]
    else:
        seed, ps = None, [0.0] * len(ads)
    weight, bias, packed, fmt, qmeta = _flatten_base(base)
    Y, _ = torch.ops.fastpeft.lora_fwd(x, weight, bias, packed, fmt, qmeta, [a.A for a in ads], [a.B for a in ads],
                                       [float(a.scale) for a in ads], ps, [a.magnitude for a in ads], seed,
                                       aset.row_index)
    return Y


def lora_linear(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                scale: float, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """One adapter over a dense weight (None: the LoRA term only, + bias): :func:`lora` for that case."""
    base = Base(weight=weight, bias=bias)
    return lora(x, base, [Adapter(lora_A, lora_B, float(scale), float(dropout_p))], training, fn="lora_linear")


def lora_quant_linear(x: Tensor, qweight: QuantizedWeight, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                      scale: float, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """One adapter over a packed weight, W = dequantize(qweight) in x's dtype: :func:`lora` for that case.
    Gradients go to x, lora_A, lora_B (and bias when it requires grad), never to the packed weight."""
    base = Base(packed=qweight, bias=bias)
    return lora(x, base, [Adapter(lora_A, lora_B, float(scale), float(dropout_p))], training,
                fn="lora_quant_linear")
