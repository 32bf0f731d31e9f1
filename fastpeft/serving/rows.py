"""The per-step mapping: the slot of every sample of the batch in flight, expanded to each layer's rows.

A server gives one slot id per sample (-1 = the base model). A layer sees its input as [M, K] with
M = samples * rows_per_sample and the rows of one sample contiguous: [batch, seq, K] reshaped, and
generate's beams / return sequences repeat each sample in place, so M = samples * k * seq goes the same
way. A server that packs tokens gives one slot per token instead: then M = len(slots) and each row is its
own "sample". Row i of a layer input takes ``slots[i // (M // samples)]``.

:class:`RowMap` is shared by every layer of a bank. It builds that [M] index once per row count, and every
layer with the same M reuses it (a model's layers all see batch * seq rows; generate's prefill and decode
steps are two row counts):

- plain mode (``bank.batch(slots)``): a fresh cache per batch;
- fixed-size mode (``bank.batch(slots, max_batch=B)``): the per-sample slots live in one persistent [B]
  tensor (entries past the batch are -1), and each row count M gets one persistent [M] tensor, allocated the
  first time M is seen (warm-up) and refilled in place whenever a new batch is set. Nothing is allocated
  and no tensor changes address from step to step: what a captured CUDA graph needs. Every forward must
  then carry B samples (pad the batch to B): a smaller batch's row count cannot be told apart from B
  samples of fewer rows.

Under torch.compile the index is computed inside the graph from the per-sample slots (a repeat_interleave:
one small op per layer, no Python state read beyond the slots tensor), so a compiled model is guarded on
the slots' shape only, never on the cache.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.plan import RowPlan


class RowMap:
    def __init__(self, slots: Optional[int] = None) -> None:
        self.n_slots = slots                  # the bank's slot count: eager plain mode then sorts once per M
        self.slots: Optional[Tensor] = None   # [samples] int64 on the bank's device, or None: no batch set
        self.max_batch: Optional[int] = None  # the fixed-size mode's B, or None
        self._cache: dict = {}                # M -> [M] int64
        self._fixed: dict = {}                # B -> (slots buffer [B], {M: rows buffer [M]})

    def set(self, slots: Optional[Tensor], max_batch: Optional[int] = None) -> None:
        """Make ``slots`` [n] (int64, on the bank's device) the batch in flight (None: no batch)."""
        if slots is None:
            self.slots, self.max_batch, self._cache = None, None, {}
            return
        if max_batch is None:
            self.slots, self.max_batch, self._cache = slots, None, {}
            return
        B = int(max_batch)
        if B < 1 or slots.shape[0] > B:
            raise ValueError(f"bank.batch: {slots.shape[0]} samples do not fit max_batch={B}")
        # persistent tensors are normal tensors even when made under torch.inference_mode, so that a later
        # batch outside inference mode may refill them
        with torch.inference_mode(False):
            if B not in self._fixed:
                self._fixed[B] = (torch.full((B,), -1, dtype=torch.int64, device=slots.device), {})
            buf, rows = self._fixed[B]
            n = slots.shape[0]
            buf[:n].copy_(slots)
            buf[n:].fill_(-1)
            for M, r in rows.items():  # refill every row count seen so far, in place
                r.view(B, M // B).copy_(buf[:, None])
        self.slots, self.max_batch, self._cache = buf, B, rows

    def state(self) -> tuple:
        return self.slots, self.max_batch, self._cache

    def restore(self, state: tuple) -> None:
        self.slots, self.max_batch, self._cache = state

    def rows(self, M: int, what: str):
        """The slot of each of the M rows of a layer input ([M] int64), or None outside a batch. In eager
        plain mode with the slot count known: the ops.RowPlan of those rows instead (one sort and one
        device-to-host copy per row count, shared by every layer, where a tensor is sorted in every op)."""
        slots = self.slots
        if slots is None:
            return None
        n = slots.shape[0]
        if n == 0 or M % n:
            extra = (" (bank.batch(..., max_batch=B): every forward must carry B samples; pad the batch)"
                     if self.max_batch is not None else "")
            raise ValueError(f"{what} has {M} rows, not a multiple of the {n} samples of bank.batch(...){extra}")
        if torch.compiler.is_compiling():
            return slots.repeat_interleave(M // n)
        idx = self._cache.get(M)
        if idx is None:
            if self.max_batch is None:
                idx = slots.repeat_interleave(M // n)
                if self.n_slots is not None:
                    idx = RowPlan.build(idx, self.n_slots, what="the bank's slots")
            else:  # a persistent buffer (see set)
                with torch.inference_mode(False):
                    idx = torch.empty(M, dtype=torch.int64, device=slots.device)
                    idx.view(n, M // n).copy_(slots[:, None])
            self._cache[M] = idx
        return idx
