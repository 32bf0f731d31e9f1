"""LoRA-FA (https://huggingface.co/papers/2308.03303): lora_A frozen, lora_B trained with a projected gradient.

peft 0.21.2's optimizer, learned by running it: AdamW ("adamw-hf": bias correction, decoupled weight decay
applied after the step, eps 1e-6) on every parameter with a gradient, except that for each LoRA pair the
update of B uses

    g_B' = (1 / s^2) g_B (A A^T + 1e-8 I)^+        (s: the layer's scale for that adapter)

computed under bfloat16 autocast where bf16 is available (always on CPU), as peft does, and A gets no update.
Pairs are lora_A / lora_B weights of one layer and adapter (and lora_embedding_A / lora_embedding_B); they are
matched by name, not by position. Other LoRA parameters (DoRA's magnitude, lora_B's bias) are refused: peft
pairs LoRA parameters by their order and would mix them into the wrong pair.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer"]

_PAIR = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}
_DELTA = 1e-8


def _bf16_autocast_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def _split(name: str):
    """("<layer>", "lora_A", "<adapter>") for a LoRA weight name, else None."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") and i + 1 < len(parts):
            rest = parts[i + 2:]
            if rest in ([], ["weight"]):
                return ".".join(parts[:i]), p, parts[i + 1]
            return None
    return None


class LoraFAOptimizer(Optimizer):
    """AdamW whose LoRA pairs get LoRA-FA's projected update of B (module docstring).

    Each param group needs ``names`` (one per parameter) and ``scaling_factors`` (the LoRA scale of each
    lora_B / lora_embedding_B, None elsewhere; peft's deprecated single ``scaling_factor`` is accepted too).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        for i in (0, 1):
            if not 0.0 <= betas[i] < 1.0:
                raise ValueError(f"Invalid beta parameter: {betas[i]} - should be in [0.0, 1.0)")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} - should be >= 0.0")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))
        self._warned_scaling_factor = False

    def _scales(self, group: dict) -> list:
        if "scaling_factors" in group:
            return group["scaling_factors"]
        if "scaling_factor" in group:
            if not self._warned_scaling_factor:
                warnings.warn("`scaling_factor` is deprecated and will be removed after 2026-11-01. Please use "
                              "`scaling_factors` instead.", FutureWarning)
                self._warned_scaling_factor = True
            return [group["scaling_factor"]] * len(group["params"])
        raise KeyError("Expected optimizer param group to define `scaling_factors`.")

    def _adam(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)
        if group["weight_decay"] > 0.0:  # decoupled, after the step (peft's order)
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            names, params = group["names"], group["params"]
            scales = self._scales(group)
            by_name = dict(zip(names, params))
            for p, name, scale in zip(params, names, scales):
                split = _split(name)
                if split is None:
                    if p.grad is not None:
                        self._adam(group, p, p.grad)
                    continue
                layer, kind, adapter = split
                if kind in _PAIR:  # A: frozen (LoRA-FA); its pair's B step reads it
                    continue
                a_kind = "lora_A" if kind == "lora_B" else "lora_embedding_A"
                a_name = next((n for n in (f"{layer}.{a_kind}.{adapter}.weight", f"{layer}.{a_kind}.{adapter}")
                               if n in by_name), None)
                if a_name is None or p.grad is None:
                    continue
                A = by_name[a_name]
                eye = torch.eye(A.shape[0], device=A.device, dtype=A.dtype)
                inv = torch.linalg.pinv(A @ A.T + _DELTA * eye)
                if _bf16_autocast_ok(p.device):
                    with torch.autocast(device_type=p.device.type, dtype=torch.bfloat16):
                        grad = (1 / scale ** 2) * (p.grad @ inv)
                else:
                    grad = (1 / scale ** 2) * (p.grad @ inv)
                self._adam(group, p, grad.to(p.grad.dtype))
        return loss


def create_lorafa_optimizer(model: nn.Module, r: int, lora_alpha: int, lr: float, weight_decay: float = 0.0,
                            use_rslora: Optional[bool] = None) -> Optimizer:
    """peft's ``create_lorafa_optimizer``: freeze every lora_A, one param group over all named parameters
    (lr, betas (0.9, 0.999), weight_decay) with each lora_B's layer scale, and a LoraFAOptimizer over it.

    r, lora_alpha (and the deprecated use_rslora) give the group's legacy ``scaling_factor``; the update uses
    each layer's own scale (rank_pattern / alpha_pattern included)."""
    configs = getattr(model, "peft_config", {}) or {}
    active = [a for a in getattr(model, "active_adapters", []) if a in configs]
    rslora = {a: bool(getattr(configs[a], "use_rslora", False)) for a in active}
    if use_rslora is not None:
        mismatched = [a for a, v in rslora.items() if v != use_rslora]
        if mismatched:
            raise ValueError(f"`use_rslora={use_rslora}` was passed to create_lorafa_optimizer, but the following "
                             f"active adapters have `use_rslora` set differently in the model config: {mismatched}. "
                             f"Please configure rsLoRA via LoraConfig and remove the `use_rslora` argument from "
                             f"create_lorafa_optimizer as the parameter is deprecated.")
        warnings.warn("`use_rslora` in create_lorafa_optimizer is deprecated and will be removed after 2026-11-01. "
                      "Please configure rsLoRA via LoraConfig instead.", FutureWarning)
    else:
        use_rslora = all(rslora.values()) if rslora else False

    named = list(model.named_parameters())
    for name, p in named:
        if "lora" in name and _split(name) is None and p.requires_grad:
            raise ValueError(f"create_lorafa_optimizer: parameter {name!r} is a LoRA parameter other than the "
                             f"lora_A / lora_B weights (DoRA magnitude, LoRA bias, ...); LoRA-FA is defined for "
                             f"the A / B pairs only (peft pairs LoRA parameters by position and would mix it in)")
        if "lora_A" in name:
            p.requires_grad_(False)

    def scale_of(name: str):
        split = _split(name)
        if split is None:
            return None
        module = model.get_submodule(split[0])
        scaling = getattr(module, "scaling", None)
        return scaling.get(split[2]) if isinstance(scaling, dict) else None

    group = {
        "params": [p for _, p in named],
        "lr": lr,
        "names": [n for n, _ in named],
        "scaling_factors": [scale_of(n) for n, _ in named],
        "scaling_factor": lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r,  # peft's legacy field
        "betas": (0.9, 0.999),
        "weight_decay": weight_decay,
    }
    return LoraFAOptimizer([group])
