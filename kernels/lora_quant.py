"""LoRA linear over a quantized base weight (QLoRA), dequantizing W in registers.

    forward   Y  = x deq(W)^T + s * S B^T (+ bias)          S = (D x) A^T   (kernels/lora_shrink.py)
    backward  dX = dY deq(W) + D * (dS A)                    dS = s dY B     (kernels/lora_shrink.py)
              dA, dB: the 16-bit reductions of kernels/lora_bwd.py (they never touch W)

One GEMM kernel, `lora_quant_kernel`, serves both GEMMs and all formats:
    out[M, P] = a[M, Q] @ Wop[Q, P] + scale * D_out * (S[M, R] @ Bt[R, P]) (+ bias[P])
with Wop = deq(W)^T (forward: P = N, Q = K) or Wop = deq(W) (dX: P = K, Q = N), chosen by the
constexpr TRANS_W. Inside the main loop over Q it loads the packed bytes / scales that the
[BLOCK_Q, BLOCK_P] tile of W needs and dequantizes them with `dequant_w`, whose constexpr FORMAT
(FMT_NF4, FMT_INT4, FMT_INT8, FMT_FP8) selects the format's arithmetic; W is never materialized in memory.
4-bit formats whose rows start on a byte (int4; nf4 with even K) load the tile's bytes once as a
[*, half] block contiguous along K and unpack both nibbles in registers (`load_nibbles`, constexpr
PACKED); nf4 with odd K (rows start mid-byte, blocks straddle rows) reads each element's byte by its
flat index instead. The NF4 code book (16 fp32) and the per-block absmax / per-group scale+zero are
gathered per element (the same few addresses across a warp: L1 broadcasts). The LoRA term is one
extra K = R step into the same fp32 accumulator (first, so the dX dropout multiplies only it: the
shared `lora_b_step`), and the output is written once (the shared `finish_tile`). R = 0 (a
quantized layer without adapter) runs the same kernel, its LoRA step empty.

Dequantization matches fastpeft.quant.formats.dequantize exactly (fp32 arithmetic in the same order;
the double-quant multiply-add is kept unfused, see `mul_rn`), then W is cast to the GEMM's dtype,
which is what the torch reference does with dequantize(qw, x.dtype).

Decode (M <= 16): the launcher restricts the configs to BLOCK_M = 16 with narrow N tiles so a
single row still spreads over many programs; the weight stream dominates and is read once.

DoRA (column scale g [N]; the constexprs HAS_COL_SCALE, X_SCALE, DUAL of kernels/_common.py): the
same kernel, the same shared loop step (`base_step`) and epilogue (`finish_lora_tile`) as the dense
GEMM. With dropout, the forward's x W^T and (D x) W^T (and dX's dY W and ((g-1) dY) W) share each
dequantized W tile: W is unpacked once per tile for both accumulators.

Mixed batches (kernels/lora_mixed.py): the MIXED constexpr, as the dense GEMM's (kernels/lora_fwd.py):
segment tiles of one adapter's rows, or decode tiles whose rows each read their own adapter's B.
"""
import functools

import torch
import triton
import triton.language as tl

from ._common import (
    DUAL_DX, DUAL_FWD, MAX_R, MIXED_GATHER, MIXED_SEGMENT, SMEM_LIMIT, base_step, col_scale_rows, dora_args,
    cuda_index, dot_precision, dropout_tile_ok, dual_start, dual_tile_ok, empty, finish_lora_tile, ieee_tile_ok, launch,
    lora_b_step, lora_tile, mixed_args, mixed_bucket, mixed_grid, mul_rn, r_block, split_grid, split_k_range,
    tl_dtype,
)
from .lora_shrink import lora_shrink
from .lora_splitk import finish_split_k, split_k_for, split_workspace

# Values of the kernel's FORMAT constexpr, usable inside @triton.jit code (`FORMAT == FMT_NF4`).
FMT_NF4 = tl.constexpr(0)
FMT_INT4 = tl.constexpr(1)
FMT_INT8 = tl.constexpr(2)
FMT_FP8 = tl.constexpr(3)
FORMAT_IDS = {"nf4": FMT_NF4.value, "int4": FMT_INT4.value, "int8": FMT_INT8.value, "fp8": FMT_FP8.value}
# r chunk of the extra LoRA step (r > 32 takes several chunks).
QUANT_BLOCK_R = 32
# Rows up to which the launcher uses the decode configs.
DECODE_MAX_M = 16


def get_lora_quant_configs():
    """Autotune space: (BLOCK_M, BLOCK_P, BLOCK_Q, warps, stages). The first group is for prefill /
    training, the BLOCK_M = 16 group for decode (M <= 16)."""
    shapes = [
        (128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 8, 3), (64, 64, 32, 4, 3),
        (32, 64, 32, 4, 3), (32, 128, 32, 8, 3),
        (16, 32, 64, 4, 3), (16, 64, 64, 4, 3), (16, 64, 32, 4, 3), (16, 128, 32, 4, 3), (16, 32, 128, 4, 2),
        (16, 32, 32, 4, 3),  # exact fp32 ("ieee") decode with N or K <= 32: the only tile its rule allows
        # fp8 W8A8 (FP8_DOT): K tiles of 128, one activation group each; the W tile goes to the tensor cores
        # as stored codes, not built in registers, so only these pass its rule (and none the others')
        (128, 64, 128, 8, 3), (64, 64, 128, 4, 3), (16, 64, 128, 4, 3), (16, 128, 128, 4, 3),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_P": bp, "BLOCK_Q": bq, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bp, bq, w, s in shapes]


def _fp8_dot_config_ok(c, mb, p, elt):
    """fp8 W8A8 (FP8_DOT): BLOCK_Q = 128 (one activation group per K tile, inside one 128-wide scale
    block); decode on 16-row tiles; the x tile in fp32 registers (its scale, its codes) next to the
    accumulator at most 96 values per thread (ptxas -v, sm_90: 128x128x128 on 8 warps and 64x128x128 on 4,
    128 each, spilled 116 B; 64x64x128 on 4, 96, did not); the pipelined x (16-bit) and W (1-byte) tiles in
    shared memory."""
    bm, bp, bq = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_P"], c.kwargs["BLOCK_Q"]
    if bq != 128 or (mb <= DECODE_MAX_M and bm != 16) or bm > max(16, mb) or bp > max(32, triton.next_power_of_2(p)):
        return False
    if bm * bp + bm * bq > 96 * 32 * c.num_warps:
        return False
    return c.num_stages * (bm * bq * elt + bq * bp) <= SMEM_LIMIT


def _quant_config_ok(c, mb, p, q, elt, out_dropout=False, precision="tf32", dual=0, mixed=0, fmt=0, fp8_dot=False):
    if fp8_dot:
        return _fp8_dot_config_ok(c, mb, p, elt)
    bm, bp, bq = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_P"], c.kwargs["BLOCK_Q"]
    if bq == 128 and bm > 16:  # W8A8's tiles: a register-built W tile this deep spilled (128x64x128, ptxas -v)
        return False
    out_dropout = out_dropout or dual == DUAL_DX  # DUAL_DX draws dX's mask at the end
    if mb <= DECODE_MAX_M and bm != 16:
        return False  # decode: only 16-row tiles (no work on padding rows, many programs along P)
    if bm > mb or bp > max(32, triton.next_power_of_2(p)) or bq > max(32, triton.next_power_of_2(q)):
        return False
    # The dequantized W tile is built in registers (fp32 value + int index math per element) before
    # it goes to shared memory for the dot: more than 32 elements per thread spilled (ptxas -v).
    if bp * bq > (16 if out_dropout else 32) * 32 * c.num_warps:
        return False  # (16 next to the dX dropout mask, whose Philox state is live at the same time)
    # fp32 values per thread: the accumulator plus that W tile. Beyond 80 (48 with the dX dropout
    # mask) ptxas -v spilled on sm_80 or sm_90.
    if bm * bp + bp * bq > (48 if out_dropout else 80) * 32 * c.num_warps:
        return False
    # A mixed batch's segment tiles (rows gathered through the plan's order) need a few more: 128x128x32 on
    # 8 warps (80 per thread, 255 registers in the plain kernel) spilled 48 B on sm_80 (nf4, ptxas -v)
    if mixed == MIXED_SEGMENT.value and bm * bp + bp * bq > 72 * 32 * c.num_warps:
        return False
    if mixed == MIXED_GATHER.value and bm != 16:  # decode tiles: the LoRA step loops over the tile's rows
        return False
    # DoRA with dropout: a second [BLOCK_M, BLOCK_P] accumulator (the dense GEMM's rule, `dual_tile_ok`)
    # next to the register-built W tile. The second form of the x tile (forward: its keep mask, Philox
    # state per element; dX: (g - 1) dY in fp32) and the W tile (index math per element) are live
    # together: more than 24 of them per thread spilled (nf4, ptxas -v: 64x64x64 on 8 warps in both
    # directions, 64x64x32 on 4 in the forward) unless the accumulators are decode sized (at most 16
    # values per thread).
    if dual and not dual_tile_ok(bm, bp, bq if dual == DUAL_FWD else 0, c.num_warps):
        return False
    if dual and (bm * bq + bp * bq > 24 * 32 * c.num_warps and 2 * bm * bp > 16 * 32 * c.num_warps):
        return False
    if elt == 4 and bm * bp > 64 * 64:  # fp32 x: bigger tiles spill registers (ptxas -v)
        return False
    if out_dropout and not dropout_tile_ok(bm, bp, c.num_warps):
        return False
    # fp8's decode (integer ops per element) next to the dX dropout mask: 32x128x32 on 8 warps spilled 12 B
    # on sm_90 (ptxas -v); under 64 rows, tiles at most 64 wide did not
    if fmt == FMT_FP8.value and out_dropout and bm < 64 and bp > 64:
        return False
    if not ieee_tile_ok(bm, bp, bq, precision) or (precision == "ieee" and bm * bp * (2 if dual else 1) > 16 * 64):
        return False  # exact fp32 FMA dots next to the W tile: 32x64 / 16x128 spilled (ptxas -v); DUAL: two
    main = c.num_stages * (bm * bq * elt + bq * bp * max(elt, 2))
    lora = (bm + bp) * QUANT_BLOCK_R * 4 * 2
    return max(main, lora) <= SMEM_LIMIT


def prune_lora_quant_configs(configs, named_args, **kwargs):
    """Pruning rule: decode shapes (M <= 16) keep only BLOCK_M = 16; otherwise BLOCK_M <= M bucket;
    BLOCK_P/BLOCK_Q no larger than P/Q rounded up to a power of two; the register-built W tile at
    most 32 elements per thread; tiles within shared memory. At least one config survives."""
    elt = named_args["x_ptr"].element_size()
    kept = [c for c in configs if _quant_config_ok(c, named_args["M_BUCKET"], named_args["P"], named_args["Q"], elt,
                                                   bool(kwargs.get("OUT_DROPOUT")), kwargs.get("INPUT_PRECISION"),
                                                   int(kwargs.get("DUAL", 0)), int(kwargs.get("MIXED", 0)),
                                                   int(kwargs.get("FORMAT", 0)), bool(kwargs.get("FP8_DOT")))]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_P"], c.kwargs["BLOCK_Q"]))]


@triton.jit
def load_nibbles(qdata_ptr, q0, p0, Q, P, row_bytes, TRANS_W: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_P: tl.constexpr):
    """The 4-bit codes of the [BLOCK_Q, BLOCK_P] tile of Wop from one load of its packed bytes.

    Rows of W start on a byte (int4 always; nf4 when K is even) and q0, p0 are even, so the tile is
    a [*, half] block of bytes, contiguous along W's K axis (coalesced), split into high (even k)
    and low (odd k) nibbles and interleaved back with join + reshape, in registers.
    TRANS_W: K runs along q (dim 0); else along p (dim 1).
    """
    if TRANS_W:
        bi = q0 // 2 + tl.arange(0, BLOCK_Q // 2)
        p = p0 + tl.arange(0, BLOCK_P)
        # bytes [BLOCK_Q // 2, BLOCK_P]: two k per byte, along q
        byte = tl.load(qdata_ptr + p.to(tl.int64)[None, :] * row_bytes + bi[:, None],
                       mask=(bi[:, None] < (Q + 1) // 2) & (p[None, :] < P), other=0).to(tl.int32)
        nib = tl.reshape(tl.permute(tl.join(byte >> 4, byte & 0xF), (0, 2, 1)), (BLOCK_Q, BLOCK_P))
    else:
        q = q0 + tl.arange(0, BLOCK_Q)
        bj = p0 // 2 + tl.arange(0, BLOCK_P // 2)
        # bytes [BLOCK_Q, BLOCK_P // 2]: two k per byte, along p
        byte = tl.load(qdata_ptr + q.to(tl.int64)[:, None] * row_bytes + bj[None, :],
                       mask=(q[:, None] < Q) & (bj[None, :] < (P + 1) // 2), other=0).to(tl.int32)
        nib = tl.reshape(tl.join(byte >> 4, byte & 0xF), (BLOCK_Q, BLOCK_P))
    return nib  # [BLOCK_Q, BLOCK_P]


@triton.jit
def e4m3fn_to_f32(bits):
    """fp32 value of float8_e4m3fn codes given as their int32 bits (0..255), by integer arithmetic.

    Exact (every e4m3fn value is an fp32): sign bit 7, exponent bits 6..3 (bias 7), mantissa 2..0.
    Normal: rebias the exponent to fp32's (+120) and move the mantissa to fp32's top bits; subnormal
    (exponent 0): m * 2^-9; 0x7F / 0xFF are NaN (e4m3fn has no inf). Integer ops rather than a
    float8 cast because the cast needs sm_89+ and Triton's CPU interpreter cannot run it; on every
    GPU this is a handful of ALU ops per element next to the GEMM.
    """
    e = (bits >> 3) & 0xF
    m = bits & 0x7
    normal = (((bits & 0x80) << 24) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    sub = tl.where((bits & 0x80) != 0, -sub, sub)
    val = tl.where(e == 0, sub, normal)
    return tl.where((bits & 0x7F) == 0x7F, float("nan"), val)


@triton.jit
def f32_to_e4m3fn_bits(v):
    """float8_e4m3fn codes (int32 0..255) of fp32 values |v| <= 448, rounded to nearest even, by
    integer arithmetic: the bits torch's v.to(torch.float8_e4m3fn) gives.

    Why not v.to(tl.float8e4nv): Triton's CPU interpreter rounds wrongly when the rounding carries
    into the exponent (1.9656 -> 1.0), so the interpreter tests could not check the kernel; this is
    exact on both. Normal results (|v| >= 2^-6): round fp32's 23-bit mantissa to 3 bits (add half an
    ulp minus one, plus the kept lsb: ties to even), a carry moving into the exponent as it should,
    then rebias the exponent (127 -> 7); 448 < |v| saturates to 448 (0x7E). Subnormal results: the
    24-bit significand shifted to units of 2^-9, ties to even; a round-up to 8 is the code of 2^-6.
    """
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    e = a >> 23
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    normal = tl.minimum(normal, 0x7E)
    mant = (a & 0x7FFFFF) | 0x800000
    shift = tl.minimum(141 - e, 31)
    sub = (mant + (1 << (shift - 1)) - 1 + ((mant >> shift) & 1)) >> shift
    sub = tl.where(shift >= 25, 0, sub)
    return tl.where(e >= 121, normal, sub) | sign


@triton.jit
def fp8_w8a8_step(acc, x, qdata_ptr, scales_ptr, qs, q_ok, q0, cols, col_ok, stride_qn, stride_sn, blocksize,
                  block_n):
    """acc + deq8(x) deq(W)^T for one [BLOCK_Q, BLOCK_P] tile of fp8 W, on fp8 tensor cores (W8A8).

    The x tile becomes e4m3 codes with one fp32 scale per row (amax / 448 over the tile's BLOCK_Q = 128
    columns: transformers' and DeepSeek's 1 x 128 activation groups), W's codes are used as stored, and
    the fp32 dot of the codes is scaled by x's row scales and W's block scale of each column (the tile
    lies inside one 128-wide scale block: the launcher checks). Divisions are IEEE (div_rn) so that the
    codes equal the torch reference's x / s.
    """
    xf = x.to(tl.float32)
    xs = tl.math.div_rn(tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-30), 448.0)  # [BLOCK_M]
    xq = f32_to_e4m3fn_bits(tl.math.div_rn(xf, xs[:, None])).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    wq = tl.load(qdata_ptr + cols.to(tl.int64)[None, :] * stride_qn + qs[:, None],
                 mask=q_ok[:, None] & col_ok[None, :], other=0).to(tl.float8e4nv, bitcast=True)  # [BLOCK_Q, BLOCK_P]
    ws = tl.load(scales_ptr + (cols // block_n) * stride_sn + q0 // blocksize, mask=col_ok, other=0.0)  # [BLOCK_P]
    return acc + tl.dot(xq, wq, out_dtype=tl.float32) * (xs[:, None] * ws[None, :])


@triton.jit
def dequant_w(qdata_ptr, scales_ptr, zeros_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, gidx_ptr,
              n, k, mask, n_ok, k_first, nib_in, K, stride_qn, stride_sn, stride_zn, blocksize, bs_shift, bs2_shift,
              block_n, FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_GIDX: tl.constexpr,
              INDEX_64: tl.constexpr, PACKED: tl.constexpr, SCALE_K: tl.constexpr, TILE_K: tl.constexpr,
              FP8_CVT: tl.constexpr):
    """fp32 values of W[n, k] (n, k: broadcastable int tensors, mask: in-bounds) for one format.

    Scales per tile, not per element: when one scale covers SCALE_K consecutive k of a row (nf4 with
    K % blocksize == 0, int4 without g_idx, fp8; 1 = not uniform, any element may differ) and the tile's TILE_K columns of k
    start at k_first, a multiple of TILE_K that divides SCALE_K, every k of the tile shares its row's
    scale: it is loaded once per row of W (n, masked by n_ok) and broadcast, instead of gathered for
    every element. The values are the same either way (bit for bit), only the loads differ.

    PACKED (nf4 / int4): the 4-bit codes come in as nib_in (from `load_nibbles`); otherwise each
    element reads its own byte (nf4 with odd K, where rows start mid-byte).

    nf4:  element i = n * K + k of the flattened weight; byte i // 2, high nibble when i is even;
          value code[nibble] * absmax[i >> bs_shift] (blocks may straddle rows: flat index math;
          nf4 block sizes are powers of two, so shifts instead of divisions);
          double quant: absmax = code2[q] * absmax2[j >> bs2_shift] + offset.
          The flat index is int32 unless INDEX_64 (N * K >= 2**31): int64 index tiles cost
          registers the [BLOCK_Q, BLOCK_P] tile cannot spare (ptxas -v spilled).
    int4: byte qdata[n, k // 2], high nibble when k is even; group g = g_idx[k] or k // blocksize;
          value (nibble - zeros[n, g]) * scales[n, g].
    int8: qdata[n, k] * scales[n].
    fp8:  e4m3fn code qdata[n, k] (passed as its uint8 bits) * scales[n // block_n, k // blocksize]
          (128 x 128 blocks, per channel: block_n 1 and blocksize K, or per tensor). The code becomes fp32
          by the GPU's conversion where it has one (FP8_CVT: sm_89+), else by `e4m3fn_to_f32`: the same
          values either way (every e4m3fn value is an fp32).
    Masked-out elements are 0.
    """
    if SCALE_K % TILE_K == 0:  # one scale per row of the tile (see above)
        ks = k_first
        smask = n_ok
    else:
        ks = k
        smask = mask
    if FORMAT == FMT_NF4:
        if INDEX_64:
            flat = n.to(tl.int64) * K + k
        else:
            flat = n * K + k
        if PACKED:
            nib = nib_in
        else:
            byte = tl.load(qdata_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
            nib = (byte >> (4 - (flat & 1).to(tl.int32) * 4)) & 0xF
        val = tl.load(code_ptr + nib, mask=mask, other=0.0)  # 16-entry code book: stays in L1
        if SCALE_K % TILE_K == 0:
            if INDEX_64:
                blk = (n.to(tl.int64) * K + k_first) >> bs_shift
            else:
                blk = (n * K + k_first) >> bs_shift
        else:
            blk = flat >> bs_shift
        if DOUBLE_QUANT:
            q = tl.load(scales_ptr + blk, mask=smask, other=0).to(tl.int32)
            c2 = tl.load(code2_ptr + q, mask=smask, other=0.0)
            a2 = tl.load(absmax2_ptr + (blk >> bs2_shift), mask=smask, other=0.0)
            absmax = mul_rn(c2, a2) + tl.load(offset_ptr)
        else:
            absmax = tl.load(scales_ptr + blk, mask=smask, other=0.0)
        w = val * absmax
    elif FORMAT == FMT_INT4:
        n64 = n.to(tl.int64)
        if PACKED:
            nib = nib_in
        else:
            byte = tl.load(qdata_ptr + n64 * stride_qn + (k >> 1), mask=mask, other=0).to(tl.int32)
            nib = (byte >> (4 - (k & 1) * 4)) & 0xF
        if HAS_GIDX:
            g = tl.load(gidx_ptr + k, mask=mask, other=0)
        else:
            g = ks // blocksize
        z = tl.load(zeros_ptr + n64 * stride_zn + g, mask=smask, other=0).to(tl.int32)
        sc = tl.load(scales_ptr + n64 * stride_sn + g, mask=smask, other=0.0).to(tl.float32)
        w = (nib - z).to(tl.float32) * sc
        if SCALE_K % TILE_K == 0:  # a row's zero and scale were loaded for masked-out k too: (0 - z) * sc != 0
            w = tl.where(mask, w, 0.0)
    elif FORMAT == FMT_FP8:
        raw = tl.load(qdata_ptr + n.to(tl.int64) * stride_qn + k, mask=mask, other=0)  # uint8 codes
        sc = tl.load(scales_ptr + (n // block_n) * stride_sn + ks // blocksize, mask=smask, other=0.0).to(tl.float32)
        if FP8_CVT:  # the hardware conversion (sm_89+): one cvt per pair of codes instead of integer ops
            w = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sc
        else:
            w = e4m3fn_to_f32(raw.to(tl.int32)) * sc
    else:  # FMT_INT8: one scale per row of W whatever the tile
        q = tl.load(qdata_ptr + n.to(tl.int64) * stride_qn + k, mask=mask, other=0).to(tl.float32)
        sc = tl.load(scales_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        w = q * sc
    return w


@triton.jit(do_not_specialize=["seed"])
def lora_quant_kernel(
    x_ptr, qdata_ptr, scales_ptr, zeros_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, gidx_ptr,
    s_ptr, b_ptr, bias_ptr, y_ptr, cs_ptr, zd_ptr,
    tiles_ptr, order_ptr, ridx_ptr, rank_ptr, off_ptr, adscale_ptr,
    M, P, Q, R, K, blocksize, bs_shift, bs2_shift, block_n,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_sm, stride_sr, stride_bp, stride_br,
    stride_ym, stride_yn, stride_zdm, stride_zdn,
    scale, seed, p_drop, inv_keep,
    M_BUCKET,  # autotune key only
    FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_GIDX: tl.constexpr, INDEX_64: tl.constexpr,
    PACKED: tl.constexpr, TRANS_W: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_DROPOUT: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr, X_SCALE: tl.constexpr, DUAL: tl.constexpr, MIXED: tl.constexpr,
    AD_SCALE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr = 1, SCALE_K: tl.constexpr = 1, FP8_DOT: tl.constexpr = False,
    FP8_CVT: tl.constexpr = False,
):
    """y[M, P] = x[M, Q] Wop[Q, P] + scale * D_out * (S[M, R] Bt[R, P]) (+ bias[P]); Bt[r, p] = b[p, r].

    TRANS_W: Wop = deq(W)^T (forward, W [P, Q]); else Wop = deq(W) (dX, W [Q, P]). K is W's column
    count (the nf4 flat index n * K + k). DoRA: HAS_COL_SCALE / X_SCALE / DUAL (kernels/_common.py),
    cs_ptr the column scale, zd_ptr DUAL_FWD's Z_d output. Mixed batches: MIXED, as the dense GEMM
    (kernels/lora_fwd.py lora_matmul_kernel). SPLIT_K > 1 (decode, `_common.split_k_range`): this
    program's stretch of Q only, no LoRA step, the raw fp32 partial into its slice of the workspace y
    (the launcher passes no bias, no column scale; kernels/lora_splitk.py finishes)."""
    # The tile (a mixed batch's segment tile: its adapter's rank, scale and columns of Bt)
    pid_p, rows, cols, row_ok, col_ok, R, scale, b_ptr = lora_tile(
        M, P, R, scale, b_ptr, stride_br, tiles_ptr, order_ptr, rank_ptr, off_ptr, adscale_ptr, MIXED, AD_SCALE,
        BLOCK_M, BLOCK_P, GROUP_M)  # [BLOCK_M], [BLOCK_P]

    q_lo, q_hi, y_ptr = split_k_range(Q, y_ptr, M, stride_ym, BLOCK_Q, SPLIT_K)
    # LoRA step first (see lora_b_step), then the dequantized base GEMM joins the accumulator.
    if SPLIT_K == 1:
        acc = lora_b_step(s_ptr, b_ptr, rows, cols, row_ok, col_ok, R, stride_sm, stride_sr, stride_br, stride_bp,
                          scale, seed, p_drop, inv_keep, P, ridx_ptr, rank_ptr, off_ptr, adscale_ptr, OUT_DROPOUT,
                          MIXED == MIXED_GATHER, AD_SCALE, tl.float32, LORA_PRECISION,
                          BLOCK_M, BLOCK_P, BLOCK_R)  # [BLOCK_M, BLOCK_P] fp32
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)  # the finish kernel adds the LoRA term
    acc, acc2 = dual_start(acc, p_drop, DUAL)  # DoRA with dropout: the second accumulator

    qq = tl.arange(0, BLOCK_Q)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    TILE_K: tl.constexpr = BLOCK_Q if TRANS_W else BLOCK_P  # the tile's extent along W's k
    for q0 in range(q_lo, q_hi, BLOCK_Q):
        qs = q0 + qq
        q_ok = qs < Q
        x = tl.load(x_rows + qs[None, :] * stride_xk,
                    mask=row_ok[:, None] & q_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_Q]
        wmask = q_ok[:, None] & col_ok[None, :]  # [BLOCK_Q, BLOCK_P]
        if FP8_DOT:  # fp8 W8A8 on the tensor cores (forward, fp8, no DoRA dropout: the launcher checks)
            acc = fp8_w8a8_step(acc, x, qdata_ptr, scales_ptr, qs, q_ok, q0, cols, col_ok, stride_qn, stride_sn,
                                blocksize, block_n)
        else:
            if PACKED:
                nib = load_nibbles(qdata_ptr, q0, pid_p * BLOCK_P, Q, P, stride_qn, TRANS_W, BLOCK_Q,
                                   BLOCK_P)  # [BLOCK_Q, BLOCK_P] int32 codes
            else:
                nib = 0  # unused: dequant_w reads bytes per element
            if TRANS_W:  # Wop[q, p] = W[p, q]: W's k runs along q
                wn, wk, n_ok, k_first = cols[None, :], qs[:, None], col_ok[None, :], q0  # [1, BLOCK_P], [BLOCK_Q, 1]
            else:  # Wop[q, p] = W[q, p]: W's k runs along p
                wn, wk, n_ok, k_first = qs[:, None], cols[None, :], q_ok[:, None], pid_p * BLOCK_P
            w = dequant_w(qdata_ptr, scales_ptr, zeros_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, gidx_ptr,
                          wn, wk, wmask, n_ok, k_first, nib, K, stride_qn, stride_sn, stride_zn, blocksize, bs_shift,
                          bs2_shift, block_n, FORMAT, DOUBLE_QUANT, HAS_GIDX, INDEX_64, PACKED, SCALE_K,
                          TILE_K, FP8_CVT)  # [BLOCK_Q, BLOCK_P] fp32
            # Round W to x's dtype first (the reference's dequantize(qw, x.dtype)), then the dot(s).
            acc, acc2 = base_step(acc, acc2, x, w.to(x_ptr.dtype.element_ty), rows, qs, q_ok, Q, cs_ptr, seed,
                                  p_drop, X_SCALE, DUAL, COMPUTE_DTYPE, INPUT_PRECISION)

    cs_row = col_scale_rows(ridx_ptr, rows, row_ok, P, MIXED, HAS_COL_SCALE)  # a mixed batch's DoRA slots
    finish_lora_tile(acc, acc2, y_ptr, zd_ptr, bias_ptr, cs_ptr, cs_row, rows, cols, row_ok, col_ok, P, stride_ym, stride_yn,
                     stride_zdm, stride_zdn, seed, p_drop, inv_keep, HAS_BIAS, HAS_COL_SCALE, DUAL)


lora_quant_kernel_tuned = triton.autotune(
    configs=get_lora_quant_configs(),
    key=["M_BUCKET", "P", "Q", "R", "FORMAT", "DOUBLE_QUANT", "HAS_GIDX", "PACKED", "TRANS_W", "HAS_BIAS",
         "OUT_DROPOUT", "HAS_COL_SCALE", "X_SCALE", "DUAL", "MIXED", "INPUT_PRECISION", "LORA_PRECISION",
         "SPLIT_K", "SCALE_K", "FP8_DOT", "FP8_CVT"],
    prune_configs_by={"early_config_prune": prune_lora_quant_configs},
)(lora_quant_kernel)


# -- launchers ------------------------------------------------------------------------------------
def quant_reason(qw, x_dtype=None):
    """None when the kernel handles this QuantizedWeight, else why not (for supports_quant)."""
    fmt = qw.fmt
    if fmt not in FORMAT_IDS:
        return f"quantization format {fmt!r} has no Triton kernel (nf4, int4, int8, fp8)"
    n, k = qw.N, qw.K
    if fmt == "nf4":
        if qw.code is None or qw.code.numel() != 16:
            return "nf4 weight without its 16-entry code book"
        if qw.blocksize <= 0 or qw.blocksize & (qw.blocksize - 1):
            return f"nf4 blocksize {qw.blocksize} must be a power of two (the kernel indexes blocks by shifts)"
        if qw.qdata.numel() * 2 < n * k:
            return f"nf4 qdata holds {qw.qdata.numel()} bytes, < N*K/2 = {(n * k + 1) // 2}"
        if qw.double_quant and (qw.code2 is None or qw.offset is None or qw.blocksize2 <= 0
                                or qw.blocksize2 & (qw.blocksize2 - 1)):
            return "nf4 double quantization needs code2, offset and a power-of-two blocksize2"
        if qw.double_quant and qw.scales.dtype != torch.uint8:
            return f"nf4 double-quantized absmax codes must be uint8, found {qw.scales.dtype}"
    elif fmt == "int4":
        if qw.zeros is None or qw.blocksize <= 0:
            return "int4 weight needs zeros and a positive group size"
        if qw.qdata.dim() != 2 or qw.qdata.stride(1) != 1 or qw.scales.stride(1) != 1 or qw.zeros.stride(1) != 1:
            return "int4 qdata/scales/zeros must be 2-D with unit stride along K"
        if qw.g_idx is not None and (qw.g_idx.numel() != k or qw.g_idx.dtype not in (torch.int32, torch.int64)):
            return f"int4 g_idx must be int32/int64 [K={k}], found {qw.g_idx.dtype} {tuple(qw.g_idx.shape)}"
    elif fmt == "fp8":
        if qw.qdata.dtype not in (torch.float8_e4m3fn, torch.uint8) or tuple(qw.qdata.shape) != (n, k):
            return (f"fp8 qdata must be float8_e4m3fn (or its uint8 bits) [N={n}, K={k}], found {qw.qdata.dtype} "
                    f"{tuple(qw.qdata.shape)}")
        if qw.qdata.stride(1) != 1:
            return "fp8 qdata must have unit stride along K"
        if qw.blocksize <= 0 or qw.blocksize2 <= 0:
            return f"fp8 scale blocks must be positive, found [{qw.blocksize2}, {qw.blocksize}]"
        gs = (-(-n // qw.blocksize2), -(-k // qw.blocksize))
        if tuple(qw.scales.shape) != gs or (gs[1] > 1 and qw.scales.stride(1) != 1):
            return (f"fp8 scales must be [{gs[0]}, {gs[1]}] with unit stride along K for blocks "
                    f"[{qw.blocksize2}, {qw.blocksize}], found {tuple(qw.scales.shape)}")
    else:
        if qw.qdata.dim() != 2 or qw.qdata.stride(1) != 1:
            return "int8 qdata must be 2-D [N, K] with unit stride along K"
    if fmt == "nf4" and not qw.qdata.is_contiguous():
        return "nf4 qdata must be contiguous (flat byte layout)"
    if x_dtype is not None and qw.scales.is_floating_point() and qw.scales.dtype not in (
            torch.float16, torch.bfloat16, torch.float32):
        return f"scales dtype {qw.scales.dtype} not supported"
    return None


def scale_k(qw) -> int:
    """How many consecutive k of a row of W share one scale, when that is the same for every row and
    block (dequant_w then loads scales per tile row), else 1: nf4 blocks when K is a multiple of the
    block size (else blocks straddle rows), int4 groups without g_idx, fp8's block_k."""
    if qw.fmt == "nf4":
        return qw.blocksize if qw.K % qw.blocksize == 0 else 1
    if qw.fmt == "int4":
        return qw.blocksize if qw.g_idx is None else 1
    if qw.fmt == "fp8":
        return qw.blocksize
    return 1


@functools.lru_cache(maxsize=None)
def _has_fp8_type(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_hw_convert(device) -> bool:
    """Whether the GPU has fp8 (e4m3) types: Triton converts codes in hardware and has fp8 dots there (sm_89+;
    its fp8e4nv type does not exist for sm_80; the interpreter's path is tested through fp8_cvt=True)."""
    device = torch.device(device)
    return device.type == "cuda" and _has_fp8_type(cuda_index(device))


def fp8_dot_reason(qw) -> "str | None":
    """None when fp8 W8A8 (`fp8_w8a8_step`) can serve this weight, else why not: fp8 codes, K a multiple of
    128 and scale blocks 128 (or a multiple) wide along K, so that each 128-wide K tile, one activation
    group, has one scale per column."""
    if qw.fmt != "fp8":
        return f"W8A8 runs on fp8 weights, not {qw.fmt}"
    if qw.K % 128 or qw.blocksize % 128:
        return f"W8A8 needs K ({qw.K}) and the scale blocks along K ({qw.blocksize}) to be multiples of 128"
    return None


def _log2(v: int) -> int:
    """log2 of a power of two (nf4 block sizes); 0 for unused (0) sizes."""
    return max(0, int(v).bit_length() - 1)


def _packed_args(qw, dummy):
    """Pointer arguments (absent fields get a dummy pointer, never read) and strides/sizes."""
    fmt = qw.fmt
    def d(t):
        return t if t is not None else dummy
    # nf4 with even K: rows start on a byte, K / 2 bytes apart (the packed-tile path)
    stride_qn = qw.qdata.stride(0) if fmt != "nf4" else qw.K // 2
    stride_sn = qw.scales.stride(0) if fmt in ("int4", "fp8") else 0
    stride_zn = qw.zeros.stride(0) if fmt == "int4" else 0
    offset = qw.offset.reshape(1) if qw.offset is not None else None
    # fp8 codes go in as their uint8 bits (dequant_w decodes them with integer ops: see e4m3fn_to_f32)
    qdata = qw.qdata.view(torch.uint8) if qw.qdata.dtype == torch.float8_e4m3fn else qw.qdata
    ptrs = (qdata, qw.scales, d(qw.zeros), d(qw.code), d(qw.absmax2), d(qw.code2), d(offset), d(qw.g_idx))
    return ptrs, stride_qn, stride_sn, stride_zn


def launch_lora_quant(x, qw, s, b, bias, y, scale, trans_w, out_dropout_p=0.0, seed=0, fp32_tf32=False,
                      config=None, col_scale=None, x_col_scale=None, in_dropout_p=0.0, z=None, mixed=None, split_k=1,
                      fp8_dot=False, fp8_cvt=None):
    """y = x Wop + scale * D_out * (s b^T) (+ bias) with Wop = deq(W)^T (trans_w) or deq(W).
    x [M, Q], s [M, R] fp32, b [P, R], y [M, P] (strided views allowed); R = 0: y = x Wop (+ bias).
    DoRA: col_scale / x_col_scale / in_dropout_p / z, mixed (a mixed batch) and split_k (decode), as for
    kernels.lora_fwd.launch_lora_matmul (`_common.dora_args`, `_common.MixedRows`). fp8_dot: fp8 W8A8 on
    the tensor cores (`fp8_w8a8_step`; forward only, `fp8_dot_reason`). fp8_cvt: decode fp8 codes with the
    GPU's conversion (`dequant_w`); None: where the device has one (`fp8_hw_convert`). Callers check shapes."""
    m, q = x.shape
    p, r = b.shape
    cs, pd, dora = dora_args("launch_lora_quant", col_scale, x_col_scale, in_dropout_p, out_dropout_p, z, p, q,
                             x.device, table_rows=mixed.rank.numel() if mixed is not None else 0)
    if fp8_dot:
        reason = fp8_dot_reason(qw) or (None if trans_w else "dX (trans_w False) dequantizes W") or (
            "DoRA's dX or dropout forward" if dora["X_SCALE"] or dora["DUAL"] else None)
        if reason is not None:
            raise ValueError(f"launch_lora_quant: fp8_dot (W8A8) cannot run this launch: {reason}")
    out = y
    if split_k > 1:  # the partial sums go to the workspace; the finish kernel adds LoRA, g and bias
        out = split_workspace("launch_lora_quant", split_k, m, p, out_dropout_p, z is not None, mixed, x.device)
        finish_cs, dora = (cs if dora["HAS_COL_SCALE"] else None), dict(dora, HAS_COL_SCALE=False)
    s_arg, b_arg = (s, b) if r else (x, x)  # R = 0: S and B are never read; pass live pointers anyway
    if mixed is not None:  # the LoRA step's R is each adapter's; R here keys the autotuner and sizes the chunks
        r = mixed.r_max
    ptrs, sqn, ssn, szn = _packed_args(qw, s_arg)
    mptrs, mconsts = mixed_args(mixed, x)
    args = (x, *ptrs, s_arg, b_arg, bias if bias is not None else b_arg, out, cs if cs is not None else y,
            z if z is not None else y, *mptrs,
            m, p, q, r, qw.K, max(1, qw.blocksize), _log2(qw.blocksize), _log2(qw.blocksize2),
            max(1, qw.blocksize2) if qw.fmt == "fp8" else 1,
            x.stride(0), x.stride(1), sqn, ssn, szn, s.stride(0), s.stride(1), b.stride(0), b.stride(1),
            out.stride(-2), out.stride(-1), z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
            float(scale), int(seed), float(pd), 1.0 / (1.0 - pd), mixed_bucket(mixed, m))
    lora_precision = dot_precision((x.dtype, b.dtype), fp32_tf32)
    consts = dict(dora, **mconsts, FORMAT=FORMAT_IDS[qw.fmt], DOUBLE_QUANT=qw.fmt == "nf4" and qw.double_quant,
                  HAS_GIDX=qw.fmt == "int4" and qw.g_idx is not None,
                  INDEX_64=qw.N * qw.K + qw.blocksize >= 2 ** 31,
                  PACKED=qw.fmt == "int4" or (qw.fmt == "nf4" and qw.K % 2 == 0), TRANS_W=bool(trans_w),
                  HAS_BIAS=bias is not None and split_k == 1,
                  COMPUTE_DTYPE=tl_dtype(x.dtype), INPUT_PRECISION=dot_precision((x.dtype,), fp32_tf32),
                  LORA_PRECISION=lora_precision, BLOCK_R=min(r_block(r), QUANT_BLOCK_R), SPLIT_K=split_k,
                  SCALE_K=scale_k(qw), FP8_DOT=bool(fp8_dot),
                  FP8_CVT=qw.fmt == "fp8" and (fp8_hw_convert(x.device) if fp8_cvt is None else bool(fp8_cvt)))
    launch(lora_quant_kernel_tuned, split_grid(mixed_grid(mixed, m, p, "BLOCK_M", "BLOCK_P"), split_k), args,
           consts, config)
    if split_k > 1:
        finish_split_k(out, s, b, bias, y, scale, finish_cs, mixed, lora_precision)
    return y


def _check(fn, x, qw, a, b, dropout_p):
    if x.dim() != 2 or x.shape[1] != qw.K:
        raise ValueError(f"{fn}: x must be [M, K={qw.K}], found {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{fn}: x dtype {x.dtype} not supported (fp16, bf16, fp32)")
    if a.dim() != 2 or a.shape[1] != qw.K or not 0 <= a.shape[0] <= MAX_R:
        raise ValueError(f"{fn}: lora_A must be [r in 0..{MAX_R}, K={qw.K}], found {tuple(a.shape)}")
    if tuple(b.shape) != (qw.N, a.shape[0]):
        raise ValueError(f"{fn}: lora_B must be [N={qw.N}, r={a.shape[0]}], found {tuple(b.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), found {dropout_p}")
    reason = quant_reason(qw, x.dtype)
    if reason is not None:
        raise ValueError(f"{fn}: {reason}")


def lora_quant_fwd(x, qw, bias, a, b, scale, dropout_p=0.0, seed=0, fp32_tf32=False, config=None,
                   shrink_config=None, col_scale=None, split_k=None, fp8_dot=False, fp8_cvt=None):
    """(Y [M, N] in x.dtype, S [M, r] fp32): Y = x deq(W)^T + scale * ((D x) a^T) b^T (+ bias).

    qw: fastpeft.quant.formats.QuantizedWeight (nf4 / int4 / int8 / fp8). config / shrink_config: explicit
    meta-parameters instead of autotuning (tests; the interpreter uses the first pruned config).
    r = 0 (a: [0, K], b: [N, 0], a quantized layer without adapter): Y = x deq(W)^T (+ bias) by the
    same fused dequant GEMM, whose LoRA step runs no iteration; S is the empty fp32 [M, 0].
    col_scale: DoRA's g [N], as for kernels.lora_fwd.lora_fwd: with dropout_p > 0 the return is
    (Y, S, Z_d), Z_d = (D x) deq(W)^T + scale S b^T, Y = x deq(W)^T - (D x) deq(W)^T + g Z_d + bias.
    split_k: K split of the GEMM (decode, kernels/lora_splitk.py); None: `split_k_for` picks it (never
    for DoRA with dropout). fp8_dot: x W^T as fp8 W8A8 on the tensor cores (x quantized per row and 128
    columns, `fp8_w8a8_step`) instead of W dequantized to x's dtype; the LoRA term stays exact. DoRA with
    dropout (two accumulators over one x tile) runs the dequantized path whatever fp8_dot says. fp8_cvt: as
    `launch_lora_quant`'s."""
    _check("lora_quant_fwd", x, qw, a, b, dropout_p)
    m, n = x.shape[0], qw.N
    dual = col_scale is not None and dropout_p > 0.0
    s = lora_shrink(x, a, 1.0, dropout_p, seed, fp32_tf32=fp32_tf32, config=shrink_config)
    y = empty((m, n), x.dtype, x.device)
    zd = empty((m, n), x.dtype, x.device) if dual else None
    if m and n:
        if qw.K == 0:  # x W^T = 0 and S = 0: Y is the bias, Z_d zero
            y.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(y))
            if zd is not None:
                zd.zero_()
        else:
            split = 1 if dual else split_k if split_k is not None else split_k_for(m, n, qw.K, x.device)
            launch_lora_quant(x, qw, s, b, bias, y, scale, True, fp32_tf32=fp32_tf32, config=config,
                              col_scale=col_scale, in_dropout_p=dropout_p if dual else 0.0, seed=seed, z=zd,
                              split_k=split, fp8_dot=fp8_dot and not dual, fp8_cvt=fp8_cvt)
    return (y, s) if zd is None else (y, s, zd)


def lora_quant_bwd(dy, x, qw, a, b, s, scale, dropout_p=0.0, seed=0, needs_dx=True, needs_da=True, needs_db=True,
                   fp32_tf32=False, configs=None, col_scale=None):
    """(dX | None, dA | None, dB | None) of Y = x deq(W)^T + scale * ((D x) a^T) b^T.

    dX = dY deq(W) + D * (dS a) in one quant GEMM (W dequantized in registers, dX written once);
    dA / dB by the 16-bit reduction kernel. configs: optional {"shrink", "quant", "wgrad", "split_m"}.
    r = 0: dX = dY deq(W) by the same GEMM; dA [0, K] and dB [N, 0] are empty.
    col_scale: DoRA's g [N], as for kernels.lora_bwd.lora_bwd (dX = dY W + D (((g-1) dY) W + dS A) in the
    same quant GEMM, dS = s dY (g B), dB = g s dY^T S)."""
    from .lora_bwd import dora_b, lora_wgrad

    _check("lora_quant_bwd", x, qw, a, b, dropout_p)
    m, k, n, r = x.shape[0], qw.K, qw.N, a.shape[0]
    if tuple(dy.shape) != (m, n) or dy.dtype != x.dtype:
        raise ValueError(f"lora_quant_bwd: dY must be {x.dtype} [{m}, {n}], found {dy.dtype} {tuple(dy.shape)}")
    if tuple(s.shape) != (m, r) or s.dtype != torch.float32:
        raise ValueError(f"lora_quant_bwd: S must be fp32 [{m}, {r}], found {s.dtype} {tuple(s.shape)}")
    if col_scale is not None and (col_scale.dim() != 1 or col_scale.shape[0] != n):
        raise ValueError(f"lora_quant_bwd: col_scale must be [N={n}], found {tuple(col_scale.shape)}")
    cfg = configs or {}
    dx = da = db = None
    ds = None
    if needs_dx or needs_da:
        bt = (dora_b(b, col_scale) if col_scale is not None else b).t()
        ds = lora_shrink(dy, bt, scale, fp32_tf32=fp32_tf32, config=cfg.get("shrink"))
    if needs_dx:
        dx = empty((m, k), x.dtype, x.device)
        if m and k:
            if n == 0:
                dx.zero_()  # ds is 0 as well
            else:
                launch_lora_quant(dy, qw, ds, a.t(), None, dx, 1.0, False, out_dropout_p=dropout_p, seed=seed,
                                  fp32_tf32=fp32_tf32, config=cfg.get("quant"), x_col_scale=col_scale)
    if needs_da:
        da = lora_wgrad(ds, x, 1.0, dropout_p, seed, True, cfg.get("split_m"), fp32_tf32, cfg.get("wgrad")).to(a.dtype)
    if needs_db:
        db = lora_wgrad(dy, s, scale, 0.0, 0, True, cfg.get("split_m"), fp32_tf32, cfg.get("wgrad"))
        db = (db * col_scale.detach().float()[:, None] if col_scale is not None else db).to(b.dtype)
    return dx, da, db
