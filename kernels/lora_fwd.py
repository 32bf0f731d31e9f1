"""LoRA linear forward:  Y = x W^T + s * S B^T (+ bias),  S = (D * x) A^T.

Two kernels, one launcher (`lora_fwd`):
- `lora_matmul_kernel` (large M): S comes from the shrink kernel (kernels/lora_shrink.py); the
  LoRA-B term is one extra K = r step into the same fp32 accumulator as x W^T, so Y is written
  once and no [M, N] temporary exists. Backward reuses it for dX = dY W + D * (dS A): the LoRA
  step runs first so the output-side dropout multiplies only the LoRA part of the accumulator.
- `lora_fused_kernel` (small M, decode): one launch; every program recomputes S for its row block
  inside the main K loop from the x tile it already loaded (cheap when M is small: the extra
  work is r/BLOCK_N of the main GEMM and A stays in L2), and the programs of column 0 write S.
Both kernels serve fp16/bf16/fp32 via constexpr dtypes; A/B may be fp32 next to 16-bit x.

DoRA (a column scale g [N], see kernels/_common.py above `dual_start` for the constexprs): without
dropout both kernels apply g in their shared epilogue (`finish_tile`) and the dX variant scales dY's
tile by g as it is loaded. With dropout the forward is the matmul kernel's DUAL_FWD (two accumulators
sharing each W tile, Y and Z_d written once each) and dX its DUAL_DX; the fused kernel does not take
them (it would hold a third [BLOCK_M, *] accumulator, S's, next to the two): `lora_fwd` routes DoRA
with dropout through the shrink + matmul path.

Mixed batches (each row its own adapter; kernels/lora_mixed.py): the matmul kernel's MIXED constexpr
(kernels/_common.py) makes its tiles segment tiles (one adapter's rows, gathered through the plan's
order) or decode tiles (each row's own B in the LoRA step); the fused kernel does not take them.
"""
import torch
import triton
import triton.language as tl

from ._common import (
    ACT_DTYPES, DUAL_DX, DUAL_FWD, MAX_R, MIXED_GATHER, MIXED_SEGMENT, SMEM_LIMIT, base_step, check_2d,
    col_scale_rows, compute_dtype, dora_args, dot_precision, dropout_tile_ok, dual_start, dual_tile_ok, empty,
    finish_lora_tile, finish_tile, grouped_grid, grouped_tile, ieee_tile_ok, launch, lora_b_step, lora_tile, m_bucket,
    mixed_args, mixed_bucket, mixed_grid, mma, out_dropout_scale, r_block, split_grid, split_k_range, tl_dtype,
)
from .lora_shrink import lora_shrink, shrink_step
from .lora_splitk import finish_split_k, forced_split_k, split_k_for, split_workspace

# r chunk of the extra LoRA step in the large-M kernel (r > 32 takes several chunks).
MATMUL_BLOCK_R = 32
# The fused kernel holds S [BLOCK_M, r_pad] and B^T [r_pad, BLOCK_N] in registers: r <= 128
# (r <= 64 with exact fp32 dots, which also keep their operands in registers).
FUSED_MAX_R = 128
FUSED_MAX_R_IEEE = 64
# auto variant: fused single kernel up to this many rows.
FUSED_MAX_M = 64


def get_lora_matmul_configs():
    """Autotune space of the large-M kernel: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    shapes = [
        (128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (64, 64, 32, 4, 4), (32, 128, 64, 4, 4), (32, 64, 64, 4, 4), (16, 64, 64, 4, 4),
        (32, 64, 32, 4, 3), (16, 64, 32, 4, 3),  # small-K tiles for exact fp32 ("ieee") dots
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def _matmul_config_ok(c, mb, n, k, elt, out_dropout=False, precision="tf32", dual=0, x_scale=False, mixed=0,
                     split_k=1):
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    # split-K partial sums (bf16): 16x64x64 on 4 warps spilled 36 B on sm_90 with the ptxas of triton 3.6 (the
    # GPU machine's; 64 registers), not with triton 3.9's; its neighbours 16x64x32 and 32x64x64 did not
    if split_k > 1 and (bm, bn, bk, c.num_warps) == (16, 64, 64, 4):
        return False
    if bm > mb or bn > max(16, triton.next_power_of_2(n)) or bk > max(32, triton.next_power_of_2(k)):
        return False
    # A mixed batch's segment tiles (rows gathered through the plan's order): on 4 warps, 128-wide W tiles
    # spilled on sm_80 (ptxas -v, bf16: 128x128x32 68 B, 64x128x64 28 B; the plain kernel sits at 255 and
    # 214 registers there); 8 warps (128x128x64: 242) and 64-wide tiles do not
    if mixed == MIXED_SEGMENT.value and c.num_warps == 4 and bn > 64:
        return False
    if mixed == MIXED_GATHER.value and bm != 16:  # decode tiles: the LoRA step loops over the tile's rows
        return False
    if elt == 4 and bm * bn > 64 * 64:  # fp32 x: FMA/tf32 tiles this big spill registers (ptxas -v)
        return False
    if (out_dropout or dual == DUAL_DX) and not dropout_tile_ok(bm, bn, c.num_warps):
        return False
    # DoRA with dropout: two accumulators (and, forward, the keep mask of the x tile, as the shrink's)
    if dual and not dual_tile_ok(bm, bn, bk if dual == DUAL_FWD else 0, c.num_warps):
        return False
    # DoRA's dX without dropout: g of the dY tile is one more pipelined load per K step; 128x128 tiles on
    # 4 warps sit at 255 registers without it and spilled with it (ptxas -v, sm_80)
    if x_scale and bm * bn > 64 * 32 * c.num_warps:
        return False
    if not ieee_tile_ok(bm, 2 * bn if dual else bn, bk, precision):  # exact fp32: both accumulators count
        return False
    main = c.num_stages * (bm + bn) * bk * elt
    lora = (bm + bn) * MATMUL_BLOCK_R * 4 * 2  # fp32 S and B chunks, double-buffered
    return max(main, lora) <= SMEM_LIMIT


def prune_lora_matmul_configs(configs, named_args, **kwargs):
    """Pruning rule: BLOCK_M <= M bucket, BLOCK_N/BLOCK_K no larger than N/K rounded up to a power
    of two, pipelined tiles within shared memory; at least the smallest config survives."""
    elt = named_args["x_ptr"].element_size()
    kept = [c for c in configs if _matmul_config_ok(c, named_args["M_BUCKET"], named_args["N"], named_args["K"], elt,
                                                    bool(kwargs.get("OUT_DROPOUT")), kwargs.get("INPUT_PRECISION"),
                                                    int(kwargs.get("DUAL", 0)), bool(kwargs.get("X_SCALE")),
                                                    int(kwargs.get("MIXED", 0)), int(kwargs.get("SPLIT_K", 1)))]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]))]


@triton.jit(do_not_specialize=["seed"])
def lora_matmul_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, cs_ptr, z_ptr,
    tiles_ptr, order_ptr, ridx_ptr, rank_ptr, off_ptr, adscale_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn,
    stride_zm, stride_zn,
    scale, seed, p_drop, inv_keep,
    M_BUCKET,  # autotune key only
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_DROPOUT: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr, X_SCALE: tl.constexpr, DUAL: tl.constexpr,
    MIXED: tl.constexpr, AD_SCALE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    LORA_DTYPE: tl.constexpr, LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,
):
    """Y[M, N] = x[M, K] W[N, K]^T + scale * D_out * (S[M, R] B[N, R]^T) (+ bias[N]).

    DoRA (kernels/_common.py): HAS_COL_SCALE Y = g * (...) + bias (cs_ptr: g [N]); X_SCALE the x tile
    times cs[k] (dX: cs = g [K]); DUAL_FWD also writes Z_d to z_ptr; DUAL_DX (cs = g - 1 [K]).
    Mixed batches (MIXED, kernels/_common.py): row i's LoRA term is s_k S[i, :r_k] B_k^T with k its
    adapter; B [N, *] holds every adapter's columns (off_ptr: the first of each), R is unused.
    MIXED_SEGMENT: programs walk the tile table (tiles_ptr, order_ptr); MIXED_GATHER: rows in order,
    row_index (ridx_ptr) picks each row's adapter.
    SPLIT_K > 1 (decode, `_common.split_k_range`): this program's stretch of K only, no LoRA step, the
    raw fp32 partial into its slice of the workspace y; kernels/lora_splitk.py finishes."""
    # The tile (a mixed batch's segment tile: its adapter's rank, scale and columns of B)
    _, rows, cols, row_ok, col_ok, R, scale, b_ptr = lora_tile(
        M, N, R, scale, b_ptr, stride_br, tiles_ptr, order_ptr, rank_ptr, off_ptr, adscale_ptr, MIXED, AD_SCALE,
        BLOCK_M, BLOCK_N, GROUP_M)  # [BLOCK_M], [BLOCK_N]

    k_lo, k_hi, y_ptr = split_k_range(K, y_ptr, M, stride_ym, BLOCK_K, SPLIT_K)
    # The LoRA step first (see lora_b_step), then the base GEMM joins the same accumulator.
    if SPLIT_K == 1:
        acc = lora_b_step(s_ptr, b_ptr, rows, cols, row_ok, col_ok, R, stride_sm, stride_sr, stride_br, stride_bn,
                          scale, seed, p_drop, inv_keep, N, ridx_ptr, rank_ptr, off_ptr, adscale_ptr, OUT_DROPOUT,
                          MIXED == MIXED_GATHER, AD_SCALE, LORA_DTYPE, LORA_PRECISION,
                          BLOCK_M, BLOCK_N, BLOCK_R)  # [BLOCK_M, BLOCK_N] fp32
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the finish kernel adds the LoRA term
    acc, acc2 = dual_start(acc, p_drop, DUAL)  # DoRA with dropout: the second accumulator

    if HAS_W:
        kk = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn  # [1, BLOCK_N]
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + kk
            k_ok = ks < K
            x = tl.load(x_rows + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            wt = tl.load(w_cols + ks[:, None] * stride_wk,
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            acc, acc2 = base_step(acc, acc2, x, wt, rows, ks, k_ok, K, cs_ptr, seed, p_drop, X_SCALE, DUAL,
                                  COMPUTE_DTYPE, INPUT_PRECISION)

    cs_row = col_scale_rows(ridx_ptr, rows, row_ok, N, MIXED, HAS_COL_SCALE)  # a mixed batch's DoRA slots
    finish_lora_tile(acc, acc2, y_ptr, z_ptr, bias_ptr, cs_ptr, cs_row, rows, cols, row_ok, col_ok, N, stride_ym, stride_yn,
                     stride_zm, stride_zn, seed, p_drop, inv_keep, HAS_BIAS, HAS_COL_SCALE, DUAL)


lora_matmul_kernel_tuned = triton.autotune(
    configs=get_lora_matmul_configs(),
    # Flags and W's K-stride are in the key too: forward (W) and backward dX (W^T, output dropout) of a
    # square layer share M/N/K/R but want (and may only use, see the pruning) different configs.
    key=["M_BUCKET", "N", "K", "R", "stride_wk", "HAS_W", "HAS_BIAS", "OUT_DROPOUT", "HAS_COL_SCALE", "X_SCALE",
         "DUAL", "MIXED", "INPUT_PRECISION", "LORA_PRECISION", "SPLIT_K"],
    prune_configs_by={"early_config_prune": prune_lora_matmul_configs},
)(lora_matmul_kernel)


def get_lora_fused_configs():
    """Autotune space of the small-M fused kernel: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    shapes = [
        (16, 32, 128, 4, 4), (16, 64, 64, 4, 4), (16, 64, 128, 4, 3), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4),
        (32, 128, 64, 4, 3), (64, 64, 64, 4, 3),
        (16, 32, 32, 4, 3), (16, 64, 32, 4, 3),  # small-K tiles for exact fp32 ("ieee") dots
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def _fused_config_ok(c, mb, n, k, br, elt, elt_a, in_dropout=False, out_dropout=False, precision="tf32"):
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    if bm > mb or bn > max(16, triton.next_power_of_2(n)) or bk > max(32, triton.next_power_of_2(k)):
        return False
    if br * bn > 128 * 64 or br * bk > 128 * 64:  # B^T / A^T tiles: register-resident operands
        return False
    if br >= 64 and bn >= 128 and c.num_stages >= 4 and not in_dropout:
        return False  # 16x128x64 at r = 64, 4 stages, no dropout: 4 B spilled on sm_90 (ptxas -v; 255 regs with it)
    if elt == 4 and bm * bn > 32 * 64:  # fp32 x: bigger tiles spill registers (ptxas -v)
        return False
    # fp32 values live per thread: Y accumulator, S accumulator, the [r_pad, BLOCK_N] B tile. More
    # than ~96 spilled on sm_80/sm_90 in ptxas -v.
    if bm * bn + br * bn + bm * br > 96 * 32 * c.num_warps:
        return False
    if (in_dropout and not dropout_tile_ok(bm, bk, c.num_warps)) or \
            (out_dropout and not dropout_tile_ok(bm, bn, c.num_warps)):
        return False
    if not ieee_tile_ok(bm, bn + br, bk, precision):
        return False
    smem = c.num_stages * ((bm + bn) * bk * elt + br * bk * elt_a)
    return smem <= SMEM_LIMIT


def prune_lora_fused_configs(configs, named_args, **kwargs):
    """Pruning rule: as the large-M kernel, plus r: the x, W and A tiles of every stage must fit in
    shared memory and the [r_pad, BLOCK_N] B tile in registers; at least one config survives."""
    br = kwargs.get("BLOCK_R", 16)
    elt = named_args["x_ptr"].element_size()
    elt_a = max(elt, named_args["a_ptr"].element_size())
    kept = [c for c in configs
            if _fused_config_ok(c, named_args["M_BUCKET"], named_args["N"], named_args["K"], br, elt, elt_a,
                                bool(kwargs.get("IN_DROPOUT")), bool(kwargs.get("OUT_DROPOUT")),
                                kwargs.get("INPUT_PRECISION"))]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]))]


@triton.jit(do_not_specialize=["seed"])
def lora_fused_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, s_ptr, cs_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_sm, stride_sr,
    s_scale, out_scale, seed, p_drop, inv_keep,
    M_BUCKET,  # autotune key only
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, IN_DROPOUT: tl.constexpr, OUT_DROPOUT: tl.constexpr,
    WRITE_S: tl.constexpr, HAS_COL_SCALE: tl.constexpr, X_SCALE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SHRINK_DTYPE: tl.constexpr, SHRINK_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """S = s_scale * (D_in * x) A^T;  Y = x W^T + out_scale * D_out * (S B^T) (+ bias); writes Y and S.

    Forward: s_scale = 1, out_scale = s, IN_DROPOUT. Backward dX (x := dY, W := W^T, A := B^T,
    B := A^T): s_scale = s, out_scale = 1, OUT_DROPOUT, and S is dS.
    DoRA without dropout (kernels/_common.py): HAS_COL_SCALE Y = g * (...) + bias (forward, cs = g [N]);
    X_SCALE the x tile times cs[k] as it is loaded (dX, cs = g [K]), so dS = s (g dY) B and
    dX = (g dY) W + dS A both come from the scaled tile.
    """
    # Grouped program order (see grouped_pid): with small M there is usually one row group and
    # this is plain column order.
    pid_n, rows, cols, row_ok, col_ok = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)  # [BLOCK_M], [BLOCK_N]
    rr = tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    r_ok = rr < R
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * stride_xm  # [BLOCK_M, 1]
    w_cols = w_ptr + cols64[None, :] * stride_wn  # [1, BLOCK_N]
    a_rows = a_ptr + rr[None, :] * stride_ar  # [1, BLOCK_R]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + kk
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        if X_SCALE:
            x = x * tl.load(cs_ptr + ks, mask=k_ok, other=0.0)[None, :]  # fp32, for both products
        if HAS_W:
            wt = tl.load(w_cols + ks[:, None] * stride_wk,
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            acc = mma(x, wt, acc, COMPUTE_DTYPE, INPUT_PRECISION)
        s_acc = shrink_step(s_acc, x, a_rows, rows, ks, k_ok, r_ok, K, stride_ak, seed, p_drop, IN_DROPOUT,
                            SHRINK_DTYPE, SHRINK_PRECISION)  # [BLOCK_M, BLOCK_R]
    s_acc = s_acc * (s_scale * inv_keep if IN_DROPOUT else s_scale)  # [BLOCK_M, BLOCK_R]
    if WRITE_S:
        if pid_n == 0:
            s_ptrs = s_ptr + rows64[:, None] * stride_sm + rr[None, :] * stride_sr
            tl.store(s_ptrs, s_acc, mask=row_ok[:, None] & r_ok[None, :])

    # The LoRA term from the S in registers (the matmul kernel's lora_b_step loads S instead).
    bt = tl.load(b_ptr + rr[:, None] * stride_br + cols64[None, :] * stride_bn,
                 mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
    lora = mma(s_acc, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), tl.float32, LORA_PRECISION)
    acc += out_dropout_scale(lora, rows, cols, N, out_scale, seed, p_drop, inv_keep, OUT_DROPOUT)
    finish_tile(acc, acc, y_ptr, bias_ptr, cs_ptr, 0, rows, cols, row_ok, col_ok, stride_ym, stride_yn, HAS_BIAS,
                HAS_COL_SCALE, False)


lora_fused_kernel_tuned = triton.autotune(
    configs=get_lora_fused_configs(),
    key=["M_BUCKET", "N", "K", "R", "stride_wk", "HAS_W", "HAS_BIAS", "IN_DROPOUT", "OUT_DROPOUT", "HAS_COL_SCALE",
         "X_SCALE", "INPUT_PRECISION", "SHRINK_PRECISION", "LORA_PRECISION"],
    prune_configs_by={"early_config_prune": prune_lora_fused_configs},
)(lora_fused_kernel)


def launch_lora_matmul(x, w, s, b, bias, y, scale, out_dropout_p=0.0, seed=0, fp32_tf32=False, config=None,
                       col_scale=None, x_col_scale=None, in_dropout_p=0.0, z=None, mixed=None, split_k=1):
    """y = x w^T + scale * D_out * (s b^T) (+ bias). Shapes: x [M, K], w [N, K] or None, s [M, R] fp32,
    b [N, R], y [M, N] (all may be strided views); R = 0: y = x w^T (+ bias).

    DoRA (see `_common.dora_args`): col_scale g [N] gives y = g * (x w^T + scale s b^T) + bias; with
    in_dropout_p > 0 (the mask of the shrink that made s, same seed) z = (D x) w^T + scale s b^T and
    y = x w^T - (D x) w^T + g z + bias. x_col_scale g [K] (dX): y = x w^T + D_out * (((g - 1) x) w^T +
    scale s b^T). mixed (`_common.MixedRows`, a mixed batch): row i's LoRA term is
    scale * s_k * s[i, :r_k] b[:, off_k : off_k + r_k]^T, k = its adapter (s_k when mixed.ad_scale);
    b holds every adapter's columns. split_k > 1 (decode, no dropout): K split over split_k programs per
    tile into an fp32 workspace, finished by kernels/lora_splitk.py. Shape checks are the callers'."""
    m, k = x.shape
    n, r = b.shape
    has_w, has_bias = w is not None, bias is not None
    cs, p, dora = dora_args("launch_lora_matmul", col_scale, x_col_scale, in_dropout_p, out_dropout_p, z, n, k,
                            x.device, table_rows=mixed.rank.numel() if mixed is not None else 0)
    out = y
    if split_k > 1:  # the partial sums go to the workspace; the finish kernel adds LoRA, g and bias
        out = split_workspace("launch_lora_matmul", split_k, m, n, out_dropout_p, z is not None,
                              mixed, x.device)
        finish_cs, dora = (cs if dora["HAS_COL_SCALE"] else None), dict(dora, HAS_COL_SCALE=False)
    s_arg, b_arg = (s, b) if r else (x, x)  # R = 0: S and B are never read; pass live pointers anyway
    if mixed is not None:  # the LoRA step's R is each adapter's; R here keys the autotuner and sizes the chunks
        r = mixed.r_max
    mptrs, mconsts = mixed_args(mixed, x)
    args = (x, w if has_w else x, s_arg, b_arg, bias if has_bias else b_arg, out, cs if cs is not None else y,
            z if z is not None else y, *mptrs, m, n, k, r,
            x.stride(0), x.stride(1), w.stride(0) if has_w else 0, w.stride(1) if has_w else 0,
            s.stride(0), s.stride(1), b.stride(0), b.stride(1), out.stride(-2), out.stride(-1),
            z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
            float(scale), int(seed), float(p), 1.0 / (1.0 - p), mixed_bucket(mixed, m))
    main_dtypes = (x.dtype, w.dtype) if has_w else (x.dtype,)
    lora_precision = dot_precision((x.dtype, b.dtype), fp32_tf32)
    consts = dict(dora, **mconsts, HAS_W=has_w, HAS_BIAS=has_bias and split_k == 1,
                  COMPUTE_DTYPE=tl_dtype(compute_dtype(*main_dtypes)),
                  INPUT_PRECISION=dot_precision(main_dtypes, fp32_tf32),
                  LORA_DTYPE=tl.float32, LORA_PRECISION=lora_precision,
                  BLOCK_R=min(r_block(r), MATMUL_BLOCK_R), SPLIT_K=split_k)
    launch(lora_matmul_kernel_tuned, split_grid(mixed_grid(mixed, m, n), split_k), args, consts, config)
    if split_k > 1:
        finish_split_k(out, s, b, bias, y, scale, finish_cs, mixed, lora_precision)
    return y


def launch_lora_fused(x, w, a, b, bias, y, s_out, s_scale, out_scale, in_dropout_p=0.0, out_dropout_p=0.0, seed=0,
                      fp32_tf32=False, config=None, col_scale=None, x_col_scale=None):
    """s_out = s_scale * (D_in x) a^T;  y = x w^T + out_scale * D_out * (s_out b^T) (+ bias).
    x [M, K], w [N, K] or None, a [R, K], b [N, R], y [M, N], s_out [M, R] fp32. Callers check.

    DoRA without dropout only (with dropout: launch_lora_matmul's DUAL modes): col_scale g [N] gives
    y = g * (...) + bias; x_col_scale g [K] (dX) scales x's columns before both products, so
    s_out = s_scale * (g x) a^T and y = (g x) w^T + out_scale * (s_out b^T)."""
    m, k = x.shape
    n, r = b.shape
    has_w, has_bias = w is not None, bias is not None
    if in_dropout_p > 0.0 and out_dropout_p > 0.0:
        raise ValueError("launch_lora_fused: dropout on the input and the output at once is not a LoRA op")
    if (col_scale is not None or x_col_scale is not None) and (in_dropout_p > 0.0 or out_dropout_p > 0.0):
        raise ValueError("launch_lora_fused: DoRA with dropout needs two accumulators: use launch_lora_matmul")
    cs, _, dora = dora_args("launch_lora_fused", col_scale, x_col_scale, 0.0, 0.0, None, n, k, x.device)
    p = max(in_dropout_p, out_dropout_p)
    args = (x, w if has_w else x, a, b, bias if has_bias else b, y, s_out, cs if cs is not None else y, m, n, k, r,
            x.stride(0), x.stride(1), w.stride(0) if has_w else 0, w.stride(1) if has_w else 0,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), y.stride(0), y.stride(1),
            s_out.stride(0), s_out.stride(1),
            float(s_scale), float(out_scale), int(seed), float(p), 1.0 / (1.0 - p), m_bucket(m))
    main_dtypes = (x.dtype, w.dtype) if has_w else (x.dtype,)
    br = r_block(r)
    consts = dict(HAS_W=has_w, HAS_BIAS=has_bias, IN_DROPOUT=in_dropout_p > 0.0, OUT_DROPOUT=out_dropout_p > 0.0,
                  HAS_COL_SCALE=dora["HAS_COL_SCALE"], X_SCALE=dora["X_SCALE"], WRITE_S=True,
                  COMPUTE_DTYPE=tl_dtype(compute_dtype(*main_dtypes)),
                  INPUT_PRECISION=dot_precision(main_dtypes, fp32_tf32),
                  SHRINK_DTYPE=tl_dtype(compute_dtype(x.dtype, a.dtype)),
                  SHRINK_PRECISION=dot_precision((x.dtype, a.dtype), fp32_tf32),
                  LORA_PRECISION=dot_precision((x.dtype, b.dtype), fp32_tf32), BLOCK_R=br)
    launch(lora_fused_kernel_tuned, grouped_grid(m, n), args, consts, config)
    return y, s_out


def use_fused(variant, m, r, dtypes, fp32_tf32) -> bool:
    """Whether lora_fwd / lora_bwd run the fused small-M kernel: always for "fused", never for
    "split", for "auto" when M <= FUSED_MAX_M and r fits its registers (FUSED_MAX_R, FUSED_MAX_R_IEEE
    for exact fp32 dots). Never for r = 0: without adapter there is nothing to fuse."""
    if r == 0 or variant == "split":
        return False
    if variant == "fused":
        return True
    ieee = dot_precision(dtypes, fp32_tf32) == "ieee"
    return m <= FUSED_MAX_M and r <= (FUSED_MAX_R_IEEE if ieee else FUSED_MAX_R)


def check_lora_args(fn, x, weight, bias, a, b, scale=1.0, dropout_p=0.0):
    """Shape/dtype/device checks shared by lora_fwd and lora_bwd; returns (M, K, N, r)."""
    if x.dim() != 2:
        raise ValueError(f"{fn}: x must be 2-D [M, K] (x.reshape(-1, K)), found shape {tuple(x.shape)}")
    m, k = x.shape
    check_2d(f"{fn}: x", x, (m, k))
    if a.dim() != 2 or a.shape[1] != k:
        raise ValueError(f"{fn}: lora_A must be [r, K={k}], found {tuple(a.shape)}")
    r = a.shape[0]
    if b.dim() != 2 or b.shape[1] != r:
        raise ValueError(f"{fn}: lora_B must be [N, r={r}], found {tuple(b.shape)}")
    n = b.shape[0]
    adapter_dtypes = (torch.float32, x.dtype)
    check_2d(f"{fn}: lora_A", a, (r, k), adapter_dtypes)
    check_2d(f"{fn}: lora_B", b, (n, r), adapter_dtypes)
    if weight is not None:
        check_2d(f"{fn}: weight", weight, (n, k), (x.dtype,))
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or bias.dtype not in ACT_DTYPES):
        raise ValueError(f"{fn}: bias must be a float [N={n}] vector, found {bias.dtype} {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", a), ("lora_B", b)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{fn}: {name} on {t.device} but x on {x.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), found {dropout_p}")
    return m, k, n, r


def lora_fwd(x, weight, bias, a, b, scale, dropout_p=0.0, seed=0, variant="auto", fp32_tf32=False,
             config=None, shrink_config=None, out=None, s_out=None, col_scale=None, zd_out=None, split_k=None):
    """Y = x weight^T + scale * ((D x) a^T) b^T (+ bias), returns (Y [M, N] in x.dtype, S [M, r] fp32).

    x: [M, K] fp16/bf16/fp32, any strides; weight: [N, K] in x.dtype or None (LoRA term only);
    bias: [N] or None; a: [r, K], b: [N, r] in fp32 or x.dtype. D: dropout with keep probability
    1 - dropout_p from (seed, element index of x), regenerated in backward, never stored.
    variant: "auto" (fused single kernel for M <= 64 and r <= 128, r <= 64 for exact fp32), "fused" or "split"
    (shrink kernel + GEMM). config / shrink_config: explicit meta-parameters instead of autotuning.
    out / s_out: optional preallocated outputs (tests poison them to prove every element is written).
    r = 0 (a: [0, K], b: [N, 0], no adapter): Y = x weight^T (+ bias) by the split path's GEMM
    alone, whatever the variant; S is the empty [M, 0].

    col_scale: DoRA's column scale g [N] (fp32; kernels/_common.py). Without dropout
    Y = g * (x W^T + scale S b^T) + bias, on either variant. With dropout (peft's semantics)
        Z_d = (D x) W^T + scale S b^T,   Y = x W^T - (D x) W^T + g * Z_d + bias,
    D the same mask as S's, on the split path (variant "fused" is refused); then the return is
    (Y, S, Z_d [M, N] in x.dtype), zd_out an optional preallocated Z_d.

    split_k: K split of the split path's GEMM (decode, kernels/lora_splitk.py); None: the fused kernel where it
    runs, else `split_k_for` picks it for a dense W (never for DoRA with dropout); FASTPEFT_SPLIT_K forces one.
    An explicit or forced split > 1 takes the split path (shrink + split GEMM + finish) instead of the fused
    kernel; "fused" refuses an explicit split_k > 1.
    """
    m, k, n, r = check_lora_args("lora_fwd", x, weight, bias, a, b, scale, dropout_p)
    dual = col_scale is not None and dropout_p > 0.0
    if dual and variant == "fused":
        raise ValueError("lora_fwd: DoRA with dropout runs on the split path (two accumulators), not 'fused'")
    if zd_out is not None and not dual:
        raise ValueError("lora_fwd: zd_out is DoRA's Z_d with dropout: it needs col_scale and dropout_p > 0")
    if variant not in ("auto", "fused", "split"):
        raise ValueError(f"lora_fwd: variant must be 'auto', 'fused' or 'split', found {variant!r}")
    if r > MAX_R:
        raise ValueError(f"lora_fwd: r must be in 0..{MAX_R}, found {r}")
    if variant == "fused" and r > FUSED_MAX_R:
        raise ValueError(f"lora_fwd: the fused variant holds r <= {FUSED_MAX_R} in registers, found r={r}")
    y = out if out is not None else empty((m, n), x.dtype, x.device)
    s = s_out if s_out is not None else empty((m, r), torch.float32, x.device)
    if tuple(y.shape) != (m, n) or y.dtype != x.dtype:
        raise ValueError(f"lora_fwd: out must be {x.dtype} [{m}, {n}], found {y.dtype} {tuple(y.shape)}")
    if tuple(s.shape) != (m, r) or s.dtype != torch.float32:
        raise ValueError(f"lora_fwd: s_out must be fp32 [{m}, {r}], found {s.dtype} {tuple(s.shape)}")
    zd = None
    if dual:
        zd = zd_out if zd_out is not None else empty((m, n), x.dtype, x.device)
        if tuple(zd.shape) != (m, n) or zd.dtype != x.dtype:
            raise ValueError(f"lora_fwd: zd_out must be {x.dtype} [{m}, {n}], found {zd.dtype} {tuple(zd.shape)}")
    done = (y, s) if zd is None else (y, s, zd)
    if m == 0 or n == 0:
        if m:
            lora_shrink(x, a, 1.0, dropout_p, seed, out=s, fp32_tf32=fp32_tf32, config=shrink_config)
        return done
    if k == 0:  # empty reduction: x W^T = 0 and S = 0 (and Z_d = 0, so DoRA's Y is the bias too)
        s.zero_()
        y.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(y))
        if zd is not None:
            zd.zero_()
        return done
    if split_k is not None and split_k > 1 and variant == "fused":
        raise ValueError(f"lora_fwd: split_k={split_k} runs on the split path, not 'fused'")
    fused = not dual and use_fused(variant, m, r, (x.dtype, a.dtype, b.dtype), fp32_tf32)
    if dual or weight is None:
        split = 1
    elif split_k is not None:
        split = split_k
    else:  # the fused kernel where it runs (one launch), unless FASTPEFT_SPLIT_K forces a split: neither rule is
        # measured against the other on a GPU yet (benchmarks/device_check.sh times both at decode shapes)
        forced = forced_split_k()
        split = forced if forced is not None else 1 if fused else split_k_for(m, n, k, x.device)
    if split == 1 and fused:
        launch_lora_fused(x, weight, a, b, bias, y, s, 1.0, scale, in_dropout_p=dropout_p, seed=seed,
                          fp32_tf32=fp32_tf32, config=config, col_scale=col_scale)
    else:
        lora_shrink(x, a, 1.0, dropout_p, seed, out=s, fp32_tf32=fp32_tf32, config=shrink_config)  # r = 0: no launch
        launch_lora_matmul(x, weight, s, b, bias, y, scale, seed=seed, fp32_tf32=fp32_tf32, config=config,
                           col_scale=col_scale, in_dropout_p=dropout_p if dual else 0.0, z=zd, split_k=split)
    return done
