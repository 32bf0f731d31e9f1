"""Mixed batches (many adapters in one batch, each row its own adapter) on the existing LoRA kernels.

    y_i = x_i W^T (+ bias) + s_k (x_i A_k^T) B_k^T,    k = row_index[i]   (-1: the base alone)

This file holds the host side only: the tables the kernels read, and the launch sequence. The GEMMs are
the existing kernels with their MIXED constexpr (kernels/_common.py, above `lora_tile`):

    forward   S  = segmented shrink             lora_shrink_kernel, MIXED_SEGMENT        S [M, max r]
              Y  = x W^T + s_k S B_k^T (+ bias) lora_matmul_kernel / lora_quant_kernel,
                                                MIXED_SEGMENT (any M) or MIXED_GATHER (M <= GATHER_MAX_M)
    backward  dS = s_k dY B_k                   lora_shrink_kernel, MIXED_SEGMENT, with B^T as its A
              dX = dY W + dS A_k                the same GEMMs with W^T, A^T as their B (dX written once)
              dA_k = dS[R_k]^T x[R_k]           lora_wgrad_kernel, MIXED_SEGMENT: one program per output
              dB_k = s_k dY[R_k]^T S[R_k]       element and adapter, a fixed-order loop over its rows

Rows, tiles and tables:
- The plan (fastpeft.ops.RowPlan: row_index [M], order [M] = rows sorted by adapter, host offsets of the
  segments; segment 0 = base rows, segment k + 1 = adapter k) gives the kernels their rows.
- The tile table (`tile_table`) is built on the host from the plan's offsets, once per plan and device
  (cached: every layer of a model reuses its plan, so a forward copies it to the device once): for each
  BLOCK_M of the config spaces (16, 32, 64, 128), the segments cut in tiles of at most BLOCK_M rows, one
  adapter per tile; and, for the dA / dB reductions, the whole adapter segments. A program reads its
  entry (begin, end, segment) and gathers its rows through order. Building it for every BLOCK_M lets
  the autotuner choose the tile height per shape without a table per config on the launch path.
- The adapter table (`AdapterBank.table`): one column per segment (column 0: the base rows, rank 0),
  int32 rank, first row of A_k in the stacked A, first column of B_k in the stacked B, first row of its
  gradient in the stacked dA / dB^T, and the fp32 scale s_k. Adapters of rank 0 (a layer without that
  adapter) and adapters without rows in the batch have rank 0 there: their rows get the base alone.

Cost per adapter is its own rank: the GEMMs' LoRA step loops to r_k (chunks of 32, masked tail); the
shrink's column chunks (<= 64 wide) past r_k run no K step, and A's loads stop at r_k. Nothing is
atomic: every element of S, Y, dS, dX, dA, dB is written by one program from a fixed-order loop, so two
runs give the same bits.

Decode (M <= GATHER_MAX_M) runs the gathered GEMM (MIXED_GATHER: rows in row order, each row reads its
own adapter's B), not the fused single kernel (kernels/lora_fwd.py lora_fused_kernel). That kernel
recomputes S in every column program from the x tile it already holds, which is cheap for one adapter
(A is read once per program, from L2) but with a gathered A every program would read every row's
adapter, up to M different A_k, N / BLOCK_N times over: a separate segmented shrink reads each A_k once,
and S (M x max r fp32) is a few KB. The GEMM then reads W once for all rows, where segment tiles of one
or two decode rows each would read W once per adapter.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence

import torch

from ._common import MIXED_GATHER, MIXED_SEGMENT, TILE_HEADER as _TILE_HEADER, MixedRows, empty, r_block
from .lora_splitk import split_k_for

# Row tiles the tile table is cut for: every BLOCK_M of the shrink / matmul / quant config spaces.
TILE_BLOCKS = (16, 32, 64, 128)
TILE_HEADER = _TILE_HEADER.value  # ints: (first entry, entries) per section i = BLOCK_M // 16 (0: whole segments)
# M up to which the GEMMs run decode tiles (each row its own adapter) instead of segment tiles.
GATHER_MAX_M = 16
# Widest column chunk of the segmented shrink (an adapter's dot is padded to its chunk, never beyond).
SHRINK_BLOCK_R = 64


# -- the tile table (host, cached per plan) ---------------------------------------------------------
def tile_entries(offsets: Sequence[int]) -> tuple[list, dict]:
    """The tile table's ints and its entry counts {section: entries} for a plan's offsets (n + 2 ints)."""
    header = [0] * TILE_HEADER
    entries: list = []
    counts = {}
    sections = [(0, None)] + [(bm // 16, bm) for bm in TILE_BLOCKS]
    for sec, bm in sections:
        first = len(entries) // 3
        for j in range(len(offsets) - 1):
            begin, end = int(offsets[j]), int(offsets[j + 1])
            if bm is None:  # whole adapter segments (not the base rows): the dA / dB reductions
                if j > 0 and end > begin:
                    entries += [begin, end, j]
                continue
            for b0 in range(begin, end, bm):
                entries += [b0, min(b0 + bm, end), j]
        counts[sec] = len(entries) // 3 - first
        header[2 * sec], header[2 * sec + 1] = first, counts[sec]
    return header + entries, counts


@functools.lru_cache(maxsize=64)
def _tile_table(offsets: tuple, device: torch.device) -> tuple:
    ints, counts = tile_entries(offsets)
    return torch.tensor(ints, dtype=torch.int32, device=device), counts


def tile_table(offsets: Sequence[int], device) -> tuple:
    """(int32 tile table on device, {section: entries}) for a plan's offsets, cached per (offsets, device)."""
    return _tile_table(tuple(int(o) for o in offsets), torch.device(device))


# -- the adapters as one addressable stack ----------------------------------------------------------
_TABLES: OrderedDict = OrderedDict()
_TABLES_MAX = 256


def _device_table(ints: tuple, scales: tuple, device) -> torch.Tensor:
    """int32 [5, n + 1] on device: 4 rows of ints, then the fp32 scales' bits; cached by content (the layers
    of a model that share ranks, offsets and scales share one copy)."""
    key = (ints, scales, str(device))
    t = _TABLES.get(key)
    if t is None:
        n1 = len(scales)
        host = torch.empty((5, n1), dtype=torch.int32)
        host[:4] = torch.tensor(ints, dtype=torch.int32).reshape(4, n1)
        host[4] = torch.tensor(scales, dtype=torch.float32).view(torch.int32)
        t = host.to(device)
        _TABLES[key] = t
        if len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return t


def pooled(ts: Sequence[torch.Tensor], dim: int) -> Optional[tuple]:
    """(base, [offset of each t]) when every t is a slice along ``dim`` of one strided tensor: the same
    storage, dtype and strides, and t's first element at base's + offset * stride(dim) (base: the t that
    starts first). Then base + (offset_k + i) * stride(dim) + j * stride(other) addresses t_k's elements,
    whatever the tensor they were cut from. None otherwise (or for no tensors)."""
    if not ts:
        return None
    base = min(ts, key=lambda t: t.data_ptr())
    st, elt = base.stride(), base.element_size()
    if st[dim] <= 0:
        return None
    store = base.untyped_storage().data_ptr()
    offs = []
    for t in ts:
        if t.dtype != base.dtype or t.device != base.device or t.stride() != st or \
                t.untyped_storage().data_ptr() != store:
            return None
        d, rem = divmod(t.data_ptr() - base.data_ptr(), elt)
        o, rem2 = divmod(d, st[dim])
        if rem or rem2:
            return None
        offs.append(o)
    return base, offs


class AdapterBank(NamedTuple):
    """The adapters of a mixed batch, addressable by the kernels.

    a [*, K]: A_k = a[a_off_k : a_off_k + r_k]; b [N, *]: B_k = b[:, b_off_k : b_off_k + r_k] (the caller's
    pool itself when every A_k / B_k is a slice of one, `pooled`; else torch.cat of the adapters with rows,
    in one dtype). table: int32 [5, n + 1] (see the module docstring; column k + 1 = adapter k).
    ranks / cat_offs: host ints per adapter (0 for those without rows or rank: base rows only);
    cat_total: rows of the stacked gradients; r_max: the largest rank with rows; copied: (a, b) copied."""
    a: torch.Tensor
    b: torch.Tensor
    table: torch.Tensor
    ranks: tuple
    cat_offs: tuple
    cat_total: int
    r_max: int
    copied: tuple

    @property
    def rank(self):
        return self.table[0]

    @property
    def a_off(self):
        return self.table[1]

    @property
    def b_off(self):
        return self.table[2]

    @property
    def cat_off(self):
        return self.table[3]

    @property
    def scale(self):
        return self.table[4].view(torch.float32)


def _extent(base: torch.Tensor, offs, ranks, dim: int) -> torch.Tensor:
    """base widened along ``dim`` to cover every slice (a view of the same storage, no copy)."""
    size = list(base.shape)
    size[dim] = max(o + r for o, r in zip(offs, ranks))
    return base.as_strided(size, base.stride(), base.storage_offset())


def adapter_bank(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], scales: Sequence[float],
                 used: Sequence[bool], device) -> AdapterBank:
    """The bank of adapters k with used[k] (rows in the batch) and rank > 0; A_k [r_k, K], B_k [N, r_k].

    Zero copy when those A_k are row slices of one tensor and those B_k column slices of one [N, *]
    tensor (a serving bank's pool, fastpeft.ops.pool; one adapter alone always is): the kernels then read
    the pool through per-adapter offsets (`pooled`; a and b are views of it spanning the adapters used).
    Otherwise one torch.cat per call of the adapters used (A_cat [sum r, K], B_cat [N, sum r]; fp32 when
    their dtypes differ). a / b are None when no adapter with rank > 0 has rows."""
    n = len(As)
    live = [k for k in range(n) if used[k] and As[k].shape[0] > 0]
    live_set = set(live)
    ranks = [As[k].shape[0] if k in live_set else 0 for k in range(n)]
    cat_offs, total = [0] * n, 0
    for k in live:
        cat_offs[k], total = total, total + ranks[k]
    a = b = None
    a_offs, b_offs, copied = [0] * n, [0] * n, (False, False)
    if live:
        la, lb, lr = [As[k] for k in live], [Bs[k] for k in live], [ranks[k] for k in live]
        pa, pb = pooled(la, 0), pooled(lb, 1)
        copied = (pa is None, pb is None)
        if pa is not None:
            a = _extent(pa[0], pa[1], lr, 0)
            for k, o in zip(live, pa[1]):
                a_offs[k] = o
        else:
            dt = la[0].dtype if all(t.dtype == la[0].dtype for t in la) else torch.float32
            a, a_offs = torch.cat([t.to(dt) for t in la], 0), list(cat_offs)
        if pb is not None:
            b = _extent(pb[0], pb[1], lr, 1)
            for k, o in zip(live, pb[1]):
                b_offs[k] = o
        else:
            dt = lb[0].dtype if all(t.dtype == lb[0].dtype for t in lb) else torch.float32
            b, b_offs = torch.cat([t.to(dt) for t in lb], 1), list(cat_offs)
    ints = tuple([0] + ranks) + tuple([0] + a_offs) + tuple([0] + b_offs) + tuple([0] + cat_offs)
    sc = tuple([0.0] + [float(s) if k in live_set else 0.0 for k, s in enumerate(scales)])
    return AdapterBank(a, b, _device_table(ints, sc, torch.device(device)), tuple(ranks), tuple(cat_offs), total,
                       max(ranks, default=0), copied)


def mixed_rows(bank: AdapterBank, row_index: torch.Tensor, order: torch.Tensor, offsets: Sequence[int],
               gather: bool) -> MixedRows:
    """The launch description of a plan over a bank (forward: shrink offsets into A, scale 1; the GEMM
    takes it `.with_operand(bank.b_off, True)`)."""
    tiles, counts = tile_table(offsets, row_index.device)
    sizes = [int(offsets[j + 1]) - int(offsets[j]) for j in range(len(offsets) - 1)]
    return MixedRows(MIXED_GATHER.value if gather else MIXED_SEGMENT.value, tiles, counts, order, row_index,
                     bank.rank, bank.a_off, bank.scale, False, max(sizes, default=0), bank.r_max)


def use_gather(variant: str, m: int) -> bool:
    if variant not in ("auto", "segment", "gather"):
        raise ValueError(f"lora_mixed: variant must be 'auto', 'segment' or 'gather', found {variant!r}")
    return variant == "gather" or (variant == "auto" and m <= GATHER_MAX_M)


def _shrink_block_r(r_max: int) -> int:
    return min(r_block(max(r_max, 1)), SHRINK_BLOCK_R)


# -- forward / backward -----------------------------------------------------------------------------
def lora_mixed_fwd(x, weight, qw, bias, bank: AdapterBank, row_index, order, offsets, n: int, s_cols: int,
                   variant="auto", fp32_tf32=False, config=None, shrink_config=None, out=None, s_out=None,
                   split_k=None, fp8_dot=False, col_scales=None):
    """(Y [M, N] in x.dtype, S [M, s_cols] fp32) of a mixed batch: y_i = x_i W^T (+ bias) + s_k S_i B_k^T.

    weight [N, K] (dense, or None) or qw (a packed QuantizedWeight); row_index / order / offsets: the plan
    (fastpeft.ops.RowPlan); bank: `adapter_bank`. S row i holds x_i A_k^T in its first
    r_k columns and zeros in the rest (base rows: all zero); s_cols >= bank.r_max. variant: "auto"
    (gathered decode GEMM for M <= GATHER_MAX_M, else segment tiles), "segment" or "gather".
    split_k: the gathered GEMM's K split (kernels/lora_splitk.py; None: `split_k_for` picks it). fp8_dot:
    an fp8 base as W8A8 on the tensor cores (kernels/lora_quant.py `fp8_w8a8_step`). col_scales: DoRA slots
    (inference): fp32 [n + 1, N], row k + 1 adapter k's g = m_k / ||W + s_k B_k A_k||_row (ones for the base
    row 0 and adapters without a magnitude): y_i = g_k * (x_i W^T + s_k S_i B_k^T) + bias, in the GEMM's
    epilogue (`_common.col_scale_rows`); adapters with a magnitude need rank > 0 (the caller checks).
    """
    from .lora_fwd import launch_lora_matmul
    from .lora_quant import launch_lora_quant
    from .lora_shrink import lora_shrink

    m, k = x.shape
    y = out if out is not None else empty((m, n), x.dtype, x.device)
    s = s_out if s_out is not None else empty((m, s_cols), torch.float32, x.device)
    if m == 0:
        return y, s
    if k == 0 or n == 0:  # empty reduction: S = 0, Y = bias
        s.zero_()
        if n:
            y.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(y))
        return y, s
    if bank.r_max == 0:  # no adapter with rows and rank > 0 (so no DoRA slot): the base GEMM alone, S = 0
        s.zero_()
        z = x.new_empty((n, 0))
        if qw is not None:
            launch_lora_quant(x, qw, s[:, :0], z, bias, y, 1.0, True, fp32_tf32=fp32_tf32, config=config,
                              fp8_dot=fp8_dot)
        else:
            launch_lora_matmul(x, weight, s[:, :0], z, bias, y, 1.0, fp32_tf32=fp32_tf32, config=config)
        return y, s
    gather = use_gather(variant, m)
    rows = mixed_rows(bank, row_index, order, offsets, gather)
    if s_cols:
        lora_shrink(x, bank.a, 1.0, out=s, fp32_tf32=fp32_tf32, config=shrink_config,
                    mixed=rows._replace(mode=MIXED_SEGMENT.value), block_r=_shrink_block_r(bank.r_max))
    gemm = rows.with_operand(bank.b_off, True)
    split = (split_k if split_k is not None else split_k_for(m, n, k, x.device)) if gather else 1
    if qw is not None:
        launch_lora_quant(x, qw, s, bank.b, bias, y, 1.0, True, fp32_tf32=fp32_tf32, config=config, mixed=gemm,
                          split_k=split, fp8_dot=fp8_dot, col_scale=col_scales)
    else:
        launch_lora_matmul(x, weight, s, bank.b, bias, y, 1.0, fp32_tf32=fp32_tf32, config=config, mixed=gemm,
                           split_k=split, col_scale=col_scales)
    return y, s


def lora_mixed_bwd(dy, x, weight, qw, bank: AdapterBank, row_index, order, offsets, s, needs_dx=True,
                   needs_da=True, needs_db=True, variant="auto", fp32_tf32=False, configs=None):
    """(dX | None, dA_cat | None, dBt_cat | None) of `lora_mixed_fwd`.

    dA_cat [bank.cat_total, K] and dBt_cat [bank.cat_total, N] fp32: adapter k's dA_k and dB_k^T are rows
    bank.cat_offs[k] .. + r_k (adapters without rows in the batch: not written; the caller gives them
    zeros). configs: optional {"shrink", "matmul" / "quant", "wgrad"} meta-parameters. Deterministic.
    """
    from .lora_bwd import lora_wgrad
    from .lora_fwd import launch_lora_matmul
    from .lora_quant import launch_lora_quant
    from .lora_shrink import lora_shrink

    cfg = configs or {}
    m, k = x.shape
    n = dy.shape[1]
    rows = mixed_rows(bank, row_index, order, offsets, use_gather(variant, m))
    seg = rows._replace(mode=MIXED_SEGMENT.value)
    dx = da = dbt = None
    ds = None
    if (needs_dx or needs_da) and m and bank.r_max:
        ds = lora_shrink(dy, bank.b.t(), 1.0, out=empty((m, bank.r_max), torch.float32, x.device),
                         fp32_tf32=fp32_tf32, config=cfg.get("shrink"), mixed=seg.with_operand(bank.b_off, True),
                         block_r=_shrink_block_r(bank.r_max))
    if needs_dx:
        dx = empty((m, k), x.dtype, x.device)
        if m and k:
            if n == 0:
                dx.zero_()
            else:
                if ds is None:  # no LoRA work: dX = dY W by the plain GEMM at rank 0
                    lora, at, dxrows = x.new_zeros((m, 0), dtype=torch.float32), x.new_empty((k, 0)), None
                else:  # dX's LoRA step reads A_k^T as its B ([K, *]), from A's offsets; dS carries s_k
                    lora, at, dxrows = ds, bank.a.t(), rows.with_operand(bank.a_off, False)
                if qw is not None:
                    launch_lora_quant(dy, qw, lora, at, None, dx, 1.0, False, fp32_tf32=fp32_tf32,
                                      config=cfg.get("quant"), mixed=dxrows)
                else:
                    launch_lora_matmul(dy, weight.t() if weight is not None else None, lora, at, None, dx, 1.0,
                                       fp32_tf32=fp32_tf32, config=cfg.get("matmul"), mixed=dxrows)
    if needs_da and bank.cat_total:
        da = empty((bank.cat_total, k), torch.float32, x.device)
        if ds is not None:
            lora_wgrad(ds, x, 1.0, fp32_tf32=fp32_tf32, config=cfg.get("wgrad"), out=da,
                       mixed=seg.with_operand(bank.cat_off, False))
    if needs_db and bank.cat_total:
        dbt = empty((bank.cat_total, n), torch.float32, x.device)
        if m:
            lora_wgrad(s, dy, 1.0, fp32_tf32=fp32_tf32, config=cfg.get("wgrad"), out=dbt,
                       mixed=seg.with_operand(bank.cat_off, True))
    return dx, da, dbt
