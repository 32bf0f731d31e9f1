"""LoRA+ (https://huggingface.co/papers/2402.12354): a larger learning rate for lora_B than for lora_A.

peft's parameter groups, in its order (an optimizer's state and a scheduler's lrs follow the group order):

  0 "A"          every trainable parameter not below                       lr,                      weight decay wd
  1 embedding    parameters held by a LoRA *embedding* layer's dicts       loraplus_lr_embedding,   wd
  2 B            names with "lora_B" and 1-D parameters, decayed ones      lr * loraplus_lr_ratio,  wd
  3 B no decay   the same, not decayed (biases, LayerNorm parameters)      lr * loraplus_lr_ratio,  0

"Decayed" is transformers' Trainer rule: not inside a torch.nn.LayerNorm and without "bias" in the name.
"""
from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

__all__ = ["create_loraplus_optimizer"]


def _decayed_names(module: nn.Module, prefix: str = "") -> set:
    """Names of parameters outside LayerNorm modules (the Trainer's weight-decay rule), every path to them."""
    out = set()
    for name, child in module.named_children():
        if isinstance(child, nn.LayerNorm):
            continue
        out |= _decayed_names(child, f"{prefix}{name}.")
    out |= {prefix + k for k, p in module._parameters.items() if p is not None}
    return out


def _is_lora_embedding(model: nn.Module, param_name: str) -> bool:
    """The parameter sits in a ModuleDict / ParameterDict (two name parts) of a LoRA embedding layer."""
    from ..tuners.lora.layer import LoraLayer

    owner = ".".join(param_name.split(".")[:-2])
    if not owner:
        return False
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    return isinstance(module, LoraLayer) and bool(getattr(module, "_is_embedding", False))


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, loraplus_lr_ratio: float,
                              **kwargs) -> Optimizer:
    """``optimizer_cls`` over the model's trainable parameters in LoRA+'s four groups (module docstring).

    kwargs: ``loraplus_weight_decay`` (default 0.0), ``loraplus_lr_embedding`` (default 1e-6); the rest go to
    the optimizer. bitsandbytes' 8-bit Adam variants keep nn.Embedding weights in 32-bit optimizer state (peft).
    """
    decayed = {n for n in _decayed_names(model) if "bias" not in n}
    groups: dict = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_lora_embedding(model, name):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decayed else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    kwargs["lr"] = lr
    param_groups = [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    optimizer = optimizer_cls(param_groups, **kwargs)
    if optimizer_cls.__name__ in ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"):
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
