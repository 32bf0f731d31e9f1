"""Speed up an existing *HF peft* PeftModel in place: ``accelerate(peft_model)``.

Each eligible ``peft.tuners.lora.Linear`` keeps its identity (class, attributes, parameters, hooks),
only its ``forward`` is rebound on the instance to one that runs the base GEMM and the LoRA update
through fastpeft.ops. So state_dict keys, isinstance checks, peft's save/load, merge/unmerge,
set_adapter and disable_adapter all keep working; ``restore(peft_model)`` undoes it.

Eligible: a float (fp16/bf16/fp32) nn.Linear or transformers Conv1D base layer, plain nn.Dropout /
nn.Identity LoRA dropout, any number of adapters, DoRA adapters included (the op computes the norm).
Everything else is left alone and listed with the reason in the returned report (LoRA variants,
lora_bias, quantized or unknown base layers, embeddings, convolutions, ...). At call time the fast
forward hands back to peft's own forward for what it does not cover (extra forward arguments such as
``adapter_names``, x/weight dtype mismatch outside autocast, adapters on another device, several
active adapters with DoRA among them).
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ... import ops
from ..tuners_utils import is_hf_conv1d

_MARK = "_fastpeft_accelerated"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class AccelerateReport:
    """What ``accelerate`` did: how many LoRA layers now run on fastpeft.ops, and what it left alone."""
    swapped: int = 0
    swapped_modules: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (module name, reason)
    note: str = ""  # set when there was nothing to do, saying why


    def __str__(self) -> str:
        lines = [f"fastpeft.accelerate: {self.swapped} LoRA layer(s) accelerated, {len(self.skipped)} left alone"]
        lines += [f"  left alone: {name}: {reason}" for name, reason in self.skipped]
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


def _peft_lora_classes():
    try:
        from peft.tuners.lora.layer import Linear as PeftLinear
        from peft.tuners.lora.layer import LoraLayer as PeftLoraLayer
    except ImportError as e:  # the function is about peft models; say so plainly
        raise ImportError("fastpeft.tuners.lora.accelerate needs the `peft` package (it speeds up HF peft "
                          "models in place)") from e
    return PeftLinear, PeftLoraLayer


def _why_not(module: nn.Module, peft_linear: type) -> Optional[str]:
    """None when ``module`` can run on fastpeft.ops, else the reason it cannot."""
    if type(module) is not peft_linear:
        kind = type(module).__name__
        if "Embedding" in kind:
            return f"embedding LoRA ({kind}): a lookup, nothing to fuse"
        if "Conv" in kind:
            return f"convolution LoRA ({kind}) is not supported"
        return f"LoRA layer type {type(module).__module__}.{kind} (quantized or unknown) is not supported"
    # peft keeps a variant object per adapter that is not plain LoRA; DoRA's is the one the op runs
    variants = {n: v for n, v in (getattr(module, "lora_variant", None) or {}).items()
                if not (getattr(module, "use_dora", {}).get(n) and type(v).__name__ == "DoraLinearVariant")}
    if variants:
        return f"LoRA variant {sorted(variants)} ({type(next(iter(variants.values()))).__name__})"
    if any(getattr(module, "lora_bias", {}).values()):
        return "lora_bias=True adapter"
    base = module.get_base_layer()
    if type(base) is nn.Linear:
        if module.fan_in_fan_out:
            return "fan_in_fan_out=True on an nn.Linear base"
    elif is_hf_conv1d(base):
        if not module.fan_in_fan_out:
            return "Conv1D base with fan_in_fan_out=False"
    else:
        return f"base layer type {type(base).__module__}.{type(base).__name__} (quantized or unknown)"
    w = getattr(base, "weight", None)
    if w is None or w.dtype not in _FLOAT_DTYPES:
        return f"base weight dtype {None if w is None else w.dtype} (need fp16, bf16 or fp32)"
    for name, drop in module.lora_dropout.items():
        if type(drop) not in (nn.Dropout, nn.Identity):
            return f"LoRA dropout of adapter {name!r} is {type(drop).__name__} (need nn.Dropout/nn.Identity)"
    return None


def autocast_inputs(x: torch.Tensor, weight: torch.Tensor, bias):
    """x, weight and bias cast the way torch.autocast casts nn.Linear's inputs (to decide below whether
    the fused op can take the call; fastpeft.ops.lora applies the same casts itself)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x = x.to(dt)
        weight = weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    return x, weight, bias


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft lora.Linear forward with the base GEMM and LoRA updates done by fastpeft.ops."""
    slow = type(self).forward
    if args or kwargs or self.disable_adapters or self.merged:
        # peft's own forward already does the right thing (unmerge on disable, base-only when merged,
        # mixed-batch adapter_names, ...)
        return slow(self, x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    base = self.get_base_layer()
    weight = base.weight
    if self.fan_in_fan_out:
        weight = weight.t()  # Conv1D stores [in, out]; ops wants [out, in] (a view, no copy)
    x, weight, bias = autocast_inputs(x, weight, base.bias)
    dora = [a for a in active if self.use_dora.get(a)]
    if (not active or x.dtype != weight.dtype or (dora and len(active) > 1)
            or any(self.lora_A[a].weight.device != x.device for a in active)):
        # (several active adapters with DoRA among them: peft chains them; its own forward does that)
        return slow(self, x, *args, **kwargs)
    adapters = []
    for name in active:
        drop = self.lora_dropout[name]
        p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        m = self.lora_magnitude_vector[name].weight if name in dora else None  # DoRA: the op computes the norm
        adapters.append(ops.Adapter(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p,
                                    magnitude=m))
    # one op for the base GEMM and every active adapter, as fastpeft's own layers do
    return ops.lora(x, ops.Base.dense(weight, bias), adapters, self.training, fn="accelerated peft lora.Linear")


def accelerate(peft_model: nn.Module) -> AccelerateReport:
    """Rebind the forward of every eligible peft LoRA Linear in ``peft_model`` to fastpeft.ops.

    Works in place and returns an AccelerateReport. Calling it again is harmless (already
    accelerated layers are counted again, not wrapped twice).
    """
    peft_linear, peft_lora_layer = _peft_lora_classes()
    report = AccelerateReport()
    for name, module in peft_model.named_modules():
        if not isinstance(module, peft_lora_layer):
            continue
        reason = _why_not(module, peft_linear)
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        if not getattr(module, _MARK, False):
            module.forward = types.MethodType(_fast_forward, module)
            setattr(module, _MARK, True)
        report.swapped += 1
        report.swapped_modules.append(name)
    if report.swapped == 0 and not report.skipped:
        report.note = (f"no HF peft LoRA layer found in this {type(peft_model).__name__}: accelerate() speeds up "
                       f"models made by peft's get_peft_model/PeftModel.from_pretrained (fastpeft's own "
                       f"models already run on fastpeft.ops)")
    return report


def restore(peft_model: nn.Module) -> int:
    """Undo ``accelerate``: give the layers back peft's own forward. Returns how many were restored."""
    n = 0
    for module in peft_model.modules():
        if getattr(module, _MARK, False):
            del module.forward
            delattr(module, _MARK)
            n += 1
    return n
