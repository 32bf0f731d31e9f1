"""Many adapters in one batch through peft's API: ``model(..., adapter_names=[...])`` and
``model.generate(..., adapter_names=[...])``, one adapter name per sample, ``"__base__"`` for the base model.

The names are turned into one per-sample plan (fastpeft.ops.RowPlan: samples sorted by adapter, one sort
and one device-to-host copy) when the model's forward starts; every adapted layer then reads it from
:func:`current` and runs its own rows per adapter through one ``fastpeft.ops.lora`` call with a row
index (a LoRA layer), a lookup per adapter (an embedding), or one module copy per adapter
(ModulesToSaveWrapper). A layer sees x as [samples * rows_per_sample, ...] in sample order (batch first,
and generate's beams / return sequences repeat each sample in place), so the plan is expanded to its rows
without another sort (RowPlan.for_rows).

Refusals are peft's, with its messages: training mode, merged adapters, DoRA adapters, unknown names, a
list whose length is not the batch size.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..ops import RowPlan

BASE_NAME = "__base__"


@dataclass(frozen=True)
class MixedBatch:
    """The adapters of one mixed batch: ``names`` (distinct, in order of first use; "__base__" is not one
    of them) and the per-sample plan over their positions (-1 = the base model)."""

    names: tuple
    plan: RowPlan

    @staticmethod
    def from_names(adapter_names: Sequence[str], device=None) -> "MixedBatch":
        names: list = []
        index = []
        for n in adapter_names:
            if n == BASE_NAME:
                index.append(-1)
                continue
            if n not in names:
                names.append(n)
            index.append(names.index(n))
        row_index = torch.tensor(index, dtype=torch.int64, device=device)
        return MixedBatch(tuple(names), RowPlan.build(row_index, len(names), what="adapter_names"))

    def rows(self, M: int, what: str) -> RowPlan:
        """The plan for a layer input of M rows (a multiple of the samples)."""
        return self.plan.for_rows(M, what)


# The mixed batch of the forward now running. A plain module global, not a ContextVar: torch.compile traces
# a read of a global (and guards on it), not ContextVar.get. One model forward at a time per process sets it,
# as a forward runs (threads sharing one model would need one forward at a time anyway: the layers' state is
# shared too).
_CURRENT: Optional[MixedBatch] = None


def current() -> Optional[MixedBatch]:
    """The mixed batch of the forward now running, or None."""
    return _CURRENT


@contextlib.contextmanager
def mixed_batch(batch: Optional[MixedBatch]):
    """Run the body with ``batch`` as the current mixed batch (None: none)."""
    global _CURRENT
    previous, _CURRENT = _CURRENT, batch
    try:
        yield batch
    finally:
        _CURRENT = previous


def check_adapter_names(model: nn.Module, adapter_names, batch_size: Optional[int], known: dict) -> list:
    """peft's checks of ``adapter_names`` for a model, in peft's order and words; returns them as a list.

    ``known``: the model's adapter configs by name. A valid call does not walk the model: merged layers refuse the batch themselves when it reaches them
    (layer_mixed_batch), and the walk that finds them runs only to report a merged model ahead of a later
    error, as peft orders its errors."""
    names = list(adapter_names)
    if model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    unknown = sorted({n for n in names if n != BASE_NAME and n not in known})
    wrong_length = batch_size is not None and len(names) != batch_size
    used = set(names) - {BASE_NAME}
    dora = any(getattr(known[n], "use_dora", False) for n in used if n in known)
    if unknown or wrong_length or dora:
        _refuse_state(False, any(m.merged for m in _tuner_layers(model)))
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
    if wrong_length:
        raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(names)} and {batch_size} respectively.")
    if dora:
        raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
    return names


def _tuner_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if hasattr(m, "merged_adapters") and hasattr(m, "use_dora")]


def _refuse_state(training: bool, merged: bool) -> None:
    """peft's refusals of adapter_names that depend on the model's state, in peft's order and words."""
    if training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    if merged:
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                         "`unmerge_adapter` first.")


def first_input(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """A model call's first tensor input (input_ids, inputs_embeds, ... or the first positional tensor)."""
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_features", "x"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor):
            return t
    for t in args:
        if isinstance(t, torch.Tensor):
            return t
    return None


def device_of(model: nn.Module):
    p = next(model.parameters(), None)
    return None if p is None else p.device


def adapter_names_context(model: nn.Module, args: tuple, kwargs: dict, known: dict):
    """Pop ``adapter_names`` from a model call's kwargs; return the context to run the call in (the checked
    mixed batch as the current one, or a no-op context when the call has no adapter_names). The batch's
    plan lives on the device of the call's input (the model's, or the model would fail on it), found without
    walking the model's parameters on every decode step."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return contextlib.nullcontext()
    x = first_input(args, kwargs)
    names = check_adapter_names(model, names, None if x is None else x.shape[0], known)
    return mixed_batch(_batch_for(names, x.device if x is not None else device_of(model)))


# The last batch built from names: a decode loop passes the same adapter_names at every step, and reusing the
# batch reuses its plan (no sort, no sync) and everything the backends derived from it (RowPlan.cached).
_LAST: Optional[tuple] = None


def _batch_for(names: list, device) -> MixedBatch:
    global _LAST
    key = (tuple(names), device)
    if _LAST is None or _LAST[0] != key:
        _LAST = (key, MixedBatch.from_names(names, device))
    return _LAST[1]


def layer_mixed_batch(layer: nn.Module, kwargs: dict, x: Optional[torch.Tensor] = None) -> Optional[MixedBatch]:
    """The mixed batch a layer's forward runs: ``adapter_names`` passed to the layer itself (popped from
    ``kwargs``; peft's layer-level call), else the model's current one, else None. ``x``: the layer's input,
    whose device the plan of a layer-level call takes (else the layer's first parameter's)."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        batch = current()
        if batch is not None:
            _refuse_state(False, getattr(layer, "merged", False))
            dora = getattr(layer, "use_dora", None)
            if dora and any(dora.values()) and any(dora.get(n) for n in batch.names):
                raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
        return batch
    dora = getattr(layer, "use_dora", None)
    if dora and any(dora.values()) and any(dora.get(n) for n in names):  # (no DoRA adapter: no walk of the names)
        raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
    _refuse_state(layer.training, getattr(layer, "merged", False))
    dev = x.device if x is not None else next((p.device for p in layer.parameters()), None)
    return _batch_for(list(names), dev)


def run_by_adapter(batch: MixedBatch, x: torch.Tensor, what: str, run) -> torch.Tensor:
    """``run(name, x's rows of that adapter)`` for the base rows (name None) and each adapter's rows, the
    outputs put back in row order: for modules that have no fused mixed path (a module copy per adapter,
    trainable-token rows), one call per adapter as peft makes it."""
    plan = batch.plan.for_rows(x.shape[0], what)
    out = None
    for k in range(-1, len(batch.names)):
        if not plan.count(k):
            continue
        seg = plan.segment(k)
        y = run(batch.names[k] if k >= 0 else None, x.index_select(0, seg))
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out.index_copy_(0, seg, y)
    return out
