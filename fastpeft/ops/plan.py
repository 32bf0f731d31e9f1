"""Rows grouped by adapter: the plan a mixed batch is computed with (many adapters in one batch).

A mixed batch gives every row of x its own adapter (peft's ``adapter_names=[...]``, one name per sample;
a serving bank's slot per request; -1 = the base model alone). Backends never loop over rows: they work
on segments, the rows of one adapter made contiguous by a stable sort,

    order    [M]        row indices sorted by adapter, base rows (-1) first, rows of one adapter in order
    offsets  [n + 2]    segment j of order is order[offsets[j]:offsets[j + 1]]; j = 0 the base rows,
                        j = k + 1 adapter k's rows (host ints: the one device-to-host copy of a plan)

so adapter k costs a GEMM over its own rows at its own rank. A plan is built once per forward (one sort,
one bincount, one sync) and reused by every layer: a model's layers see x as [batch, seq, ...] with the
adapter fixed per sample, so the per-sample plan is expanded to each layer's rows without another sort or
sync (:meth:`RowPlan.per_row`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowPlan:
    row_index: Tensor   # [M] int64: adapter per row, -1 = base only
    order: Tensor       # [M] int64: rows sorted by adapter (stable; base rows first)
    offsets: tuple      # n_adapters + 2 ints (see the module docstring)

    @property
    def n_adapters(self) -> int:
        return len(self.offsets) - 2

    @property
    def M(self) -> int:
        return self.row_index.shape[0]

    @staticmethod
    def build(row_index: Tensor, n_adapters: int, what: str = "row_index") -> "RowPlan":
        """The plan for ``row_index`` [M] (ints in [-1, n_adapters)); ValueError naming ``what`` otherwise."""
        if row_index.dim() != 1 or row_index.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8,
                                                             torch.uint8):
            raise ValueError(f"{what} must be a 1-D integer tensor [M]; got {tuple(row_index.shape)} "
                             f"{row_index.dtype}")
        idx = row_index.long()
        M = idx.shape[0]
        counts = [0] * (n_adapters + 1)
        if M:
            # one device-to-host copy: the range check and the segment sizes together (clamped so that a bad
            # value cannot break bincount before it is reported)
            binned = torch.bincount((idx + 1).clamp(0, n_adapters), minlength=n_adapters + 1)
            lo, hi, *counts = torch.cat([torch.stack([idx.min(), idx.max()]), binned]).tolist()
            if lo < -1 or hi >= n_adapters:
                bad = lo if lo < -1 else hi
                raise ValueError(f"{what} holds {bad}, outside [-1, {n_adapters - 1}] (-1 = base only, "
                                 f"k = adapter k of {n_adapters})")
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        order = torch.argsort(idx, stable=True) if M else idx.new_empty(0)
        return RowPlan(idx, order, tuple(offsets))

    def segment(self, k: int) -> Tensor:
        """Rows of adapter k (k = -1: the base rows), in row order."""
        return self.order[self.offsets[k + 1]:self.offsets[k + 2]]

    def count(self, k: int) -> int:
        return self.offsets[k + 2] - self.offsets[k + 1]

    def cached(self, name, build, extra: tuple = ()):
        """``build()``, kept on this plan (its tensors never change) while ``extra`` is the same; one entry per
        name. Every layer of a forward, and every step of a decode loop that keeps its adapter names, shares
        one plan: what a backend derives from it is built once."""
        store = self.__dict__.setdefault("_cache", {})
        hit = store.get(name)
        if hit is None or hit[0] != extra:
            hit = (extra, build())
            store[name] = hit
        return hit[1]

    def per_row(self, rows_per_sample: int) -> "RowPlan":
        """The plan of a layer input [samples * rows_per_sample, K] whose rows go sample by sample (x of
        shape [batch, seq, K] reshaped): every row takes its sample's adapter. No sort, no sync (and built
        once per plan and row count: every layer of a prefill gets the same one)."""
        T = int(rows_per_sample)
        if T == 1:
            return self
        return self.cached("per_row", lambda: self._per_row(T), extra=(T,))

    def _per_row(self, T: int) -> "RowPlan":
        dev = self.order.device
        order = (self.order[:, None] * T + torch.arange(T, device=dev)).reshape(-1)
        return RowPlan(self.row_index.repeat_interleave(T), order, tuple(o * T for o in self.offsets))

    def for_rows(self, M: int, what: str = "the input") -> "RowPlan":
        """This per-sample plan for a layer input of M rows (M a multiple of the samples), else ValueError."""
        if M == self.M:
            return self
        if self.M == 0 or M % self.M:
            raise ValueError(f"{what} has {M} rows, not a multiple of the {self.M} samples the adapter index "
                             f"was given for")
        return self.per_row(M // self.M)


def plan_from(row_index: Optional[Tensor], order: Optional[Tensor], offsets) -> Optional[RowPlan]:
    """A RowPlan from its flattened form (the custom ops carry its tensors and ints), or None (also for a row
    index without its order: a pool call, whose plan the op builds)."""
    if row_index is None or order is None:
        return None
    return RowPlan(row_index, order, tuple(int(o) for o in offsets))
