"""Riemannian-preconditioned LoRA (https://huggingface.co/papers/2402.02347), as peft 0.21.2's
``create_riemannian_optimizer``: before each step of any base optimizer, the gradients of every trainable
lora_A / lora_B weight pair are preconditioned with r x r matrices,

    g_A <- (B^T B + reg I)^+ g_A,      g_B <- g_B (A A^T + reg I)^+

in at least fp32 (the result cast back to the gradient's dtype). Other parameters (DoRA magnitudes, biases,
LoRA embeddings) are stepped by the base optimizer unchanged.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["create_riemannian_optimizer"]


def _lora_pairs(model: nn.Module) -> list:
    """(lora_A, lora_B) weight pairs matched by name (".lora_A." -> ".lora_B."), 2-D and both trainable."""
    params = dict(model.named_parameters())
    pairs = []
    for name, a in params.items():
        if ".lora_A." not in name:
            continue
        b = params.get(name.replace(".lora_A.", ".lora_B."))
        if b is not None and a.ndim == 2 and b.ndim == 2 and a.requires_grad and b.requires_grad:
            pairs.append((a, b))
    return pairs


def _damped_pinv(m: torch.Tensor, reg: float) -> torch.Tensor:
    return torch.linalg.pinv(m + reg * torch.eye(m.shape[-1], device=m.device, dtype=m.dtype))


@torch.no_grad()
def _precondition(pairs: list, reg: float) -> None:
    for pa, pb in pairs:
        ga, gb = pa.grad, pb.grad
        if ga is None and gb is None:
            continue
        acc = torch.promote_types(pa.dtype, torch.float32)
        a, b = pa.detach().to(acc), pb.detach().to(acc)
        if ga is not None:
            ga.copy_((_damped_pinv(b.T @ b, reg) @ ga.to(acc)).to(ga.dtype))
        if gb is not None:
            gb.copy_((gb.to(acc) @ _damped_pinv(a @ a.T, reg)).to(gb.dtype))


def create_riemannian_optimizer(model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, reg: float = 1e-2,
                                **kwargs) -> Optimizer:
    """An ``optimizer_cls`` (a subclass of it) over the model's trainable parameters whose step() first
    preconditions the LoRA gradients (module docstring). kwargs go to the optimizer. Closures are refused:
    they recompute the gradients inside step(), after the preconditioning."""
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(f"optimizer_cls must be a subclass of torch.optim.Optimizer, got {optimizer_cls!r}.")
    pairs = _lora_pairs(model)
    if not pairs:
        raise ValueError("create_riemannian_optimizer did not find any trainable lora_A/lora_B parameter pairs on "
                         "the model. The Riemannian preconditioner only applies to LoRA-style adapters.")
    closure = inspect.signature(optimizer_cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(f"{optimizer_cls.__name__} requires a closure and re-evaluates the objective inside "
                         f"step(); the Riemannian preconditioner would be recomputed each iteration, invalidating "
                         f"the optimizer's curvature or line-search state. Use an optimizer whose step() has an "
                         f"optional closure (SGD, AdamW, etc).")

    class RiemannianPreconditionedOptimizer(optimizer_cls):
        @torch.no_grad()
        def step(self, closure: Optional[Callable] = None):
            if closure is not None:
                raise ValueError("The Riemannian-preconditioned optimizer does not support closures. Closures "
                                 "re-evaluate the objective inside step(), which would overwrite the preconditioned "
                                 "gradients before the base optimizer consumes them.")
            _precondition(pairs, reg)
            return super().step()

    return RiemannianPreconditionedOptimizer([p for p in model.parameters() if p.requires_grad], lr=lr, **kwargs)
