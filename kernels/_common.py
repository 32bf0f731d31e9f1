"""Helpers shared by the LoRA kernels: dropout mask, dtype mapping, block-size arithmetic, the
launch rule, and the two ends of an output tile of the LoRA GEMMs (`lora_b_step`, `finish_tile`).

Every op file holds its own kernels, configs and launcher; this file holds what must be
*identical* across ops (the dropout mask must be bit-identical in forward and backward, so it is
defined once here) or would otherwise be repeated by each of them.
"""
import os

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


# -- the two ends of an output tile of the LoRA GEMMs ----------------------------------------------
# lora_matmul_kernel, lora_fused_kernel (kernels/lora_fwd.py) and lora_quant_kernel
# (kernels/lora_quant.py) each compute one [BLOCK_M, BLOCK_N] tile of
#     y = x W^T + scale * D_out * (S B^T) (+ bias)
# in one fp32 accumulator. What makes the tile a *LoRA* tile, rather than a GEMM tile, lives in two
# shared functions, so that it is written once for all three kernels:
#   lora_b_step  the first step (matmul / quant kernels): the LoRA term scale * D_out * (S B^T),
#                before the base GEMM's main loop joins the same accumulator. It goes first so that
#                backward dX's output dropout D_out multiplies only the LoRA part, and so that no
#                second [BLOCK_M, BLOCK_N] fp32 accumulator is live next to the main loop's
#                (register pressure: the AOT test checks ptxas spills). The fused kernel computes S
#                in its main loop and adds its LoRA term after it instead.
#   finish_tile  the last step (all three): bias, cast, masked store.


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
                scale, seed, p_drop, inv_keep, n_cols, OUT_DROPOUT: tl.constexpr,
                LORA_DTYPE: tl.constexpr, LORA_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The LoRA term of an output tile, the first steps of its accumulator: scale * D_out * (S B^T).

    S [M, R] times B^T (B [N, R]) as extra K = R steps (chunks of BLOCK_R, masked tail), scaled,
    and, for dX in backward, multiplied by the dropout mask of the output element, all before the
    base GEMM joins the same fp32 accumulator, so the output tile is written once. R = 0 (a layer
    without adapter): no step runs and the tile starts at zero (S and B are never read).
    Returns the fp32 [BLOCK_M, BLOCK_N] accumulator.
    """
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rr0 = tl.arange(0, BLOCK_R)
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
def finish_tile(acc, y_ptr, bias_ptr, rows, cols, row_ok, col_ok, stride_ym, stride_yn, HAS_BIAS: tl.constexpr):
    """The last step of an output tile of the LoRA GEMMs: y[rows, cols] = acc (+ bias[cols]).

    acc: the fp32 [BLOCK_M, BLOCK_N] accumulator holding x W^T + scale * D_out * (S B^T). The bias
    (any float dtype) is added in fp32, the sum is cast to y's dtype once and stored, masked to the
    matrix. This is the one place where per-output scaling of the whole tile is to be added, once
    for the three kernels that call it:
    - DoRA, y = g * (x W^T + s S B^T) + bias with a per-output-column magnitude scale g [N]: the
      multiply acc * g[cols] goes here, before the bias (not implemented yet);
    - a per-row adapter gather (several adapters in one batch, an adapter index per row): its
      per-row selection of g goes here, and of B in `lora_b_step` (not implemented yet).
    """
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_N]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


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
