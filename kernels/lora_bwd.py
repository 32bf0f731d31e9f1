"""LoRA linear backward.

    dS = s * dY B                    [M, r]   shrink kernel (kernels/lora_shrink.py) with A := B^T
    dX = dY W + D * (dS A)           [M, K]   lora_matmul_kernel (kernels/lora_fwd.py) with W := W^T,
                                              B := A^T, output dropout: one kernel, dX written once
                                              (small M: lora_fused_kernel computes dS and dX together)
    dA = dS^T (D * x)                [r, K]   lora_wgrad_kernel below
    dB = s * dY^T S                  [N, r]   lora_wgrad_kernel below

D is regenerated from the forward's seed and the element index of x (kernels/_common.py), so the
masks of forward and backward are identical without ever being stored.

DoRA (column scale g [N], ``col_scale``): the LoRA backward runs on g * dY, and with dropout the base
term keeps peft's extra masked product:

    dS = s * (g dY) B = s * dY (g B)   g folded into B on the host ([N, r], the shrink reads it)
    dX = dY W + D * (((g - 1) dY) W + dS A)     one dX GEMM: without dropout (D = 1) this is
                                                (g dY) W + dS A, dY's tile scaled by g as it is loaded
                                                (X_SCALE); with dropout two accumulators share each
                                                W tile (DUAL_DX, kernels/_common.py)
    dA = dS^T (D * x)                           as without DoRA
    dB = s * (g dY)^T S = g[:, None] * (s dY^T S)   the [N, r] result scaled on the host

dA and dB are reductions over M, which is long in training (tokens) while the outputs are small:
the M range is split over several programs (grid axis 1) so the GPU fills up. Each split writes an
fp32 partial [split, P, Q]; the partials are then summed in a fixed order (deterministic: the same
bits every run). With deterministic=False the splits atomically add into one fp32 buffer instead
(one pass less, run-to-run bit differences). A mixed batch's dA_k / dB_k (kernels/lora_mixed.py) run the
same kernel over each adapter's rows (MIXED_SEGMENT): no split, no atomics.
"""
import torch
import triton
import triton.language as tl

from ._common import (
    MIXED_SEGMENT, SMEM_LIMIT, compute_dtype, dot_precision, dropout_keep, dropout_tile_ok, empty, ieee_tile_ok,
    cuda_index, launch, m_bucket, mixed_args, mma, sm_count, tile_entry, tile_section, tl_dtype,
)
from .lora_fwd import FUSED_MAX_R, check_lora_args, launch_lora_fused, launch_lora_matmul, use_fused
from .lora_shrink import lora_shrink


def get_wgrad_configs():
    """Autotune space of the reduction kernel: (BLOCK_P, BLOCK_Q, BLOCK_M, warps, stages)."""
    shapes = [
        (16, 64, 128, 4, 3), (16, 128, 64, 4, 3), (32, 64, 128, 4, 3), (32, 128, 64, 4, 3), (64, 64, 64, 4, 3),
        (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 32, 8, 3), (64, 16, 128, 4, 3), (128, 32, 64, 4, 3),
        (128, 16, 64, 4, 4),
        (32, 64, 32, 4, 3), (16, 64, 32, 4, 3), (64, 16, 32, 4, 3),  # for exact fp32 ("ieee") dots
    ]
    return [triton.Config({"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bp, bq, bm, w, s in shapes]


def _wgrad_config_ok(c, p, q, elt, dropout=False, precision="tf32"):
    bp, bq, bm = c.kwargs["BLOCK_P"], c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_M"]
    if bp > max(16, triton.next_power_of_2(p)) or bq > max(16, triton.next_power_of_2(q)):
        return False
    if dropout and not dropout_tile_ok(bm, bq, c.num_warps):
        return False
    # fp32 values per thread (accumulator + both operand tiles, upcast for tf32 / FMA dots): more
    # than 128 (32 for exact fp32) spilled on sm_80 in ptxas -v.
    per_thread = (bp * bq + (bp + bq) * bm) / (32 * c.num_warps)
    if per_thread > (32 if precision == "ieee" else 128) or not ieee_tile_ok(bp, bq, bm, precision):
        return False
    return c.num_stages * (bp + bq) * bm * elt <= SMEM_LIMIT


def prune_wgrad_configs(configs, named_args, **kwargs):
    """Pruning rule: output tiles no larger than P and Q rounded up to a power of two (r = 16 gets
    16-wide tiles, not 128 of padding), pipelined tiles within shared memory; >= 1 config kept."""
    elt = max(named_args["lhs_ptr"].element_size(), named_args["rhs_ptr"].element_size())
    kept = [c for c in configs
            if _wgrad_config_ok(c, named_args["P"], named_args["Q"], elt, bool(kwargs.get("HAS_DROPOUT")),
                                kwargs.get("INPUT_PRECISION"))]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_M"]))]


@triton.jit(do_not_specialize=["seed"])
def lora_wgrad_kernel(
    lhs_ptr, rhs_ptr, out_ptr, tiles_ptr, order_ptr, rank_ptr, off_ptr, adscale_ptr,
    M, P, Q,
    stride_lhs_m, stride_lhs_p, stride_rhs_m, stride_rhs_q, stride_os, stride_op, stride_oq,
    scale, seed, p_drop, inv_keep, rows_per_split,
    M_BUCKET,  # autotune key only
    HAS_DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, MIXED: tl.constexpr, AD_SCALE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out[split, P, Q] (or atomically out[P, Q]) = scale * lhs[m-range, P]^T (D * rhs)[m-range, Q].

    dA: lhs = dS, rhs = x (dropout index m * K + k, as forward). dB: lhs = dY, rhs = S, scale = s.

    MIXED_SEGMENT (a mixed batch, kernels/_common.py): program (tile, pid_s) reduces over the rows of
    adapter segment pid_s (section 0 of the tile table: whole segments, gathered through order), P
    masked to its rank r_k, into rows off_k .. off_k + r_k of out [sum r, Q] (stride_os unused; scale
    times s_k when AD_SCALE). One program per output element, a fixed-order loop: deterministic, no
    atomics, no split of M. dA_k: lhs = dS [M, max r], rhs = x; dB_k^T: lhs = S, rhs = dY.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_q = tl.cdiv(Q, BLOCK_Q)
    pid_p = pid // num_q
    pid_q = pid % num_q
    pp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qq < Q
    mm = tl.arange(0, BLOCK_M)
    if MIXED == MIXED_SEGMENT:
        first, _ = tile_section(tiles_ptr, 0)
        m_start, seg_end, seg = tile_entry(tiles_ptr, first + pid_s)  # positions in order, adapter table column
        P = tl.load(rank_ptr + seg)
        out_ptr += tl.load(off_ptr + seg).to(tl.int64) * stride_op
        if AD_SCALE:
            scale = scale * tl.load(adscale_ptr + seg)
        m_end = tl.where(pid_p * BLOCK_P < P, seg_end, m_start)  # p tiles past the rank: nothing to do
    else:
        m_start = pid_s * rows_per_split
        m_end = tl.minimum(m_start + rows_per_split, M)
    p_ok = pp < P
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        ms = m0 + mm
        m_ok = ms < m_end
        if MIXED == MIXED_SEGMENT:
            ms = tl.load(order_ptr + ms, mask=m_ok, other=0).to(tl.int32)  # positions -> rows
        ms64 = ms.to(tl.int64)
        # lhs^T tile straight from lhs [M, P] via strides.
        lhs_t = tl.load(lhs_ptr + pp[:, None] * stride_lhs_p + ms64[None, :] * stride_lhs_m,
                        mask=p_ok[:, None] & m_ok[None, :], other=0.0)  # [BLOCK_P, BLOCK_M]
        rhs = tl.load(rhs_ptr + ms64[:, None] * stride_rhs_m + qq[None, :] * stride_rhs_q,
                      mask=m_ok[:, None] & q_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_Q]
        if HAS_DROPOUT:
            rhs = tl.where(dropout_keep(seed, ms, qq, Q, p_drop), rhs, 0.0)
        acc = mma(lhs_t, rhs, acc, COMPUTE_DTYPE, INPUT_PRECISION)  # [BLOCK_P, BLOCK_Q]
    acc = acc * (scale * inv_keep if HAS_DROPOUT else scale)
    mask = p_ok[:, None] & q_ok[None, :]
    offs = pp[:, None].to(tl.int64) * stride_op + qq[None, :] * stride_oq
    if ATOMIC:
        tl.atomic_add(out_ptr + offs, acc, mask=mask)
    else:
        if MIXED != MIXED_SEGMENT:
            out_ptr += pid_s.to(tl.int64) * stride_os
        tl.store(out_ptr + offs, acc, mask=mask)


lora_wgrad_kernel_tuned = triton.autotune(
    configs=get_wgrad_configs(), key=["M_BUCKET", "P", "Q", "HAS_DROPOUT", "ATOMIC", "MIXED", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_wgrad_configs},
    reset_to_zero=["out_ptr"],  # atomic mode accumulates: each timing run starts from zero
)(lora_wgrad_kernel)


def choose_split(m: int, p: int, q: int, device) -> int:
    """Number of M splits: enough programs for ~2 waves on the GPU, each split >= 256 rows."""
    tiles = triton.cdiv(p, 64) * triton.cdiv(q, 64)
    return max(1, min(triton.cdiv(m, 256), triton.cdiv(2 * (sm_count(cuda_index(device)) if device.type == "cuda" else 4), tiles)))


def lora_wgrad(lhs, rhs, scale=1.0, dropout_p=0.0, seed=0, deterministic=True, split_m=None, fp32_tf32=False,
               config=None, mixed=None, out=None):
    """fp32 [P, Q] = scale * lhs[M, P]^T @ (D * rhs)[M, Q], D from (seed, element index of rhs).

    split_m: number of M splits (default: `choose_split`). deterministic: fixed-order sum of
    per-split partials (True) or fp32 atomics (False). config: explicit meta-parameters.
    mixed (`_common.MixedRows`, a mixed batch): per adapter k over its rows only,
    out[off_k : off_k + r_k] = scale (* s_k) * lhs[R_k, :r_k]^T rhs[R_k] into out (fp32 [sum r, Q], rows
    of adapters without rows in the batch left as they are); no split, deterministic; returns out.
    """
    m, p = lhs.shape
    m2, q = rhs.shape
    if m != m2:
        raise ValueError(f"lora_wgrad: lhs {tuple(lhs.shape)} and rhs {tuple(rhs.shape)} differ in M")
    if mixed is not None:
        items = mixed.counts[0]
        if m == 0 or p == 0 or q == 0 or items == 0:
            return out
        mptrs, mconsts = mixed_args(mixed, lhs, ("tiles", "order", "rank", "off", "scale"))
        args = (lhs, rhs, out, *mptrs, m, p, q, lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1),
                0, out.stride(0), out.stride(1), float(scale), int(seed), float(dropout_p), 1.0 / (1.0 - dropout_p),
                m, m_bucket(mixed.max_rows))
        consts = dict(mconsts, HAS_DROPOUT=dropout_p > 0.0, ATOMIC=False,
                      COMPUTE_DTYPE=tl_dtype(compute_dtype(lhs.dtype, rhs.dtype)),
                      INPUT_PRECISION=dot_precision((lhs.dtype, rhs.dtype), fp32_tf32))
        grid = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(q, meta["BLOCK_Q"]), items)  # noqa: E731
        launch(lora_wgrad_kernel_tuned, grid, args, consts, config)
        return out
    if m == 0 or p == 0 or q == 0:  # empty reduction (no rows) or empty output (r = 0): no launch
        return torch.zeros((p, q), dtype=torch.float32, device=lhs.device)
    split = split_m if split_m is not None else choose_split(m, p, q, lhs.device)
    split = max(1, min(int(split), m))
    rows_per_split = triton.cdiv(m, split)
    if split_m is None and rows_per_split > 128:
        rows_per_split = triton.cdiv(rows_per_split, 128) * 128  # whole BLOCK_M steps per split
    split = triton.cdiv(m, rows_per_split)
    atomic = not deterministic and split > 1
    if atomic:
        out = torch.zeros((1, p, q), dtype=torch.float32, device=lhs.device)
    else:
        out = empty((split, p, q), torch.float32, lhs.device)
    mptrs, mconsts = mixed_args(None, lhs, ("tiles", "order", "rank", "off", "scale"))
    args = (lhs, rhs, out, *mptrs, m, p, q, lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            float(scale), int(seed), float(dropout_p), 1.0 / (1.0 - dropout_p), rows_per_split, m_bucket(m))
    consts = dict(mconsts, HAS_DROPOUT=dropout_p > 0.0, ATOMIC=atomic,
                  COMPUTE_DTYPE=tl_dtype(compute_dtype(lhs.dtype, rhs.dtype)),
                  INPUT_PRECISION=dot_precision((lhs.dtype, rhs.dtype), fp32_tf32))
    grid = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(q, meta["BLOCK_Q"]), split)  # noqa: E731
    launch(lora_wgrad_kernel_tuned, grid, args, consts, config)
    # torch's sum over a fixed-size leading dim is a deterministic tree; split == 1 is a no-op view.
    return out[0] if out.shape[0] == 1 else out.sum(0)


def dora_b(b, col_scale):
    """g[:, None] * B [N, r] in fp32: dS = s (g dY) B = s dY (g B) from the plain shrink."""
    return b.float() * col_scale.detach().float()[:, None]


def lora_bwd(dy, x, weight, a, b, s, scale, dropout_p=0.0, seed=0, needs_dx=True, needs_da=True, needs_db=True,
             deterministic=True, variant="auto", fp32_tf32=False, configs=None, col_scale=None):
    """Gradients of Y = x W^T + scale * ((D x) A^T) B^T. Returns (dX | None, dA | None, dB | None).

    dy: [M, N] (dtype of x); x: [M, K]; weight: [N, K] or None; a: [r, K]; b: [N, r];
    s: [M, r] fp32, the S saved by lora_fwd; seed/dropout_p: the forward's.
    dX in x.dtype, dA in a.dtype, dB in b.dtype.
    variant: "auto" (fused dS+dX kernel for M <= 64 and r <= 128), "fused" or "split".
    configs: optional dict of explicit meta-parameters with keys among "shrink", "matmul",
    "fused", "wgrad" (tests use small blocks; otherwise autotuned).
    r = 0 (no adapter): dX = dY W by the split path's GEMM alone, whatever the variant; dA [0, K]
    and dB [N, 0] are empty.
    col_scale: DoRA's g [N] (module docstring); with dropout dX runs on the split path.
    """
    m, k, n, r = check_lora_args("lora_bwd", x, weight, None, a, b, scale, dropout_p)
    if tuple(dy.shape) != (m, n) or dy.dtype != x.dtype:
        raise ValueError(f"lora_bwd: dY must be {x.dtype} [{m}, {n}], found {dy.dtype} {tuple(dy.shape)}")
    if tuple(s.shape) != (m, r) or s.dtype != torch.float32:
        raise ValueError(f"lora_bwd: S must be fp32 [{m}, {r}], found {s.dtype} {tuple(s.shape)}")
    if dy.device != x.device or s.device != x.device:
        raise ValueError(f"lora_bwd: dY on {dy.device}, S on {s.device}, x on {x.device}: must match")
    if variant not in ("auto", "fused", "split"):
        raise ValueError(f"lora_bwd: variant must be 'auto', 'fused' or 'split', found {variant!r}")
    dora = col_scale is not None
    if dora and (col_scale.dim() != 1 or col_scale.shape[0] != n):
        raise ValueError(f"lora_bwd: col_scale must be [N={n}], found {tuple(col_scale.shape)}")
    if dora and dropout_p > 0.0 and variant == "fused":
        raise ValueError("lora_bwd: DoRA with dropout runs dX on the split path (two accumulators), not 'fused'")
    cfg = configs or {}
    dx = da = db = None
    ds = None
    bt = (dora_b(b, col_scale) if dora else b).t()  # the shrink's A := B^T (DoRA: (g B)^T)
    if needs_dx:
        dx = empty((m, k), x.dtype, x.device)
        fused = use_fused(variant, m, r, (x.dtype, a.dtype, b.dtype), fp32_tf32) and not (dora and dropout_p > 0.0)
        if m and k and (n == 0):
            dx.zero_()
            ds = torch.zeros((m, r), dtype=torch.float32, device=x.device)
        elif m and k:
            wt = weight.t() if weight is not None else None
            if fused:
                if r > FUSED_MAX_R:
                    raise ValueError(f"lora_bwd: the fused variant holds r <= {FUSED_MAX_R}, found r={r}")
                ds = empty((m, r), torch.float32, x.device)
                # DoRA: dY's tile times g feeds both dS and dX, so B stays unscaled here
                launch_lora_fused(dy, wt, b.t(), a.t(), None, dx, ds, scale, 1.0, out_dropout_p=dropout_p,
                                  seed=seed, fp32_tf32=fp32_tf32, config=cfg.get("fused"), x_col_scale=col_scale)
            else:
                ds = lora_shrink(dy, bt, scale, fp32_tf32=fp32_tf32, config=cfg.get("shrink"))
                launch_lora_matmul(dy, wt, ds, a.t(), None, dx, 1.0, out_dropout_p=dropout_p, seed=seed,
                                   fp32_tf32=fp32_tf32, config=cfg.get("matmul"), x_col_scale=col_scale)
    if needs_da:
        if ds is None:
            ds = lora_shrink(dy, bt, scale, fp32_tf32=fp32_tf32, config=cfg.get("shrink"))
        da = lora_wgrad(ds, x, 1.0, dropout_p, seed, deterministic, cfg.get("split_m"), fp32_tf32,
                        cfg.get("wgrad")).to(a.dtype)
    if needs_db:
        db = lora_wgrad(dy, s, scale, 0.0, 0, deterministic, cfg.get("split_m"), fp32_tf32, cfg.get("wgrad"))
        db = (db * col_scale.detach().float()[:, None] if dora else db).to(b.dtype)
    return dx, da, db
