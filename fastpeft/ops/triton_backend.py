"""Triton backend of the LoRA op: every call of the contract (contract.py) on the kernels in
``fastpeft.kernels`` (repository folder kernels/).

Runs CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter: slow, for CI).
The dropout masks come from Philox in the kernels (seed + element index), so they differ from the
torch backend's masks for the same seed; forward and backward of this backend always agree.

How a call maps onto the kernels (Y and dX are written once in every forward, and in the backward
unless several adapters use dropout):
- one adapter: kernels/lora_fwd.py (dense or no base; fused single kernel for small M, else shrink +
  GEMM) or kernels/lora_quant.py (packed base); backward kernels/lora_bwd.py / lora_quant.py;
- zero adapters (a QuantLinear no adapter targets): the same kernels at rank 0, so a packed base is
  dequantized in registers inside the GEMM, never in memory;
- several adapters: each adapter's shrink writes its columns of one S [M, sum r] (its own dropout
  seed), and the GEMM takes the adapters stacked, B_cat = [s_1 B_1, s_2 B_2, ...] in fp32, as its
  LoRA step: one extra K = sum r into the same accumulator. In backward, dX stacks the adapters that
  share an output dropout mask (all those without dropout) into the base GEMM; each adapter with
  dropout adds its own masked term;
- DoRA (one adapter with a magnitude; g = call.col_scale() [N] fp32): the one-adapter kernels with
  their column-scale constexprs (kernels/_common.py). Without dropout g is applied in the GEMM
  epilogue (Y written once) and dX's GEMM scales dY's tile by g as it loads it; with dropout the
  forward GEMM keeps two accumulators over one read of W (x W^T and (D x) W^T, D the shrink's mask)
  and writes Y and Z_d once each, and dX's GEMM two (dY W and ((g-1) dY) W). dS and dB take g on the
  host ([N, r] work: g B for dS, g * (s dY^T S) for dB).
- a mixed batch (call.plan: row i takes adapter k = row_index[i], -1 = the base alone; an adapter
  pool's calls too): kernels/lora_mixed.py, the same kernels through their MIXED constexpr
  (kernels/_common.py). Forward: a segmented shrink (row tiles in the plan's order, one adapter per
  tile, x rows gathered through `order`) writes S [M, max r], row i holding x_i A_k^T in its first r_k
  columns and exact zeros in the rest (base rows: all zeros); then the dense or packed GEMM adds
  s_k S_i B_k^T in its LoRA step, in the same fp32 accumulator as x W^T, Y written once: on segment
  tiles (any M; rows loaded and stored through `order`) or, for decode (M <= 16), on row-order tiles
  where each row reads its own adapter's B (one read of W for all rows; the fused single kernel is not
  used: it would re-read every row's A in each column program). Backward: dS by the segmented shrink
  (B^T as its A, s_k from the table), dX = dY W + dS A_k by the same GEMMs (dX written once), dA_k and
  dB_k by lora_wgrad_kernel over each adapter's rows (one program per output element: no atomics, no
  split over M; deterministic, simpler than the training path). The tile table (one entry per row
  tile: positions in `order` and the adapter) is built on the host from the plan's offsets, for every
  BLOCK_M the configs use, once per plan (cached). No dropout (supports() says so; the torch backend
  runs it). DoRA slots (a pool's adapters with a magnitude, inference): each row's g from a [n + 1, N]
  table in the GEMM's epilogue, Y still written once (`_common.col_scale_rows`); their backward is the
  torch backend's, on the same S.
  Adapter storage: the kernels address every adapter of the batch in one A [*, K] and one B [N, *]
  through an int32 table (rank, first row of A_k, first column of B_k; column 0 = base rows) and an
  fp32 table of scales (`lora_mixed.adapter_bank`, tables cached by content across layers). When the
  adapters with rows are row slices of one tensor (A) and column slices of one [N, R] tensor (B), as a
  serving bank's pool passes them (fastpeft.ops.pool views; a single adapter always is), that tensor is
  read in place, no copy: the check is the same storage, dtype and strides, and each slice's start a
  whole number of rows (columns) from the first (`lora_mixed.pooled`). Otherwise the adapters with
  rows are concatenated once per call (A_cat [sum r, K], B_cat [N, sum r]; fp32 if their dtypes
  differ): one copy of the batch's adapters per layer call.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .contract import PACKED_FIELDS, LoraCall, dora_column_scale
from .dispatch import triton_interpreting

try:
    import triton  # noqa: F401
    _TRITON_ERROR = None
except Exception as e:  # not installed, or a broken install: the backend reports it in supports()
    _TRITON_ERROR = f"triton is not importable ({type(e).__name__}: {e})"

_ACT = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    # Imported on first use: importing defines the @triton.jit functions (cheap), and keeps
    # `import fastpeft.ops` working where triton is missing.
    from fastpeft.kernels import _common, lora_bwd, lora_fwd, lora_quant, lora_shrink

    return _common, lora_fwd, lora_bwd, lora_quant, lora_shrink


def _mixed_kernels():
    from fastpeft.kernels import lora_mixed

    return lora_mixed


def _fp32_tf32(x: Tensor) -> bool:
    """fp32 dots use TF32 exactly when torch's own fp32 matmuls would (F.linear parity)."""
    return x.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32


FP8_DOT_ENV = "FASTPEFT_FP8_DOT"


def _fp8_dot(call: LoraCall) -> bool:
    """Whether an fp8 base runs its forward as W8A8 on fp8 tensor cores (kernels/lora_quant.py
    `fp8_w8a8_step`: x quantized to e4m3 per row and 128 columns, as transformers' and vLLM's fp8 linears
    do) rather than W dequantized to x's dtype. Automatic: on GPUs with fp8 tensor cores (sm_89+: Ada,
    Hopper) when the weight allows it (`fp8_dot_reason`) and the call has more than DECODE_MAX_M rows;
    elsewhere, or FASTPEFT_FP8_DOT=0, the exact dequantized path. Decode is left exact because it gains
    nothing there: its 16-row tiles get no fp8 MMA from Triton on sm_90 (ptxas: mma.sync on converted
    operands, not wgmma e4m3), and both paths read the same fp8 bytes. FASTPEFT_FP8_DOT=1 forces W8A8 at
    any M (also under the interpreter: the CI tests), and raises when the weight cannot take it.
    Backward (dX) always dequantizes."""
    qw = call.base.packed
    if qw is None or qw.fmt != "fp8":
        return False
    env = os.environ.get(FP8_DOT_ENV, "").strip()
    if env not in ("", "0", "1"):
        raise RuntimeError(f"{FP8_DOT_ENV}={env!r}: expected 0, 1 or unset")
    if env == "0":
        return False
    reason = _kernels()[3].fp8_dot_reason(qw)
    if env == "1":
        if reason is not None:
            raise RuntimeError(f"{FP8_DOT_ENV}=1 forces fp8 W8A8, which cannot run this {call.describe()}: {reason}")
        return True
    quant = _kernels()[3]
    return reason is None and call.M > quant.DECODE_MAX_M and quant.fp8_hw_convert(call.x.device)


def supports(call: LoraCall) -> Optional[str]:
    """None when the Triton kernels can run this (validated) call, else why not."""
    if _TRITON_ERROR is not None:
        return _TRITON_ERROR
    x = call.x
    if x.device.type == "cpu" and not triton_interpreting():
        return "x is a CPU tensor and TRITON_INTERPRET=1 is not set (Triton kernels need CUDA tensors)"
    if x.device.type not in ("cuda", "cpu"):
        return f"x is on {x.device}; the triton backend runs on CUDA (or CPU under TRITON_INTERPRET=1)"
    if x.dtype not in _ACT:
        return f"x dtype {x.dtype} not supported (fp16, bf16, fp32)"
    common = _kernels()[0]
    mixed = call.plan is not None
    for i, a in enumerate(call.adapters):
        if not (0 if mixed else 1) <= a.r <= common.MAX_R:
            return f"r={a.r} is outside the kernels' range {0 if mixed else 1}..{common.MAX_R}"
        if mixed and a.dropout_p > 0.0:
            return "LoRA dropout in a mixed batch (row_index) has no Triton kernel (mixed batches are for inference)"
        if mixed and a.magnitude is not None and (a.r == 0 or a.weight_norm is None):
            return (f"a DoRA adapter (slot {i}) in a mixed batch (row_index) needs rank > 0 and its weight_norm "
                    f"on the Triton kernels (the torch backend runs it)")
        for name, t in (("lora_A", a.A), ("lora_B", a.B)):
            if t.dtype not in (torch.float32, x.dtype):
                return f"{name} dtype {t.dtype} not supported with x {x.dtype} (fp32 or x's dtype)"
        if not 0.0 <= a.dropout_p < 1.0:
            return f"dropout_p={a.dropout_p} outside [0, 1) (p = 1 drops the whole LoRA branch; use torch)"
    bias = call.base.bias
    if bias is not None and bias.dtype not in _ACT:
        return f"bias dtype {bias.dtype} not supported (fp16, bf16, fp32)"
    tensors = [("weight", call.base.weight), ("bias", bias)]
    tensors += [(f"lora_{n}", t) for a in call.adapters for n, t in (("A", a.A), ("B", a.B))]
    tensors += [(f"DoRA {n}", t) for a in call.adapters for n, t in (("magnitude", a.magnitude),
                                                                      ("weight_norm", a.weight_norm))]
    qw = call.base.packed
    if qw is not None:
        tensors += [(f"quantized weight field {f}", getattr(qw, f)) for f in PACKED_FIELDS]
    for name, t in tensors:
        if t is not None and t.device != x.device:
            return f"{name} is on {t.device} but x on {x.device}"
    if call.is_dora and call.adapters[0].weight_norm is None:
        return "DoRA adapter without its weight_norm (fastpeft.ops.lora computes it)"
    if qw is not None:
        return _kernels()[3].quant_reason(qw, x.dtype)
    return None


def _empty_adapter(call: LoraCall) -> tuple[Tensor, Tensor]:
    """A rank-0 (A, B) for a call without adapters: the kernels then run the base GEMM alone."""
    x = call.x
    return x.new_empty((0, call.K)), x.new_empty((call.N, 0))


def _stacked_b(call: LoraCall) -> Tensor:
    """[N, sum r] fp32: s_i B_i side by side, the LoRA step of several adapters as one (scale 1)."""
    return torch.cat([a.B.float() * a.scale for a in call.adapters], dim=1)


def _col_scale(call: LoraCall) -> Optional[Tensor]:
    """DoRA's g [N] as the kernels read it (fp32, contiguous), or None for a plain LoRA call."""
    g = call.col_scale()
    return None if g is None else g.to(torch.float32).contiguous()


def _bank(call: LoraCall):
    """The mixed batch's adapters as the kernels address them (kernels/lora_mixed.py `adapter_bank`: the
    caller's pool without a copy when the adapters are slices of one, else one concatenation)."""
    plan = call.plan
    ads = call.adapters
    return _mixed_kernels().adapter_bank([a.A for a in ads], [a.B for a in ads], [a.scale for a in ads],
                                         [plan.count(k) > 0 for k in range(len(ads))], call.x.device)


def _dora_rows(call: LoraCall) -> bool:
    """Whether a DoRA adapter (a pool's DoRA slot) has rows in this mixed batch."""
    return any(a.magnitude is not None and call.plan.count(k) for k, a in enumerate(call.adapters))


def _col_scale_table(call: LoraCall) -> Optional[Tensor]:
    """A mixed batch's DoRA scales, fp32 [n + 1, N]: row k + 1 = adapter k's g (ones without a magnitude or
    rows), row 0 ones (base rows); None when no DoRA adapter has rows."""
    if not _dora_rows(call):
        return None
    table = torch.ones(len(call.adapters) + 1, call.N, dtype=torch.float32, device=call.x.device)
    for k, a in enumerate(call.adapters):
        if a.magnitude is not None and call.plan.count(k):
            table[k + 1] = dora_column_scale(a.magnitude, a.weight_norm).float()
    return table


def _mixed_forward(call: LoraCall) -> tuple:
    """(Y, S [M, max r] fp32): row i of S holds its adapter's r_k values first, zeros after (base rows: 0).
    DoRA slots with rows: their g in the GEMM's epilogue, per row (`_col_scale_table`)."""
    plan, base = call.plan, call.base
    return _mixed_kernels().lora_mixed_fwd(call.x, base.weight, base.packed, base.bias, _bank(call), plan.row_index,
                                           plan.order, plan.offsets, call.N, call.r_total,
                                           fp32_tf32=_fp32_tf32(call.x), fp8_dot=_fp8_dot(call),
                                           col_scales=_col_scale_table(call))


def _mixed_backward(call: LoraCall, dY: Tensor, S: Tensor, needs_dx: bool, needs_dA: list,
                    needs_dB: list) -> tuple[Optional[Tensor], list, list]:
    if _dora_rows(call):  # DoRA slots are an inference feature: their backward is the torch backend's (same S)
        from . import torch_backend

        return torch_backend.backward(call, dY, S, needs_dx, needs_dA, needs_dB)
    plan, base, x = call.plan, call.base, call.x
    bank = _bank(call)
    dX, da, dbt = _mixed_kernels().lora_mixed_bwd(dY, x, base.weight, base.packed, bank, plan.row_index, plan.order,
                                                  plan.offsets, S, needs_dx, any(needs_dA), any(needs_dB),
                                                  fp32_tf32=_fp32_tf32(x))
    dAs, dBs = [], []
    for a, r, o, need_A, need_B in zip(call.adapters, bank.ranks, bank.cat_offs, needs_dA, needs_dB):
        # each gradient its own tensor, in the parameter's dtype and layout (adapters without rows: zeros)
        dAs.append(None if not need_A else torch.zeros_like(a.A) if r == 0 else
                   torch.empty(a.A.shape, dtype=a.A.dtype, device=x.device).copy_(da[o:o + r]))
        dBs.append(None if not need_B else torch.zeros_like(a.B) if r == 0 else
                   torch.empty(a.B.shape, dtype=a.B.dtype, device=x.device).copy_(dbt[o:o + r].t()))
    return dX, dAs, dBs


def forward(call: LoraCall) -> tuple:
    """(Y [M, N] in x's dtype, S [M, sum r] fp32). Y = x W^T + sum_i s_i ((D_i x) A_i^T) B_i^T (+ bias).
    A DoRA call with dropout returns (Y, S, Z_d [M, N] in x's dtype), as the torch backend does; a mixed
    batch (Y, S [M, max r])."""
    common, fwd, _, quant, shrink = _kernels()
    x, base, tf32 = call.x, call.base, _fp32_tf32(call.x)
    if call.plan is not None:
        return _mixed_forward(call)
    if call.is_dora:
        a, g = call.adapters[0], _col_scale(call)
        if base.packed is not None:
            return quant.lora_quant_fwd(x, base.packed, base.bias, a.A, a.B, a.scale, a.dropout_p, call.seed,
                                        fp32_tf32=tf32, col_scale=g, fp8_dot=_fp8_dot(call))
        return fwd.lora_fwd(x, base.weight, base.bias, a.A, a.B, a.scale, a.dropout_p, call.seed, fp32_tf32=tf32,
                            col_scale=g)
    if len(call.adapters) <= 1:
        if call.adapters:
            a = call.adapters[0]
            A, B, s, p = a.A, a.B, a.scale, a.dropout_p
        else:
            (A, B), s, p = _empty_adapter(call), 1.0, 0.0
        if base.packed is not None:
            return quant.lora_quant_fwd(x, base.packed, base.bias, A, B, s, p, call.seed, fp32_tf32=tf32,
                                        fp8_dot=_fp8_dot(call))
        return fwd.lora_fwd(x, base.weight, base.bias, A, B, s, p, call.seed, fp32_tf32=tf32)
    S = common.empty((call.M, call.r_total), torch.float32, x.device)
    for a, seed, sl in zip(call.adapters, call.seeds(), call.r_slices()):
        shrink.lora_shrink(x, a.A, 1.0, a.dropout_p, seed, out=S[:, sl], fp32_tf32=tf32)
    Y = common.empty((call.M, call.N), x.dtype, x.device)
    if call.M and call.N:
        if base.packed is not None:
            quant.launch_lora_quant(x, base.packed, S, _stacked_b(call), base.bias, Y, 1.0, True, fp32_tf32=tf32,
                                    fp8_dot=_fp8_dot(call))
        else:
            fwd.launch_lora_matmul(x, base.weight, S, _stacked_b(call), base.bias, Y, 1.0, fp32_tf32=tf32)
    return Y, S


def _dx_term(call: LoraCall, dY: Tensor, dS: Tensor, adapters: list, with_base: bool, out: Tensor, p: float,
             seed: int, tf32: bool) -> Tensor:
    """out = dY W (with_base) + D * (dS A_cat): the adapters' A stacked, one output dropout mask (p, seed)."""
    _, fwd, _, quant, _ = _kernels()
    at = torch.cat([a.A.float() for a in adapters], dim=0).t()  # [K, sum r]
    if with_base and call.base.packed is not None:
        quant.launch_lora_quant(dY, call.base.packed, dS, at, None, out, 1.0, False, out_dropout_p=p, seed=seed,
                                fp32_tf32=tf32)
    else:
        wt = call.base.weight.t() if with_base and call.base.weight is not None else None
        fwd.launch_lora_matmul(dY, wt, dS, at, None, out, 1.0, out_dropout_p=p, seed=seed, fp32_tf32=tf32)
    return out


def backward(call: LoraCall, dY: Tensor, S: Tensor, needs_dx: bool, needs_dA: list,
             needs_dB: list) -> tuple[Optional[Tensor], list, list]:
    """(dX in x's dtype | None, [dA_i | None], [dB_i | None]). The dA/dB reductions over M are
    deterministic (fixed-order sum of per-split fp32 partials)."""
    common, _, bwd, quant, shrink = _kernels()
    x, base, tf32 = call.x, call.base, _fp32_tf32(call.x)
    dY = dY if dY.dtype == x.dtype else dY.to(x.dtype)
    S = S if S.dtype == torch.float32 else S.float()
    if call.plan is not None:
        return _mixed_backward(call, dY, S, needs_dx, needs_dA, needs_dB)
    if call.is_dora:  # the one-adapter kernels, g in dX's GEMM and on the [N, r] factors of dS and dB
        a, g = call.adapters[0], _col_scale(call)
        kw = dict(needs_dx=needs_dx, needs_da=needs_dA[0], needs_db=needs_dB[0], fp32_tf32=tf32, col_scale=g)
        if base.packed is not None:
            dX, dA, dB = quant.lora_quant_bwd(dY, x, base.packed, a.A, a.B, S, a.scale, a.dropout_p, call.seed, **kw)
        else:
            dX, dA, dB = bwd.lora_bwd(dY, x, base.weight, a.A, a.B, S, a.scale, a.dropout_p, call.seed,
                                      deterministic=True, **kw)
        return dX, [dA], [dB]
    if len(call.adapters) <= 1:
        if call.adapters:
            a = call.adapters[0]
            A, B, s, p, need_A, need_B = a.A, a.B, a.scale, a.dropout_p, needs_dA[0], needs_dB[0]
        else:
            (A, B), s, p, need_A, need_B = _empty_adapter(call), 1.0, 0.0, False, False
        if base.packed is not None:
            dX, dA, dB = quant.lora_quant_bwd(dY, x, base.packed, A, B, S, s, p, call.seed, needs_dx=needs_dx,
                                              needs_da=need_A, needs_db=need_B, fp32_tf32=tf32)
        else:
            dX, dA, dB = bwd.lora_bwd(dY, x, base.weight, A, B, S, s, p, call.seed, needs_dx=needs_dx,
                                      needs_da=need_A, needs_db=need_B, deterministic=True, fp32_tf32=tf32)
        return dX, [dA] if call.adapters else [], [dB] if call.adapters else []

    ads, seeds, slices = call.adapters, call.seeds(), call.r_slices()
    dS = None
    if needs_dx or any(needs_dA):
        dS = common.empty((call.M, call.r_total), torch.float32, x.device)
        for a, sl in zip(ads, slices):
            shrink.lora_shrink(dY, a.B.t(), a.scale, out=dS[:, sl], fp32_tf32=tf32)
    dX = None
    if needs_dx:
        dX = common.empty((call.M, call.K), x.dtype, x.device)
        if call.M and call.K:
            # The base GEMM takes the adapters without dropout (they share the all-ones mask) or, when
            # every adapter has dropout, the first one; each other adapter adds its own masked term.
            first = [i for i, a in enumerate(ads) if a.dropout_p == 0.0] or [0]
            group_dS = torch.cat([dS[:, slices[i]] for i in first], dim=1)
            _dx_term(call, dY, group_dS, [ads[i] for i in first], True, dX, ads[first[0]].dropout_p,
                     seeds[first[0]], tf32)
            for i in (i for i in range(len(ads)) if i not in first):
                term = common.empty((call.M, call.K), x.dtype, x.device)
                dX.add_(_dx_term(call, dY, dS[:, slices[i]], [ads[i]], False, term, ads[i].dropout_p, seeds[i], tf32))
        else:
            dX.zero_()
    dAs, dBs = [], []
    for a, seed, sl, need_A, need_B in zip(ads, seeds, slices, needs_dA, needs_dB):
        dAs.append(bwd.lora_wgrad(dS[:, sl], x, 1.0, a.dropout_p, seed, True, fp32_tf32=tf32).to(a.A.dtype)
                   if need_A else None)
        dBs.append(bwd.lora_wgrad(dY, S[:, sl], a.scale, 0.0, 0, True, fp32_tf32=tf32).to(a.B.dtype)
                   if need_B else None)
    return dX, dAs, dBs
