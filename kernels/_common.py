"""Helpers shared by the LoRA kernels: dropout mask, dtype mapping, block-size arithmetic, the
launch rule, the two ends of an output tile of the LoRA GEMMs (`lora_b_step`, `finish_tile`), and the
rows of a mixed batch's tiles (`lora_tile`, `segment_rows`: the MIXED constexpr).

Every op file holds its own kernels, configs and launcher; this file holds what must be
*identical* across ops (the dropout mask must be bit-identical in forward and backward, so it is
defined once here) or would otherwise be repeated by each of them.
"""
import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

# Largest LoRA rank any kernel supports (the shrink / split / quant paths; the fused small-M kernel
# holds less in registers, see lora_fwd.FUSED_MAX_R). Rank 0 (no adapter) is accepted too.
MAX_R = 256

# Shared memory per block usable by a kernel (bytes); sm_90 has 227 KiB, sm_80 163 KiB. Config
# pruning uses the smaller so a config kept here compiles on both.
SMEM_LIMIT = 160 * 1024

TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
ACT_DTYPES = tuple(TORCH_TO_TL)


# Test hook: when True, every output buffer the launchers allocate starts as NaN (see `empty`), so a
# test proves each element is written by a kernel. Never set in production (it costs a fill).
POISON_OUTPUTS = False


def empty(shape, dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs (NaN-filled under POISON_OUTPUTS)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def cuda_index(device) -> int:
    """The CUDA device index of ``device`` (a bare "cuda" is the current device)."""
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (asked once per device)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dropout_tile_ok(rows: int, cols: int, num_warps: int) -> bool:
    """Pruning rule for tiles that draw a dropout mask: at most 32 elements per thread.

    tl.rand runs Philox per element with 4 live 32-bit counters each, so a 128x128 tile on 256
    threads needs ~256 registers for the mask alone and spills (seen with ptxas -v)."""
    return rows * cols <= 32 * 32 * num_warps


def ieee_tile_ok(rows: int, cols: int, bk: int, precision) -> bool:
    """Pruning rule for exact fp32 dots (input_precision "ieee", no tensor cores): Triton lowers
    them to FMA loops holding both operand tiles in registers; bigger tiles spill (ptxas -v)."""
    return precision != "ieee" or (rows * cols <= 32 * 64 and bk <= 32)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def r_block(r: int) -> int:
    """r padded to a power of two >= 16 (tl.dot needs every dim >= 16); the tail is masked."""
    return max(16, next_pow2(r))


def m_bucket(m: int) -> int:
    """Autotune key for M: powers of two from 16, capped, so M=1000 and M=1024 share a tuning."""
    return min(max(16, next_pow2(m)), 8192)


def tl_dtype(t: torch.dtype):
    return TORCH_TO_TL[t]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Operand dtype of a dot whose inputs have `dtypes`: fp32 if any input is fp32, else the
    16-bit dtype. Accumulation is always fp32.

    bf16 x with fp32 adapters therefore multiplies in fp32 (tf32 on GPU, see `dot_precision`):
    bf16 converts to tf32 exactly, only the fp32 side rounds (to 10 mantissa bits), which is
    closer to peft (it computes the LoRA branch in the adapter dtype) than rounding A, S or B to
    bf16. Those dots have an inner size of r or a [*, r] output, so their cost is small next to
    the main GEMM, which always runs in x's dtype.
    """
    if any(d == torch.float32 for d in dtypes):
        return torch.float32
    return dtypes[0]


def dot_precision(dtypes, fp32_tf32: bool) -> str:
    """tl.dot input_precision: "tf32" when fp32 operands meet 16-bit data (the 16-bit side is the
    precision floor anyway); for all-fp32 inputs "tf32" or "ieee" as the caller asks (the triton
    backend follows torch.backends.cuda.matmul.allow_tf32, like F.linear does)."""
    if all(d == torch.float32 for d in dtypes):
        return "tf32" if fp32_tf32 else "ieee"
    return "tf32"


def check_2d(name: str, t: torch.Tensor, shape: tuple, dtypes=ACT_DTYPES):
    if t.dim() != 2 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, found {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (expected one of {list(dtypes)})")


# Triton's CPU interpreter multiplies bf16 dot operands as their raw uint16 storage (checked on
# triton 3.9: garbage ~1e10). Under the interpreter only, bf16 operands are rounded to bf16 and
# then multiplied in fp32, which is what bf16 tensor cores compute (exact products, fp32 sums).
# On a GPU this flag is False and the branch compiles away.
INTERPRETING = interpreting()  # fixed at import, as Triton's own choice of interpreter is
_INTERPRETING = tl.constexpr(INTERPRETING)  # the same, for @triton.jit code


def launch(tuned, grid, args, consts, config=None):
    """Launch an autotuned kernel the one way every launcher does.

    tuned: `triton.autotune(configs=get_*_configs(), prune_configs_by={"early_config_prune":
    prune_*}, ...)(kernel)`; args: the kernel's positional (runtime) arguments; consts: its
    constexpr flags; grid: meta -> launch grid, where meta maps the config's meta-parameters
    (BLOCK_*) to values.
    - config given (tests, benchmarks): the plain @triton.jit kernel with those meta-parameters
      (keys of the config's kwargs plus num_warps / num_stages), on grid(config);
    - no config under the interpreter, which cannot time anything: the first config left by the
      kernel's pruning rule, given the same named arguments the autotuner would give it;
    - no config on a GPU: the autotuned kernel, with grid over the chosen meta.
    """
    if config is None and INTERPRETING:
        c = tuned.early_config_prune(tuned.configs, dict(zip(tuned.arg_names, args)), **consts)[0]
        config = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    if config is not None:
        tuned.fn[grid(config)](*args, **consts, **config)
    else:
        tuned[grid](*args, **consts)


def grouped_grid(m, n, block_m="BLOCK_M", block_n="BLOCK_N"):
    """Grid of a kernel ordering its [block_m, block_n] output tiles with `grouped_pid`: one axis."""
    return lambda meta: (triton.cdiv(m, meta[block_m]) * triton.cdiv(n, meta[block_n]),)


@triton.jit
def grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order.

    Consecutive program ids walk GROUP_M row tiles of one column strip before moving to the next
    strip, so programs resident at the same time share W tiles (and x rows) in L2 instead of each
    streaming its own; plain row-major order would re-read all of W once per row tile from DRAM
    when W does not fit in L2.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_N] tile of an [M, N] output, in `grouped_pid` order:
    (pid_n, rows [BLOCK_M], cols [BLOCK_N], row_ok = rows < M, col_ok = cols < N)."""
    pid_m, pid_n = grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_n, rows, cols, rows < M, cols < N


# -- split-K (decode: few rows, so the output tiles alone cannot fill the GPU) -----------------------
# With SPLIT_K > 1 a GEMM launch gets a second grid axis: program (tile, k) sums only its stretch of the
# inner axis and stores that fp32 partial tile, without the LoRA term, bias or column scale, into slice k
# of a contiguous [SPLIT_K, M, N] workspace; kernels/lora_splitk.py then adds the slices in a fixed order
# to the LoRA term and finishes the tile (finish_tile), so Y is still written once and the result does not
# depend on which program ran first (no atomics). Every slice is fully written, also by programs whose
# stretch is empty (they store zeros), so the workspace needs no fill.
@triton.jit
def split_k_range(Q, y_ptr, M, stride_ym, BLOCK_Q: tl.constexpr, SPLIT_K: tl.constexpr):
    """(q_lo, q_hi, y_ptr) of this program: its stretch of the inner axis [0, Q), whole BLOCK_Q tiles so
    that no tile straddles two programs, and its workspace slice. SPLIT_K == 1: all of Q, y unchanged."""
    if SPLIT_K > 1:
        pid_k = tl.program_id(1)
        per = tl.cdiv(tl.cdiv(Q, BLOCK_Q), SPLIT_K) * BLOCK_Q
        q_lo = pid_k * per
        q_hi = tl.minimum(Q, q_lo + per)
        y_ptr += pid_k.to(tl.int64) * M * stride_ym
    else:
        q_lo = 0
        q_hi = Q
    return q_lo, q_hi, y_ptr


def split_grid(grid, split_k: int):
    """The launch grid of a split-K launch: `grid`'s tiles times split_k on a second axis."""
    if split_k == 1:
        return grid
    return lambda meta: (grid(meta)[0], split_k)


@triton.jit
def mma(a, b, acc, COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b with operands cast to COMPUTE_DTYPE, fp32 accumulation."""
    if _INTERPRETING and COMPUTE_DTYPE == tl.bfloat16:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc,
                      input_precision="ieee")
    else:
        return tl.dot(a.to(COMPUTE_DTYPE), b.to(COMPUTE_DTYPE), acc, input_precision=INPUT_PRECISION)


@triton.jit
def dropout_keep(seed, rows, cols, n_cols, p_drop):
    """Dropout keep-mask (bool) of the elements (rows[:, None], cols[None, :]) of a [*, n_cols] matrix.

    The Philox counter is the logical element index row * n_cols + col (int32, wrapping, so masks
    repeat only after 2**32 elements), independent of strides and of block sizes: forward and
    backward kernels with different tilings regenerate exactly the same mask from the seed.
    True (kept) with probability 1 - p. Kernels zero the dropped inputs with tl.where (exact in any
    dtype) and apply the 1/(1-p) scale to the fp32 accumulator once, so no rounding of x/(1-p) to
    16 bits ever happens.
    """
    idx = rows[:, None] * n_cols + cols[None, :]
    u = tl.rand(seed, idx)
    return u >= p_drop


# -- mixed batches: each row its own adapter (many adapters in one batch) --------------------------------
# A mixed batch (fastpeft.ops.RowPlan: row_index [M], -1 = base only; order [M], the rows sorted by adapter;
# host offsets of each adapter's segment of order) reaches the kernels through one constexpr, MIXED:
#   MIXED_NONE     the plain kernels (one adapter, or several summed, for every row).
#   MIXED_SEGMENT  (prefill, any M; SGMV-style) row tiles in the plan's order, each tile ONE adapter's rows:
#                  the tile table (kernels/lora_mixed.py, built on the host from the plan's offsets, for
#                  every BLOCK_M of the config spaces) gives each program its segment's positions; x rows
#                  are loaded and output rows stored through `order` (`segment_rows`), and the adapter's
#                  rank, offset into the stacked A / B and scale come from the per-adapter table
#                  (`lora_tile`). The shrink, the GEMMs' LoRA step and the dA / dB reductions take it.
#   MIXED_GATHER   (decode, small M; BGMV-style) row tiles in row order; each row reads its own adapter
#                  (row_index) in the GEMMs' LoRA step (`lora_b_step`): one read of W for all rows.
# The per-adapter table has one column per plan segment: column 0 the base rows (rank 0, scale 0),
# column k + 1 adapter k (so column = row_index + 1 = segment index); int32 ranks and offsets, fp32 scales.
MIXED_NONE = tl.constexpr(0)
MIXED_SEGMENT = tl.constexpr(1)
MIXED_GATHER = tl.constexpr(2)
# The tile table (int32): a header of 2 ints per section, section i = BLOCK_M // 16 (16, 32, 64, 128 rows:
# i = 1, 2, 4, 8; i = 0: whole adapter segments, for the dA / dB reductions): (first entry, number of
# entries); then entries of 3 ints: (begin, end) positions in `order`, the segment (adapter table column).
TILE_HEADER = tl.constexpr(18)


@triton.jit
def tile_section(tiles_ptr, SECTION: tl.constexpr):
    """(first entry, number of entries) of one section of the tile table."""
    return tl.load(tiles_ptr + 2 * SECTION), tl.load(tiles_ptr + 2 * SECTION + 1)


@triton.jit
def tile_entry(tiles_ptr, t):
    """Entry t of the tile table: (begin, end) positions in order, the segment (adapter table column)."""
    e = tiles_ptr + TILE_HEADER + 3 * t
    return tl.load(e), tl.load(e + 1), tl.load(e + 2)


@triton.jit
def segment_rows(tiles_ptr, order_ptr, t, BLOCK_M: tl.constexpr):
    """The rows of tile entry t: (rows [BLOCK_M] int32, gathered through order; row_ok [BLOCK_M]; the
    segment = the adapter table's column)."""
    begin, end, seg = tile_entry(tiles_ptr, t)
    pos = begin + tl.arange(0, BLOCK_M)
    row_ok = pos < end
    rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int32)
    return rows, row_ok, seg


@triton.jit
def lora_tile(M, N, R, scale, b_ptr, stride_br, tiles_ptr, order_ptr, rank_ptr, off_ptr, adscale_ptr,
              MIXED: tl.constexpr, AD_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              GROUP_M: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_N] output tile of the LoRA GEMMs and the operands of its LoRA step:
    (pid_n, rows, cols, row_ok, col_ok, R, scale, b_ptr).

    MIXED_SEGMENT: tile pid_m of the table's section for BLOCK_M (grouped order over the tiles), its rows
    gathered through order; R, the first column of B (b_ptr + off * stride_br) and the scale (times s_k
    when AD_SCALE) are its adapter's. Otherwise the rows of `grouped_tile` and R, scale, b_ptr unchanged.
    """
    if MIXED == MIXED_SEGMENT:
        first, n_tiles = tile_section(tiles_ptr, BLOCK_M // 16)
        pid_m, pid_n = grouped_pid(n_tiles * BLOCK_M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows, row_ok, seg = segment_rows(tiles_ptr, order_ptr, first + pid_m, BLOCK_M)
        R = tl.load(rank_ptr + seg)
        b_ptr += tl.load(off_ptr + seg).to(tl.int64) * stride_br
        if AD_SCALE:
            scale = scale * tl.load(adscale_ptr + seg)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
    else:
        pid_n, rows, cols, row_ok, col_ok = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_n, rows, cols, row_ok, col_ok, R, scale, b_ptr


class MixedRows(NamedTuple):
    """A mixed batch as one launch sees it (kernels/lora_mixed.py builds it; MIXED above).

    mode: MIXED_SEGMENT or MIXED_GATHER; tiles: the int32 tile table and counts {section: entries};
    order / row_index: the plan's int64 [M] tensors; rank, off (int32) and scale (fp32) [n + 1]: the
    adapter table, off the first row (shrink: of the stacked A; GEMM: of B's columns; dA / dB: of the
    output) of each adapter in the operand this launch reads; ad_scale: multiply by s_k (else s_k is
    in the operand already); max_rows: rows of the largest segment (segment tiles' M bucket); r_max: the
    largest rank (the launch's R: the autotune key and the LoRA step's chunk, whatever the width of the
    stacked operand, which changes with the batch's adapters)."""
    mode: int
    tiles: torch.Tensor
    counts: dict
    order: torch.Tensor
    row_index: torch.Tensor
    rank: torch.Tensor
    off: torch.Tensor
    scale: torch.Tensor
    ad_scale: bool
    max_rows: int
    r_max: int

    def with_operand(self, off: torch.Tensor, ad_scale: bool) -> "MixedRows":
        """The same rows for a launch reading another stacked operand (its offsets), s_k applied or not."""
        return self._replace(off=off, ad_scale=ad_scale)


def mixed_args(mixed: Optional[MixedRows], dummy: torch.Tensor, names=("tiles", "order", "row_index", "rank", "off",
                                                                         "scale")):
    """(the launch's mixed-batch pointer arguments, in `names` order; its MIXED / AD_SCALE constexprs).
    No mixed batch: `dummy` for every pointer (never read), MIXED_NONE."""
    if mixed is None:
        return (dummy,) * len(names), dict(MIXED=MIXED_NONE.value, AD_SCALE=False)
    return tuple(getattr(mixed, f) for f in names), dict(MIXED=int(mixed.mode), AD_SCALE=bool(mixed.ad_scale))


def mixed_grid(mixed: Optional[MixedRows], m, n, block_m="BLOCK_M", block_n="BLOCK_N"):
    """Grid of a GEMM launch: `grouped_grid`, or for segment tiles, the table's tiles for the config's
    BLOCK_M times the column tiles."""
    if mixed is None or mixed.mode != MIXED_SEGMENT.value:
        return grouped_grid(m, n, block_m, block_n)
    return lambda meta: (mixed.counts[meta[block_m] // 16] * triton.cdiv(n, meta[block_n]),)


def mixed_bucket(mixed: Optional[MixedRows], m: int) -> int:
    """M_BUCKET of a launch: segment tiles never hold more rows than the largest segment."""
    if mixed is not None and mixed.mode == MIXED_SEGMENT.value:
        return m_bucket(mixed.max_rows)
    return m_bucket(m)


# -- the two ends of an output tile of the LoRA GEMMs ----------------------------------------------
# lora_matmul_kernel, lora_fused_kernel (kernels/lora_fwd.py) and lora_quant_kernel
# (kernels/lora_quant.py) each compute one [BLOCK_M, BLOCK_N] tile of
#     y = x W^T + scale * D_out * (S B^T) (+ bias)
# in one fp32 accumulator. What makes the tile a *LoRA* tile, rather than a GEMM tile, lives in
# shared functions, so that it is written once for all three kernels:
#   lora_b_step  the first step (matmul / quant kernels): the LoRA term scale * D_out * (S B^T),
#                before the base GEMM's main loop joins the same accumulator. It goes first so that
#                backward dX's output dropout D_out multiplies only the LoRA part, and so that no
#                second [BLOCK_M, BLOCK_N] fp32 accumulator is live next to the main loop's
#                (register pressure: the AOT test checks ptxas spills). The fused kernel computes S
#                in its main loop and adds its LoRA term after it instead.
#   base_step    one K tile of the base GEMM (matmul / quant kernels), with DoRA's variants of it
#                (below); the fused kernel, whose loop also runs the shrink, scales its x tile inline
#                (X_SCALE) and takes no DUAL.
#   finish_tile  the last step (all three): DoRA's column scale, bias, cast, masked store.
#
# DoRA (a per-output-column scale g = m / ||W + s B A||_row, fastpeft/ops/dora.py) changes these
# ends through constexprs, never through a copy of a kernel:
#   HAS_COL_SCALE  forward, no dropout: y = g * (x W^T + s S B^T) + bias; finish_tile multiplies the
#                  fp32 accumulator by g[cols] before the bias, so y is still written once.
#   X_SCALE        dX, no dropout: dX = (g * dY) W + dS A; the dY tile is multiplied by g[k] as it is
#                  loaded (k: the columns of dY, the GEMM's inner axis; dS = s (g dY) B comes from
#                  the caller, from g folded into B).
#   DUAL           DoRA with dropout (peft's semantics: a second, masked base product). Two fp32
#                  accumulators share every load of W (and of x):
#     DUAL_FWD     forward. acc += x W^T and acc2 += (D01 * x) W^T, where D01 is the keep mask the
#                  shrink drew for S: `dropout_keep(seed, rows, ks, K, p)` of element (row, k) of x,
#                  the same seed, the same element index (the invariant of `dropout_keep`), so the
#                  base product and the adapter see one mask. Both start from the LoRA term L =
#                  s S B^T (acc2 from (1 - p) L), so after the loop, with the 1/(1-p) of D:
#                      Z_d = acc2 / (1 - p)  = (D x) W^T + L
#                      acc - Z_d             = x W^T - (D x) W^T
#                      y   = g * Z_d + (acc - Z_d) + bias      (finish_tile, written once)
#                  and Z_d, which backward's magnitude gradient needs, is a second [M, N] output.
#                  Starting both from L keeps two [BLOCK_M, BLOCK_N] accumulators live, not three.
#     DUAL_DX      dX. acc += dY W and acc2 += ((g - 1) * dY) W (the column scale, here g - 1, on
#                  the dY tile as it is loaded); acc2 starts with dS A (lora_b_step without its
#                  output dropout), so dX = acc + D_out * acc2 = dY W + D * (((g-1) dY) W + dS A).
#                  The kernels take OUT_DROPOUT False here: D_out multiplies all of acc2 at the end.
DUAL_NONE = tl.constexpr(0)
DUAL_FWD = tl.constexpr(1)
DUAL_DX = tl.constexpr(2)


def dual_tile_ok(rows: int, cols: int, mask_cols: int, num_warps: int) -> bool:
    """Pruning rule for DoRA with dropout (DUAL): the two fp32 [rows, cols] accumulators plus, in the
    forward, the keep mask of the [rows, mask_cols] x tile (dX: mask_cols = 0; its mask is drawn after
    the loop), at most 80 values per thread. Measured with ptxas -v on sm_80 / sm_90 (bf16, dense W):
    64x64 tiles with BLOCK_K = 64 on 4 warps (96 per thread) spilled, 64x64x32 and 32x128x64 did not;
    128x128 tiles spill even on 8 warps (160), so DoRA's dropout forward runs on smaller tiles than the
    plain GEMM: it does twice the dot work per W tile it loads."""
    return 2 * rows * cols + rows * mask_cols <= 80 * 32 * num_warps


def dora_args(fn, col_scale, x_col_scale, in_dropout_p, out_dropout_p, z, n_out, n_in, device, table_rows=0):
    """The DoRA constexprs and column-scale vector of one launch of the matmul / quant kernels.

    col_scale: g [n_out] (forward: y = g * (...) + bias), or with table_rows a mixed batch's table of them
    [table_rows, n_out] (`col_scale_rows`); with in_dropout_p > 0, DoRA's forward with
    dropout (DUAL_FWD: z, the [M, n_out] Z_d output, is required). x_col_scale: g [n_in] of the
    input's columns (dX: y = x w + D_out * (((g - 1) x) w + S b^T), which is (g x) w + S b^T without
    dropout: X_SCALE; with out_dropout_p > 0: DUAL_DX, the kernel reads g - 1).
    Returns (cs fp32 contiguous or None, p_drop, consts: HAS_COL_SCALE, X_SCALE, DUAL, OUT_DROPOUT).
    """
    if col_scale is not None and x_col_scale is not None:
        raise ValueError(f"{fn}: col_scale (forward) and x_col_scale (dX) exclude each other")
    if (in_dropout_p > 0.0) != (z is not None) or (in_dropout_p > 0.0 and col_scale is None):
        raise ValueError(f"{fn}: in_dropout_p > 0 is DoRA's forward with dropout: it needs col_scale and z (Z_d), "
                         f"and z only goes with it")
    if in_dropout_p > 0.0 and out_dropout_p > 0.0:
        raise ValueError(f"{fn}: dropout on the input and the output at once is not a LoRA op")
    if col_scale is not None and out_dropout_p > 0.0:
        raise ValueError(f"{fn}: col_scale is DoRA's forward scale; the output dropout (dX) takes x_col_scale")
    consts = dict(HAS_COL_SCALE=col_scale is not None, X_SCALE=False, DUAL=DUAL_NONE.value,
                  OUT_DROPOUT=out_dropout_p > 0.0)
    cs, n, p = col_scale, n_out, out_dropout_p
    if x_col_scale is not None:
        cs, n = x_col_scale, n_in
    if cs is not None:
        want = (table_rows, n) if table_rows and col_scale is not None else (n,)
        if tuple(cs.shape) != want or not cs.is_floating_point() or cs.device != device:
            raise ValueError(f"{fn}: the column scale must be a float {list(want)} "
                             f"{'table' if len(want) == 2 else 'vector'} on {device}, found "
                             f"{cs.dtype} {tuple(cs.shape)} on {cs.device}")
        cs = cs.detach().to(torch.float32).contiguous()
    if in_dropout_p > 0.0:
        consts["DUAL"], p = DUAL_FWD.value, in_dropout_p
    elif x_col_scale is not None and out_dropout_p > 0.0:
        # D_out multiplies all of the second accumulator at the end (DUAL_DX), not the LoRA term alone
        consts.update(DUAL=DUAL_DX.value, OUT_DROPOUT=False)
        cs = cs - 1.0
    elif x_col_scale is not None:
        consts["X_SCALE"] = True
    return cs, p, consts


@triton.jit
def out_dropout_scale(lora, rows, cols, n_cols, scale, seed, p_drop, inv_keep, OUT_DROPOUT: tl.constexpr):
    """scale * D_out * lora for a [rows, cols] tile of the LoRA term (D_out: backward dX's dropout
    mask of the output element, inverse keep probability included; none in forward)."""
    lora = lora * scale
    if OUT_DROPOUT:
        lora = tl.where(dropout_keep(seed, rows, cols, n_cols, p_drop), lora * inv_keep, 0.0)
    return lora


@triton.jit
def lora_b_step(s_ptr, b_ptr, rows, cols, row_ok, col_ok, R, stride_sm, stride_sr, stride_br, stride_bn,
                scale, seed, p_drop, inv_keep, n_cols, ridx_ptr, rank_ptr, off_ptr, adscale_ptr,
                OUT_DROPOUT: tl.constexpr, GATHER: tl.constexpr, AD_SCALE: tl.constexpr,
                LORA_DTYPE: tl.constexpr, LORA_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The LoRA term of an output tile, the first steps of its accumulator: scale * D_out * (S B^T).

    S [M, R] times B^T (B [N, R]) as extra K = R steps (chunks of BLOCK_R, masked tail), scaled,
    and, for dX in backward, multiplied by the dropout mask of the output element, all before the
    base GEMM joins the same fp32 accumulator, so the output tile is written once. R = 0 (a layer
    without adapter): no step runs and the tile starts at zero (S and B are never read).
    A mixed batch's segmented tile (MIXED_SEGMENT, see `lora_tile`) comes here with its adapter's R,
    scale and B already chosen: the same steps, looping to that adapter's rank.

    GATHER (a mixed batch's decode tile, MIXED_GATHER): every row takes its own adapter, column
    ridx[row] + 1 of the adapter table (rank_ptr, off_ptr: the adapter's first column of B,
    adscale_ptr: s_k when AD_SCALE); S [M, max r] holds row i's r_k values in its first columns. Row by
    row, S[i, :r_k] B_k^T runs as fp32 multiply-adds over chunks of BLOCK_R ranks (a row's [BLOCK_R,
    BLOCK_N] slice of B_k: no dot, whose 16-row minimum would be wasted on one row), into row i of the
    accumulator. R is unused. Returns the fp32 [BLOCK_M, BLOCK_N] accumulator.
    """
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rr0 = tl.arange(0, BLOCK_R)
    if GATHER:
        seg = tl.load(ridx_ptr + rows64, mask=row_ok, other=-1).to(tl.int32) + 1  # [BLOCK_M] table column
        rank = tl.load(rank_ptr + seg)  # [BLOCK_M]: 0 for base rows (column 0) and rows past M
        boff = tl.load(off_ptr + seg).to(tl.int64)
        if AD_SCALE:
            sc = tl.load(adscale_ptr + seg)  # [BLOCK_M] fp32
        else:
            sc = tl.full((BLOCK_M,), 1.0, tl.float32)
        mm = tl.arange(0, BLOCK_M)
        for i in range(0, BLOCK_M):
            sel = mm == i
            r_i = tl.sum(tl.where(sel, rank, 0), axis=0)
            s_row = s_ptr + tl.sum(tl.where(sel, rows64, 0), axis=0) * stride_sm
            b_i = b_ptr + tl.sum(tl.where(sel, boff, 0), axis=0) * stride_br
            part = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for r0 in range(0, r_i, BLOCK_R):
                rr = r0 + rr0
                r_ok = rr < r_i
                s = tl.load(s_row + rr * stride_sr, mask=r_ok, other=0.0)  # [BLOCK_R] fp32
                bt = tl.load(b_i + rr[:, None] * stride_br + cols64[None, :] * stride_bn,
                             mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
                part += tl.sum(s[:, None] * bt.to(tl.float32), axis=0)
            acc = tl.where(sel[:, None], (part * tl.sum(tl.where(sel, sc, 0.0), axis=0))[None, :], acc)
    else:
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + rr0
            r_ok = rr < R
            s = tl.load(s_ptr + rows64[:, None] * stride_sm + rr[None, :] * stride_sr,
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
            bt = tl.load(b_ptr + rr[:, None] * stride_br + cols64[None, :] * stride_bn,
                         mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
            acc = mma(s, bt, acc, LORA_DTYPE, LORA_PRECISION)
    return out_dropout_scale(acc, rows, cols, n_cols, scale, seed, p_drop, inv_keep, OUT_DROPOUT)


@triton.jit
def dual_start(acc, p_drop, DUAL: tl.constexpr):
    """(acc, acc2) at the start of the main loop, from the LoRA term in acc (see DUAL above):
    DUAL_FWD (acc, (1 - p) acc); DUAL_DX (0, acc); no DUAL: (acc, acc), acc2 then unused."""
    if DUAL == DUAL_FWD:
        acc2 = acc * (1.0 - p_drop)
    elif DUAL == DUAL_DX:
        acc2 = acc
        acc = tl.zeros_like(acc)
    else:
        acc2 = acc
    return acc, acc2


@triton.jit
def base_step(acc, acc2, x, w, rows, ks, k_ok, n_k, cs_ptr, seed, p_drop, X_SCALE: tl.constexpr,
              DUAL: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One K tile of the base GEMM: acc + x w, and the DoRA variants (X_SCALE, DUAL; see above).

    x: the [BLOCK_M, BLOCK_K] tile of the input at rows x ks (ks < n_k: k_ok), w: the [BLOCK_K,
    BLOCK_N] tile of the weight, loaded (or dequantized) once for both products. cs_ptr: the input's
    column scale [n_k] fp32 (X_SCALE: g; DUAL_DX: g - 1). Returns (acc, acc2).
    """
    if X_SCALE:
        x = x * tl.load(cs_ptr + ks, mask=k_ok, other=0.0)[None, :]
    acc = mma(x, w, acc, COMPUTE_DTYPE, INPUT_PRECISION)
    if DUAL == DUAL_FWD:
        # the same mask as the shrink's for S: element (row, k) of x, this call's seed
        acc2 = mma(tl.where(dropout_keep(seed, rows, ks, n_k, p_drop), x, 0.0), w, acc2, COMPUTE_DTYPE,
                   INPUT_PRECISION)
    elif DUAL == DUAL_DX:
        acc2 = mma(x * tl.load(cs_ptr + ks, mask=k_ok, other=0.0)[None, :], w, acc2, COMPUTE_DTYPE,
                   INPUT_PRECISION)
    return acc, acc2


@triton.jit
def col_scale_rows(ridx_ptr, rows, row_ok, n_cols, MIXED: tl.constexpr, HAS_COL_SCALE: tl.constexpr):
    """Where each row's column scale starts in cs (the `cs_row` of `finish_tile`): a mixed batch with DoRA
    slots reads a table [n + 1, n_cols], row ridx[row] + 1 (row 0: ones, for base rows and adapters without
    a magnitude), so each row gets its adapter's g; otherwise 0 (one g for every row)."""
    if MIXED != MIXED_NONE and HAS_COL_SCALE:
        return ((tl.load(ridx_ptr + rows.to(tl.int64), mask=row_ok, other=-1) + 1) * n_cols)[:, None]
    else:
        return 0


@triton.jit
def finish_tile(acc, rest, y_ptr, bias_ptr, cs_ptr, cs_row, rows, cols, row_ok, col_ok, stride_ym, stride_yn,
                HAS_BIAS: tl.constexpr, HAS_COL_SCALE: tl.constexpr, HAS_REST: tl.constexpr):
    """The last step of an output tile of the LoRA GEMMs: y[rows, cols] = g * acc (+ rest) (+ bias).

    acc: the fp32 [BLOCK_M, BLOCK_N] accumulator holding x W^T + scale * D_out * (S B^T) (or DoRA's
    Z_d). HAS_COL_SCALE: DoRA's column scale, acc * g[cols] (cs_ptr: g [N] fp32; cs_row: 0, or a mixed
    batch's [BLOCK_M, 1] offsets of each row's g in a table, `col_scale_rows`), before the bias;
    HAS_REST: a further fp32 tile added unscaled (DoRA with dropout: x W^T - (D x) W^T; else rest
    is unused, pass anything). The bias (any float dtype) is added in fp32, the sum is cast to y's
    dtype once and stored, masked to the matrix. This is the one place where per-output scaling of
    the whole tile happens, for the three kernels that call it. rows are the tile's output rows: for a
    mixed batch's segment tile, gathered through the plan's order (`lora_tile`), so y is still written
    once, in place.
    """
    if HAS_COL_SCALE:
        acc = acc * tl.load(cs_ptr + cs_row + cols[None, :], mask=col_ok[None, :], other=0.0)  # [1 or BLOCK_M, BLOCK_N]
    if HAS_REST:
        acc += rest
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_N]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def finish_lora_tile(acc, acc2, y_ptr, z_ptr, bias_ptr, cs_ptr, cs_row, rows, cols, row_ok, col_ok, n_cols, stride_ym,
                     stride_yn, stride_zm, stride_zn, seed, p_drop, inv_keep, HAS_BIAS: tl.constexpr,
                     HAS_COL_SCALE: tl.constexpr, DUAL: tl.constexpr):
    """The end of a tile of the matmul / quant kernels after their main loop (see DUAL above):
    DUAL_FWD writes Z_d to z and y = g Z_d + (acc - Z_d) + bias; DUAL_DX y = acc + D_out acc2;
    otherwise y = (g *) acc (+ bias)."""
    if DUAL == DUAL_FWD:
        z = acc2 * inv_keep  # Z_d = (D x) W^T + s S B^T
        finish_tile(z, z, z_ptr, bias_ptr, cs_ptr, cs_row, rows, cols, row_ok, col_ok, stride_zm, stride_zn,
                    False, False, False)
        finish_tile(z, acc - z, y_ptr, bias_ptr, cs_ptr, cs_row, rows, cols, row_ok, col_ok, stride_ym, stride_yn,
                    HAS_BIAS, True, True)
    else:
        if DUAL == DUAL_DX:
            acc += out_dropout_scale(acc2, rows, cols, n_cols, 1.0, seed, p_drop, inv_keep, True)
        finish_tile(acc, acc, y_ptr, bias_ptr, cs_ptr, cs_row, rows, cols, row_ok, col_ok, stride_ym, stride_yn,
                    HAS_BIAS, HAS_COL_SCALE, False)


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, seed, p_drop, inv_keep, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    d = tl.where(dropout_keep(seed, rows, cols, K, p_drop), inv_keep, 0.0)  # [BLOCK_M, BLOCK_K]
    ptrs = out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
    tl.store(ptrs, d, mask=(rows[:, None] < M) & (cols[None, :] < K))


def dropout_mask_dense(seed: int, m: int, k: int, p: float, device="cpu") -> torch.Tensor:
    """The [m, k] fp32 dropout multiplier the kernels use, materialised.

    For tests and debugging only: the kernels never store the mask.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), found {p}")
    out = torch.empty((m, k), dtype=torch.float32, device=device)
    grid = (triton.cdiv(m, 32), triton.cdiv(k, 64))
    _dropout_mask_kernel[grid](out, m, k, seed, p, 1.0 / (1.0 - p), BLOCK_M=32, BLOCK_K=64)
    return out


@triton.jit
def mul_rn(a, b):
    """fp32 a * b rounded on its own, never contracted with a following add into an FMA.

    Dequantization formulas such as code2[q] * absmax2 + offset must give the bits of the torch
    reference, which rounds the product before the add; the compiler would otherwise fuse them
    (PTX mul.rn is exempt from contraction). The interpreter computes in numpy, which never fuses.
    """
    if _INTERPRETING:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
