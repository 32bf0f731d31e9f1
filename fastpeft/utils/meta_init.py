"""low_cpu_mem_usage: adapter weights that a load is about to overwrite are created on the meta device.

peft's option of the same name (get_peft_model, PeftModel.from_pretrained, load_adapter, add_adapter,
inject_adapter_in_model) creates the new adapter's tensors without storage and without running their
initialisation; loading the saved weights then puts real tensors in their place. fastpeft does the same:

- ``adapters_on_meta(True)`` around the creation of adapters makes LoRA layers create their weights (and a
  DoRA magnitude) on the meta device, skip their initialisation, and take only the base weight's dtype;
- ``materialize(...)``, called by set_peft_model_state_dict for every target still on the meta device,
  replaces the parameter by one holding the loaded tensor, on the device of the base layer it adapts and
  in the dtype the parameter was given, with its requires_grad (so the result equals a normal load).

Weights the file does not hold stay on the meta device, as in peft (a forward then fails on them).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch
from torch import nn

__all__ = ["adapters_on_meta", "creating_on_meta", "materialize"]

_ON_META = contextvars.ContextVar("fastpeft_adapters_on_meta", default=False)


@contextlib.contextmanager
def adapters_on_meta(enabled: bool = True):
    """Within the block, new adapter weights are created on the meta device (when ``enabled``)."""
    token = _ON_META.set(bool(enabled))
    try:
        yield
    finally:
        _ON_META.reset(token)


def creating_on_meta() -> bool:
    """Whether adapter layers should create their new weights on the meta device now."""
    return _ON_META.get()


def _base_device(model: nn.Module, key: str) -> Optional[torch.device]:
    """The device of the base layer of the adapter layer that holds ``key`` (its closest enclosing one)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            module = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        if hasattr(module, "base_layer") and isinstance(getattr(module, "adapter_layer_names", None), tuple):
            base = module.get_base_layer()
            for tensor in list(base.parameters()) + list(base.buffers()):
                if not tensor.is_meta:
                    return tensor.device
            return None
    return None


def materialize(model: nn.Module, key: str, target: torch.Tensor, value: torch.Tensor) -> None:
    """Put ``value`` in place of the meta parameter ``target`` found under state_dict key ``key`` of ``model``."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if getattr(owner, attr, None) is not target:
        raise RuntimeError(f"low_cpu_mem_usage: {key!r} is not a parameter of {type(owner).__name__} "
                           f"{owner_name!r}; cannot materialize it from the loaded weights")
    device = _base_device(model, key) or value.device
    new = nn.Parameter(value.detach().to(device=device, dtype=target.dtype, copy=True),
                       requires_grad=target.requires_grad)
    # ParameterDict and plain modules alike: setattr re-registers the parameter under the same name
    setattr(owner, attr, new)
