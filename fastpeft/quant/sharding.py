"""Packed quantized weights that FSDP2 and DeepSpeed ZeRO-3 shard (QLoRA under a sharding engine).

Sharding engines shard parameters; buffers stay whole on every rank (and DDP broadcasts buffers
from rank 0 at every forward). A QuantLinear keeps its packed codes as a buffer, so under FSDP2 a
QLoRA model trains correctly but every rank holds every packed weight. :func:`packed_as_parameters`
turns each QuantLinear's packed codes (its ``weight``: uint8 for nf4 / int4, int8 for int8) into a
frozen ``nn.Parameter`` of the same dtype, in place, before the model is wrapped; state_dict keys
and values do not change.

bitsandbytes stores its codes in a ``quant_storage`` float dtype because FSDP1 flattens all of a
unit's parameters into one tensor of one dtype. FSDP2 all-gathers parameters of mixed dtypes through
one uint8 buffer, so the codes shard in their own dtype and need no storage dtype. The statistics
(absmax / scales / code books) stay buffers: they are small, and as parameters a float cast (``.to(bf16)``,
FSDP2's ``MixedPrecisionPolicy(param_dtype=...)``) would change every dequantized value.

FSDP1 cannot hold integer codes next to float adapters in one flat parameter: it raises
"Must flatten tensors with uniform dtype". Under FSDP1 leave the codes as buffers (replicated).
"""
from __future__ import annotations

from torch import nn

from .linear import QuantLinear


def packed_as_parameters(model: nn.Module) -> int:
    """Make the packed codes of every QuantLinear in ``model`` a frozen parameter (in place, before wrapping
    the model with fully_shard / deepspeed.initialize); returns how many layers changed. Calling it again
    changes nothing. QuantLinear.set_quantized then needs a Parameter-compatible assignment, so quantize
    and load first, then call this."""
    changed = 0
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        codes = module._buffers.get("weight")
        if codes is None:
            continue
        del module._buffers["weight"]
        module.weight = nn.Parameter(codes, requires_grad=False)
        changed += 1
    return changed
