"""QA-LoRA (peft's ``use_qalora=True``): the LoRA branch sees the input average-pooled in groups along K.

peft (0.21.2) applies it to GPTQ layers only (fastpeft: an int4 QuantLinear base, the format GPTQ and AWQ
import to); on every other layer peft ignores ``use_qalora`` and so does fastpeft. With g = qalora_group_size
and G = K / g groups, lora_A is stored as [r, G] (peft's file shape) and peft computes

    S = (mean over each group of x) * G @ A^T

That is a plain LoRA term with the expanded A_e [r, K], A_e[:, k] = A[:, k // g] * G / g: so the forward is
the usual single fused op (base GEMM + LoRA) with A_e, gradients reach A through the expansion, and dropout
on x (before the pooling, as in peft) is the op's own. Merging adds s B A_e (peft refuses to merge QA-LoRA;
its GPTQ layers cannot merge at all).
"""
from __future__ import annotations

import torch
from torch import nn

from .plain import PlainLora


def uses_qalora(layer) -> bool:
    """True for the layers peft runs QA-LoRA on: LoRA over an int4 (GPTQ-like) QuantLinear."""
    from ....quant.linear import QuantLinear

    base = layer.get_base_layer()
    return isinstance(base, QuantLinear) and base.fmt == "int4"


class QALora(PlainLora):
    name = "qalora"

    def __init__(self, group_size: int) -> None:
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"qalora_group_size must be a positive int; got {group_size!r}")
        self.group_size = group_size

    def init_adapter(self, layer, adapter_name: str) -> None:
        """lora_A becomes nn.Linear(K / g, r) (peft's init: a fresh nn.Linear, Kaiming-uniform)."""
        K, g = layer.in_features, self.group_size
        if K % g:
            raise ValueError(f"`use_qalora=True` requires `module.in_features` ({K}) to be divisible by "
                             f"'qalora_group_size' ({g})")
        old = layer.lora_A[adapter_name]
        layer.lora_A[adapter_name] = nn.Linear(K // g, old.out_features, bias=False, device=old.weight.device,
                                               dtype=old.weight.dtype)

    def op_weights(self, layer, adapter_name: str) -> tuple:
        A, B = layer._adapter_weights(adapter_name)
        K, g = layer.in_features, self.group_size
        if A.shape[1] * g != K:
            raise ValueError(f"QA-LoRA adapter {adapter_name!r}: lora_A is {tuple(A.shape)}, expected "
                             f"[r, in_features / qalora_group_size = {K // g}]")
        # the pooling (mean over g, times G = K / g) folded into A: one factor per column
        return torch.repeat_interleave(A, g, dim=1) * ((K // g) / g), B

    def __repr__(self) -> str:
        return f"QALora(group_size={self.group_size})"
