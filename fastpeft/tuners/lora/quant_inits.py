"""Weight-derived LoRA inits on a QuantLoraLinear (packed nf4 / int8 / int4 base), as peft 0.21.2 does them.

What peft 0.21.2 does on bitsandbytes layers was learned by running it (bitsandbytes 0.50.2, CPU) on the same
weights; tests/tuners/test_quant_inits.py compares the tensors:

- ``"olora"`` (any case) is the only weight-derived init peft runs on a quantized layer. It dequantizes the
  packed weight (4-bit: in the quant state's dtype, i.e. the layer's compute dtype; 8-bit: fp32), takes
  Q, R = qr(W) in fp32, sets B = Q[:, :r], A = R[:r], and re-quantizes the fp32 residual W - s B A into a new
  packed weight of the same kind (4-bit: same quant type and double quantization; 8-bit: LLM.int8's row-wise
  absmax after a cast to fp16). Here the residual goes back into the layer's own format and settings (nf4:
  bitsandbytes' codes to the bit, so lora_A, lora_B and the dequantized residual equal peft's at bitsandbytes'
  block size 64; int8: fastpeft's row-wise int8, within one quantization step of bnb's). Two differences,
  both deliberate: peft re-quantizes at bitsandbytes' default block size 64 whatever the layer had (it does not
  pass the block size on), fastpeft keeps the layer's block size; and int4 (GPTQ / AWQ layers, for which peft
  has no OLoRA path) is refused.
- ``"pissa"`` / ``"pissa_niter_<n>"``, ``"corda"``, ``"mica"``: peft checks the base weight's dtype first and
  raises a TypeError (its messages are kept below): PiSSA / CorDA are meant to be computed on the float model,
  whose residual is then quantized ("QPiSSA").
- ``"orthogonal"``, and ``"lora_ga"`` with a gradient attached: peft casts the adapters to the packed weight's
  integer dtype and fails inside torch (RuntimeError); refused here with a RuntimeError that says why.
  ``"lora_ga"`` without a gradient (an adapter being loaded) gets the default init, as peft.
- ``"eva"``: B = 0 as on float layers; initialize_lora_eva_weights then sets A from the layer inputs.

saving with ``path_initial_model_for_weight_conversion`` needs only the adapters (weight_conversion.py), so
it works on a quantized OLoRA model as in peft.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...quant import formats
from ...quant.linear import QuantLinear

__all__ = ["init_quant_adapter", "requantize_into"]

# peft's messages for the inits it refuses on a non-float (quantized) base weight
_DTYPE_ERRORS = {
    "pissa": "Please initialize PiSSA under float32, float16, or bfloat16. Subsequently, re-quantize the residual "
             "model to help minimize quantization errors.",
    "corda": "Please initialize CorDA under float32, float16, or bfloat16. Subsequently, re-quantize the residual "
             "model to help minimize quantization errors.",
    "mica": "Please initialize MiCA under float32, float16, or bfloat16.",
}


def init_quant_adapter(layer, adapter_name: str, init_lora_weights: Any, kind: str) -> None:
    """Initialise ``adapter_name`` of a QuantLoraLinear for a weight-derived ``init_lora_weights`` of family
    ``kind`` (inits.init_kind), or refuse it as peft does on a bitsandbytes layer (module docstring)."""
    base = layer.get_base_layer()
    what = f"{type(layer).__name__} over {_describe(base)}"
    if kind in _DTYPE_ERRORS:
        raise TypeError(f"{_DTYPE_ERRORS[kind]} (init_lora_weights={init_lora_weights!r} on a {what}: the packed "
                        f"weight is not a float weight; initialise on the float model, then quantize the residual)")
    if kind == "eva":  # A keeps nn.Linear's Kaiming init until initialize_lora_eva_weights sets it
        with torch.no_grad():
            nn.init.zeros_(layer.lora_B[adapter_name].weight)
        return
    if kind == "lora_ga":
        if getattr(base, "_peft_loraga_grad", None) is None:  # loading: the file's weights come next
            return layer._init_adapter_weights(adapter_name, True)
        raise RuntimeError(f"init_lora_weights='lora_ga' is not supported on a {what}: LoRA-GA would subtract its "
                           f"initial product from a float base weight (peft 0.21.2 fails here with 'data set to a "
                           f"tensor that requires gradients must be floating point', and its preprocess_loraga "
                           f"refuses quantized models). Run preprocess_loraga and get_peft_model on the float model.")
    if kind == "orthogonal":
        raise RuntimeError(f"init_lora_weights='orthogonal' is not supported on a {what}: peft 0.21.2 casts the "
                           f"adapters to the base weight's dtype, which is the packed integer dtype here, and fails "
                           f"with 'Only Tensors of floating point and complex dtype can require gradients'.")
    if kind != "olora":
        raise ValueError(f"init_lora_weights={init_lora_weights!r} is not handled on a {what}")
    if not isinstance(base, QuantLinear):
        raise ValueError(f"init_lora_weights={init_lora_weights!r}: the base of this {type(layer).__name__} is "
                         f"{type(base).__name__}, not a QuantLinear (it is merged); unmerge before adding an adapter "
                         f"that rewrites the base weight")
    if base.fmt == "int4":
        raise TypeError(f"init_lora_weights={init_lora_weights!r} is not supported on a {what}: peft 0.21.2 "
                        f"re-quantizes the OLoRA residual only for bitsandbytes 4-bit and 8-bit weights (fastpeft "
                        f"nf4 / int8), and has no path for GPTQ / AWQ int4 layers. Initialise OLoRA on the float "
                        f"model, then quantize the residual model.")
    _olora(layer, base, adapter_name)


def _describe(base: nn.Module) -> str:
    if isinstance(base, QuantLinear):
        return f"{base.fmt} QuantLinear [{base.out_features}, {base.in_features}]"
    return type(base).__name__


@torch.no_grad()
def _olora(layer, base: QuantLinear, name: str) -> None:
    # bitsandbytes 4-bit dequantizes in its quant state's dtype (the compute dtype, which from_bnb keeps), 8-bit
    # in fp32; peft then goes to fp32 either way
    W = base.dequantize(base.compute_dtype if base.fmt == "nf4" else torch.float32).to(torch.float32)
    Q, R = torch.linalg.qr(W)
    r, s = layer.r[name], layer.scaling[name]
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    layer.lora_A[name].weight.data = A
    layer.lora_B[name].weight.data = B
    requantize_into(base, W - s * B @ A)  # peft's order: W -= s * (B @ A), in fp32


def requantize_into(base: QuantLinear, weight: torch.Tensor) -> None:
    """Quantize the float ``weight`` [out, in] into ``base``'s own nf4 / int8 format and settings and make it the
    packed weight of ``base`` (new tensors: caches keyed on the old packed weight, such as DoRA's ||W||, see a new
    one). The statistics keep their dtype and the layer its compute dtype."""
    N, K = base.out_features, base.in_features
    if tuple(weight.shape) != (N, K):
        raise ValueError(f"cannot re-quantize a weight of shape {tuple(weight.shape)} into the {_describe(base)}: "
                         f"expected [{N}, {K}]")
    if base.fmt not in ("nf4", "int8"):
        raise ValueError(f"cannot re-quantize into the {_describe(base)}: only nf4 and int8 are handled here")
    qw = formats.quantize_weight(weight.to(base.weight.device), base.fmt, blocksize=base.blocksize,
                                 double_quant=base.double_quant)
    if base.fmt == "int8":
        qw = qw._replace(scales=qw.scales.to(base.scales.dtype))
    if "weight" in base._parameters:  # packed_as_parameters (FSDP2 / ZeRO-3): the codes stay a frozen parameter
        qw = qw._replace(qdata=nn.Parameter(qw.qdata, requires_grad=False))
    base.set_quantized(qw)
