"""Trainable tokens: a table whose selected rows are replaced by trained values (peft's TrainableTokens).

peft runs these layers on a full copy of the table: ``W' = W.index_copy(0, idx, values)`` every
forward, then ``F.embedding(ids, W')`` (or ``F.linear(x, W')`` for a tied output head). That copy is
[V, D] per forward, and its gradient is a dense [V, D] tensor per backward, to train a handful of
rows. The functions here give the same values and the same gradients without either:

- :func:`token_embedding`: the base lookup, then each id that is a selected token takes its row from
  ``values`` (one ``searchsorted`` over the n sorted token ids finds it; memory O(M * D + n), no [V]
  or [V, D] temporary);
- :func:`token_linear`: the base ``x W^T``, then the n selected output columns are recomputed as
  ``x values^T`` and written over it in place (memory O(M * n) beyond the output).

Gradients equal peft's: a replaced row gets its gradient only in ``values`` (none in ``weight``),
padding ids give no gradient to their row, as ``F.embedding`` does. Embedding options that act on
the whole table (``max_norm`` renormalises rows in place, ``scale_grad_by_freq`` scales gradients by
id counts) run peft's way, on a merged copy, because only there is the result defined the same way.
``sparse=True`` makes only the table's own gradient sparse (peft's merged copy cannot backpropagate a
sparse gradient into its rows at all: torch raises "expand is unsupported for Sparse tensors").

``token_indices`` must hold distinct ids (callers that accept repeats, like peft's "last one
wins", reduce them first: see :func:`last_occurrences`). Plain torch: a gather and a small GEMM,
nothing for a fused kernel to win, and no data-dependent shapes (torch.compile traces it as is).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["last_occurrences", "token_embedding", "token_linear", "token_merged_weight", "token_slots"]


def last_occurrences(token_ids: Sequence[int]) -> tuple[list[int], Optional[list[int]]]:
    """(distinct ids, positions of their last occurrence in ``token_ids``), positions None when all ids
    are distinct. A repeated id takes its last row, as peft's CPU ``index_copy`` leaves it."""
    last: dict[int, int] = {}
    for pos, t in enumerate(token_ids):
        last[int(t)] = pos
    if len(last) == len(token_ids):
        return [int(t) for t in token_ids], None
    ids = sorted(last, key=last.__getitem__)
    return ids, [last[t] for t in ids]


def _check(name: str, table: Tensor, token_indices: Tensor, values: Tensor) -> None:
    if table.dim() != 2:
        raise ValueError(f"{name}: weight must be [V, D]; got shape {tuple(table.shape)}")
    if token_indices.dim() != 1 or token_indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: token_indices must be a 1-d int64/int32 tensor; got shape "
                         f"{tuple(token_indices.shape)}, dtype {token_indices.dtype}")
    if values.dim() != 2 or values.shape[0] != token_indices.shape[0] or values.shape[1] != table.shape[1]:
        raise ValueError(f"{name}: values must be [n={token_indices.shape[0]}, D={table.shape[1]}] (n token ids, "
                         f"weight {tuple(table.shape)}); got {tuple(values.shape)}")


def token_slots(ids: Tensor, token_indices: Tensor) -> Tensor:
    """For every id its position in ``token_indices`` (distinct ids), or -1; same shape as ``ids``."""
    n = token_indices.shape[0]
    if n == 0:
        return torch.full_like(ids, -1, dtype=torch.int64)
    sorted_ids, order = torch.sort(token_indices.to(torch.int64))
    flat = ids.reshape(-1).to(torch.int64)
    pos = torch.searchsorted(sorted_ids, flat).clamp_(max=n - 1)
    hit = sorted_ids.index_select(0, pos) == flat
    return torch.where(hit, order.index_select(0, pos), torch.full_like(pos, -1)).reshape(ids.shape)


def token_merged_weight(weight: Tensor, token_indices: Tensor, values: Tensor) -> Tensor:
    """``weight`` with rows ``token_indices`` replaced by ``values`` (cast to weight's dtype): a new tensor,
    differentiable in both. For merging, reading ``.weight``, and the whole-table embedding options."""
    _check("token_merged_weight", weight, token_indices, values)
    return weight.index_copy(0, token_indices.to(device=weight.device, dtype=torch.int64),
                             values.to(device=weight.device, dtype=weight.dtype))


def token_embedding(ids: Tensor, weight: Tensor, token_indices: Tensor, values: Tensor,
                    padding_idx: Optional[int] = None, max_norm: Optional[float] = None, norm_type: float = 2.0,
                    scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """``F.embedding(ids, weight with rows token_indices := values, ...)`` in weight's dtype.

    weight [V, D], token_indices [n] distinct ids, values [n, D] (any float dtype: cast like peft casts
    its delta to the table's dtype).
    """
    _check("token_embedding", weight, token_indices, values)
    if max_norm is not None or scale_grad_by_freq:
        # these act on the table as a whole; peft's merged copy is the definition
        table = token_merged_weight(weight, token_indices, values)
        return F.embedding(ids, table, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    base = F.embedding(ids, weight, padding_idx, sparse=sparse)  # sparse: only the table's own gradient
    if token_indices.shape[0] == 0:
        return base
    n = token_indices.shape[0]
    slots = token_slots(ids, token_indices.to(ids.device))
    hit = (slots >= 0).unsqueeze(-1)
    # the rows as a second lookup into [values; 0] where every other id reads the zero row n, its padding row:
    # embedding's backward sums gradients per row (no M-way scatter into a few rows) and skips row n
    table = torch.cat([values, values.new_zeros(1, values.shape[1])])
    rows = F.embedding(torch.where(slots >= 0, slots, n), table, n).to(weight.dtype)
    if padding_idx is not None:
        # F.embedding never sends gradient to the padding row; a selected padding row keeps that rule
        rows = torch.where((ids == padding_idx).unsqueeze(-1), rows.detach(), rows)
    return torch.where(hit, rows, base)


def token_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], token_indices: Tensor, values: Tensor) -> Tensor:
    """``F.linear(x, weight with rows token_indices := values, bias)``: an output head whose weight is a
    table with trained rows (a head tied to a trainable-tokens embedding). weight [V, D], values [n, D]."""
    _check("token_linear", weight, token_indices, values)
    out = F.linear(x, weight, bias)
    if token_indices.shape[0] == 0:
        return out
    idx = token_indices.to(device=out.device, dtype=torch.int64)
    cols = F.linear(x, values.to(weight.dtype), None if bias is None else bias.index_select(0, idx))
    # in place on a fresh output (linear's backward does not read it): no second [M, V] tensor; autograd
    # routes the replaced columns' gradient to values only, as peft's copied table does
    return out.index_copy_(-1, idx, cols)
