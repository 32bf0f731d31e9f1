"""Training helpers that QLoRA recipes call before get_peft_model."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _is_quantized(model: nn.Module) -> bool:
    from ..quant import QuantLinear  # lazy: fastpeft.quant imports ops

    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return True  # quantized by transformers/bitsandbytes
    return any(isinstance(m, QuantLinear) for m in model.modules())


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None) -> nn.Module:
    """Get a quantized model ready for LoRA training (peft's function of the same name).

    - Freezes every parameter: only the adapters added afterwards train.
    - On a quantized model (fastpeft QuantLinear layers, or transformers' 4/8-bit loading), casts the
      remaining 16-bit parameters (norms, embeddings, head) to fp32, so their gradients and the
      activations they produce stay stable in training; packed weights are buffers and stay packed.
    - With use_gradient_checkpointing: makes the input embeddings' output require grad (so the
      checkpointed blocks of a frozen model still get gradients) and turns checkpointing on.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if _is_quantized(model):
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(f"use_gradient_checkpointing=True, but {type(model).__name__} has no "
                             f"gradient_checkpointing_enable(); pass use_gradient_checkpointing=False")
        kwargs = {"use_reentrant": True} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
