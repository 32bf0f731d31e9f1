"""Optimizers for LoRA training, as peft 0.21.2's ``peft.optimizers`` (same functions, arguments and groups).

- :func:`create_loraplus_optimizer` (LoRA+): lora_B (and 1-D parameters) at ``lr * loraplus_lr_ratio``;
- :func:`create_lorafa_optimizer` (LoRA-FA): lora_A frozen, lora_B's gradient projected, AdamW;
- :func:`create_riemannian_optimizer`: r x r preconditioned gradients for lora_A / lora_B, any base optimizer.

They read parameter names and the LoRA layers' ``scaling`` only, so they work on fastpeft and peft models alike.
"""
from .lorafa import LoraFAOptimizer, create_lorafa_optimizer
from .loraplus import create_loraplus_optimizer
from .riemannian import create_riemannian_optimizer

__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer", "create_loraplus_optimizer", "create_riemannian_optimizer"]
