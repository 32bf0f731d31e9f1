"""``init_lora_weights="loftq"``: LoftQConfig and the per-layer LoftQ initialisation (peft 0.21.2 behaviour).

The algorithm is in fastpeft/utils/loftq_utils.py. A layer initialised this way keeps a float base weight that
holds the dequantized nf4 (or int8) values, and LoRA weights that absorb the quantization error; the model is
then saved and loaded in 4 bits. As in peft, only LoRA on ``torch.nn.Linear`` runs it: peft's Embedding and
Conv layers fail on it (they call their loftq_init without the config) and its Conv1D path builds lora_A from
the [in, out] weight untransposed, so fastpeft refuses those layers by name instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LoftQConfig", "loftq_layer_init"]


@dataclass
class LoftQConfig:
    """LoftQ settings (``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))``).

    loftq_bits: 4 (nf4) or 8 (int8) bit quantization of the base weight.
    loftq_iter: alternating quantize / low-rank steps.
    """

    loftq_bits: int = field(default=4, metadata={"help": "Quantization bits for LoftQ"})
    loftq_iter: int = field(default=1, metadata={"help": "Alternating iterations for LoftQ"})


def _setting(loftq_config: Any, key: str) -> int:
    value = loftq_config.get(key) if isinstance(loftq_config, dict) else getattr(loftq_config, key, None)
    if value is None:
        # peft indexes the dict and fails with a bare KeyError; name the key and what is expected instead
        raise ValueError(f"loftq_config needs {key!r} (LoftQConfig: loftq_bits 4 or 8, loftq_iter >= 1); "
                         f"got {loftq_config!r}")
    return value


def loftq_layer_init(layer, adapter_name: str, loftq_config: Any) -> None:
    """LoftQ for ``adapter_name`` of a LoRA layer: lora_A, lora_B from LoftQ and the base weight replaced by its
    dequantized quantization (in the base weight's dtype and device)."""
    from ...quant.linear import QuantLinear
    from ...utils.loftq_utils import loftq_init
    from .linear import Linear

    base = layer.get_base_layer()
    kind = type(layer).__name__
    if not isinstance(layer, Linear) or getattr(layer, "fan_in_fan_out", False) or isinstance(base, QuantLinear):
        where = ("an already quantized base (use replace_lora_weights_loftq for that)" if isinstance(base, QuantLinear)
                 else f"lora.{kind} over {type(base).__name__}")
        raise NotImplementedError(f"init_lora_weights='loftq' on {where}: LoftQ initialises LoRA on "
                                  f"torch.nn.Linear layers only (as in peft, whose other layer types fail on it)")
    if not loftq_config:
        raise ValueError("init_lora_weights='loftq' needs a non-empty `loftq_config` (LoftQConfig)")
    qweight, lora_A, lora_B = loftq_init(base.weight, num_bits=_setting(loftq_config, "loftq_bits"),
                                         reduced_rank=layer.r[adapter_name],
                                         num_iter=_setting(loftq_config, "loftq_iter"))
    with torch.no_grad():
        layer.lora_A[adapter_name].weight.data = lora_A
        layer.lora_B[adapter_name].weight.data = lora_B
        base.weight.data = qweight
