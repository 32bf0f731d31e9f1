"""LoRA-GA preprocessing (peft's ``preprocess_loraga``): estimate each targeted layer's full weight
gradient with the user's training step, and attach it as ``_peft_loraga_grad`` (peft's attribute);
``get_peft_model(..., init_lora_weights="lora_ga")`` then builds the adapters from its SVD (inits.py).

Same results as peft 0.21.2 for the same model and train step: only the targeted weights require
grad during the step, the accumulated gradient is divided by the number of backward passes through
each layer, and a cache file uses peft's keys ("<module>._peft_loraga_grad").
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import nn

from ...utils.constants import LORA_DEFAULT_TARGET_MODULES
from ..tuners_utils import is_hf_conv1d, target_matches

__all__ = ["estimate_gradients", "preprocess_loraga"]


def _targets(model: nn.Module, config):
    for name, module in model.named_modules():
        if name and target_matches(config, name) and (isinstance(module, nn.Linear) or is_hf_conv1d(module)):
            yield name, module


def _device(model: nn.Module):
    model = getattr(model, "module", model)
    return next(iter(model.parameters())).device


@torch.no_grad()
def preprocess_loraga(model: nn.Module, lora_config, train_step: Callable[[], None],
                      cache_file: Optional[str] = None) -> None:
    """Attach ``_peft_loraga_grad`` (the mean gradient of ``weight`` over train_step's backward passes)
    to every targeted nn.Linear / Conv1D of ``model`` (before get_peft_model)."""
    if lora_config.lora_ga_config is None:
        raise ValueError("If you want to use LoRA-GA, please initialize the LoraConfig with "
                         "init_lora_weights='lora_ga' and lora_ga_config=LoraGAConfig(...).")
    if lora_config.target_modules is None:  # get_peft_model fills these in later; the targets are needed now
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in LORA_DEFAULT_TARGET_MODULES:
            raise ValueError("Please specify `target_modules` in `peft_config`")
        lora_config.target_modules = set(LORA_DEFAULT_TARGET_MODULES[model_type])
    for name, module in _targets(model, lora_config):
        if hasattr(module, "quant_state"):
            raise ValueError(f"LoRA-GA does not support quantized models. Found quantized module: '{name}'. "
                             "LoRA-GA requires full-precision gradients during preprocessing.")
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        cache = torch.load(cache_file, map_location=_device(model))
        for name, module in _targets(model, lora_config):
            key = f"{name}._peft_loraga_grad"
            if key not in cache:
                raise KeyError(f"LoRA-GA cache file {cache_file!r} has no entry {key!r}")
            module._peft_loraga_grad = cache[key]
        return
    estimate_gradients(model, lora_config, train_step)
    if cache_file is not None:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        torch.save({f"{n}._peft_loraga_grad": m._peft_loraga_grad for n, m in _targets(model, lora_config)
                    if hasattr(m, "_peft_loraga_grad")}, cache_file)


def estimate_gradients(model: nn.Module, lora_config, train_step: Callable[[], None]) -> None:
    was_training = model.training
    model.train()
    targets = list(_targets(model, lora_config))
    if not targets:
        raise ValueError("No supported layers found for LoRA-GA initialization. LoRA-GA only supports nn.Linear "
                         "and Conv1D layers. Please ensure your model contains at least one of these layer types "
                         "in target_modules.")
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad = False
    counts = {id(m): 0 for _, m in targets}

    def count(module, grad_input, grad_output):
        counts[id(module)] += 1

    hooks = []
    for _, module in targets:
        module.weight.requires_grad = True
        hooks.append(module.register_full_backward_hook(count))
    try:
        with torch.enable_grad():
            train_step()
    finally:
        for h in hooks:
            h.remove()
        for n, p in model.named_parameters():
            if n in saved:
                p.requires_grad = saved[n]
    for _, module in targets:
        if counts[id(module)] > 0:
            module._peft_loraga_grad = module.weight.grad.detach() / counts[id(module)]
        module.weight.grad = None
    if not was_training:
        model.eval()
