"""LoRA on transformers' Conv1D (GPT-2 style linear layers storing the weight as [in, out]).

The base weight is fed to fastpeft.ops as a transposed view, so no copy of it is made; merging
transposes the [out, in] delta back. The layer is a lora ``Linear`` with ``fan_in_fan_out=True``,
which is what peft uses for Conv1D too (same attributes, same state_dict keys).
"""
from __future__ import annotations

from torch import nn

from .linear import Linear


class Conv1D(Linear):
    _peft_layer_name = "Linear"  # peft wraps Conv1D in its lora.Linear (fan_in_fan_out=True): same repr

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        # a Conv1D weight is always stored [in, out]: the flag is a property of the layer type
        kwargs["fan_in_fan_out"] = True
        super().__init__(base_layer, adapter_name, **kwargs)

    @staticmethod
    def _base_features(base_layer: nn.Module) -> tuple[int, int]:
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features
