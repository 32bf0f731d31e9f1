"""Plain LoRA: y = base(x) + s * dropout(x) A^T B^T, delta W = s * B A."""
from __future__ import annotations

import torch

from .... import ops
from .base import LoraVariant


class PlainLora(LoraVariant):
    name = "lora"

    # both read op_weights: a variant that only stores A or B in another shape (QA-LoRA, BD-LoRA) overrides
    # that alone
    def op_adapter(self, layer, adapter_name: str) -> ops.Adapter:
        A, B = self.op_weights(layer, adapter_name)
        return ops.Adapter(A, B, layer.scaling[adapter_name], layer._dropout_p(adapter_name))

    def delta_weight(self, layer, adapter_name: str) -> torch.Tensor:
        A, B = self.op_weights(layer, adapter_name)
        return ops.lora_delta_weight(A, B, layer.scaling[adapter_name])
