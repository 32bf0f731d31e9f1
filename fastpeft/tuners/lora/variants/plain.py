"""Plain LoRA: y = base(x) + s * dropout(x) A^T B^T, delta W = s * B A."""
from __future__ import annotations

import torch

from .... import ops
from .base import LoraVariant


class PlainLora(LoraVariant):
    name = "lora"

    def op_adapter(self, layer, adapter_name: str) -> ops.Adapter:
        A, B = layer._adapter_weights(adapter_name)
        return ops.Adapter(A, B, layer.scaling[adapter_name], layer._dropout_p(adapter_name))

    def delta_weight(self, layer, adapter_name: str) -> torch.Tensor:
        A, B = layer._adapter_weights(adapter_name)
        return ops.lora_delta_weight(A, B, layer.scaling[adapter_name])
