"""Activated LoRA (peft's ``alora_invocation_tokens``): the adapter acts only from its invocation tokens on.

For each sample, the *offset* is the distance from the end of the sequence to the start of the LAST
occurrence of the adapter's invocation token sequence in ``input_ids`` (None: not found). In a layer input
x [B, T, K] (or [B, K]: T = 1), token t of sample b gets the adapter iff t >= T - min(offset_b, T); the other
tokens get the base output only, so a cached prefix stays valid for the base model. peft 0.21.2 semantics,
learned by running it:

- a causal-LM PeftModel computes the offsets from ``input_ids`` in forward and once from the prompt in generate
  (decode steps, T = 1, are then all on when the invocation was found); ``alora_offsets=[...]`` passed to the
  model call wins; without ``input_ids`` (only inputs_embeds) aLoRA is off for the call, with a warning;
  with ``adapter_names`` each sample uses its own adapter's invocation tokens;
- merging is refused ("aLoRA does not support merging."); aLoRA with DoRA, or on layers other than linear
  ones (Embedding, Conv, ...), is refused as peft refuses it ("Invalid or unsupported variant combination").

Forward goes through fastpeft.ops: the token mask becomes the op's per-row adapter index (0 = the adapter,
-1 = base only), one fused call, the same row plan as mixed batches (built once per forward and reused by
every layer). With dropout in training, the active rows are gathered and their LoRA term added with one op
call on them (the row-index path has no dropout).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from .... import ops
from ....ops import RowPlan
from .plain import PlainLora

__all__ = ["ALora", "alora_forward", "alora_mixed_rows", "calculate_alora_offsets", "call_context",
           "current_offsets", "joined", "offsets_context"]


class ALora(PlainLora):
    name = "alora"

    def merged_weight(self, layer, adapter_name: str, weight: Tensor) -> Tensor:
        raise NotImplementedError("aLoRA does not support merging.")

    def unmerged_weight(self, layer, adapter_name: str, weight: Tensor) -> Tensor:
        raise NotImplementedError("aLoRA does not support unmerging.")


# -- the offsets of the model call now running -----------------------------------------------------------------
class _Offsets:
    """Per-sample offsets of one model call, and the row plans derived from them (one per input shape)."""

    def __init__(self, offsets: Optional[Sequence]) -> None:
        self.offsets = None if offsets is None else [None if o is None else int(o) for o in offsets]
        self._masks: dict = {}

    def row_mask(self, x: Tensor, what: str) -> Tensor:
        """Bool [M] over the rows of x [B, T, K] / [B, K]: True where an aLoRA adapter acts."""
        if x.dim() not in (2, 3):
            raise ValueError(f"aLoRA needs a layer input [batch, tokens, features] or [batch, features]; {what} "
                             f"got {tuple(x.shape)}")
        B, T = x.shape[0], (x.shape[1] if x.dim() == 3 else 1)
        key = (B, T, x.device)
        hit = self._masks.get(key)
        if hit is not None:
            return hit
        if self.offsets is None:  # no offsets for this call: base only everywhere (peft)
            mask = torch.zeros(B * T, dtype=torch.bool, device=x.device)
        else:
            n = len(self.offsets)
            if B % n:
                raise ValueError(f"aLoRA has {n} offsets (one per sample) but {what} has a batch of {B}")
            off = torch.tensor([0 if o is None else min(o, T) for o in self.offsets], dtype=torch.long)
            off = off.repeat_interleave(B // n).to(x.device)  # generate's repeated samples sit next to each other
            pos = torch.arange(T, device=x.device)
            mask = (pos[None, :] >= (T - off)[:, None]).reshape(-1)
        self._masks[key] = mask
        return mask

    def plan(self, x: Tensor, what: str) -> RowPlan:
        """One adapter (index 0) on the active rows, the base elsewhere."""
        key = ("plan",) + tuple(x.shape[:-1]) + (x.device,)
        hit = self._masks.get(key)
        if hit is None:
            mask = self.row_mask(x, what)
            hit = RowPlan.build(torch.where(mask, 0, -1), 1, what="aLoRA rows")
            self._masks[key] = hit
        return hit


# A module global as in tuners/mixed_batch.py (torch.compile guards on a global read, not on a ContextVar).
_CURRENT: Optional[_Offsets] = None


def current_offsets() -> Optional[_Offsets]:
    return _CURRENT


@contextlib.contextmanager
def offsets_context(offsets: Optional[Sequence]):
    """Run the body with ``offsets`` (one per sample, None entries = invocation not found) as the current ones;
    ``offsets=None``: aLoRA adapters act nowhere."""
    global _CURRENT
    previous, _CURRENT = _CURRENT, _Offsets(offsets)
    try:
        yield
    finally:
        _CURRENT = previous


def calculate_alora_offsets(peft_config: dict, active_adapter, input_ids: Optional[Tensor],
                            adapter_names: Optional[Sequence[str]] = None) -> list:
    """Per sample of ``input_ids`` [B, T]: T - (start of the last occurrence of its adapter's invocation tokens),
    or None (not an aLoRA adapter, "__base__", unknown adapter (warned), or invocation not found)."""
    if input_ids is None:
        return []
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    active = active_adapter if isinstance(active_adapter, str) else list(active_adapter)[0]
    B, T = input_ids.shape
    out: list = [None] * B
    rows_by_adapter: dict = {}
    for i in range(B):
        name = adapter_names[i] if adapter_names and i < len(adapter_names) else active
        if name == "__base__":
            continue
        if name not in peft_config:
            warnings.warn(f"Adapter '{name}' not found in peft_config. Using base model for row {i}.")
            continue
        tokens = getattr(peft_config[name], "alora_invocation_tokens", None)
        if tokens is not None:
            rows_by_adapter.setdefault(name, []).append(i)
    for name, rows in rows_by_adapter.items():
        inv = torch.as_tensor(list(peft_config[name].alora_invocation_tokens), dtype=input_ids.dtype,
                              device=input_ids.device)
        L = inv.numel()
        if L == 0 or L > T:
            continue
        ids = input_ids[rows]
        hits = (ids.unfold(1, L, 1) == inv).all(dim=2)  # [rows, T - L + 1]: a match starting at each position
        found = hits.any(dim=1)
        # the last start: the largest index with a hit (argmax over reversed positions)
        last = (T - L) - hits.flip(1).int().argmax(dim=1)
        for j, i in enumerate(rows):
            if bool(found[j]):
                out[i] = T - int(last[j])
    return out


def _relevant(configs: dict, active, adapter_names) -> bool:
    if not any(getattr(c, "alora_invocation_tokens", None) for c in configs.values()):
        return False  # no aLoRA adapter at all: the common case, without a walk over a batch's names
    names = [active] if isinstance(active, str) else list(active or [])
    if any(getattr(configs.get(n), "alora_invocation_tokens", None) for n in names[:1]):
        return True
    return any(getattr(configs.get(n), "alora_invocation_tokens", None) for n in (adapter_names or ())
               if n != "__base__")


def call_context(model, args: tuple, kwargs: dict, compute: bool):
    """The aLoRA context of one model call: pops ``alora_offsets`` from kwargs; when the call involves an aLoRA
    adapter and gives none, computes them from ``input_ids`` if ``compute`` (a causal LM, as peft). A no-op
    context when aLoRA is not involved or nothing is to be computed (an enclosing call's offsets stay current).
    ``adapter_names`` is read, not popped."""
    given = kwargs.pop("alora_offsets", None)
    configs = getattr(model, "peft_config", {}) or {}
    adapter_names = kwargs.get("adapter_names")
    if not _relevant(configs, getattr(model, "active_adapter", None), adapter_names):
        return contextlib.nullcontext() if given is None else offsets_context(given)
    if given is not None:
        return offsets_context(given)
    if not compute:  # keep the offsets of an enclosing call (a PeftModel around this LoraModel); none: base only
        return contextlib.nullcontext()
    num_beams = kwargs.get("num_beams")
    if isinstance(num_beams, int) and num_beams > 1:
        raise ValueError("Beam search not yet supported for aLoRA.")
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
        ids = args[0]
    if ids is None:
        if kwargs.get("inputs_embeds") is not None:
            warnings.warn("Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling aLoRA "
                          "for this forward pass.")
        return offsets_context(None)
    return offsets_context(calculate_alora_offsets(configs, model.active_adapter, ids, adapter_names))


@contextlib.contextmanager
def joined(first, second):
    """Enter two contexts, the first outermost (the aLoRA context around the mixed-batch one)."""
    with first, second:
        yield


# -- the layer side --------------------------------------------------------------------------------------------
def alora_forward(layer, x: Tensor, names: list) -> Tensor:
    """Forward of a linear LoRA layer whose active adapters include aLoRA ones (plain ones act on every row)."""
    fn = f"lora.{type(layer).__name__}.forward (aLoRA)"
    ctx = current_offsets() or _Offsets(None)
    base = layer._op_base()
    al = [n for n in names if isinstance(layer.lora_variant[n], ALora)]
    plain = [n for n in names if n not in al]
    a = layer.lora_variant[al[0]].op_adapter(layer, al[0])
    dropout = layer.training and a.dropout_p > 0.0
    if len(al) == 1 and not plain and not dropout:
        # the common case: one fused op, the adapter on the active rows only
        out = ops.lora(x, base, ops.AdapterSet((a,), row_index=ctx.plan(x, fn)), layer.training, fn=fn)
        return add_lora_bias(layer, out, al, ctx.row_mask(x, fn))
    if any(layer.use_dora.get(n) for n in plain):
        from .dora import chained_forward

        out = chained_forward(layer, x, plain)
    else:
        out = ops.lora(x, base, [layer.lora_variant[n].op_adapter(layer, n) for n in plain], layer.training, fn=fn)
    out = add_lora_bias(layer, out, plain, None)
    mask = ctx.row_mask(x, fn)
    rows = mask.nonzero().squeeze(1)
    x2d = x.reshape(-1, x.shape[-1])
    flat = out.reshape(-1, out.shape[-1])
    for n in al:
        an = layer.lora_variant[n].op_adapter(layer, n)
        if rows.numel() == 0:  # nothing active: a zero term that still gives the adapter (zero) gradients
            none = RowPlan.build(torch.full((x2d.shape[0],), -1, dtype=torch.long, device=x.device), 1)
            term = ops.lora(x2d, ops.Base.none(), ops.AdapterSet((an,), row_index=none), False, fn=fn)
            flat = flat + term.to(flat.dtype)
            continue
        term = ops.lora(x2d.index_select(0, rows), ops.Base.none(), [an], layer.training, fn=fn)
        flat = flat.index_add(0, rows, term.to(flat.dtype))
    out = flat.view(out.shape)
    return add_lora_bias(layer, out, al, mask)


def add_lora_bias(layer, out: Tensor, names: list, mask: Optional[Tensor]) -> Tensor:
    """lora_B's bias (lora_bias=True) times the scale, on every row (mask None) or on the masked rows."""
    for n in names:
        if not layer.lora_bias.get(n):
            continue
        bias = (layer.lora_B[n].bias * layer.scaling[n]).to(out.dtype)
        if mask is None:
            out = out + bias
        else:
            out = out + mask.view(*out.shape[:-1], 1).to(out.dtype) * bias
    return out


def alora_mixed_rows(layer, batch, rows: RowPlan, x: Tensor) -> RowPlan:
    """A mixed batch (adapter_names) whose adapters include aLoRA ones: their rows outside the invocation get
    the base (-1). ``rows`` is returned unchanged when no aLoRA adapter of this layer is in the batch."""
    variants = getattr(layer, "lora_variant", None) or {}
    al = [k for k, n in enumerate(batch.names) if isinstance(variants.get(n), ALora)]
    if not al:
        return rows
    ctx = current_offsets() or _Offsets(None)
    mask = ctx.row_mask(x, f"lora.{type(layer).__name__}.forward (aLoRA, adapter_names)")
    idx = rows.row_index
    is_alora = torch.isin(idx, torch.tensor(al, device=idx.device))
    return RowPlan.build(torch.where(is_alora & ~mask, -1, idx), rows.n_adapters, what="aLoRA rows")
