"""The LoRA op: ``fastpeft::lora_fwd`` / ``fastpeft::lora_bwd``, torch.library custom ops for every base
(dense, quantized, none) and every adapter set (see contract.py for the contract).

The ops are opaque to torch.compile (fake impls give shapes), so ``torch.compile(fullgraph=True)``
traces a LoRA model without graph breaks; their autograd is :class:`_LoraFunction` (see there why it
is not register_autograd). In plain eager mode (nothing traces the call: eager.py) the Function calls the
ops' Python functions directly, and the common call (dense base, plain adapters) skips the flattening too:
eager.plain_call. Both give the same results as the ops; tracers and dispatch modes still see the ops.

Custom ops take tensors, lists of tensors, numbers and strings, so a call travels flattened:

    fastpeft::lora_fwd(x, weight?, bias?, packed: Tensor?[], fmt, qmeta: int[],
                       lora_As: Tensor[], lora_Bs: Tensor[], scales: float[], dropout_ps: float[],
                       magnitudes: Tensor?[], weight_norms: Tensor?[], seed?, row_index?, row_order?,
                       row_offsets: int[])
                       -> (Y [..., N] in x's dtype, S [M, sum r] in the compute dtype,
                           Z_d [M, N] for a DoRA call with dropout, else an empty tensor)
    fastpeft::lora_bwd(dY, x, weight?, bias?, dora_saved?, <same base and adapters>, S, needs_dx,
                       needs_dA: bool[], needs_dB: bool[], needs_dm) -> [dX, dA_0.., dB_0.., (dm)]
                       (empty tensors for grads not needed; dm only when needs_dm)

A DoRA call's magnitude gradient comes out of lora_bwd too (dora.magnitude_grad, from Y or Z_d).

row_index / row_order / row_offsets: a mixed batch's RowPlan (plan.py), flattened; None / None / [].
packed: the QuantizedWeight fields in PACKED_FIELDS order ([] for a dense base, fmt ""), qmeta: its
[N, K, blocksize, blocksize2]. Saved for backward: x (a reference to the caller's tensor, so q/k/v
projections of one input keep one copy), S = (D*x) A^T [M, sum r], the seed, references to the
weights. The dropout masks are regenerated from the seed in backward. The seed is drawn from torch's
default CPU generator, so ``torch.utils.checkpoint`` (which restores that RNG state before
recomputing) reproduces it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..quant.formats import QuantizedWeight
from . import dispatch, dora, eager
from .eager import param_layout as _param_layout
from .contract import (PACKED_FIELDS, SEED_HIGH, Adapter, AdapterSet, Base, LoraCall, compute_dtype, out_features,
                       prepare, s_columns, validate)
from .plan import RowPlan, plan_from
from .pool import AdapterPool


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


def _call(x, weight, bias, packed, fmt, qmeta, lora_As, lora_Bs, scales, dropout_ps, magnitudes, weight_norms, seed,
          row_index=None, row_order=None, row_offsets=(), pool=(), pool_max_rank=0) -> LoraCall:
    pool = AdapterPool.from_tensors(pool, pool_max_rank)
    if pool is not None:  # a bank's storage: per-slot views, and the plan built here (inside the op)
        adapters = pool.views()
    else:
        adapters = tuple(Adapter(A, B, float(s), float(p), m, n)
                         for A, B, s, p, m, n in zip(lora_As, lora_Bs, scales, dropout_ps, magnitudes, weight_norms))
    plan = plan_from(row_index, row_order, row_offsets)
    if plan is None and row_index is not None:
        plan = RowPlan.build(row_index, len(adapters))
    return LoraCall(x.reshape(-1, x.shape[-1]), _base(weight, bias, packed, fmt, qmeta), adapters,
                    0 if seed is None else int(seed.item()), plan, pool)


# -- forward ------------------------------------------------------------------------------------------
def _lora_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], packed: Sequence[Optional[Tensor]],
              fmt: str, qmeta: Sequence[int], lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor],
              scales: Sequence[float], dropout_ps: Sequence[float], magnitudes: Sequence[Optional[Tensor]],
              weight_norms: Sequence[Optional[Tensor]], seed: Optional[Tensor], row_index: Optional[Tensor],
              row_order: Optional[Tensor], row_offsets: Sequence[int], pool: Sequence[Optional[Tensor]],
              pool_max_rank: int) -> tuple[Tensor, Tensor, Tensor]:
    call = _call(x, weight, bias, packed, fmt, qmeta, lora_As, lora_Bs, scales, dropout_ps, magnitudes, weight_norms,
                 seed, row_index, row_order, row_offsets, pool, pool_max_rank)
    Y, S, *aux = dispatch.get(dispatch.choose(call)).forward(call)
    # The fake impl promises these dtypes and shapes; keep real outputs identical whatever a backend returned.
    cdt = _fake_cdt(x, lora_As, lora_Bs, pool)
    Y = Y if Y.dtype == x.dtype else Y.to(x.dtype)
    S = S if S.dtype == cdt else S.to(cdt)
    if pool and S.shape[1] != pool_max_rank:  # a pool's S is [M, max_rank] whatever ranks the batch uses
        S = torch.nn.functional.pad(S, (0, pool_max_rank - S.shape[1]))
    Zd = aux[0].to(x.dtype) if _returns_zd(magnitudes, dropout_ps) else x.new_empty(0)
    return Y.reshape(*x.shape[:-1], Y.shape[-1]), S, Zd


# The op wraps the plain function, which _LoraFunction also calls directly when nothing traces it (eager.direct).
lora_fwd_op = torch.library.custom_op("fastpeft::lora_fwd", _lora_fwd, mutates_args=())


def _fake_cdt(x, lora_As, lora_Bs, pool) -> torch.dtype:
    """S's dtype from the op's arguments (a pool: its A and B stand for the adapters)."""
    ts = (pool[0], pool[1]) if pool else (*lora_As, *lora_Bs)
    return compute_dtype(x.dtype, *(t.dtype for t in ts))


def _returns_zd(magnitudes, dropout_ps) -> bool:
    """A DoRA call with dropout: its forward returns Z_d for the magnitude gradient."""
    return any(m is not None for m in magnitudes) and any(p > 0.0 for p in dropout_ps)


@lora_fwd_op.register_fake
def _(x, weight, bias, packed, fmt, qmeta, lora_As, lora_Bs, scales, dropout_ps, magnitudes, weight_norms, seed,
      row_index, row_order, row_offsets, pool, pool_max_rank):
    M = math.prod(x.shape[:-1])
    if pool:
        N, R = pool[1].shape[0], pool_max_rank
    else:
        N = out_features(_base(weight, bias, packed, fmt, qmeta), [Adapter(A, B, 1.0) for A, B in zip(lora_As, lora_Bs)])
        R = s_columns([A.shape[0] for A in lora_As], row_index is not None)
    cdt = _fake_cdt(x, lora_As, lora_Bs, pool)
    Zd = x.new_empty((M, N)) if _returns_zd(magnitudes, dropout_ps) else x.new_empty(0)
    return x.new_empty((*x.shape[:-1], N)), x.new_empty((M, R), dtype=cdt), Zd


# -- backward -----------------------------------------------------------------------------------------
def _lora_bwd(dY: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], dora_saved: Optional[Tensor],
              packed: Sequence[Optional[Tensor]], fmt: str,
              qmeta: Sequence[int], lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor], S: Tensor,
              scales: Sequence[float], dropout_ps: Sequence[float], magnitudes: Sequence[Optional[Tensor]],
              weight_norms: Sequence[Optional[Tensor]], seed: Optional[Tensor], row_index: Optional[Tensor],
              row_order: Optional[Tensor], row_offsets: Sequence[int], pool: Sequence[Optional[Tensor]],
              pool_max_rank: int, needs_dx: bool, needs_dA: Sequence[bool], needs_dB: Sequence[bool],
              needs_dm: bool) -> list[Tensor]:
    """[dX, dA_0, .., dB_0, ..]; a grad that is not needed comes back as an empty tensor (custom ops
    cannot return None), each its own (outputs of a custom op must not alias each other).

    The backward must run on the backend that made the masks (torch and Triton RNGs differ). The
    choice is a pure function of the call's tensors (shapes, dtypes, devices) and the environment, so
    it is made again here, from the same tensors, rather than carried over from the forward."""
    call = _call(x, weight, bias, packed, fmt, qmeta, lora_As, lora_Bs, scales, dropout_ps, magnitudes, weight_norms,
                 seed, row_index, row_order, row_offsets, pool, pool_max_rank)
    if pool:  # a pool's slots get no gradients (a bank serves frozen adapters); dX only
        needs_dA = needs_dB = [False] * len(call.adapters)
    dX = None
    dAs, dBs = [None] * len(needs_dA), [None] * len(needs_dB)
    if needs_dx or any(needs_dA) or any(needs_dB):
        dX, dAs, dBs = dispatch.get(dispatch.choose(call)).backward(call, dY.reshape(-1, dY.shape[-1]), S, needs_dx,
                                                                    list(needs_dA), list(needs_dB))
    if pool:
        dAs, dBs = [], []
    out = [dX.to(x.dtype).reshape(x.shape) if needs_dx else x.new_empty(0)]
    out += [g.to(A.dtype) if need else A.new_empty(0) for g, A, need in zip(dAs, lora_As, needs_dA)]
    out += [g.to(B.dtype) if need else B.new_empty(0) for g, B, need in zip(dBs, lora_Bs, needs_dB)]
    if needs_dm:  # DoRA (one adapter per call): from the output Y, or Z_d under dropout (dora.py)
        out.append(dora.magnitude_grad(call, dY, dora_saved, S))
    return out


lora_bwd_op = torch.library.custom_op("fastpeft::lora_bwd", _lora_bwd, mutates_args=())


@lora_bwd_op.register_fake
def _(dY, x, weight, bias, dora_saved, packed, fmt, qmeta, lora_As, lora_Bs, S, scales, dropout_ps, magnitudes,
      weight_norms, seed, row_index, row_order, row_offsets, pool, pool_max_rank, needs_dx, needs_dA, needs_dB,
      needs_dm):
    out = [torch.empty_like(x) if needs_dx else x.new_empty(0)]
    out += [torch.empty_like(A) if need else A.new_empty(0) for A, need in zip(lora_As, needs_dA)]
    out += [torch.empty_like(B) if need else B.new_empty(0) for B, need in zip(lora_Bs, needs_dB)]
    if needs_dm:
        out.append(torch.empty_like(magnitudes[0]))
    return out


class _LoraFunction(torch.autograd.Function):
    """Autograd of the op: forward is fastpeft::lora_fwd, backward fastpeft::lora_bwd.

    A plain autograd.Function with the tensors as varargs (x, weight, bias, seed, row_index, row_order, then every
    A, B, magnitude, weight norm and packed field), rather than register_autograd on the custom op: an op
    with list inputs gets torch's tensor-list autograd wrapper, whose pytree flattening of every call cost
    ~100 us per layer on CPU. dynamo traces this Function (both ops have fake impls), so
    torch.compile(fullgraph=True) still sees no graph break."""

    @staticmethod
    def forward(ctx, meta, x, weight, bias, seed, row_index, row_order, *tensors):
        fmt, qmeta, scales, dropout_ps, offsets, max_rank = meta
        n = len(scales)
        lora_As, lora_Bs, magnitudes, norms, packed, pool = _split(tensors, n, fmt)
        # the custom op for tracers, its function itself in plain eager mode (eager.direct: same result)
        fwd = _lora_fwd if eager.direct((x, weight, bias, row_index, row_order, *tensors)) else \
            torch.ops.fastpeft.lora_fwd
        Y, S, Zd = fwd(x, weight, bias, packed, fmt, qmeta, lora_As, lora_Bs, scales, dropout_ps, magnitudes, norms,
                       seed, row_index, row_order, offsets, pool, max_rank)
        ctx.meta = meta
        ctx.bias_dtype = None if bias is None else bias.dtype
        # DoRA's magnitude gradient reads Y (a reference to the output) or, under dropout, Z_d (dora.py)
        dora = any(m is not None for m in magnitudes)
        keep = (Zd if Zd.numel() else Y) if dora else None
        # x by reference (q/k/v projections of one input share it), S [M, sum r], the seed; never a mask
        ctx.save_for_backward(x, weight, bias if dora else None, S, seed, row_index, row_order, keep, *tensors)
        return Y

    @staticmethod
    def backward(ctx, dY):
        fmt, qmeta, scales, dropout_ps, offsets, max_rank = ctx.meta
        n = len(scales)
        x, weight, bias, S, seed, row_index, row_order, keep, *tensors = ctx.saved_tensors
        lora_As, lora_Bs, magnitudes, norms, packed, pool = _split(tensors, n, fmt)
        need = ctx.needs_input_grad
        need_x, need_w, need_b = need[1], need[2], need[3]
        t0 = 7  # index of the first of *tensors in forward's arguments
        need_A, need_B = list(need[t0:t0 + n]), list(need[t0 + n:t0 + 2 * n])
        need_m = list(need[t0 + 2 * n:t0 + 3 * n])
        dX = dW = db = None
        dAs, dBs, dms = [None] * n, [None] * n, [None] * n
        need_dm = any(need_m)  # one DoRA adapter per call (contract.validate)
        if need_x or any(need_A) or any(need_B) or need_dm:
            bwd = _lora_bwd if eager.direct((dY, x, weight, bias, S, keep, *tensors)) else \
                torch.ops.fastpeft.lora_bwd
            out = bwd(dY, x, weight, bias, keep, packed, fmt, qmeta, lora_As, lora_Bs, S, scales, dropout_ps, magnitudes,
                      norms, seed, row_index, row_order, offsets, pool, max_rank, need_x, need_A, need_B, need_dm)
            dX = out[0] if need_x else None
            dAs = [_param_layout(g, A) if nd else None for g, A, nd in zip(out[1:1 + n], lora_As, need_A)]
            dBs = [_param_layout(g, B) if nd else None for g, B, nd in zip(out[1 + n:1 + 2 * n], lora_Bs, need_B)]
            if need_dm:
                dms = [out[-1]]
        if need_w or need_b:  # a trainable dense base (packed weights never get grads)
            dW, db = eager.base_grads(dY.reshape(-1, dY.shape[-1]), x.reshape(-1, x.shape[-1]),
                                      weight.dtype if need_w else None, ctx.bias_dtype, need_w, need_b)
        return (None, dX, dW, db, None, None, None, *dAs, *dBs, *dms, *([None] * (len(tensors) - 3 * n)))


def _split(tensors, n: int, fmt: str) -> tuple:
    """The varargs of _LoraFunction as lists: (As, Bs, magnitudes, weight norms, packed fields, pool fields)."""
    p = 4 * n + (len(PACKED_FIELDS) if fmt else 0)
    return (list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:3 * n]), list(tensors[3 * n:4 * n]),
            list(tensors[4 * n:p]), list(tensors[p:]))


# -- the public entry points ---------------------------------------------------------------------------
def lora(x: Tensor, base: Base, adapters: Union[AdapterSet, Sequence[Adapter]] = (), training: bool = False,
         fn: str = "fastpeft.ops.lora") -> Tensor:
    """``base(x) + sum_i s_i * dropout_i(x) A_i^T B_i^T`` as one op; returns [..., N] in x's dtype.

    An adapter's scale may be a 0-dim tensor (folded into B). An adapter with a magnitude is DoRA
    (contract.py, dora.py): its weight norm is computed here when the adapter does not carry it (a layer
    passes it, having kept ||W||^2), and the magnitude gets a gradient.

    base: :class:`Base` (dense weight, packed weight, or none; with an optional bias). adapters: an
    :class:`AdapterSet` or a sequence of :class:`Adapter`, applied together (zero adapters: the base
    alone, through the same kernels). Dropout applies to each adapter's input only, and only when
    ``training``. ``fn`` names the caller in error messages.
    """
    if type(adapters) is not AdapterSet:
        # the common eager call (a layer's forward: decode steps, small training steps) skips what it does
        # not need: eager.py
        y = eager.plain_call(x, base, adapters, training, draw_seed)
        if y is not None:
            return y
    elif adapters.pool is not None and not adapters.adapters:
        y = eager.pool_call(x, base, adapters.row_index, adapters.pool)  # a mixed batch's decode step: eager.py
        if y is not None:
            return y
    aset = adapters if isinstance(adapters, AdapterSet) else AdapterSet(tuple(adapters))
    x, base, aset = prepare(x, base, aset)
    validate(fn, x, base, aset)
    ads = aset.adapters
    if any(isinstance(a.scale, Tensor) for a in ads):
        # a tensor scale (compiled hot swapping updates it in place) joins B inside the traced graph: a new
        # value is new data for torch.compile, where a float would be a constant baked into the graph
        ads = tuple(dataclasses.replace(a, B=a.B * a.scale.to(device=a.B.device, dtype=a.B.dtype), scale=1.0)
                    if isinstance(a.scale, Tensor) else a for a in ads)
    if any(a.magnitude is not None and a.weight_norm is None for a in ads):
        ads = tuple(dataclasses.replace(a, weight_norm=dora.weight_norm(base, a.A, a.B, a.scale))
                    if a.magnitude is not None and a.weight_norm is None else a for a in ads)
    if training and any(a.dropout_p > 0.0 for a in ads):
        seed = draw_seed()
        ps = [float(a.dropout_p) for a in ads]
    else:
        seed, ps = None, [0.0] * len(ads)
    plan = aset.row_index  # a RowPlan (prepare built it), or a pool call's row_index tensor, or None
    if plan is not None and training and any(a.dropout_p > 0.0 for a in ads):
        raise ValueError(f"{fn}: LoRA dropout in a mixed batch (row_index) is not supported; mixed batches are "
                         f"for inference (peft refuses adapter_names in training mode)")
    pool = aset.pool
    if _eager_inference(x, base, ads, pool):
        ads = tuple(a if a.dropout_p == p else dataclasses.replace(a, dropout_p=p) for a, p in zip(ads, ps))
        return _forward_now(x, base, ads, seed, plan, pool)
    weight, bias, packed, fmt, qmeta = _flatten_base(base)
    if pool is not None:  # the op expands the pool, and sorts the rows itself unless given a RowPlan
        pre = isinstance(plan, RowPlan)
        meta = (fmt, tuple(qmeta), (), (), plan.offsets if pre else (), pool.max_rank)
        return _LoraFunction.apply(meta, x, weight, bias, None, plan.row_index if pre else plan,
                                   plan.order if pre else None, *packed, *pool.tensors())
    meta = (fmt, tuple(qmeta), tuple(float(a.scale) for a in ads), tuple(ps), () if plan is None else plan.offsets, 0)
    return _LoraFunction.apply(meta, x, weight, bias, seed, None if plan is None else plan.row_index,
                               None if plan is None else plan.order, *(a.A for a in ads), *(a.B for a in ads),
                               *(a.magnitude for a in ads), *(a.weight_norm for a in ads), *packed)


def _eager_inference(x: Tensor, base: Base, ads: tuple, pool) -> bool:
    """No graph to record and no gradient to build: the op can run its backend directly.

    The custom op and the autograd Function are there for torch.compile (a traced, opaque op) and for
    backward; an eager call with nothing that needs a gradient pays ~0.2 ms of dispatch on CPU for neither
    (serving, generate, eval loops)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if not torch.is_grad_enabled():
        return True
    tensors = [x, base.weight, base.bias]
    tensors += [t for a in ads for t in (a.A, a.B, a.magnitude)]
    if pool is not None:
        tensors += [pool.A, pool.B]
    return not any(t is not None and t.requires_grad for t in tensors)


def _forward_now(x: Tensor, base: Base, ads: tuple, seed: Optional[Tensor], plan, pool) -> Tensor:
    """What fastpeft::lora_fwd computes, for an eager call without gradients (see _eager_inference)."""
    x2d = x.reshape(-1, x.shape[-1])
    if pool is not None:
        ads = pool.views()
        if not isinstance(plan, RowPlan):
            plan = RowPlan.build(plan, len(ads))
    return eager.forward_now(LoraCall(x2d, base, tuple(ads), 0 if seed is None else int(seed), plan, pool), x)


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
