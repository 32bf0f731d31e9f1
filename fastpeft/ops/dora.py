"""DoRA's part of the LoRA op: the weight norm without forming W + s B A, and the magnitude gradient.

DoRA (peft's ``use_dora``) rescales each output column of a LoRA layer. With m the trained magnitude [N],

    n   = ||W + s B A||_row          [N]   detached (peft's semantics: no gradient flows through n)
    g   = m / max(n, EPS)            [N]   fp32 (contract.DORA_EPS: an all-zero row gives 0, not NaN)
    Y   = g * (x W^T + s S B^T) + bias                                  (dropout off)
    Y   = x W^T + (g - 1) * ((D x) W^T) + g * s S B^T + bias           (dropout on: peft's extra base GEMM)

The norm never forms the [N, K] matrix W + s B A (peft does, every forward):

    n^2 = ||W||^2_row  +  2 s rowsum((W A^T) * B)  +  s^2 rowsum((B (A A^T)) * B)

- ||W||^2_row is W's alone: W is frozen, so a layer computes it once and passes it back in (``w_sq``);
- W A^T [N, r] is the base GEMM with A as its input rows (for a packed base: the fused dequant GEMM, so
  no 16-bit copy of W is made); the last term is [N, r] work.
It is accumulated in fp32 and then rounded to the dtype peft's norm has, promote(W, A, B): peft adds the
adapter's delta to W in that dtype before taking the norm.

Magnitude gradient. With Z the pre-scale output (Y = g * Z + bias without dropout),
dm_j = sum_i dY_ij Z_ij / max(n_j, EPS). Without dropout Z is not stored: Y - bias = g * Z and
g_j max(n_j, EPS) = m_j, so dm_j = sum_i dY_ij (Y_ij - bias_j) / m_j, from the output the op saved (a
reference: saving an output is free when the next op keeps it, as torch's exp or softmax do). Columns with
m_j = 0 (g_j = 0: their Z is not in Y) get Z from their rows of W. With dropout, Z_d = (D x) W^T + s S B^T
is a second [M, N] product the forward returns (peft keeps two such tensors, base and LoRA results).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..quant.formats import dequantize
from .contract import DORA_EPS, Base, LoraCall
from .contract import dora_column_scale as column_scale  # noqa: F401  (g = m / max(n, EPS))

# Rows of a dense W cast to fp32 at a time (16 MiB of fp32 at K = 4096): bounds the temporary.
_CHUNK_ELEMS = 1 << 22


def _row_chunks(N: int, K: int):
    step = max(1, _CHUNK_ELEMS // max(K, 1))
    for i in range(0, N, step):
        yield slice(i, min(N, i + step))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(torch.float32, dtype)  # fp32, or float64 for float64 (the test oracle)


def weight_row_sq_norm(base: Base) -> Tensor:
    """||W||^2 per row [N] in fp32 (float64 for a float64 W) (W dense [N, K] or packed). A packed W is dequantized to fp32 once for this,
    one layer at a time; a layer computes this once (W is frozen) and keeps the [N] result."""
    with torch.no_grad():
        if base.packed is not None:
            return dequantize(base.packed, torch.float32).square().sum(1)
        W = base.weight.detach()
        acc = _acc(W.dtype)
        out = torch.empty(W.shape[0], dtype=acc, device=W.device)
        for rows in _row_chunks(*W.shape):
            out[rows] = W[rows].to(acc).square().sum(1)
        return out


def _w_at(base: Base, Ac: Tensor) -> Tensor:
    """W A^T [N, r] in Ac's dtype: for a packed W, the fused dequant GEMM of fastpeft.ops.lora with A's rows
    as x."""
    if base.packed is not None:
        from .lora_op import lora  # lora_op imports this module

        return lora(Ac, Base.quantized(base.packed), (), fn="DoRA weight norm").t()
    W = base.weight.detach()
    if W.dtype == Ac.dtype:
        return torch.mm(W, Ac.t())  # no cast, no temporary beyond the [N, r] result
    out = torch.empty(W.shape[0], Ac.shape[0], dtype=Ac.dtype, device=W.device)
    for rows in _row_chunks(*W.shape):  # cast a bounded number of rows at a time
        torch.mm(W[rows].to(Ac.dtype), Ac.t(), out=out[rows])
    return out


def weight_dtype(base: Base, A: Tensor, B: Tensor) -> torch.dtype:
    """The dtype of peft's norm: W + s B A computed in promote(W, A, B) (a packed W dequantizes to fp32)."""
    w = base.weight.dtype if base.weight is not None else torch.float32
    return torch.promote_types(torch.promote_types(w, A.dtype), B.dtype)


def weight_norm(base: Base, A: Tensor, B: Tensor, scale: float, w_sq: Optional[Tensor] = None) -> Tensor:
    """n = ||W + s B A||_row [N] in fp32 (float64 when W, A or B is), detached, without forming W + s B A
    (see the module docstring).

    w_sq: ||W||^2_row from :func:`weight_row_sq_norm`, when the caller keeps it (W is frozen)."""
    with torch.no_grad():
        if w_sq is None:
            w_sq = weight_row_sq_norm(base)
        wdt = weight_dtype(base, A, B)
        acc = _acc(wdt)
        Ac, Bc = A.detach().to(acc), B.detach().to(acc)
        # 2s W A^T + s^2 B (A A^T) [N, r] in one addmm, then one row-wise dot with B (few ops: at a decoder's
        # sizes this norm is op-count bound on CPU)
        T = torch.addmm(_w_at(base, Ac).to(acc), Bc, Ac @ Ac.t(), beta=2.0 * scale, alpha=scale * scale)
        n = torch.linalg.vecdot(T, Bc, dim=1).add_(w_sq.to(acc)).clamp_min_(0.0).sqrt_()
        return n.to(wdt).to(acc)


# Rows of [M, N] per block of the CPU column reduction: the block's product stays in cache (~1 MiB).
_DOT_BLOCK_BYTES = 1 << 20


def column_dots(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """sum_i a_ij b_ij [N] in ``acc``, for a, b [M, N], without an [M, N] temporary in ``acc``.

    CUDA: one product in the inputs' dtype, summed in ``acc``. CPU: the product in row blocks written into one
    small buffer, so the pass stays in cache (torch has no fused column dot; its vecdot and einsum write the
    whole product first, and einsum is far slower)."""
    if a.device.type != "cpu":
        return torch.mul(a, b).sum(0, dtype=acc)
    M, N = a.shape
    rows = max(1, _DOT_BLOCK_BYTES // max(1, N * a.element_size()))
    if rows >= M:
        return torch.mul(a, b).sum(0, dtype=acc)
    out = torch.zeros(N, dtype=acc, device=a.device)
    buf = torch.empty(rows, N, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    for i in range(0, M, rows):
        n = min(rows, M - i)
        torch.mul(a[i:i + n], b[i:i + n], out=buf[:n])
        out.add_(buf[:n].sum(0, dtype=acc))
    return out


def magnitude_grad(call: LoraCall, dY: Tensor, saved: Tensor, S: Tensor) -> Tensor:
    """dL/dm [N] in m's dtype, for a DoRA call (dY [M, N]).

    ``saved``: without dropout the op's output Y; with dropout Z_d = (D x) W^T + s S B^T (module docstring).
    """
    a = call.adapters[0]
    acc = _acc(torch.promote_types(saved.dtype, a.weight_norm.dtype))
    m, nt = a.magnitude, a.weight_norm.to(acc).clamp_min(DORA_EPS)
    dY = dY.reshape(-1, dY.shape[-1])
    saved = saved.reshape(-1, saved.shape[-1])
    dY = dY if dY.dtype == saved.dtype else dY.to(saved.dtype)
    if a.dropout_p > 0.0:
        return (column_dots(dY, saved, acc) / nt).to(m.dtype)
    bias = call.base.bias
    m32 = m.detach().to(acc)
    dm = column_dots(dY, saved, acc)  # sum_i dY_ij (Y_ij - bias_j) = that - bias_j sum_i dY_ij
    if bias is not None:
        dm -= bias.to(acc) * dY.sum(0, dtype=acc)
    zero = m32 == 0
    dm /= torch.where(zero, 1.0, m32)
    # Columns with g_j = 0 hold only the bias in Y: their Z from W's rows, x W_J^T + s S B_J^T. (The check
    # is a device-to-host sync on a GPU; m is exactly 0 only where peft's init met an all-zero row of W.)
    if bool(zero.any()):
        J = zero.nonzero().flatten()
        W = call.base.weight if call.base.weight is not None else dequantize(call.base.packed, torch.float32)
        ZJ = call.x.to(acc) @ W.index_select(0, J).to(acc).t()
        ZJ += a.scale * (S.to(acc) @ a.B.detach().index_select(0, J).to(acc).t())
        dm[J] = (dY.index_select(1, J).to(acc) * ZJ).sum(0) / nt[J]
    return dm.to(m.dtype)
