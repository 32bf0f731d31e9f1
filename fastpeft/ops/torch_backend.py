"""PyTorch backend of the LoRA op: what CPU users run, and the test oracle (in float64).

Math (docs/ops.md), x: [M, K], W: [N, K] (dense, or dequantize(packed) in x's dtype, or absent), and
per adapter i: A_i [r_i, K], B_i [N, r_i], s_i = scale, D_i = its dropout mask (keep prob 1 - p_i,
kept entries scaled by 1 / (1 - p_i), drawn from the adapter's seed):

    forward   S_i  = (D_i * x) A_i^T                        [M, r_i]
              Y    = x W^T + sum_i s_i * S_i B_i^T (+ bias)  [M, N]
    backward  dS_i = s_i * dY B_i
              dX   = dY W + sum_i D_i * (dS_i A_i)
              dA_i = dS_i^T (D_i * x)
              dB_i = s_i * dY^T S_i

DoRA (one adapter with a magnitude; g = m / max(n, EPS) [N], see dora.py):

    dropout off  Y    = g * (x W^T + s S B^T) + bias       backward: the LoRA backward on g * dY
    dropout on   Z_d  = (D x) W^T + s S B^T                 (returned: the magnitude gradient needs it)
                 Y    = x W^T - (D x) W^T + g * Z_d + bias  (= peft's x W^T + (g-1)(D x) W^T + g s S B^T)
                 dS   = s (g * dY) B
                 dX   = dY W + D * (((g - 1) * dY) W + dS A)

A mixed batch (call.plan: row i takes adapter k = row_index[i], -1 = none; plan.py), per adapter k over its
rows R_k only (a segment of the plan: a GEMM per adapter at its own rank, never a loop over rows):

    forward   S[R_k, :r_k] = x[R_k] A_k^T;   Y = x W^T (+ bias);   Y[R_k] += s_k S[R_k, :r_k] B_k^T
    backward  dS = s_k dY[R_k] B_k;   dX = dY W;   dX[R_k] += dS A_k;   dA_k = dS^T x[R_k];
              dB_k = s_k dY[R_k]^T S[R_k, :r_k]

A pool call on CPU (fp32 or bf16 activations, no DoRA slot with rows) adds the
s_k S B_k^T terms with csrc/lora_mixed_cpu.cpp (cpu_mixed.py) after the base GEMM: the same math per row, in
one pass that reads each adapter at its own rank and touches no other row; other pool calls run the grouped
GEMMs below (_grouped_pool), and float64 calls (the test oracle) never leave torch.

Where the work is saved over a plain "base(x) + B(A(dropout(x)))": every LoRA add is folded into the
GEMM with ``addmm_`` (Y is the only [M, N] tensor written, whatever the number of adapters), and D_i is
regenerated from an integer seed in backward instead of keeping ``dropout(x)`` alive. A quantized W is
dequantized fresh in forward and again in backward, never kept alive in between (QLoRA's saving).
The mask comes from a ``torch.Generator`` on x's device seeded with the seed, so :func:`dropout_mask`
reproduces it exactly (tests use it to build references with the same mask). Other backends use
their own RNG (Triton: Philox), so a forward and its backward must run on the same backend; the ops
layer makes sure of that.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quant.formats import dequantize
from . import cpu_mixed
from .contract import LoraCall, adapter_seed, dora_column_scale


def supports(call: LoraCall) -> Optional[str]:
    """None: this backend runs every valid call, on any device and float dtype torch itself can do."""
    w, b = call.base.weight, call.base.bias
    if call.x.is_floating_point() and (w is None or w.is_floating_point()) and (b is None or b.is_floating_point()):
        return None  # (asked on every call: the common answer without building the loop below)
    for name, t in (("x", call.x), ("weight", call.base.weight), ("bias", call.base.bias)):
        if t is not None and not t.is_floating_point():
            return f"{name} has non-float dtype {t.dtype}"
    return None


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


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in ``dtype``; t itself when it already is (a skipped .to() is one dispatched op less per call, which
    counts at decode sizes)."""
    return t if t.dtype == dtype else t.to(dtype)


def _base_weight(call: LoraCall) -> Optional[Tensor]:
    """W [N, K] in x's dtype: the dense weight, or the packed one dequantized (a fresh temporary)."""
    if call.base.packed is not None:
        return dequantize(call.base.packed, call.x.dtype)
    return call.base.weight  # validated: x's dtype


def forward(call: LoraCall) -> tuple:
    """Returns (Y [M, N] in x's dtype, S [M, sum r_i] in the compute dtype, fp32 for 16-bit x); a DoRA
    call with dropout returns Z_d [M, N] as a third element."""
    if call.is_dora:
        return _dora_forward(call)
    if call.plan is not None:
        return _mixed_forward(call)
    # (a decode step's host time is this function's too: no helper calls or temporaries a call without dropout
    # and with matching dtypes does not need)
    x2d, bias = call.x, call.base.bias
    cdt, dt = call.compute_dtype(), x2d.dtype
    W = _base_weight(call)
    Y = None
    if W is not None:  # F.linear on 2-D x is addmm(bias, x, W^T) / mm(x, W^T), without the transposed views
        Y = F.linear(x2d, W) if bias is None else F.linear(x2d, W, _as(bias, dt))
    del W
    S_parts = []
    xc = x2d if dt == cdt else x2d.to(cdt)  # x in the compute dtype, cast once for every adapter
    for i, a in enumerate(call.adapters):
        p, A, B = a.dropout_p, a.A, a.B
        if p > 0.0:
            keep = _keep01(adapter_seed(call.seed, i), x2d.shape, p, x2d.device)
            S = torch.mm(xc * keep, _as(A, cdt).t())
            del keep
            S.mul_(_keep_scale(p))
        else:
            S = F.linear(xc, A if A.dtype == cdt else A.to(cdt))
        S_parts.append(S)
        # The GEMM's operands must share Y's dtype; S and B are small ([M, r], [N, r]) so casting them
        # down is cheap, while Y itself is never copied to a wider dtype.
        S_o = S if S.dtype == dt else S.to(dt)
        Bt = (B if B.dtype == dt else B.to(dt)).t()
        if Y is not None:
            Y.addmm_(S_o, Bt, alpha=a.scale)
        elif bias is not None:
            Y = torch.addmm(_as(bias, dt), S_o, Bt, alpha=a.scale)
        else:
            Y = torch.mm(S_o, Bt)
            if a.scale != 1.0:
                Y.mul_(a.scale)
    if len(S_parts) == 1:
        return Y, S_parts[0]
    return Y, (torch.cat(S_parts, dim=1) if S_parts else x2d.new_empty((call.M, 0), dtype=cdt))


def backward(call: LoraCall, dY: Tensor, S: Tensor, needs_dx: bool, needs_dA: list,
             needs_dB: list) -> tuple[Optional[Tensor], list, list]:
    """Grads w.r.t. x (x's dtype), each A_i (A_i's dtype) and each B_i (B_i's dtype); None where not needed.
    (A DoRA call's magnitude gradient is dora.magnitude_grad's, outside the backends.)"""
    if call.is_dora:
        return _dora_backward(call, dY, S, needs_dx, needs_dA[0], needs_dB[0])
    if call.plan is not None:
        return _mixed_backward(call, dY, S, needs_dx, needs_dA, needs_dB)
    x2d = call.x
    cdt, dt = call.compute_dtype(), x2d.dtype
    dY = dY.to(dt) if dY.dtype != dt else dY
    # dY in the compute dtype: the dS and dB GEMMs need it; for 16-bit dY this is the one [M, N] upcast.
    dYc = dY if dY.dtype == cdt or not call.adapters else dY.to(cdt)
    W = _base_weight(call) if needs_dx else None
    any_dropout = False
    for a in call.adapters:
        any_dropout = any_dropout or a.dropout_p > 0.0
    dX = None
    if needs_dx and W is not None and not any_dropout:
        dX = torch.mm(dY, W)  # the LoRA terms then accumulate into it in place
    dAs, dBs = [], []
    start = 0  # adapter i's columns of S: [start, start + r_i)
    # (casts only where dtypes differ: a skipped .to() is one dispatched op less, which counts at small M)
    for i, (a, need_A, need_B) in enumerate(zip(call.adapters, needs_dA, needs_dB)):
        p, r = a.dropout_p, a.A.shape[0]
        sl = slice(start, start + r)
        start += r
        # One regeneration of the mask serves both dX and dA.
        keep = (_keep01(adapter_seed(call.seed, i), x2d.shape, p, x2d.device) if p > 0.0 and (needs_dx or need_A)
                else None)
        dS = None
        if needs_dx or need_A:
            # dS carries the 1/(1-p) of D too: D * (dS A) = keep * ((dS/(1-p)) A), and likewise for dA.
            dS = torch.mm(dYc, _as(a.B, cdt))
            ds_scale = a.scale * (_keep_scale(p) if p > 0.0 else 1.0)
            if ds_scale != 1.0:
                dS.mul_(ds_scale)
        if needs_dx:
            dS_o, A_o = _as(dS, dt), _as(a.A, dt)
            if keep is not None:
                term = torch.mm(dS_o, A_o)
                term.mul_(keep)
                dX = term if dX is None else dX.add_(term)
            elif dX is None:
                dX = torch.mm(dS_o, A_o)
            else:
                dX.addmm_(dS_o, A_o)
        dAs.append(_as(torch.mm(dS.t(), _masked(x2d, cdt, keep)), a.A.dtype) if need_A else None)
        del keep
        if need_B:
            Si = S if r == S.shape[1] else S[:, sl]  # (one adapter: all of S, without a slice view)
            dB = torch.mm(dYc.t(), Si if Si.dtype == cdt else Si.to(cdt))
            if a.scale != 1.0:
                dB.mul_(a.scale)
            dBs.append(_as(dB, a.B.dtype))
        else:
            dBs.append(None)
    if needs_dx and W is not None and any_dropout:
        # dX = sum_i keep_i * (dS_i A_i) + dY W: the masked LoRA terms first, then the base GEMM
        # accumulates into them in place (one [M, K] buffer, no extra add pass).
        dX.addmm_(dY, W)
    return dX, dAs, dBs


# -- DoRA (header: the two forms, with and without dropout) -------------------------------------------
def _shrink(call: LoraCall, keep: Optional[Tensor]) -> Tensor:
    """S = (D x) A^T [M, r] in the compute dtype, the 1/(1-p) of D applied to the small factor."""
    a = call.adapters[0]
    S = torch.mm(_masked(call.x, call.compute_dtype(), keep), a.A.to(call.compute_dtype()).t())
    if keep is not None:
        S.mul_(_keep_scale(a.dropout_p))
    return S


def _dora_forward(call: LoraCall) -> tuple:
    x2d, bias, a = call.x, call.base.bias, call.adapters[0]
    dt, p = x2d.dtype, a.dropout_p
    g = call.col_scale().to(dt)
    W = _base_weight(call)
    keep = _keep01(call.seed, x2d.shape, p, x2d.device) if p > 0.0 else None
    S = _shrink(call, keep)
    sBt = a.B.to(dt).t()
    if keep is None:
        Y = torch.mm(x2d, W.t())
        Y.addmm_(S.to(dt), sBt, alpha=a.scale)
        if bias is None:
            Y.mul_(g)
        else:
            torch.addcmul(bias.to(dt), Y, g, out=Y)  # g * Y + bias in one pass over Y
        return Y, S
    Y = torch.mm(x2d, W.t()) if bias is None else torch.addmm(_as(bias, dt), x2d, W.t())
    Zd = torch.mm(x2d * keep, W.t())                   # (D x) W^T, its 1/(1-p) applied on [M, N] below
    del W, keep
    Zd.mul_(_keep_scale(p))
    Y.sub_(Zd)
    Zd.addmm_(S.to(dt), sBt, alpha=a.scale)            # Z_d = (D x) W^T + s S B^T
    Y.addcmul_(Zd, g)
    return Y, S, Zd


def _dora_backward(call: LoraCall, dY: Tensor, S: Tensor, needs_dx: bool, need_A: bool,
                   need_B: bool) -> tuple[Optional[Tensor], list, list]:
    x2d, a = call.x, call.adapters[0]
    cdt, dt, p = call.compute_dtype(), x2d.dtype, a.dropout_p
    g = call.col_scale()
    dY = dY.to(dt) if dY.dtype != dt else dY
    dYg = dY * g.to(dt)                                # the LoRA backward runs on g * dY
    if p == 0.0:
        plain = dataclasses.replace(a, magnitude=None, weight_norm=None)
        return backward(call.replace(adapters=(plain,)), dYg, S, needs_dx, [need_A], [need_B])
    keep = _keep01(call.seed, x2d.shape, p, x2d.device) if needs_dx or need_A else None
    dYgc = dYg.to(cdt)
    dS = None
    if needs_dx or need_A:
        dS = torch.mm(dYgc, a.B.to(cdt)).mul_(a.scale * _keep_scale(p))   # with the 1/(1-p) of D
    dX = None
    if needs_dx:
        W = _base_weight(call)
        # D * (((g-1) dY) W + dS A) + dY W: the masked terms first, then the base GEMM adds in place
        term = torch.mm(dY * ((g - 1.0) * _keep_scale(p)).to(dt), W)
        term.addmm_(dS.to(dt), a.A.to(dt))
        term.mul_(keep)
        dX = term.addmm_(dY, W)
    dA = torch.mm(dS.t(), _masked(x2d, cdt, keep)).to(a.A.dtype) if need_A else None
    dB = torch.mm(dYgc.t(), S.to(cdt)).mul_(a.scale).to(a.B.dtype) if need_B else None
    return dX, [dA], [dB]


# -- mixed batches (header: each adapter over its own rows) --------------------------------------------
def _segments(call: LoraCall):
    """(k, adapter, its rows) for every adapter with rows in this batch and a rank above 0 (or a DoRA scale)."""
    for k, a in enumerate(call.adapters):
        if call.plan.count(k) and (a.r or a.magnitude is not None):
            yield k, a, call.plan.segment(k)


# A pool call (an adapter pool: a layer's adapters or a serving bank's slots) runs its adapters in buckets of
# equal rank, each bucket as two batched GEMMs instead of a GEMM pair per adapter. The n adapters of rank r
# in a bucket form n groups of c = their largest row count (short groups padded with zero rows):
#     X_g [n, c, K] = the group's rows of x       S_g = X_g (s A)_g^T [n, c, r]       Y[rows] += S_g B_g^T
# with (s A)_g^T and B_g^T the bucket's adapters stacked (kept with the pool while its tables and the
# bucket's adapters stay). One gather of x and one scatter-add into Y serve every bucket. Ranks are never
# padded: at decode sizes the GEMMs are bound by reading the adapters, and a rank-8 adapter next to a rank-64
# one reads rank-8 weights. Rows are padded while that costs less than the ops it saves: a small op's fixed
# cost is worth about _OP_MACS multiply-adds on a CPU core, so 8 adapters over 4 rows each share a bucket,
# while in a prefill with one adapter on most rows every adapter is a bucket of its own.
_OP_MACS = 150_000


def _grouped_pool(call: LoraCall, Y: Tensor) -> bool:
    """Y += each row's s_k S B_k^T bucket by bucket (above); False (nothing done) when a DoRA slot has rows.
    The buckets and stacked weights are kept with the pool (they depend on its tables and the row counts),
    the gather indices with the plan (they depend on which rows, not only how many), so a decode step pays
    the GEMMs, one gather and one scatter."""
    plan, pool, cdt = call.plan, call.pool, call.compute_dtype()
    buckets = pool.cached("buckets", lambda: _buckets(call), extra=(plan.offsets,))
    if buckets is None:
        return False
    if not buckets:
        return True
    stacks = pool.cached("stacks", lambda: [_stack_groups(call, groups, cdt) for groups, _ in buckets],
                         extra=(tuple(groups for groups, _ in buckets), cdt))
    rows, pos, padded_rows = plan.cached("grouped rows", lambda: _group_rows(plan, buckets), extra=(buckets,))
    x = _as(call.x, cdt)
    X = x.index_select(0, rows)
    if pos is not None:
        X = x.new_zeros(padded_rows, x.shape[1]).index_copy_(0, pos, X)
    outs, start = [], 0
    for (groups, c), (At, Bt) in zip(buckets, stacks):
        n = len(groups)
        outs.append(torch.bmm(torch.bmm(X[start:start + n * c].view(n, c, -1), At), Bt).view(-1, Y.shape[1]))
        start += n * c
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if pos is not None:
        out = out.index_select(0, pos)
    Y.index_add_(0, rows, _as(out, Y.dtype))
    return True


def _group_rows(plan, buckets: tuple) -> tuple:
    """(the rows of x in bucket order, their positions in the padded [sum n * c] layout or None when no group
    is short, the padded row count)."""
    rows, pos, start = [], [], 0
    for groups, c in buckets:
        for g, k in enumerate(groups):
            seg = plan.segment(k)
            rows.append(seg)
            pos.append(torch.arange(start + g * c, start + g * c + seg.numel(), device=seg.device))
        start += len(groups) * c
    rows = torch.cat(rows)
    return rows, (torch.cat(pos) if start != rows.numel() else None), start


def _buckets(call: LoraCall) -> Optional[tuple]:
    """((adapter indices, padded row count c) per bucket), or None when a DoRA slot has rows. Adapters
    without rows or rank here are left out (their rows, if any, keep the base output)."""
    plan = call.plan
    by_rank: dict = {}
    for k, a in enumerate(call.adapters):
        if a.r and plan.count(k):
            if a.magnitude is not None:
                return None
            by_rank.setdefault(a.r, []).append(k)
    buckets = []
    for r, ks in sorted(by_rank.items()):
        counts = [plan.count(k) for k in ks]
        c = max(counts)
        if (len(ks) * c - sum(counts)) * r * (call.K + call.N) <= _OP_MACS * 4 * (len(ks) - 1):
            buckets.append((tuple(ks), c))
        else:  # too uneven to pad: one bucket per adapter
            buckets.extend(((k,), n) for k, n in zip(ks, counts))
    return tuple(buckets)


def _stack_groups(call: LoraCall, groups: tuple, cdt: torch.dtype) -> tuple:
    """((s_k A_k)^T stacked [n, K, r], B_k^T stacked [n, r, N]) for adapters of one rank r."""
    At = torch.stack([call.adapters[k].A.t().to(cdt) * call.adapters[k].scale for k in groups])
    Bt = torch.stack([call.adapters[k].B.t().to(cdt) for k in groups])
    return At, Bt


def _cpu_kernel_runs(call: LoraCall) -> bool:
    """The CPU kernel (cpu_mixed.py) takes a pool call: CPU float32/bfloat16 activations, no DoRA slot with rows,
    ranks the kernel holds, and the kernel built (else the grouped path). Any number of rows: it beats the
    grouped GEMMs from decode to a 4096-row prefill (benchmarks/mixed_rows_check.py)."""
    x, pool = call.x, call.pool
    return (x.is_cpu and x.dtype in cpu_mixed.ACT_DTYPES and pool.max_rank <= cpu_mixed.MAX_RANK
            and x.stride(1) == 1 and (pool.dora is None or not _dora_rows(call)) and cpu_mixed.unavailable() is None)


def pool_runner(call: LoraCall):
    """``run(x2d, W, bias, order) -> Y``: this pool call's forward for an x, W (dense, x's dtype) and bias of the
    call's dtypes and shapes and a plan order with the call's offsets, valid while the pool's tensors do not
    change; None where the call takes the grouped path. What eager.pool_call keeps with the pool: a decode
    step then costs the base GEMM, the kernel, and a few checks (the choice of path, the tables and the plan's
    offsets are made once, not per layer per step)."""
    if call.pool is None or not _cpu_kernel_runs(call):
        return None
    plan, pool, dt, N = call.plan, call.pool, call.x.dtype, call.N
    tables = pool.cached("cpu tables", lambda: cpu_mixed.slot_tables(pool.A, pool.B, pool.start, pool.rank,
                                                                      pool.scale, slots=()))
    used = plan.cached("cpu slots", lambda: [k for k in range(plan.n_adapters) if plan.count(k)])
    tables.lay_out(used)  # the B panels of this batch's slots (a no-op once they are there)
    offsets = plan.cached("cpu offsets", lambda: cpu_mixed.plan_offsets(plan.offsets))
    add = cpu_mixed.bind(tables, offsets, dt, fn="torch_backend mixed forward")

    def run(x2d: Tensor, W: Optional[Tensor], bias: Optional[Tensor], order: Tensor) -> Tensor:
        return add(_base_out(x2d, W, bias, N), x2d, order)

    return run


def _base_out(x2d: Tensor, W: Optional[Tensor], bias: Optional[Tensor], N: int) -> Tensor:
    """x W^T (+ bias) [M, N] in x's dtype (W in x's dtype; no W: zeros, or the bias)."""
    dt = x2d.dtype
    if W is not None:
        return torch.mm(x2d, W.t()) if bias is None else torch.addmm(_as(bias, dt), x2d, W.t())
    return x2d.new_zeros((x2d.shape[0], N)) if bias is None else bias.to(dt).expand(x2d.shape[0], N).clone()


def _dora_rows(call: LoraCall) -> bool:
    """Whether a DoRA slot of the pool has rows in this call (kept with the pool per set of segment sizes: a
    serving bank's pool always carries the DoRA tables, and most of its batches use no DoRA slot)."""
    plan = call.plan
    return call.pool.cached("dora rows", lambda: any(a.magnitude is not None and plan.count(k)
                                                     for k, a in enumerate(call.adapters)), extra=(plan.offsets,))


def _mixed_forward(call: LoraCall) -> tuple[Tensor, Tensor]:
    x2d, bias = call.x, call.base.bias
    cdt, dt = call.compute_dtype(), x2d.dtype
    W = _base_weight(call)
    run = pool_runner(call) if call.pool is not None else None
    if run is not None:  # the CPU kernel; a pool gets no gradients: S (for dB) is returned unset
        return run(x2d, W, bias, call.plan.order), x2d.new_empty((call.M, call.pool.max_rank), dtype=cdt)
    Y = _base_out(x2d, W, bias, call.N)
    del W
    if call.pool is not None and _grouped_pool(call, Y):
        # a pool's slots get no gradients, so S (for dB) is not needed: its contents are left unset
        return Y, x2d.new_empty((call.M, call.pool.max_rank), dtype=cdt)
    S = x2d.new_zeros((call.M, call.r_total), dtype=cdt)
    for k, a, rows in _segments(call):
        Sk = torch.mm(x2d.index_select(0, rows).to(cdt), a.A.to(cdt).t())
        S[rows, :a.r] = Sk
        if a.magnitude is None:
            Y.index_add_(0, rows, torch.mm(Sk.to(dt), a.B.to(dt).t()), alpha=a.scale)
            continue
        # a DoRA slot (an adapter pool's; inference): its rows get g * (x W^T + s S B^T) + bias
        g = dora_column_scale(a.magnitude, a.weight_norm).to(dt)
        Yk = Y.index_select(0, rows)
        if bias is not None:
            Yk.sub_(bias.to(dt))
        Yk.addmm_(Sk.to(dt), a.B.to(dt).t(), alpha=a.scale)
        if bias is None:
            Yk.mul_(g)
        else:
            torch.addcmul(bias.to(dt), Yk, g, out=Yk)
        Y.index_copy_(0, rows, Yk)
    return Y, S


def _mixed_backward(call: LoraCall, dY: Tensor, S: Tensor, needs_dx: bool, needs_dA: list,
                    needs_dB: list) -> tuple[Optional[Tensor], list, list]:
    x2d = call.x
    cdt, dt = call.compute_dtype(), x2d.dtype
    dY = dY.to(dt) if dY.dtype != dt else dY
    dX = W = None
    if needs_dx:
        W = _base_weight(call)
        dX = torch.mm(dY, W) if W is not None else x2d.new_zeros(x2d.shape)
    dAs, dBs = [None] * len(call.adapters), [None] * len(call.adapters)
    for k, a, rows in _segments(call):
        dYk = dY.index_select(0, rows).to(cdt)
        if a.magnitude is not None:  # a DoRA slot: its rows' backward runs on g * dY (the base term too)
            g = dora_column_scale(a.magnitude, a.weight_norm)
            if needs_dx and W is not None:
                dX.index_add_(0, rows, torch.mm((dYk * (g - 1.0).to(cdt)).to(dt), W))
            dYk = dYk * g.to(cdt)
        if needs_dx or needs_dA[k]:
            dS = torch.mm(dYk, a.B.to(cdt)).mul_(a.scale)
            if needs_dx:
                dX.index_add_(0, rows, torch.mm(dS.to(dt), a.A.to(dt)))
            if needs_dA[k]:
                dAs[k] = torch.mm(dS.t(), x2d.index_select(0, rows).to(cdt)).to(a.A.dtype)
        if needs_dB[k]:
            dBs[k] = torch.mm(dYk.t(), S.index_select(0, rows)[:, :a.r].to(cdt)).mul_(a.scale).to(a.B.dtype)
    for k, a in enumerate(call.adapters):  # adapters without rows here: zero gradients
        if needs_dA[k] and dAs[k] is None:
            dAs[k] = torch.zeros_like(a.A)
        if needs_dB[k] and dBs[k] is None:
            dBs[k] = torch.zeros_like(a.B)
    return dX, dAs, dBs
