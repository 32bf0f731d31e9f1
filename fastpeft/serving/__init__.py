"""fastpeft.serving: many LoRA adapters at once on one base model, for inference servers.

Server API (one slot per adapter; every row of the batch names its slot; -1 = the base model):

    bank = AdapterBank(model, target_modules=["q_proj", "v_proj"], max_slots=32, max_rank=64)
    slot = bank.load("path/to/adapter", "alice")   # peft folder (or a state dict + LoraConfig) -> slot id
    bank.prefetch("path/to/other", "bob")          # read now (CPU), copy into the pools at load("...", "bob")
    bank.slot_of("alice")                          # -> slot id; None when not loaded; "__base__" -> -1
    bank.loaded()                                  # {name: slot}, least recently used first
    bank.unload("alice")

    with bank.batch(["alice", "__base__", 3]):      # one entry per sample: a name or a slot id, -1 = base
        logits = model(input_ids).logits           # or model.generate(...): beams keep their sample's slot

- row or token -> slot: ``bank.batch(slots)`` takes one slot per sample of the [batch, seq] input (every
  token of a sample uses its slot), or one per token when the server packs the tokens of its requests into
  one sequence dimension (then len(slots) equals the rows every adapted layer sees). Layers see their input
  as [M, K] with the rows of a sample contiguous; M is always a multiple of len(slots).
- loads: ``load`` returns the slot; when every slot is taken it evicts the least recently used adapter
  that the batch in flight does not use (``with bank.batch(...)`` pins its slots; a load with every slot
  pinned raises). Loading between forwards is allowed at any time, also inside a ``bank.batch`` block and
  between the decode steps of a running generation: only the pools' contents change, never their shapes,
  so a torch.compile'd model is not recompiled.
- fixed size (CUDA graphs): ``bank.batch(slots, max_batch=B)`` keeps the per-sample and per-row slot
  index tensors at a fixed size and address (padding samples map to -1; every forward carries B samples).
- one bank per model; one forward at a time (the batch in flight is state of the bank).

Pieces: bank.py (AdapterBank), layer.py (BankLayer: a layer's pool and its op call), adapter.py (reading
and checking an adapter), pages.py (first-fit page runs and compaction), rows.py (per-sample slots ->
each layer's rows). docs/serving.md walks through a server loop.
"""
from __future__ import annotations

from .adapter import LayerWeights, PreparedAdapter
from .bank import BASE_NAME, AdapterBank
from .layer import BankLayer
from .pages import PageTable
from .rows import RowMap

__all__ = ["AdapterBank", "BankLayer", "BASE_NAME", "LayerWeights", "PageTable", "PreparedAdapter", "RowMap"]
