"""LoRA shrink: S = scale * (D * x) A^T  ->  [M, r] in fp32.

Forward uses it for S = (D x) A^T (scale 1, dropout on); backward reuses it for dS = s * dY B by
passing B^T as a strided view (A := B^T, no dropout, scale s).

r is small (1..256): the r axis is one or two tiles of BLOCK_R (r padded in registers to a power
of two >= 16 with masks); the grid runs over M tiles and r tiles; each program walks all of K.
"""
import torch
import triton
import triton.language as tl

from ._common import (
    MIXED_SEGMENT, SMEM_LIMIT, check_2d, compute_dtype, dot_precision, dropout_keep, dropout_tile_ok, empty,
    ieee_tile_ok, launch, mixed_args, mixed_bucket, mma, r_block, segment_rows, tile_section, tl_dtype,
)

# r tiles wider than this are split across programs (keeps the fp32 accumulator in registers).
MAX_BLOCK_R = 128


def get_shrink_configs():
    """Autotune space for the shrink kernel (BLOCK_R is not tuned: it follows r)."""
    configs = []
    for bm in (16, 32, 64, 128):
        for bk in (16, 32, 64):
            for warps, stages in ((4, 3), (4, 4), (8, 3)):
                configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return configs


def prune_shrink_configs(configs, named_args, **kwargs):
    """Pruning rule: BLOCK_M no larger than the M bucket (no work on padding rows), BLOCK_K no
    larger than K rounded up, 8 warps only for big tiles, and the pipelined tiles must fit in
    shared memory. Always keeps at least one config."""
    mb = named_args["M_BUCKET"]
    k = named_args["K"]
    br = kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 16))
    elt = named_args["x_ptr"].element_size()
    kept = []
    for c in configs:
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        if bm > mb or bk > max(32, triton.next_power_of_2(k)):
            continue
        if c.num_warps == 8 and bm * br < 128 * 64:
            continue
        if bm * bk > 64 * 64 and (elt == 4 or named_args["a_ptr"].element_size() == 4):
            continue  # fp32 operand tiles (x upcast for tf32 next to fp32 A) this big spill registers
        if bk == 16 and kwargs.get("INPUT_PRECISION") != "ieee":
            continue  # BLOCK_K = 16 exists for exact fp32 only
        if not ieee_tile_ok(bm, br, bk, kwargs.get("INPUT_PRECISION")):
            continue
        if kwargs.get("HAS_DROPOUT") and not dropout_tile_ok(bm, bk, c.num_warps):
            continue
        if c.num_stages * (bm + br) * bk * max(elt, 2) > SMEM_LIMIT:
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps))]


@triton.jit
def shrink_step(s_acc, x, a_rows, rows, ks, k_ok, r_ok, K, stride_ak, seed, p_drop, HAS_DROPOUT: tl.constexpr,
                COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One K tile of S = (D x) A^T: s_acc [BLOCK_M, BLOCK_R] + (D * x) A^T[ks, :].

    x: the [BLOCK_M, BLOCK_K] tile of x at rows x ks (left undropped for the caller: the fused
    kernel multiplies it by W too); a_rows: A's row pointers [1, BLOCK_R]. The shrink kernel and
    the fused forward/dX kernel (kernels/lora_fwd.py) share it, so both make S the same way.
    DoRA's forward with dropout multiplies W by the masked x too (`base_step`, DUAL_FWD, in
    kernels/_common.py) and draws its mask with this same call, dropout_keep(seed, rows, ks, K, p):
    the two must stay identical, as peft applies one dropout to both.
    """
    # A^T tile loaded straight from A [r, K] via strides.
    at = tl.load(a_rows + ks[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]
    if HAS_DROPOUT:
        x = tl.where(dropout_keep(seed, rows, ks, K, p_drop), x, 0.0)
    return mma(x, at, s_acc, COMPUTE_DTYPE, INPUT_PRECISION)


@triton.jit(do_not_specialize=["seed"])
def lora_shrink_kernel(
    x_ptr, a_ptr, s_ptr, tiles_ptr, order_ptr, rank_ptr, off_ptr, adscale_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    scale, seed, p_drop, inv_keep,
    M_BUCKET,  # autotune key only
    HAS_DROPOUT: tl.constexpr, MIXED: tl.constexpr, AD_SCALE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """s[M, R] = scale * (D x) a^T; program (pid_m, pid_r): rows pid_m * BLOCK_M.., columns pid_r * BLOCK_R...

    MIXED_SEGMENT (a mixed batch, kernels/_common.py): pid_m is a tile of the tile table's section for
    BLOCK_M, one adapter's rows gathered through order; its rank r_k, first row of a (off_ptr) and scale
    (times s_k when AD_SCALE) from the adapter table. S [M, R] (R = max r) gets the r_k values of each row
    in its first columns and zeros in the rest (base rows: all zeros): a program whose column chunk starts
    past r_k runs no K step and stores its zeros, and A's loads stop at r_k, so an adapter reads its own
    rank only. Deterministic: each element of S comes from one program's fixed-order K loop."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    if MIXED == MIXED_SEGMENT:
        first, _ = tile_section(tiles_ptr, BLOCK_M // 16)
        rows, row_ok, seg = segment_rows(tiles_ptr, order_ptr, first + pid_m, BLOCK_M)
        r_ad = tl.load(rank_ptr + seg)
        a_ptr += tl.load(off_ptr + seg).to(tl.int64) * stride_ar
        if AD_SCALE:
            scale = scale * tl.load(adscale_ptr + seg)
        k_end = tl.where(pid_r * BLOCK_R < r_ad, K, 0)  # chunks past this adapter's rank: zeros, no K step
    else:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        r_ad = R
        k_end = K
    r_ok = rr < r_ad
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    a_rows = a_ptr + rr[None, :].to(tl.int64) * stride_ar  # [1, BLOCK_R]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + kk
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        acc = shrink_step(acc, x, a_rows, rows, ks, k_ok, r_ok, K, stride_ak, seed, p_drop, HAS_DROPOUT,
                          COMPUTE_DTYPE, INPUT_PRECISION)  # [BLOCK_M, BLOCK_R]
    acc = acc * (scale * inv_keep if HAS_DROPOUT else scale)
    s_ptrs = s_ptr + rows[:, None].to(tl.int64) * stride_sm + rr[None, :] * stride_sr
    tl.store(s_ptrs, acc, mask=row_ok[:, None] & (rr < R)[None, :])


lora_shrink_kernel_tuned = triton.autotune(
    configs=get_shrink_configs(),
    # Flags are in the key too: a config tuned (and pruned) without dropout must not be reused with it.
    key=["M_BUCKET", "K", "R", "HAS_DROPOUT", "MIXED", "INPUT_PRECISION", "BLOCK_R"],
    prune_configs_by={"early_config_prune": prune_shrink_configs},
)(lora_shrink_kernel)


def shrink_block_r(r: int) -> int:
    return min(r_block(r), MAX_BLOCK_R)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0,
                out: torch.Tensor | None = None, fp32_tf32: bool = False, config: dict | None = None,
                mixed=None, block_r: int | None = None) -> torch.Tensor:
    """S = scale * (D * x) @ a^T, fp32 [M, r].

    x: [M, K] fp16/bf16/fp32, any strides. a: [r, K] fp32 or x's dtype, any strides.
    D: dropout multiplier regenerated from (seed, element index of x) when dropout_p > 0.
    r = 0 (no adapter) gives the empty [M, 0] S without a launch.
    out: optional preallocated fp32 [M, r] (any strides). config: explicit meta-parameters
    (BLOCK_M, BLOCK_K, num_warps, num_stages) to bypass autotuning; used by tests and under
    the interpreter, where autotuning cannot time anything.
    mixed (`_common.MixedRows`, segment mode): a mixed batch; a holds every adapter's rows (mixed.off:
    the first of each), out is [M, R] with R = out's width (the batch's largest rank, or more), row i
    getting scale (* s_k) * x_i a_k^T in its first r_k columns and zeros after; block_r: the column
    chunk (default min(r_block(R), MAX_BLOCK_R)).
    """
    if x.dim() != 2:
        raise ValueError(f"lora_shrink: x must be 2-D [M, K], found shape {tuple(x.shape)}")
    m, k = x.shape
    check_2d("lora_shrink: x", x, (m, k))
    if a.dim() != 2 or a.shape[1] != k:
        raise ValueError(f"lora_shrink: a must be [r, K={k}], found {tuple(a.shape)}")
    check_2d("lora_shrink: a", a, (a.shape[0], k))
    if mixed is not None and out is None:
        raise ValueError("lora_shrink: a mixed batch writes a given out [M, R] (R: the batch's S width)")
    r = a.shape[0] if mixed is None else out.shape[1]
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_shrink: dropout_p must be in [0, 1), found {dropout_p}")
    if x.device != a.device:
        raise ValueError(f"lora_shrink: x on {x.device} but a on {a.device}")
    if out is None:
        out = empty((m, r), torch.float32, x.device)
    elif out.shape != (m, r) or out.dtype != torch.float32:
        raise ValueError(f"lora_shrink: out must be fp32 [{m}, {r}], found {out.dtype} {tuple(out.shape)}")
    if m == 0 or r == 0:
        return out
    if k == 0 or a.shape[0] == 0:
        return out.zero_()
    br = block_r or shrink_block_r(r)
    mptrs, mconsts = mixed_args(mixed, x, ("tiles", "order", "rank", "off", "scale"))
    args = (x, a, out, *mptrs, m, k, r, x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0),
            out.stride(1), float(scale), int(seed), float(dropout_p), 1.0 / (1.0 - dropout_p), mixed_bucket(mixed, m))
    consts = dict(mconsts, HAS_DROPOUT=dropout_p > 0.0, COMPUTE_DTYPE=tl_dtype(compute_dtype(x.dtype, a.dtype)),
                  INPUT_PRECISION=dot_precision((x.dtype, a.dtype), fp32_tf32), BLOCK_R=br)
    if mixed is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, br))  # noqa: E731
    else:
        grid = lambda meta: (mixed.counts[meta["BLOCK_M"] // 16], triton.cdiv(r, br))  # noqa: E731
    launch(lora_shrink_kernel_tuned, grid, args, consts, config)
    return out
