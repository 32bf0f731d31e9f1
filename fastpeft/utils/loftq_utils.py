"""LoftQ (https://huggingface.co/papers/2310.08659): LoRA weights that absorb the quantization error of a base weight.

Given a float weight W [out, in] and a rank r, LoftQ alternates ``num_iter`` times

    Q   = dequant(quant(W - B A))      (the first time: dequant(quant(W)))
    B A = best rank-r approximation of W - Q (truncated SVD; B = U_r sqrt(S_r), A = sqrt(S_r) Vh_r)

so that Q + B A is closer to W than Q alone. peft 0.21.2 semantics, checked against peft by running it:

- 4 bits is bitsandbytes' nf4 with blocks of 64 and no double quantization (fastpeft.quant.formats, whose nf4
  is bit-identical to bitsandbytes'); 8 bits is bitsandbytes' ``Int8Params`` row-wise int8 (the weight is cast to
  fp16 first, scale = row absmax, q = round(w * 127 / absmax)), reproduced here because it differs from
  fastpeft's int8 format (no fp16 cast, another rounding order);
- the adapter gets A = sqrt(S_r) Vh_r, B = U_r sqrt(S_r) in fp32 and the base weight becomes Q in its own dtype
  (the model is not quantized: it is saved this way and loaded in 4 bits later);
- the scale alpha / r is NOT taken out of B A (peft does not either): LoftQ is meant for lora_alpha = r.

``replace_lora_weights_loftq`` is peft's function for a model that is already quantized: one step, with
Q the layer's own packed weight and W read back from the model's safetensors file.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor

from ..quant import formats

__all__ = ["loftq_init", "loftq_quantize", "low_rank_decomposition", "replace_lora_weights_loftq"]

LOFTQ_NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which peft's LoftQ uses
LOFTQ_BITS = (4, 8)
_INV_127 = 7.874015718698502e-3  # bitsandbytes' int8 dequantization multiplies by this, not / 127


def _int8_rowwise_roundtrip(w: Tensor) -> Tensor:
    """bitsandbytes' Int8Params quantize + int8_vectorwise_dequant of fp32 ``w``, in fp32."""
    w16 = w.to(torch.float16)
    absmax = w16.abs().amax(dim=1).float()
    # an all-zero row: bnb's 127 / 0 makes NaN codes; the row dequantizes to 0 whatever the codes are
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    q = torch.round(w16 * inv[:, None]).to(torch.int8)
    return q * absmax[:, None] * _INV_127


def loftq_quantize(w: Tensor, num_bits: int) -> Tensor:
    """dequant(quant(w)) in fp32 for LoftQ's ``num_bits`` (4: nf4 blocks of 64; 8: bnb row-wise int8)."""
    if num_bits == 4:
        qw = formats.QuantizedWeight(**formats.nf4_quantize(w, blocksize=LOFTQ_NF4_BLOCKSIZE, double_quant=False))
        return formats.dequantize(qw, torch.float32)
    if num_bits == 8:
        return _int8_rowwise_roundtrip(w)
    raise ValueError(f"LoftQ supports loftq_bits 4 (nf4) and 8 (int8); got {num_bits!r}")


def low_rank_decomposition(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(L [out, r], R [r, in]) with L R the best rank-r approximation of w: L = U_r sqrt(S_r), R = sqrt(S_r) Vh_r."""
    if w.dim() != 2:
        raise ValueError(f"LoftQ decomposes 2-D weights [out, in]; got shape {tuple(w.shape)}")
    if rank > min(w.shape):
        raise ValueError(f"LoftQ rank r={rank} exceeds min(out, in) of the weight {tuple(w.shape)}: the residual "
                         f"has at most {min(w.shape)} singular values")
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


@torch.no_grad()
def loftq_init(weight: Tensor, num_bits: int, reduced_rank: int, num_iter: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """LoftQ for one weight [out, in]: (Q in weight's dtype and device, lora_A [r, in] fp32, lora_B [out, r] fp32).

    Computed in fp32 on the weight's own device (peft uses the GPU); see the module docstring.
    """
    if num_bits not in LOFTQ_BITS:
        raise ValueError(f"LoftQ supports loftq_bits 4 (nf4) and 8 (int8); got {num_bits!r}")
    if not isinstance(num_iter, int) or num_iter <= 0:
        raise ValueError(f"LoftQ loftq_iter must be a positive int; got {num_iter!r}")
    if weight.dim() != 2:
        raise ValueError(f"LoftQ needs a 2-D weight [out, in]; got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    res = w
    for i in range(num_iter):
        q = loftq_quantize(res, num_bits)
        L, R = low_rank_decomposition(w - q, reduced_rank)
        if i + 1 < num_iter:
            res = w - L @ R
    return q.to(weight.dtype), R, L


# -- a model that is already quantized --------------------------------------------------------------------------
class _SafetensorsWeights:
    """The float weights of a model's safetensors file (one file or an index of shards), read one at a time."""

    INDEX = "model.safetensors.index.json"

    def __init__(self, peft_model, model_path: Optional[str]) -> None:
        if model_path is None:
            model_path = self._local_snapshot(peft_model)
        self.prefix = getattr(peft_model.get_base_model(), "base_model_prefix", None) or ""
        if model_path.endswith(".safetensors") and os.path.isfile(model_path):
            self.files = {None: model_path}
            return
        folder = model_path[: -len("model.safetensors")] if model_path.endswith("model.safetensors") else model_path
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(single):
            self.files = {None: single}
            return
        index = os.path.join(folder, self.INDEX)
        if not os.path.isfile(index):
            raise FileNotFoundError(f"Could not find the model's float weights: neither {single} nor a sharded "
                                    f"{index} exists (LoftQ reads the unquantized weights from safetensors files)")
        import json

        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        self.files = {k: os.path.join(folder, v) for k, v in weight_map.items()}

    @staticmethod
    def _local_snapshot(peft_model) -> str:
        name = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
        if not name:
            raise ValueError("The model does not say where its weights come from (no config._name_or_path): pass "
                             "model_path, the safetensors file or folder of the unquantized model")
        if os.path.isdir(name):
            return name
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name, local_files_only=True)
        except Exception as exc:  # not a Hub id, or not in the local cache
            raise ValueError(f"Could not find the weights of {name!r} locally; pass model_path, the safetensors "
                             f"file or folder of the unquantized model") from exc

    def get(self, name: str) -> Tensor:
        from safetensors import safe_open

        candidates = [name]
        if self.prefix and name.startswith(self.prefix + "."):
            candidates.append(name[len(self.prefix) + 1:])  # saved without the base model prefix
        for key in candidates:
            path = self.files.get(key) if None not in self.files else self.files[None]
            if path is None:
                continue
            with safe_open(path, framework="pt", device="cpu") as f:
                if key in f.keys():
                    return f.get_tensor(key)
        raise KeyError(f"weight {name!r} not found in {sorted(set(self.files.values()))}")


def _packed_dequantized(layer) -> Optional[Tensor]:
    """The fp32 [out, in] weight of a LoRA layer over a fastpeft QuantLinear (nf4 / int8 / int4), else None.

    (A bitsandbytes model goes through fastpeft.quant.import_bnb first: same nf4 codes, bit-identical
    dequantization, so the same LoftQ weights as peft computes on the bnb layers.)"""
    from ..quant.linear import QuantLinear

    base = layer.get_base_layer()
    return base.dequantize(torch.float32) if isinstance(base, QuantLinear) else None


@torch.no_grad()
def replace_lora_weights_loftq(peft_model, model_path: Optional[str] = None, adapter_name: str = "default",
                               callback: Optional[Callable] = None) -> None:
    """peft's ``replace_lora_weights_loftq``: set the LoRA weights of every quantized LoRA layer to LoftQ's
    (one step: B A = rank-r SVD of W - dequant(Q), W read from the model's safetensors file, Q the layer's packed
    weight; the packed weight itself is left as it is).

    Quantized layers are fastpeft QuantLinear bases (nf4, int8 or int4; peft: bitsandbytes 4-bit; a bnb model
    is imported with fastpeft.quant.import_bnb, which keeps its codes).
    model_path: the unquantized model's safetensors file, or its folder (``model.safetensors`` or a sharded
    index); None: the local Hub snapshot of ``config._name_or_path``.
    callback(model, module_name) -> bool: called after each layer; False rolls that layer back.
    """
    from ..tuners.lora.layer import LoraLayer

    prefix = "base_model.model."
    weights = _SafetensorsWeights(peft_model, model_path)
    any_match = False
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in getattr(module, "lora_A", {}):
            continue
        q = _packed_dequantized(module)
        if q is None:
            continue
        if not name.startswith(prefix):
            raise TypeError(f"The passed model does not appear to be a valid PeftModel: module {name!r} does not "
                            f"start with {prefix!r}")
        any_match = True
        name = name[len(prefix):]
        w = weights.get(name + ".weight").to(device=q.device, dtype=torch.float32)
        if tuple(w.shape) != tuple(q.shape):
            raise ValueError(f"{name}.weight in the safetensors file has shape {tuple(w.shape)}; the quantized "
                             f"layer is {tuple(q.shape)}")
        L, R = low_rank_decomposition(w - q, module.r[adapter_name])
        lora_A, lora_B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        before = (lora_A.data, lora_B.data)
        lora_A.data = R.to(lora_A.dtype)
        lora_B.data = L.to(lora_B.dtype)
        if callback is not None and not callback(peft_model, name):
            lora_A.data, lora_B.data = before
    if not any_match:
        raise ValueError("No quantized LoRA module found on the model (LoftQ replaces the LoRA weights of layers "
                         "over a fastpeft QuantLinear; import bitsandbytes layers with fastpeft.quant.import_bnb)")
