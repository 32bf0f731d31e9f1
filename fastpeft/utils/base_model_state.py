"""get_base_model_state_dict: the base model's own state dict out of a PeftModel, under the original keys.

peft's function of the same name: adapter tensors are left out (everything of a LoRA layer except its
``base_layer``; the per-adapter copies of a modules_to_save wrapper) and the infixes the adapters put into
the keys are taken out again (``q_proj.base_layer.weight`` -> ``q_proj.weight``,
``score.original_module.weight`` -> ``score.weight``), so the result loads into the model as it was
before get_peft_model. A prompt-learning model does not change the base model: its state dict as it is.

The walk follows the module tree (not string rules), so a module of the user's that happens to be called
``base_layer`` keeps its name.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["get_base_model_state_dict"]


def _original_key(root: nn.Module, key: str) -> Optional[str]:
    """``key`` of ``root.state_dict()`` without adapter infixes, or None for an adapter tensor."""
    # imported here: save_and_load re-exports this module's function (peft's module path), so the two
    # modules must import in either order
    from .save_and_load import is_lora_layer, is_modules_to_save_wrapper

    parts = key.split(".")
    kept = []
    current: Optional[nn.Module] = root
    for i, part in enumerate(parts):
        child = current._modules.get(part) if current is not None else None
        if current is not None and is_lora_layer(current):
            if part != "base_layer":
                return None  # lora_A / lora_B / magnitudes / ...: the adapter's
            current = child
            continue
        if current is not None and is_modules_to_save_wrapper(current):
            if part != "original_module":
                return None  # the per-adapter trained copies
            current = child
            continue
        kept.append(part)
        current = child
    return ".".join(kept)


def get_base_model_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of ``model``'s base model (a fastpeft PeftModel) with its original keys."""
    if model.__dict__.get("_is_prompt_learning"):
        return dict(model.base_model.state_dict())
    root = model.get_base_model()
    out = {}
    for key, value in root.state_dict().items():
        original = _original_key(root, key)
        if original is not None:
            out[original] = value
    return out
