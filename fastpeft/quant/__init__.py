"""Quantized base weights for fastpeft: formats (nf4 / int8 / int4), QuantLinear, ``quantize(model, fmt)``
and importers for bitsandbytes, GPTQ and AWQ weights. See formats.py for the packed layouts."""
from . import formats  # first: fastpeft.ops.lora_quant imports it, and QuantLinear imports ops
from .formats import FORMATS, QuantizedWeight, dequantize, quantize_weight
from .linear import QuantLinear
from .quantize import QuantizeReport, merge_and_unload, quantize
from .importers import from_awq, from_bnb, from_gptq, import_bnb

__all__ = ["FORMATS", "QuantizedWeight", "QuantLinear", "QuantizeReport", "dequantize", "from_awq", "from_bnb",
           "from_gptq", "import_bnb", "merge_and_unload", "quantize", "quantize_weight"]
