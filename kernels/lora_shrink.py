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
    SMEM_LIMIT, check_2d, compute_dtype, dot_precision, dropout_keep, dropout_tile_ok, empty, ieee_tile_ok, launch,
    m_bucket, mma, r_block, tl_dtype,
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
    x_ptr, a_ptr, s_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    scale, seed, p_drop, inv_keep,
    M_BUCKET,  # autotune key only
    HAS_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    r_ok = rr < R
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    a_rows = a_ptr + rr[None, :].to(tl.int64) * stride_ar  # [1, BLOCK_R]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + kk
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        acc = shrink_step(acc, x, a_rows, rows, ks, k_ok, r_ok, K, stride_ak, seed, p_drop, HAS_DROPOUT,
                          COMPUTE_DTYPE, INPUT_PRECISION)  # [BLOCK_M, BLOCK_R]
    acc = acc * (scale * inv_keep if HAS_DROPOUT else scale)
    s_ptrs = s_ptr + rows[:, None].to(tl.int64) * stride_sm + rr[None, :] * stride_sr
    tl.store(s_ptrs, acc, mask=row_ok[:, None] & r_ok[None, :])


lora_shrink_kernel_tuned = triton.autotune(
    configs=get_shrink_configs(),
    # Flags are in the key too: a config tuned (and pruned) without dropout must not be reused with it.
    key=["M_BUCKET", "K", "R", "HAS_DROPOUT", "INPUT_PRECISION", "BLOCK_R"],
    prune_configs_by={"early_config_prune": prune_shrink_configs},
)(lora_shrink_kernel)


def shrink_block_r(r: int) -> int:
    return min(r_block(r), MAX_BLOCK_R)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0,
                out: torch.Tensor | None = None, fp32_tf32: bool = False, config: dict | None = None) -> torch.Tensor:
    """S = scale * (D * x) @ a^T, fp32 [M, r].

    x: [M, K] fp16/bf16/fp32, any strides. a: [r, K] fp32 or x's dtype, any strides.
    D: dropout multiplier regenerated from (seed, element index of x) when dropout_p > 0.
    r = 0 (no adapter) gives the empty [M, 0] S without a launch.
    out: optional preallocated fp32 [M, r] (any strides). config: explicit meta-parameters
    (BLOCK_M, BLOCK_K, num_warps, num_stages) to bypass autotuning; used by tests and under
    the interpreter, where autotuning cannot time anything.
    """
    if x.dim() != 2:
        raise ValueError(f"lora_shrink: x must be 2-D [M, K], found shape {tuple(x.shape)}")
    m, k = x.shape
    check_2d("lora_shrink: x", x, (m, k))
    if a.dim() != 2 or a.shape[1] != k:
        raise ValueError(f"lora_shrink: a must be [r, K={k}], found {tuple(a.shape)}")
    r = a.shape[0]
    check_2d("lora_shrink: a", a, (r, k))
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
    if k == 0:
        return out.zero_()
    br = shrink_block_r(r)
    args = (x, a, out, m, k, r, x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
            float(scale), int(seed), float(dropout_p), 1.0 / (1.0 - dropout_p), m_bucket(m))
    consts = dict(HAS_DROPOUT=dropout_p > 0.0, COMPUTE_DTYPE=tl_dtype(compute_dtype(x.dtype, a.dtype)),
                  INPUT_PRECISION=dot_precision((x.dtype, a.dtype), fp32_tf32), BLOCK_R=br)
    launch(lora_shrink_kernel_tuned, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, br)), args, consts,
           config)
    return out
