"""BankLayer: an adapted layer of an adapter bank. It owns the layer's adapter pool and makes one op call.

A BankLayer replaces one target module of the served model (nn.Linear, transformers' Conv1D, or a
fastpeft.quant.QuantLinear) and keeps it as ``base_layer``. Its forward is

    ops.lora(x, <the base>, ops.AdapterSet(pool=<this layer's pool>, row_index=<slot of every row>))

with the row index from the bank's :class:`~fastpeft.serving.rows.RowMap` (outside ``bank.batch(...)``
the layer is its base layer alone). The pool (fastpeft/ops/pool.py) is held as non-persistent buffers, so
``model.state_dict()`` does not grow by the bank and ``model.to(...)`` moves it with the model:

    pool_A            [R, in]    rank rows of every slot (slot j: rows start_j .. start_j + r_j)
    pool_B            [out, R]   the matching columns
    pool_start, pool_rank [S] int64;  pool_scale [S] fp32
    pool_magnitude, pool_weight_norm [S, out] fp32;  pool_dora [S] bool      (DoRA slots)

Their shapes never change; loading, evicting and compacting write into them (in place, under no_grad), so a
compiled model sees new data, never a new graph.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import dora as _dora
from .rows import RowMap


def _hf_conv1d_type():
    """transformers' Conv1D class, if transformers is loaded (a model holding one has loaded it)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def _quant_linear_type():
    mod = sys.modules.get("fastpeft.quant.linear")
    return getattr(mod, "QuantLinear", None)


def layer_kind(module: nn.Module) -> Optional[str]:
    """"quant", "conv1d" or "linear" for a module a bank can adapt, else None."""
    ql = _quant_linear_type()
    if ql is not None and isinstance(module, ql):
        return "quant"
    c1 = _hf_conv1d_type()
    if c1 is not None and isinstance(module, c1):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def features(module: nn.Module, kind: str) -> tuple:
    """(in_features, out_features) of a base layer."""
    if kind == "conv1d":  # weight stored [in, out]
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


def _float_dtype(module: nn.Module, kind: str) -> torch.dtype:
    if kind == "quant":
        return module.compute_dtype
    return module.weight.dtype


class BankLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, name: str, rows: RowMap, slots: int, rank_rows: int, max_rank: int,
                 dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise ValueError(f"AdapterBank: module {name!r} ({type(base_layer).__name__}) cannot be adapted; a "
                             f"bank adapts torch.nn.Linear, transformers' Conv1D and fastpeft.quant.QuantLinear")
        self.base_layer = base_layer
        self.kind, self.name, self.max_rank = kind, name, int(max_rank)
        self.in_features, self.out_features = features(base_layer, kind)
        self._rows = rows
        self._w_sq: Optional[Tensor] = None  # ||W||^2 per row, for DoRA norms (W is frozen); made on first need
        if device is None:
            device = next((t.device for t in base_layer.parameters(recurse=False)), None)
            if device is None:
                device = next((t.device for t in base_layer.buffers(recurse=False)), torch.device("cpu"))
        dtype = dtype or _float_dtype(base_layer, kind)
        S, R, K, N = int(slots), int(rank_rows), self.in_features, self.out_features
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        for name_, t in (("pool_A", torch.zeros(R, K, dtype=dtype, device=device)),
                         ("pool_B", torch.zeros(N, R, dtype=dtype, device=device)),
                         ("pool_start", torch.zeros(S, **i64)), ("pool_rank", torch.zeros(S, **i64)),
                         ("pool_scale", torch.zeros(S, **f32)),
                         ("pool_magnitude", torch.ones(S, N, **f32)), ("pool_weight_norm", torch.ones(S, N, **f32)),
                         ("pool_dora", torch.zeros(S, dtype=torch.bool, device=device))):
            self.register_buffer(name_, t, persistent=False)

    # -- the op call ---------------------------------------------------------------------------------
    def op_base(self) -> ops.Base:
        base = self.base_layer
        if self.kind == "quant":
            return ops.Base.quantized(base.quantized(), base.bias)
        if self.kind == "conv1d":
            return ops.Base.dense(base.weight.t(), base.bias)
        return ops.Base.dense(base.weight, base.bias)

    def pool(self) -> ops.AdapterPool:
        """The layer's pool: one AdapterPool object while its buffers stay the same tensors. What backends derive
        from a pool (per-slot views, a CPU kernel's layout) is kept on that object and rebuilt when a load writes
        the buffers (their version counters move), so a decode step between loads rebuilds nothing. Moving the
        layer (.to()) replaces the buffers, and then the object."""
        tensors = (self.pool_A, self.pool_B, self.pool_start, self.pool_rank, self.pool_scale, self.pool_magnitude,
                   self.pool_weight_norm, self.pool_dora)
        held = self.__dict__.get("_pool_object")
        if held is None or any(a is not b for a, b in zip(held[0], tensors)):
            held = (tensors, ops.AdapterPool(*tensors[:5], self.max_rank, *tensors[5:]))
            self.__dict__["_pool_object"] = held
        return held[1]

    def forward(self, x: Tensor) -> Tensor:
        rows = self._rows.rows(x.numel() // x.shape[-1], f"the input of bank layer {self.name}")
        if rows is None:
            return self.base_layer(x)
        return ops.lora(x, self.op_base(), ops.AdapterSet(pool=self.pool(), row_index=rows), False,
                        fn=f"AdapterBank layer {self.name}")

    def extra_repr(self) -> str:
        R, S = self.pool_A.shape[0], self.pool_start.shape[0]
        return f"{self.kind}, in={self.in_features}, out={self.out_features}, slots={S}, rank_rows={R}"

    # -- writing the pool (the bank calls these; never during a forward) ---------------------------------
    @torch.no_grad()
    def write(self, slot: int, start: int, A: Optional[Tensor], B: Optional[Tensor], scale: float,
              magnitude: Optional[Tensor] = None) -> None:
        """Put an adapter's A [r, in], B [out, r] (None: the adapter does not touch this layer) into ``slot``
        at rank row ``start``; a magnitude [out] makes it a DoRA slot, whose n = ||W + s B A||_row is computed
        here, once (bank adapters are frozen)."""
        r = 0 if A is None else A.shape[0]
        if r:
            dev = self.pool_A.device
            self.pool_A[start:start + r].copy_(A, non_blocking=True)
            self.pool_B[:, start:start + r].copy_(B, non_blocking=True)
            if magnitude is not None:
                if self._w_sq is None or self._w_sq.device != dev:  # (the model may have moved since)
                    self._w_sq = _dora.weight_row_sq_norm(self.op_base())
                # the norm from the adapter's own tensors (its file dtype), as peft computes it
                Ad, Bd = A.to(dev, non_blocking=True), B.to(dev, non_blocking=True)
                n = _dora.weight_norm(self.op_base(), Ad, Bd, float(scale), self._w_sq)
                self.pool_weight_norm[slot].copy_(n)
                self.pool_magnitude[slot].copy_(magnitude, non_blocking=True)
        self.pool_start[slot] = int(start)
        self.pool_rank[slot] = r
        self.pool_scale[slot] = float(scale) if r else 0.0
        self.pool_dora[slot] = bool(r and magnitude is not None)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Empty ``slot`` (rank 0: rows that still name it get the base alone)."""
        self.pool_rank[slot] = 0
        self.pool_scale[slot] = 0.0
        self.pool_dora[slot] = False

    @torch.no_grad()
    def move(self, slot: int, old: int, new: int, n_rows: int) -> None:
        """Move ``slot``'s rank rows [old, old + n_rows) to [new, ...) (compaction; the ranges may overlap)."""
        src = slice(old, old + n_rows)
        dst = slice(new, new + n_rows)
        self.pool_A[dst] = self.pool_A[src].clone()
        self.pool_B[:, dst] = self.pool_B[:, src].clone()
        self.pool_start[slot] = int(new)
