"""AdapterBank: many LoRA / DoRA adapters served at once on one base model, one slot per adapter.

See the package docstring (fastpeft/serving/__init__.py) for the server API and docs/serving.md for a walk
through. This module ties the pieces together:

- construction replaces every target module of a plain transformers model by a :class:`BankLayer`
  (layer.py) that owns the layer's adapter pool [R rank rows] and makes one ``fastpeft.ops.lora`` call;
- :meth:`AdapterBank.load` reads an adapter (adapter.py), picks a slot (a free one, else the least recently
  used one that the batch in flight does not use), finds it a contiguous run of pages (pages.py: first fit,
  compaction when the free pages are there but scattered, more LRU evictions when they are not) and copies
  its tensors into every layer's pool;
- :meth:`AdapterBank.batch` sets the slot of every sample for the forwards run inside it (rows.py) and pins
  those slots against eviction.

Pages. R = ``rank_rows`` rounded up to a multiple of ``page_rows`` (default: ``max_slots`` times the pages
of a max_rank adapter, so that pages never run out before slots do). An adapter takes
ceil(r_max / page_rows) pages, r_max its largest rank over the layers (rank_pattern can give layers different
ranks: every layer uses the same run, each layer its own first r_l rows of it), so a rank-8 adapter next to
a rank-64 one holds 8 rows, rounded up to a page, not 64.
"""
from __future__ import annotations

import contextlib
import operator
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .adapter import PreparedAdapter, prepare
from .layer import BankLayer, layer_kind
from .pages import PageTable
from .rows import RowMap

BASE_NAME = "__base__"


@dataclass
class _Slot:
    name: str
    first_page: int
    n_pages: int
    max_r: int
    dora: bool


class AdapterBank:
    """Adapter slots installed into ``model`` (a plain transformers model or nn.Module, not a PeftModel).

    Args:
        model: the base model; its target modules are replaced in place by BankLayers.
        target_modules: the modules to adapt: a list of names (a module matches when its name equals one or
            ends with "." + one), a regex string matching the whole name, or "all-linear". Every adapter the
            bank loads must target a subset of these.
        max_slots: how many adapters are loaded at once (S).
        max_rank: the largest rank an adapter may have (the width of the op's S [M, max_rank]).
        rank_rows: rank rows R of every layer's pool (rounded up to whole pages); default
            ``max_slots * ceil(max_rank / page_rows) * page_rows``. A smaller R holds many low-rank adapters in
            less memory and evicts by pages when high-rank ones crowd in.
        page_rows: rank rows per page (the allocation unit).
        dtype: the pools' dtype (default: each layer's weight dtype; a QuantLinear's compute dtype).
        device: the pools' device (default: each layer's weight device).
    """

    def __init__(self, model: nn.Module, target_modules: Union[str, Sequence[str]], max_slots: int, max_rank: int,
                 rank_rows: Optional[int] = None, page_rows: int = 16, dtype: Optional[torch.dtype] = None,
                 device=None) -> None:
        for what, v in (("max_slots", max_slots), ("max_rank", max_rank), ("page_rows", page_rows)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"AdapterBank: {what} must be a positive int; got {v!r}")
        self.model = model
        self.max_slots, self.max_rank, self.page_rows = max_slots, max_rank, page_rows
        per_slot = -(-max_rank // page_rows)
        if rank_rows is None:
            n_pages = max_slots * per_slot
        else:
            n_pages = -(-int(rank_rows) // page_rows)
            if n_pages < per_slot:
                raise ValueError(f"AdapterBank: rank_rows={rank_rows} cannot hold one adapter of max_rank={max_rank} "
                                 f"({per_slot} pages of {page_rows} rows)")
        self.rank_rows = n_pages * page_rows
        self.pages = PageTable(n_pages)
        self.rows = RowMap(max_slots)
        self.layers: dict = OrderedDict()  # module name -> BankLayer
        self._slots: list = [None] * max_slots   # slot -> _Slot or None
        self._lru: OrderedDict = OrderedDict()   # name -> slot, least recently used first
        self._prefetched: dict = {}              # name -> PreparedAdapter
        self._batches: list = []                 # stack of (slots tensor, max_batch, pinned slot set)
        self.stats = {"loads": 0, "evictions": 0, "compactions": 0, "rows_moved": 0}
        self._install(target_modules, dtype, device)

    # -- installation ----------------------------------------------------------------------------------
    def _targets(self, target_modules) -> list:
        from ..utils.modules import name_matches

        if any(isinstance(m, BankLayer) for m in self.model.modules()):
            raise ValueError("AdapterBank: this model already holds an adapter bank (call its uninstall() first)")
        if target_modules == "all-linear":
            from ..tuners.tuners_utils import all_linear_names

            names = sorted(all_linear_names(self.model))
        else:
            if isinstance(target_modules, str):
                names = [n for n, _ in self.model.named_modules() if n and name_matches(n, target_modules)]
            else:
                wanted = list(target_modules)
                names = [n for n, _ in self.model.named_modules() if n and name_matches(n, wanted)]
        if not names:
            some = [n for n, _ in self.model.named_modules() if n][:8]
            raise ValueError(f"AdapterBank: target_modules {target_modules!r} match no module of "
                             f"{type(self.model).__name__} (some module names: {some})")
        for n in names:
            mod = self.model.get_submodule(n)
            if layer_kind(mod) is None:
                raise ValueError(f"AdapterBank: target module {n!r} ({type(mod).__name__}) cannot be adapted; a "
                                 f"bank adapts torch.nn.Linear, transformers' Conv1D and fastpeft.quant.QuantLinear")
        return names

    def _install(self, target_modules, dtype, device) -> None:
        from ..utils.modules import get_submodules

        for n in self._targets(target_modules):
            parent, target, attr = get_submodules(self.model, n)
            layer = BankLayer(target, n, self.rows, self.max_slots, self.rank_rows, self.max_rank, dtype, device)
            setattr(parent, attr, layer)
            self.layers[n] = layer

    def uninstall(self) -> nn.Module:
        """Put the original modules back (the pools are dropped); returns the model."""
        from ..utils.modules import get_submodules

        for n, layer in self.layers.items():
            parent, _, attr = get_submodules(self.model, n)
            setattr(parent, attr, layer.base_layer)
        self.layers.clear()
        return self.model

    # -- queries -----------------------------------------------------------------------------------------
    def slot_of(self, name: str) -> Optional[int]:
        """The slot of a loaded adapter (-1 for "__base__"), or None when ``name`` is not loaded."""
        if name == BASE_NAME:
            return -1
        return self._lru.get(name)

    def loaded(self) -> dict:
        """{name: slot} of the loaded adapters, least recently used first (the next to be evicted first)."""
        return dict(self._lru)

    def in_flight(self) -> set:
        """Slots used by the batches now running (pinned: never evicted, never unloaded)."""
        return set().union(*(p for _, _, p in self._batches)) if self._batches else set()

    def memory_bytes(self) -> int:
        """Bytes held by the pools and tables of every layer."""
        return sum(b.numel() * b.element_size() for layer in self.layers.values() for b in layer.buffers(False))

    # -- loading -------------------------------------------------------------------------------------------
    def _pin_memory(self) -> bool:
        layer = next(iter(self.layers.values()))
        return layer.pool_A.device.type == "cuda"

    def _prepare(self, source, name: str, config) -> PreparedAdapter:
        return prepare(source, name, config, self.layers, self.max_rank, pin=self._pin_memory())

    @staticmethod
    def _check_name(name) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"AdapterBank: an adapter name must be a non-empty str; got {name!r}")
        if name == BASE_NAME:
            raise ValueError(f"AdapterBank: {BASE_NAME!r} names the base model, not an adapter")

    def prefetch(self, source, name: str, config=None) -> None:
        """Read and check adapter ``name`` now and keep its CPU tensors (pinned on CUDA), so that a later
        ``load(source, name)`` (or ``load(None, name)``) only copies them into the pools."""
        self._check_name(name)
        self._prefetched[name] = self._prepare(source, name, config)

    def load(self, source, name: str, config=None) -> int:
        """Load adapter ``name`` (a peft-format folder, or a state dict with its LoraConfig; None: the one
        prefetched under ``name``) into a slot and return the slot id.

        A name already loaded returns its slot (touched as recently used) without reading anything: unload
        it first to replace it. When every slot is taken, the least recently used adapter that the batch in
        flight does not use is evicted; when the pools' free pages are scattered they are compacted first.
        A load refused for lack of room (every other adapter in flight) keeps what it read, as ``prefetch``
        does, so a retry needs no source.
        """
        self._check_name(name)
        if name in self._lru:
            self._lru.move_to_end(name)
            return self._lru[name]
        ready = self._prefetched.pop(name, None)  # a stale one (another source) is dropped
        if ready is not None and (source is None or source is ready.source or
                                  (isinstance(source, str) and source == ready.source)):
            prepared = ready
        elif source is None:
            raise ValueError(f"AdapterBank.load: no source given and nothing prefetched under {name!r}")
        else:
            prepared = self._prepare(source, name, config)
        n_pages = prepared.pages(self.page_rows)
        try:
            slot = self._free_slot(name)
            first = self._find_pages(n_pages, name)
        except RuntimeError:  # no room now (everything pinned): keep what was read for a later try
            self._prefetched[name] = prepared
            raise
        self.pages.assign(slot, first, n_pages)
        start = first * self.page_rows
        for lname, layer in self.layers.items():
            w = prepared.layers.get(lname)
            if w is None:
                layer.write(slot, start, None, None, 0.0)
            else:
                layer.write(slot, start, w.A, w.B, w.scale, w.magnitude)
        self._slots[slot] = _Slot(name, first, n_pages, prepared.max_r, prepared.dora)
        self._lru[name] = slot
        self.stats["loads"] += 1
        return slot

    def unload(self, name: str) -> None:
        """Free ``name``'s slot and pages. Refused while the batch in flight uses it."""
        if name not in self._lru:
            raise KeyError(f"AdapterBank.unload: {name!r} is not loaded (loaded: {list(self._lru)})")
        slot = self._lru[name]
        if slot in self.in_flight():
            raise RuntimeError(f"AdapterBank.unload: {name!r} (slot {slot}) is used by the batch in flight")
        self._drop(slot)

    def _drop(self, slot: int) -> None:
        info = self._slots[slot]
        for layer in self.layers.values():
            layer.clear(slot)
        self.pages.release(slot)
        self._slots[slot] = None
        del self._lru[info.name]

    def _victim(self) -> Optional[int]:
        """The least recently used loaded slot that no batch in flight uses."""
        busy = self.in_flight()
        return next((s for s in self._lru.values() if s not in busy), None)

    def _evict_one(self, name: str, why: str) -> None:
        victim = self._victim()
        if victim is None:
            raise RuntimeError(f"AdapterBank.load({name!r}): {why}, and every loaded adapter "
                               f"({list(self._lru)}) is used by the batch in flight; none can be evicted")
        self._drop(victim)
        self.stats["evictions"] += 1

    def _free_slot(self, name: str) -> int:
        free = next((s for s, info in enumerate(self._slots) if info is None), None)
        if free is not None:
            return free
        self._evict_one(name, f"the bank is full ({self.max_slots} slots)")
        return next(s for s, info in enumerate(self._slots) if info is None)

    def _find_pages(self, n: int, name: str) -> int:
        while True:
            first = self.pages.first_fit(n)
            if first is None and self.pages.free >= n:
                self.compact()
                first = self.pages.first_fit(n)
            if first is not None:
                return first
            self._evict_one(name, f"it needs {n} pages of {self.page_rows} rank rows and {self.pages.free} of "
                                  f"{self.pages.n_pages} are free")

    def compact(self) -> int:
        """Slide every slot's rows down so the free pages form one run at the end; returns the rows moved.
        Called by load when a run of free pages long enough is missing; safe between forwards only."""
        moved = 0
        for slot, old, new in self.pages.compact():
            info = self._slots[slot]
            info.first_page = new
            rows = info.max_r
            for layer in self.layers.values():
                layer.move(slot, old * self.page_rows, new * self.page_rows, rows)
            moved += rows
        self.stats["compactions"] += 1
        self.stats["rows_moved"] += moved
        return moved

    # -- the batch in flight ---------------------------------------------------------------------------
    def _slot_ids(self, slots) -> list:
        if isinstance(slots, Tensor):
            if slots.dim() != 1 or slots.is_floating_point() or slots.is_complex():
                raise ValueError(f"bank.batch: slots must be a 1-D int tensor; got {tuple(slots.shape)} {slots.dtype}")
            return [int(s) for s in slots.tolist()]
        out = []
        for s in slots:
            if isinstance(s, str):
                slot = self.slot_of(s)
                if slot is None:
                    raise KeyError(f"bank.batch: adapter {s!r} is not loaded (loaded: {list(self._lru)})")
                out.append(slot)
            elif isinstance(s, bool):
                raise ValueError(f"bank.batch: a slot must be a slot id (int, -1 = base) or an adapter name; got {s!r}")
            else:
                try:
                    out.append(operator.index(s))
                except TypeError:
                    raise ValueError(f"bank.batch: a slot must be a slot id (int, -1 = base) or an adapter name; "
                                     f"got {s!r}") from None
        return out

    @contextlib.contextmanager
    def batch(self, slots, max_batch: Optional[int] = None):
        """Run the forwards in the body with sample i on slot ``slots[i]`` (-1 or "__base__": the base model;
        names are looked up). Yields the per-sample slot tensor the layers read.

        ``max_batch``: the fixed-size mode for CUDA graphs (rows.py): the per-sample and per-row index tensors
        keep their size and address from batch to batch (padding samples map to -1); every forward inside
        must then carry max_batch samples."""
        ids = self._slot_ids(slots)
        for s in ids:
            if s != -1 and not (0 <= s < self.max_slots and self._slots[s] is not None):
                state = "empty" if 0 <= s < self.max_slots else f"outside [-1, {self.max_slots - 1}]"
                raise ValueError(f"bank.batch: slot {s} is {state} (loaded: {self.loaded()})")
        used = {s for s in ids if s >= 0}
        for s in dict.fromkeys(s for s in ids if s >= 0):  # in order of first use
            self._lru.move_to_end(self._slots[s].name)
        device = next(iter(self.layers.values())).pool_A.device
        tensor = torch.tensor(ids, dtype=torch.int64).to(device, non_blocking=True)
        self.rows.set(tensor, max_batch)
        self._batches.append((tensor, max_batch, used))
        try:
            yield self.rows.slots
        finally:
            self._batches.pop()
            if self._batches:
                outer, outer_max, _ = self._batches[-1]
                self.rows.set(outer, outer_max)
            else:
                self.rows.set(None)

    def __repr__(self) -> str:
        return (f"AdapterBank({len(self.layers)} layers, {len(self._lru)}/{self.max_slots} slots loaded, "
                f"max_rank={self.max_rank}, rank_rows={self.rank_rows} in pages of {self.page_rows}, "
                f"{self.pages.free}/{self.pages.n_pages} pages free)")
