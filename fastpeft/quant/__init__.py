"""Quantized base weights for fastpeft: formats (nf4 / int8 / int4 / fp8), QuantLinear, ``quantize(model, fmt)``
and importers for bitsandbytes, GPTQ, AWQ, transformers' FP8 and compressed-tensors weights. See formats.py for
the packed layouts.

The submodules load on first use (PEP 562): fastpeft.ops imports fastpeft.quant.formats, a torch-only
leaf, and must not pull QuantLinear, quantize or the importers along with it.
"""
import sys
import types

from ..utils.lazy import lazy_exports

# public name -> submodule that defines it
_EXPORTS = {
    "FORMATS": "formats",
    "QuantizedWeight": "formats",
    "dequantize": "formats",
    "quantize_weight": "formats",
    "QuantLinear": "linear",
    "QuantizeReport": "quantize",
    "merge_and_unload": "quantize",
    "quantize": "quantize",
    "from_awq": "importers",
    "from_bnb": "importers",
    "from_ctensors": "ctensors_import",
    "load_ctensors_checkpoint": "ctensors_import",
    "from_fp8": "fp8_import",
    "import_fp8": "fp8_import",
    "load_fp8_checkpoint": "fp8_import",
    "from_gptq": "importers",
    "import_bnb": "importers",
    "packed_as_parameters": "sharding",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _QuantPackage(types.ModuleType):
    """The package's module type. The import system binds every submodule it loads as an attribute of
    its package, and the submodule quantize.py shares its name with the function quantize(): without
    this, ``import fastpeft.quant.quantize`` anywhere would make ``fastpeft.quant.quantize`` the module."""

    def __setattr__(self, name, value):
        if name == "quantize" and isinstance(value, types.ModuleType):
            value = value.quantize
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _QuantPackage
