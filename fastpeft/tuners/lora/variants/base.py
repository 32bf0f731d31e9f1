"""The variant seam: what one adapter of a LoRA layer does, behind one small interface.

A LoRA layer (linear.py, conv1d.py, embedding.py, quant_linear.py) owns the parameters and the base
layer; for each adapter it keeps a variant object (``layer.lora_variant[name]``) that decides

- ``op_adapter``: the adapter's entry in the layer's one call of fastpeft.ops (an ``ops.Adapter``:
  A, B, scale, dropout p, and for DoRA its magnitude). The layer gathers the entries of all its
  active adapters into one call, so the base GEMM and every adapter's term are one op;
- ``delta_weight``: the change the adapter makes to the base weight, [out, in] (the layer turns it
  into its own weight layout);
- ``merged_weight`` / ``unmerged_weight``: the base weight after merging / unmerging the adapter.

Plain LoRA (plain.py) is one variant. A new variant (DoRA, ...) is a new file with a subclass, plus
its entry in ``variants.variant_for``; the layer files do not change. Variants hold no parameters of
their own: anything trainable is a parameter of the layer (so it is in the state dict under peft's key)
and the variant reads it from there. Methods take the layer and the adapter name, so one variant
object may serve any layer type that provides ``_adapter_weights(name) -> (A [r, in], B [out, r])``.
"""
from __future__ import annotations

import torch

from .... import ops


class LoraVariant:
    """Interface of a per-adapter LoRA variant (see the module docstring)."""

    name = "abstract"

    def op_adapter(self, layer, adapter_name: str) -> ops.Adapter:
        raise NotImplementedError(f"{type(self).__name__} must define op_adapter")

    def init_adapter(self, layer, adapter_name: str) -> None:
        """Called once the adapter's weights exist and are initialised: a variant whose weights differ from
        plain LoRA's (e.g. QA-LoRA's pooled lora_A) replaces them here, as peft's variant init does."""

    def op_weights(self, layer, adapter_name: str) -> tuple:
        """(A [r, in], B [out, r]) as the op computes with them (a variant that stores them in another shape,
        e.g. QA-LoRA or BD-LoRA, expands them here; used for mixed-batch pools)."""
        return layer._adapter_weights(adapter_name)

    def delta_weight(self, layer, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define delta_weight")

    def merged_weight(self, layer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with the adapter merged in, in ``weight``'s layout and dtype."""
        return weight + layer._to_weight_layout(self.delta_weight(layer, adapter_name)).to(weight.dtype)

    def unmerged_weight(self, layer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with the (merged) adapter taken out again."""
        return weight - layer._to_weight_layout(self.delta_weight(layer, adapter_name)).to(weight.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
