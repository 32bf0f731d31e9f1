"""The op's eager fast lanes: what an eager call skips when nothing traces it.

An eager decode step on a GPU is bound by host time (a decode kernel takes ~15 us, a layer's Python
easily more), and so is a training step at a few rows (on CPU, and on a GPU without CUDA graphs). Two lanes
cut it:

- :func:`plain_call`: the common call (a dense base, plain LoRA adapters with number scales, no row plan or
  pool, plain tensors, no autocast, not compiling or tracing) skips input preparation and runs the
  contract's checks inline. Without a gradient to build it runs its backend's forward directly; with one,
  :class:`_PlainLora` (the backend's forward and backward, without the custom ops). Any input those checks
  do not pass (or any case outside the lane) returns None and the caller takes the general path, whose
  :func:`contract.validate` then raises its error naming the tensor: the lane never has to word one.
- :func:`pool_call`: the same for an adapter pool call with a prepared row plan (a mixed batch: adapter_names,
  a serving bank) when nothing needs a gradient: straight to the backend's forward, or to the runner the
  backend gave for this pool and these segments (``pool_runner``, kept with the pool: a decode step of a
  mixed batch then costs its GEMM and kernel, not the choice and the tables, in every layer).
- :func:`direct`: whether lora_op's autograd Function may call the custom ops' implementations as plain
  Python functions instead of through ``torch.ops.fastpeft.*`` (for the calls outside the plain lane:
  packed bases, DoRA, pools, ...).

The custom-op boundary (schema checks, the dispatcher's redispatch into Python, its alias checks) costs
~0.1 ms per forward and again per backward on CPU, and is there for tracers: dynamo, jit tracing, fake /
functional tensors and Python dispatch modes (make_fx, FlopCounterMode) all take the op, exactly as before.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import dispatch
from .contract import Adapter, Base, LoraCall
from .plan import RowPlan

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_SCALARS = (float, int)
_dispatch_depth = torch._C._len_torch_dispatch_stack
# autocast on for any device type (then the general path decides for x's): one call, without building x.device
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing  # torch.jit.is_tracing() without its is_scripting() wrapper


def direct(tensors: Sequence[Optional[Tensor]]) -> bool:
    """True when the custom ops may be skipped: not compiling / tracing, no Python dispatch mode, and
    only plain tensors (a subclass, e.g. a FakeTensor or a DTensor, keeps the op)."""
    if _is_compiling() or _is_tracing() or _dispatch_depth():
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


def plain_call(x: Tensor, base: Base, adapters: Sequence[Adapter], training: bool,
               draw_seed: Callable[[], Tensor]) -> Optional[Tensor]:
    """``base(x) + sum_i s_i * dropout_i(x) A_i^T B_i^T`` for the common eager call, or None (the call is not
    one: see the module docstring). The same result as the general path: the same backend choice
    (dispatch.choose) and the same backend functions on the same LoraCall; with a gradient to build, the same
    dropout seed drawn at the same point (``draw_seed``: lora_op.draw_seed, passed by the caller so that a
    replacement there, e.g. a test recording seeds, is the one called) and the same tensors saved (x by
    reference, S)."""
    if not _dense_ok(x, base):
        return None
    W, bias = base.weight, base.bias
    N, K = W.shape
    grad = torch.is_grad_enabled()
    needs_grad = grad and (x.requires_grad or W.requires_grad or (bias is not None and bias.requires_grad))
    drop = False
    for a in adapters:
        if type(a) is not Adapter or a.magnitude is not None or type(a.scale) not in _SCALARS:
            return None
        A, B = a.A, a.B
        if type(A) not in _PLAIN or type(B) not in _PLAIN:
            return None
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != K or B.shape[0] != N or B.shape[1] != A.shape[0]:
            return None
        if not (A.is_floating_point() and B.is_floating_point()):
            return None
        p = a.dropout_p
        if not 0.0 <= p <= 1.0:
            return None  # validate's error
        drop = drop or p > 0.0
        needs_grad = needs_grad or (grad and (A.requires_grad or B.requires_grad))
    if drop and not training:  # the backends see no dropout
        adapters = [a if a.dropout_p == 0.0 else Adapter(a.A, a.B, a.scale) for a in adapters]
        drop = False
    x2d = x if x.dim() == 2 else x.reshape(-1, K)
    if needs_grad:
        if _dispatch_depth():
            return None  # a Python dispatch mode sees the custom op, as before
        seed = int(draw_seed()) if drop else 0
        call = LoraCall(x2d, base, tuple(adapters), seed)
        return _PlainLora.apply(call, dispatch.pick(call), x, W, bias,
                                *[a.A for a in adapters], *[a.B for a in adapters])
    if drop:
        return None  # inference in training mode: the general path draws the seed (and consumes the RNG)
    return forward_now(LoraCall(x2d, base, tuple(adapters)), x)


def pool_call(x: Tensor, base: Base, plan, pool) -> Optional[Tensor]:
    """An adapter pool call (a mixed batch: a layer's adapter_names, a serving bank) with nothing to trace and no
    gradient to build, run on its backend directly; None for anything else (the general path then runs it, or
    raises validate()'s error). ``plan`` must already be a RowPlan for x's rows (a layer's or a bank's); the
    pool's own checks are pool.check's, kept with the pool. No dropout, no seed: pools are inference."""
    if type(plan) is not RowPlan or _dispatch_depth() or not _dense_ok(x, base):
        return None
    W, bias = base.weight, base.bias
    N, K = W.shape
    if plan.n_adapters != pool.slots:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or W.requires_grad or pool.A.requires_grad
                                    or pool.B.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    x2d = x if x.dim() == 2 else x.reshape(-1, K)
    if x2d.shape[0] != plan.M:
        return None
    pool.check("fastpeft.ops.lora", N, K, x.device)
    if x.is_cuda:  # runners are the torch backend's (its CPU kernel), which CUDA calls never get automatically
        return forward_now(LoraCall(x2d, base, pool.views(), 0, plan, pool), x)
    # The backend's runner for this pool, these segments and x's dtype and layout, kept with the pool (rebuilt
    # when a pool tensor is written) so that a decode step skips the choice and the tables; None: no runner.
    run = pool.cached("eager runner", lambda: _pool_runner(x2d, base, plan, pool),
                      extra=(plan.offsets, x2d.dtype, x2d.stride(1) == 1, dispatch.settings()))
    if run is None:
        return forward_now(LoraCall(x2d, base, pool.views(), 0, plan, pool), x)
    Y = run(x2d, W, bias, plan.order)
    return Y if x.dim() == 2 else Y.reshape(*x.shape[:-1], Y.shape[-1])


def _pool_runner(x2d: Tensor, base: Base, plan: RowPlan, pool):
    call = LoraCall(x2d, base, pool.views(), 0, plan, pool)
    make = getattr(dispatch.pick(call), "pool_runner", None)
    return None if make is None else make(call)


def forward_now(call: LoraCall, x: Tensor) -> Tensor:
    """The backend's forward of ``call`` (whose x is ``x`` as [M, K]), as the op returns it: in x's dtype and
    shape. What every eager call without a gradient ends with (the lanes here, lora_op._forward_now)."""
    Y = dispatch.pick(call).forward(call)[0]
    if Y.dtype != x.dtype:
        Y = Y.to(x.dtype)
    return Y if x.dim() == 2 else Y.reshape(*x.shape[:-1], Y.shape[-1])


def _dense_ok(x: Tensor, base: Base) -> bool:
    """What both lanes need of a call: plain tensors, a dense float base in x's dtype with matching shapes (bias
    [N], x [..., K]), nothing compiling or tracing, no autocast (the general path's prepare() casts x, W and
    bias as autocast would)."""
    W, bias = base.weight, base.bias
    if W is None or base.packed is not None or type(x) not in _PLAIN or type(W) not in _PLAIN:
        return False
    if bias is not None and (type(bias) not in _PLAIN or not bias.is_floating_point()):
        return False
    if _is_compiling() or _is_tracing() or _autocast_on(x):
        return False
    if x.dim() < 1 or not x.is_floating_point() or W.dtype != x.dtype or W.dim() != 2:
        return False
    return x.shape[-1] == W.shape[1] and (bias is None or bias.shape == (W.shape[0],))


def _autocast_on(x: Tensor) -> bool:
    """Autocast is on (for any device type when torch can say so in one call, else for x's)."""
    return _any_autocast() if _any_autocast is not None else torch.is_autocast_enabled(x.device.type)


def base_grads(dY2: Tensor, x2d: Tensor, weight_dtype, bias_dtype, need_w: bool, need_b: bool) -> tuple:
    """(dW, db) of a trainable dense base (rare: LoRA freezes it), None where not needed; dY2 [M, N], x2d [M, K]."""
    dW = torch.mm(dY2.t(), x2d).to(weight_dtype) if need_w else None
    db = dY2.sum(0).to(bias_dtype) if need_b else None
    return dW, db


def param_layout(g: Tensor, p: Tensor) -> Tensor:
    """``g`` with ``p``'s strides (contiguous for a contiguous parameter): DDP buckets, FSDP2's
    reduce-scatter and ZeRO's partitioning read gradients as flat views of the parameter's layout."""
    if g.stride() == p.stride() or g.numel() <= 1:
        return g
    return torch.empty_like(p, dtype=g.dtype).copy_(g)


class _PlainLora(torch.autograd.Function):
    """Autograd of a plain eager call (plain_call): the backend's forward and backward called directly, what
    lora_op._LoraFunction does through the custom ops, without flattening the call into op arguments and
    back. The backend that ran the forward runs the backward (its dropout masks are its RNG's)."""

    @staticmethod
    def forward(ctx, call, impl, x, weight, bias, *ab):
        Y, S = impl.forward(call)[:2]
        if Y.dtype != x.dtype:
            Y = Y.to(x.dtype)
        cdt = call.compute_dtype()
        if S.dtype != cdt:
            S = S.to(cdt)
        ctx.impl = impl
        ctx.meta = (call.seed, [(a.scale, a.dropout_p) for a in call.adapters],
                    None if bias is None else bias.dtype)
        # x by reference (q/k/v projections of one input share it), S [M, sum r]; never a mask
        ctx.save_for_backward(x, weight, S, *ab)
        return Y if x.dim() == 2 else Y.reshape(*x.shape[:-1], Y.shape[-1])

    @staticmethod
    def backward(ctx, dY):
        x, weight, S, *ab = ctx.saved_tensors
        seed, sp, bias_dtype = ctx.meta
        n = len(sp)
        need = ctx.needs_input_grad  # (call, impl, x, weight, bias, *As, *Bs)
        need_x, need_w, need_b = need[2], need[3], need[4]
        need_A, need_B = list(need[5:5 + n]), list(need[5 + n:])
        dX = None
        dAs, dBs = [None] * n, [None] * n
        # (a reshape that changes nothing still makes a view: skipped for 2-D tensors)
        dY2 = dY if dY.dim() == 2 else dY.reshape(-1, dY.shape[-1])
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if need_x or any(need_A) or any(need_B):
            # rebuilt from the saved tensors (a saved-tensor hook, e.g. offloading, may hand back new ones)
            call = LoraCall(x2d, Base(weight), tuple(Adapter(A, B, s, p) for A, B, (s, p) in zip(ab, ab[n:], sp)),
                            seed)
            dX, gAs, gBs = ctx.impl.backward(call, dY2, S, need_x, need_A, need_B)
            if need_x:
                dX = (dX if dX.dtype == x.dtype else dX.to(x.dtype)).reshape(x.shape)
            dAs = [param_layout(g if g.dtype == A.dtype else g.to(A.dtype), A) if nd else None
                   for g, A, nd in zip(gAs, ab, need_A)]
            dBs = [param_layout(g if g.dtype == B.dtype else g.to(B.dtype), B) if nd else None
                   for g, B, nd in zip(gBs, ab[n:], need_B)]
        dW, db = base_grads(dY2, x2d, weight.dtype, bias_dtype, need_w, need_b)
        return (None, None, dX, dW, db, *dAs, *dBs)
