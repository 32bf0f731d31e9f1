"""LoRA over a QuantLinear base (QLoRA): the base stays packed, the adapters train.

Forward runs fastpeft.ops.lora over the packed base (dequantize + GEMM + LoRA as one op; dX flows through the
dequantized W, the packed weight gets no gradient). state_dict keys are the ones peft gives over a
bitsandbytes layer: ``<name>.base_layer.<packed buffers>``, ``<name>.lora_A.<adapter>.weight``, ...

Merging cannot add a float delta into packed codes. merge() therefore dequantizes the CURRENT packed
weight (never a cached float copy, which could be stale after a load_state_dict), adds the deltas,
and makes the base a 16-bit nn.Linear holding the result; merge_and_unload then returns that 16-bit
layer. With ``requantize_on_merge = True`` (see fastpeft.quant.merge_and_unload) the merged weight is
quantized again to the base's format, with a warning giving the measured max error. unmerge() puts
back the original QuantLinear object, so unmerge is exact.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ... import ops
from ...quant.linear import QuantLinear
from ..tuners_utils import adapters_to_merge
from .linear import Linear


class QuantLoraLinear(Linear):
    """LoRA around a fastpeft QuantLinear (nf4 / int8 / int4)."""

    requantize_on_merge = False  # per instance; set by fastpeft.quant.merge_and_unload(requantize=True)

    def __init__(self, base_layer: QuantLinear, adapter_name: str, **kwargs) -> None:
        kwargs.pop("fan_in_fan_out", None)  # a QuantLinear is always [out, in]
        super().__init__(base_layer, adapter_name, fan_in_fan_out=False, **kwargs)
        # The packed base while merged into a float copy. Kept outside _modules (object.__setattr__) so
        # that a merged layer's state_dict holds only the float base, as after a merge in peft.
        object.__setattr__(self, "_quant_base", None)

    def _op_base(self):
        base = self.get_base_layer()
        if not isinstance(base, QuantLinear):  # merged with requantize=False and then re-activated
            return super()._op_base()
        return ops.Base.quantized(base.quantized(), base.bias)  # the GEMM runs on the packed weight

    # -- merge ---------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = [n for n in adapters_to_merge(self, adapter_names) if self._has_adapter(n)]
        if not names:
            return
        base = self.get_base_layer()
        if not isinstance(base, QuantLinear):  # already a float copy (a second merge): plain add
            return super().merge(safe_merge=safe_merge, adapter_names=names)
        with torch.no_grad():
            w = base.dequantize(torch.float32)  # fresh from the packed buffers
            b = base.bias.detach().float() if base.bias is not None else None
            for name in names:
                w = self.lora_variant[name].merged_weight(self, name, w)
                bd = self._lora_bias_delta(name)
                if bd is not None:
                    if b is None:
                        raise ValueError(f"Cannot merge adapter {name!r}: it has a LoRA bias (lora_bias=True) but "
                                         f"the base QuantLinear has no bias to merge into.")
                    b = b + bd.float()
            if safe_merge and (not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {names} seems to be broken")
            dt = base.compute_dtype
            if self.requantize_on_merge:
                from ...quant.formats import dequantize, quantize_weight
                qw = quantize_weight(w.to(dt), base.fmt, blocksize=base.blocksize, double_quant=base.double_quant,
                                     group_size=base.blocksize,
                                     fp8_block_size=(base.block_n, base.blocksize) if base.fmt == "fp8" else 128)
                err = (dequantize(qw, torch.float32) - w).abs().max().item()
                warnings.warn(f"Re-quantized the merged weight [{base.out_features}, {base.in_features}] to "
                              f"{base.fmt}: max abs error against the 16-bit merge {err:.3g}", UserWarning)
                new = QuantLinear.from_quantized(qw, b.to(dt) if b is not None else None, compute_dtype=dt)
            else:
                new = nn.Linear(base.in_features, base.out_features, bias=b is not None, device="meta")
                new.weight = nn.Parameter(w.to(dt), requires_grad=False)
                if b is not None:
                    new.bias = nn.Parameter(b.to(dt), requires_grad=False)
        if self._quant_base is None:  # after a re-quantizing merge, keep the original base for unmerge
            object.__setattr__(self, "_quant_base", base)
        self.base_layer = new
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Put back the packed base exactly as it was before the first merge."""
        if not self.merged_adapters:
            return
        if self._quant_base is None:
            return super().unmerge()
        float_base = self.get_base_layer()
        self.base_layer = self._quant_base.to(float_base.weight.device)
        object.__setattr__(self, "_quant_base", None)
        self.merged_adapters.clear()
