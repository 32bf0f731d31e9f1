"""Import FP8 checkpoints as transformers saves them ("fine-grained" FP8) without re-quantizing.

transformers' FineGrainedFP8 layout (``quantization_config = {"quant_method": "fp8",
"weight_block_size": [block_n, block_k], "activation_scheme": ..., "modules_to_not_convert": [...]}``),
per quantized linear layer ``X``:
    X.weight            float8_e4m3fn [N, K]
    X.weight_scale_inv  fp32 (or float8_e8m0fnu with scale_fmt "ue8m0") [ceil(N/block_n), ceil(K/block_k)];
                        despite the name it multiplies: W = float(weight) * scale
    X.bias              optional, 16-bit
    X.activation_scale  only with activation_scheme "static": a scale for quantizing activations, which
                        fastpeft does not do (x stays 16-bit, as in transformers' dequantize mode); ignored.
``weight_block_size: null`` means one scale per tensor (scale [1, 1] or []); a scale of shape [N, 1]
or [N] is taken as per output channel. The codes and scales become a fastpeft fp8 QuantLinear
(formats.py) as they are.

Three entry points:
    from_fp8(weight, weight_scale_inv, bias, block_size)   one layer from its tensors
    import_fp8(model)                                       swap the FP8Linear layers of a model
                                                            transformers loaded on a GPU (weight in fp8)
    load_fp8_checkpoint(model, path)                        a model built from the checkpoint's config
                                                            (e.g. AutoModelForCausalLM.from_config)
                                                            gets the checkpoint's weights, fp8 layers
                                                            as QuantLinear (on CPU, where transformers
                                                            itself would dequantize everything to bf16)
compressed-tensors checkpoints ("quant_method": "compressed-tensors") are read by ctensors_import.py:
load_fp8_checkpoint hands them to load_ctensors_checkpoint; import_fp8 refuses them (other tensor names).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..utils.modules import get_submodules
from .formats import FP8_DTYPE, QuantizedWeight, fp8_block
from .linear import QuantLinear

SCALE_KEY = "weight_scale_inv"


def _block_from_scale(N: int, K: int, scale: Tensor, block_size, what: str) -> tuple[tuple[int, int], Tensor]:
    """(block_n, block_k) and the scale as a 2-D fp32 tensor, checked against the weight [N, K]."""
    s = scale.float() if scale.dtype != torch.float32 else scale
    if block_size is None:
        if s.numel() == 1:
            return (N, K), s.reshape(1, 1)
        if s.numel() == N and (s.dim() == 1 or tuple(s.shape) == (N, 1)):
            return (1, K), s.reshape(N, 1)
        raise ValueError(f"{what}: without a block size the scale must be per tensor ([] or [1, 1]) or per "
                         f"output channel ([{N}, 1]); got {tuple(s.shape)}")
    bn, bk = fp8_block(N, K, block_size)
    want = (-(-N // bn), -(-K // bk))
    if tuple(s.shape) != want:
        raise ValueError(f"{what}: {SCALE_KEY} has shape {tuple(s.shape)}, expected {want} for a weight [{N}, {K}] "
                         f"in blocks [{bn}, {bk}]")
    return (bn, bk), s


def from_fp8(weight: Tensor, weight_scale_inv: Tensor, bias: Optional[Tensor] = None, block_size=(128, 128),
             compute_dtype: Optional[torch.dtype] = None, name: str = "fp8 layer") -> QuantLinear:
    """An fp8 QuantLinear from a transformers FP8 layer's tensors (layout in the module docstring).

    block_size: the checkpoint's ``weight_block_size`` ([block_n, block_k]); None = per tensor or per
    channel, told apart by the scale's shape. compute_dtype: the layer's dtype (default: the bias's,
    else bfloat16, transformers' dtype for FP8 models).
    """
    what = f"FP8 import of {name}"
    if weight.dim() != 2:
        raise ValueError(f"{what}: weight must be 2-D [N, K]; got {tuple(weight.shape)}")
    if weight.dtype == torch.uint8:
        weight = weight.view(FP8_DTYPE)
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"{what}: weight must be float8_e4m3fn (or its uint8 bits); got {weight.dtype} "
                         f"(float8_e5m2 and fp4-packed int8 weights are not supported)")
    N, K = weight.shape
    (bn, bk), scale = _block_from_scale(N, K, weight_scale_inv, block_size, what)
    qw = QuantizedWeight("fp8", N, K, weight.contiguous(), scale.contiguous(), blocksize=bk, blocksize2=bn)
    cdt = compute_dtype or (bias.dtype if bias is not None and bias.is_floating_point() else torch.bfloat16)
    return QuantLinear.from_quantized(qw, bias, compute_dtype=cdt)


def _block_size_of(quantization_config) -> object:
    """weight_block_size of a transformers FP8 quantization_config (dict or config object); refuses others."""
    cfg = config_dict(quantization_config)
    method = str(cfg.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        raise ValueError("compressed-tensors checkpoints (weight + weight_scale) are not transformers' FP8 layout: "
                         "load them with fastpeft.quant.load_ctensors_checkpoint (or load_fp8_checkpoint)")
    if method != "fp8":
        raise ValueError(f"quantization_config has quant_method {cfg.get('quant_method')!r}; the FP8 importer "
                         f"reads quant_method 'fp8' (transformers' FineGrainedFP8Config)")
    if cfg.get("dequantize"):
        raise ValueError("quantization_config has dequantize=True: the model's weights are not fp8")
    return cfg.get("weight_block_size")


def import_fp8(model: nn.Module, block_size="config") -> list[str]:
    """Replace every FP8 linear layer of ``model`` (a ``weight`` in float8_e4m3fn next to a
    ``weight_scale_inv``, as transformers' FP8Linear) by a QuantLinear, in place; returns the names.
    block_size "config": the model's ``config.quantization_config.weight_block_size``."""
    if block_size == "config":
        qc = getattr(getattr(model, "config", None), "quantization_config", None)
        if qc is None:
            raise ValueError(f"{type(model).__name__} has no config.quantization_config: pass block_size")
        block_size = _block_size_of(qc)
    done = []
    for name, mod in list(model.named_modules()):
        w, s = getattr(mod, "weight", None), getattr(mod, SCALE_KEY, None)
        if isinstance(w, Tensor) and isinstance(s, Tensor) and w.dtype == FP8_DTYPE and w.dim() == 2:
            bias = getattr(mod, "bias", None)
            q = from_fp8(w.data, s.data, bias.data if isinstance(bias, Tensor) else None, block_size, name=name)
            parent, _, attr = get_submodules(model, name)
            setattr(parent, attr, q)
            done.append(name)
    return done


def read_checkpoint(path: str) -> tuple[dict, dict, dict]:
    """(state dict, key -> the file holding it, config.json dict) of a checkpoint directory of safetensors
    files (this importer's and the compressed-tensors one's)."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}")
    sd, where = {}, {}
    for f in files:
        with safe_open(os.path.join(path, f), "pt") as h:
            for k in h.keys():
                sd[k] = h.get_tensor(k)
                where[k] = os.path.join(path, f)
    cfg_path = os.path.join(path, "config.json")
    config = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    return sd, where, config


def config_dict(quantization_config) -> dict:
    """A quantization_config (a transformers config object or a dict) as a plain dict."""
    if hasattr(quantization_config, "to_dict"):
        quantization_config = quantization_config.to_dict()
    return dict(quantization_config)


def module_for(prefix: str, modules: dict) -> Optional[str]:
    """The model's module name for a checkpoint prefix: checkpoint keys may carry a prefix the model does not
    (a base model loaded into a task model) or lack one it has, so a suffix match either way."""
    if prefix in modules:
        return prefix
    return next((m for m in modules if m and (m.endswith("." + prefix) or prefix.endswith("." + m))), None)


def load_fp8_checkpoint(model: nn.Module, checkpoint: Union[str, dict], quantization_config=None,
                        strict: bool = True) -> list[str]:
    """Load a transformers FP8 checkpoint into ``model`` (built from its config, float weights), in place:
    each linear layer whose checkpoint weight has a ``weight_scale_inv`` becomes an fp8 QuantLinear (in the
    layer's dtype), every other tensor loads as usual. Returns the names of the fp8 layers.

    checkpoint: a directory (config.json + *.safetensors, as save_pretrained writes) or a state dict
    (then quantization_config is required). strict: as load_state_dict's, for the remaining tensors.
    A compressed-tensors checkpoint goes to ctensors_import.load_ctensors_checkpoint (fp8, int8, int4 layers).
    """
    if _is_ctensors(checkpoint, quantization_config):
        from .ctensors_import import load_ctensors_checkpoint

        return load_ctensors_checkpoint(model, checkpoint, quantization_config, strict)
    if isinstance(checkpoint, str):
        sd, _, config = read_checkpoint(checkpoint)
        quantization_config = quantization_config or config.get("quantization_config")
        if quantization_config is None:
            raise ValueError(f"{checkpoint}/config.json has no quantization_config: not an FP8 checkpoint")
    else:
        sd = dict(checkpoint)
        if quantization_config is None:
            raise ValueError("load_fp8_checkpoint with a state dict needs quantization_config")
    block_size = _block_size_of(quantization_config)
    modules = dict(model.named_modules())
    done = []
    for key in [k for k in sd if k.endswith("." + SCALE_KEY)]:
        prefix = key[: -len(SCALE_KEY) - 1]
        name = module_for(prefix, modules)
        lin = modules.get(name) if name is not None else None
        if not isinstance(lin, nn.Linear) or isinstance(lin, QuantLinear):
            raise ValueError(f"checkpoint tensor {key!r}: no nn.Linear {prefix!r} in {type(model).__name__} "
                             f"(found {type(lin).__name__ if lin is not None else 'nothing'})")
        w, s = sd.pop(prefix + ".weight", None), sd.pop(key)
        if w is None:
            raise ValueError(f"checkpoint has {key!r} but no {prefix + '.weight'!r}")
        if tuple(w.shape) != (lin.out_features, lin.in_features):
            raise ValueError(f"checkpoint {prefix}.weight has shape {tuple(w.shape)}; the model's {name} is "
                             f"[{lin.out_features}, {lin.in_features}]")
        sd.pop(prefix + ".activation_scale", None)  # static activation quantization: not used (docstring)
        bias = sd.pop(prefix + ".bias", None)
        if (bias is None) != (lin.bias is None):
            raise ValueError(f"checkpoint {prefix}: bias {'missing' if bias is None else 'present'}, the model's "
                             f"{name} has {'one' if lin.bias is not None else 'none'}")
        dt = lin.weight.dtype if lin.weight.is_floating_point() else torch.bfloat16
        q = from_fp8(w, s, bias.to(dt) if bias is not None else None, block_size, compute_dtype=dt, name=prefix)
        parent, _, attr = get_submodules(model, name)
        setattr(parent, attr, q.to(lin.weight.device))
        done.append(name)
    if not done:
        raise ValueError(f"the checkpoint has no '*.{SCALE_KEY}' tensor: not a transformers FP8 checkpoint")
    # the rest (embeddings, norms, unquantized layers): through load_state_dict, with the fp8 layers' own
    # tensors already loaded, so they are reported missing only if the model expected something else
    load_rest(model, sd, done, strict, "load_fp8_checkpoint")
    return done


def load_rest(model: nn.Module, sd: dict, done: list, strict: bool, fn: str, where=lambda key: key) -> None:
    """Load what a checkpoint holds beyond its quantized layers (embeddings, norms, unquantized layers) with
    load_state_dict, the layers named in `done` already replaced and loaded: their own tensors are not
    reported missing, nor parameters transformers ties to another. strict: missing or unexpected keys raise,
    naming them (`where(key)`: the key as the error shows it, e.g. with its file)."""
    own = {f"{n}.{k}" for n in done for k in model.get_submodule(n).state_dict()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in own and not _tied(model, k)]
    if strict and (missing or unexpected):
        raise ValueError(f"{fn}: missing keys {missing[:10]}, unexpected keys {[where(k) for k in unexpected[:10]]}")


def _is_ctensors(checkpoint, quantization_config) -> bool:
    """Whether the config (given, or the checkpoint directory's config.json) is compressed-tensors'."""
    if quantization_config is None and isinstance(checkpoint, str):
        cfg_path = os.path.join(checkpoint, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                quantization_config = json.load(f).get("quantization_config")
    if quantization_config is None:
        return False
    return str(config_dict(quantization_config).get("quant_method", "")).lower() == "compressed-tensors"


def _tied(model: nn.Module, key: str) -> bool:
    """True for a parameter transformers ties to another (lm_head.weight to the embeddings), which
    checkpoints do not store."""
    keys = getattr(model, "_tied_weights_keys", None) or {}
    names = keys.keys() if isinstance(keys, dict) else keys
    return any(key == k or key.endswith("." + k) for k in names)
