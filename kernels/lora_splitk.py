"""Split-K decode: the end of a split launch of the LoRA GEMMs (kernels/lora_fwd.py, lora_quant.py).

At decode (M = 1..64 rows) a GEMM with K = N = 4096 has 64 output tiles of 16 x 64 for the 132 SMs
of an H100: each program streams a whole [K, BLOCK_N] strip of W, half the GPU idles, and those
that work keep too few loads in flight to reach the memory bandwidth. Split-K gives every output
tile SPLIT_K programs, each over its own stretch of K (`_common.split_k_range`), writing an fp32
partial tile into slice k of a [SPLIT_K, M, N] workspace. This file holds the second, small
launch that turns the slices into Y:

    Y = g * (scale * S B^T + sum_k partial_k) (+ bias)        (g: DoRA's column scale, if any)

The LoRA term is the shared first step of every LoRA tile (`lora_b_step`: S [M, r] times B^T,
or, for a mixed batch's decode rows, each row its own adapter's B), the slices are added in the
order k = 0, 1, ... (deterministic, no atomics), and `finish_tile` applies g and the bias and
stores Y once. Extra memory traffic: SPLIT_K * M * N * 4 bytes written and read back, against
the N * K weight bytes a decode step streams (M = 16, split 4, N = K = 4096: 1 MB of 32 MB).

What a split launch cannot take: dropout on the output (dX in training) and DoRA with dropout
(two accumulators): the launchers refuse them; decode is inference.

`split_k_for` picks SPLIT_K from the shape and the GPU's SM count. FASTPEFT_SPLIT_K=<n> forces it
(1 turns split-K off), for benchmarks that measure the crossover.
"""
import os

import torch
import triton
import triton.language as tl

from ._common import MIXED_GATHER, col_scale_rows, cuda_index, empty, finish_tile, lora_b_step, r_block, sm_count

SPLIT_K_ENV = "FASTPEFT_SPLIT_K"
# Split only while each program keeps at least this much of K (whole tiles of the decode configs).
MIN_K_PER_SPLIT = 512
MAX_SPLIT_K = 16
# Rows up to which a launch may split (the decode regime; beyond it the output tiles fill the GPU).
SPLIT_MAX_M = 64
# The output tile the heuristic assumes (the decode configs' typical BLOCK_M x BLOCK_N).
_TILE_M, _TILE_N = 16, 64
# r chunk of the finish kernel's LoRA step: 32 spilled 8 B on sm_90 with a mixed batch's gathered rows
# (ptxas of triton 3.6, the GPU machine's; 4 warps, 128 registers); 16 did not (80-90 registers)
FINISH_BLOCK_R = 16


def forced_split_k():
    """The SPLIT_K that FASTPEFT_SPLIT_K forces, or None (unset or empty: the heuristic decides)."""
    val = os.environ.get(SPLIT_K_ENV, "").strip()
    if not val:
        return None
    if not val.isdigit() or not 1 <= int(val) <= MAX_SPLIT_K:
        raise RuntimeError(f"{SPLIT_K_ENV}={val!r}: expected an integer in 1..{MAX_SPLIT_K}")
    return int(val)


def split_k_for(m: int, n: int, k: int, device) -> int:
    """SPLIT_K for an [m, k] x [k, n] decode GEMM on `device`: 1 (no split) unless m <= SPLIT_MAX_M,
    the output tiles are fewer than the SMs and K is long enough; then the power of two that brings
    the programs closest to two per SM, each keeping at least MIN_K_PER_SPLIT of K.

    Unmeasured: no GPU has run the split path yet (benchmarks/device_check.sh times split 1, 2, 4 and 8
    at the decode shapes; this rule is to be replaced by what it measures). CPU tensors (the
    interpreter) never split unless FASTPEFT_SPLIT_K forces it."""
    forced = forced_split_k()
    if forced is not None:
        return forced
    device = torch.device(device)
    if device.type != "cuda" or m > SPLIT_MAX_M or m == 0 or n == 0:
        return 1
    sms = sm_count(cuda_index(device))
    tiles = triton.cdiv(m, _TILE_M) * triton.cdiv(n, _TILE_N)
    split = 1
    while split < MAX_SPLIT_K and tiles * split * 2 <= 2 * sms and k // (split * 2) >= MIN_K_PER_SPLIT:
        split *= 2
    return split


def split_workspace(fn: str, split_k: int, m: int, n: int, out_dropout_p: float, dual: bool, mixed, device):
    """The fp32 [split_k, m, n] workspace of a split launch of launcher `fn`, after its checks: split-K is
    for inference (no output dropout, no DoRA with dropout) and, for a mixed batch, its decode rows."""
    if not 1 < split_k <= MAX_SPLIT_K:
        raise ValueError(f"{fn}: split_k must be in 1..{MAX_SPLIT_K}, found {split_k}")
    if out_dropout_p > 0.0 or dual:
        raise ValueError(f"{fn}: split_k={split_k} runs without dropout (decode); this launch has "
                         f"{'DoRA with dropout' if dual else 'an output dropout'}")
    if mixed is not None and mixed.mode != MIXED_GATHER.value:
        raise ValueError(f"{fn}: a mixed batch splits K only on its decode (gather) tiles")
    return empty((split_k, m, n), torch.float32, device)


def get_finish_config():
    """The finish kernel's one config (it reads SPLIT_K fp32 tiles and r columns of S and B per output
    element: bandwidth-bound and small, nothing to tune). BLOCK_M = 16: the LoRA step's dot needs 16
    rows, and a mixed batch's decode rows loop over the tile's rows."""
    return triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=1)


@triton.jit
def lora_splitk_finish_kernel(
    part_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, cs_ptr, ridx_ptr, rank_ptr, off_ptr, adscale_ptr,
    M, N, R, stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn, scale,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_COL_SCALE: tl.constexpr, GATHER: tl.constexpr,
    AD_SCALE: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y[M, N] = g * (scale * S B^T + sum_k part[k]) (+ bias); part: the contiguous fp32 [SPLIT_K, M, N]
    workspace. GATHER: a mixed batch's decode rows (row i: s_k S[i, :r_k] B_k^T, `lora_b_step`)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = lora_b_step(s_ptr, b_ptr, rows, cols, row_ok, col_ok, R, stride_sm, stride_sr, stride_br, stride_bn,
                      scale, 0, 0.0, 1.0, N, ridx_ptr, rank_ptr, off_ptr, adscale_ptr, False, GATHER, AD_SCALE,
                      tl.float32, LORA_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)  # [BLOCK_M, BLOCK_N] fp32
    mask = row_ok[:, None] & col_ok[None, :]
    part = part_ptr + rows.to(tl.int64)[:, None] * N + cols.to(tl.int64)[None, :]
    slice_elems = M.to(tl.int64) * N
    for k in tl.static_range(SPLIT_K):  # fixed order: the same sum on every run
        acc += tl.load(part + k * slice_elems, mask=mask, other=0.0)
    if GATHER:  # a mixed batch's DoRA slots: each row its adapter's g (`col_scale_rows`)
        cs_row = col_scale_rows(ridx_ptr, rows, row_ok, N, MIXED_GATHER, HAS_COL_SCALE)
    else:
        cs_row = 0
    finish_tile(acc, acc, y_ptr, bias_ptr, cs_ptr, cs_row, rows, cols, row_ok, col_ok, stride_ym, stride_yn,
                HAS_BIAS, HAS_COL_SCALE, False)


def finish_split_k(part, s, b, bias, y, scale, col_scale, mixed, lora_precision):
    """y = g * (scale * s b^T + sum_k part[k]) (+ bias), the end of a split-K launch.

    part: fp32 [SPLIT_K, M, N] contiguous; s [M, R] fp32, b [N, R] (R = 0: no LoRA term); y [M, N]
    (strided views allowed); col_scale: fp32 [N] or None; mixed: a MixedRows of mode MIXED_GATHER or
    None. Callers check shapes (the GEMM launchers, which made `part`)."""
    split, m, n = part.shape
    r = b.shape[1]
    s_arg, b_arg = (s, b) if r else (part, part)  # R = 0: never read
    if mixed is not None:  # (gather tiles only: split_workspace, which made `part`, refused the others)
        r = mixed.r_max
        mptrs = (mixed.row_index, mixed.rank, mixed.off, mixed.scale)
    else:
        mptrs = (part,) * 4
    args = (part, s_arg, b_arg, bias if bias is not None else part, y,
            col_scale if col_scale is not None else part, *mptrs,
            m, n, r, s.stride(0), s.stride(1), b.stride(0), b.stride(1), y.stride(0), y.stride(1), float(scale))
    consts = dict(SPLIT_K=split, HAS_BIAS=bias is not None, HAS_COL_SCALE=col_scale is not None,
                  GATHER=mixed is not None, AD_SCALE=bool(mixed.ad_scale) if mixed is not None else False,
                  LORA_PRECISION=lora_precision, BLOCK_R=min(r_block(r), FINISH_BLOCK_R))
    c = get_finish_config()
    grid = (triton.cdiv(n, c.kwargs["BLOCK_N"]), triton.cdiv(m, c.kwargs["BLOCK_M"]))
    lora_splitk_finish_kernel[grid](*args, **consts, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    return y
