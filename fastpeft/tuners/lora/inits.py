"""LoRA initialisations that read (and some that rewrite) the base weight, with peft 0.21.2's results.

``init_lora_weights`` values handled here (learned by running peft on the same inputs; same torch,
so the same SVD / QR / random draws give the same tensors):

- ``"pissa"``: W = U S V^T; B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, base W <- W - s B A.
- ``"pissa_niter_<n>"``: the same from ``torch.svd_lowrank(W, q=r, niter=n)`` (random start: global RNG).
- ``"olora"``: W = Q R; B = Q[:, :r], A = R[:r]; base W <- W - s B A.
- ``"corda"``: B, A from the U, S, V that ``preprocess_corda`` attached to the base module (``eigens``).
- ``"lora_ga"``: from the SVD of the gradient ``preprocess_loraga`` attached (``_peft_loraga_grad``);
  without it (an adapter being loaded) the default init, as peft.
- ``"mica"``: B = the r left singular vectors of the smallest singular values, A = 0, B frozen.
- ``"orthogonal"``: A and B from orthogonal halves of a random r x r QR (even r), / 10.
- ``"eva"``: B = 0 here; lora_A comes later from ``initialize_lora_eva_weights`` (eva.py).

The math runs once per adapter, in fp32, in plain torch (no per-step computation here), layer by
layer as peft does. Batching the decompositions of equal-shape layers was measured on CPU (2 threads):
bit-identical results but no gain (16 x [512, 512] SVD 1.10x, QR 1.00x; 8 x [1024, 1024] SVD 1.00x,
QR 1.06x: LAPACK loops over the batch) for an extra stacked copy of the weights, so it is not done.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from .init_configs import LoraGAConfig, read_sub_config

__all__ = ["BASE_CHANGING_INITS", "freeze_adapter_weight", "init_adapter", "init_kind", "is_supported_init"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# inits whose adapter is not a no-op on its own: the base weight keeps W - s B A (converted back at save time)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga")
_PLAIN = (True, False, "gaussian")


def init_kind(value: Any) -> Optional[str]:
    """The family of an ``init_lora_weights`` value handled here ("pissa", "olora", ...), else None.

    peft dispatches with ``startswith("pissa")`` / ``startswith("corda")`` and case-insensitive
    "olora" / "mica"; the others compare exactly."""
    if not isinstance(value, str):
        return None
    if value.startswith("pissa"):
        return "pissa"
    if value.startswith("corda"):
        return "corda"
    if value.lower() in ("olora", "mica"):
        return value.lower()
    if value in ("eva", "orthogonal", "lora_ga"):
        return value
    return None


def is_supported_init(value: Any) -> bool:
    """True for every value fastpeft initialises (bool True/False exactly, not 1/0)."""
    if value is True or value is False:
        return True
    return isinstance(value, str) and (value.lower() == "gaussian" or init_kind(value) is not None)


# ------------------------------------------------------------------------------------------------ math
def _check_float(weight: torch.Tensor, what: str, layer_name: str) -> None:
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"init_lora_weights={what!r} needs a float32/float16/bfloat16 base weight; {layer_name} "
                        f"has {weight.dtype}. Initialise in a float dtype, then re-quantize the residual model.")


def _pissa_factors(V: torch.Tensor, S: torch.Tensor, Uh: torch.Tensor, r: int, scaling: float):
    """B [out, r], A [r, in] from a (possibly truncated) SVD W = V diag(S) Uh, with S_r divided by s."""
    Sr = S[:r] / scaling
    root = torch.sqrt(Sr)
    return V[:, :r] * root, root[:, None] * Uh[:r]


def _residual(W32: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float) -> torch.Tensor:
    # (s * B) @ A, subtracted: peft's evaluation order, so the residual matches bit for bit
    return W32 - (scaling * B) @ A


def _lowrank_pissa(W32: torch.Tensor, r: int, scaling: float, value: str):
    parts = value.split("_niter_")
    if len(parts) != 2:
        raise ValueError(f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got {value!r}")
    try:
        niter = int(parts[1])
    except ValueError:
        raise ValueError(f"init_lora_weights={value!r}: the number of iterations after '_niter_' must be an "
                         f"integer") from None
    V, S, U = torch.svd_lowrank(W32, r, niter=niter)
    return _pissa_factors(V, S, U.t(), r, scaling)


def _set_pair(layer, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    layer.lora_A[name].weight.data = A
    layer.lora_B[name].weight.data = B


# ------------------------------------------------------------------------------------------ dispatch
def init_adapter(layer, adapter_name: str, init_lora_weights: Any, options: dict) -> None:
    """Initialise ``adapter_name``'s weights in ``layer`` (LoraLayer.update_layer's init step).

    Values not handled here (True, False, "gaussian", "loftq", unknown strings) go to the layer's own
    ``_init_adapter_weights``, which also raises peft's error for unknown values."""
    kind = init_kind(init_lora_weights)
    if kind is None:
        return layer._init_adapter_weights(adapter_name, init_lora_weights)
    from .embedding import Embedding
    from .linear import Linear

    # peft picks MiCA's variant (frozen B, no DoRA) only for exactly "mica"; "MICA" initialises the same, untied
    mica_variant = init_lora_weights == "mica"
    if mica_variant and options.get("use_dora"):
        raise ValueError("Invalid or unsupported variant combination: ('mica', 'use_dora'): MiCA "
                         "(init_lora_weights='mica') cannot be combined with use_dora=True")
    if isinstance(layer, Embedding):
        if kind == "mica":
            return _mica_embedding(layer, adapter_name, mica_variant)
        # peft's embedding layers give every other value here the default init (it never checks the string)
        return layer._init_adapter_weights(adapter_name, True)
    if isinstance(layer, Linear) and not _is_plain_linear(layer, Linear):  # a QuantLoraLinear: packed base
        from .quant_inits import init_quant_adapter

        return init_quant_adapter(layer, adapter_name, init_lora_weights, kind)
    if not _is_plain_linear(layer, Linear):
        if kind == "lora_ga" and hasattr(layer, "_kernel_dim"):  # conv layers: default init, as peft
            return layer._init_adapter_weights(adapter_name, True)
        if kind in ("lora_ga", "eva", "orthogonal") or not hasattr(layer, "_kernel_dim"):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported for "
                             f"{type(layer).__name__} layers in fastpeft (it is for nn.Linear and "
                             f"transformers' Conv1D); target only linear layers with it")
        return layer._init_adapter_weights(adapter_name, init_lora_weights)  # peft's "Unknown initialization"
    with torch.no_grad():
        if kind == "eva":  # A keeps nn.Linear's Kaiming init; initialize_lora_eva_weights sets it later
            nn.init.zeros_(layer.lora_B[adapter_name].weight)
        elif kind == "orthogonal":
            _orthogonal(layer, adapter_name)
        elif kind == "lora_ga":
            _lora_ga(layer, adapter_name, options.get("lora_ga_config"))
        elif kind == "corda":
            _corda(layer, adapter_name)
        elif kind == "pissa":
            W32 = _base_fp32(layer, init_lora_weights, transpose=True)
            r, s = layer.r[adapter_name], layer.scaling[adapter_name]
            if init_lora_weights == "pissa":
                B, A = _pissa_factors(*torch.linalg.svd(W32, full_matrices=False), r, s)
            else:
                B, A = _lowrank_pissa(W32, r, s, init_lora_weights)
            _finish_factors(layer, adapter_name, W32, A, B)
        elif kind == "olora":
            if layer.fan_in_fan_out:
                raise ValueError("init_lora_weights='olora' is not supported on fan_in_fan_out layers "
                                 f"({type(layer).__name__}): peft 0.21.2 decomposes the stored [in, out] weight "
                                 "untransposed, which changes the model's output at init; fastpeft refuses it")
            W32 = _base_fp32(layer, "olora", transpose=False)
            Q, R = torch.linalg.qr(W32)
            r = layer.r[adapter_name]
            _finish_factors(layer, adapter_name, W32, R[:r].contiguous(), Q[:, :r].contiguous())
        elif kind == "mica":
            W32 = _base_fp32(layer, "mica", transpose=True)
            r = layer.r[adapter_name]
            if r > min(W32.shape):
                raise ValueError(f"MiCA requires `r` <= min(in_features, out_features) but got r={r} for a layer "
                                 f"with weight shape {tuple(W32.shape)} (max usable r is {min(W32.shape)}).")
            U = torch.linalg.svd(W32, full_matrices=False)[0]
            dtype = layer.get_base_layer().weight.dtype
            _set_pair(layer, adapter_name, torch.zeros(r, W32.shape[1], device=W32.device).to(dtype),
                      U[:, -r:].contiguous().to(dtype))
    if mica_variant:
        freeze_adapter_weight(layer, adapter_name, "lora_B")


def _is_plain_linear(layer, linear_cls) -> bool:
    """A fastpeft Linear (or Conv1D) over a dense float weight (not a QuantLoraLinear's packed one)."""
    if not isinstance(layer, linear_cls):
        return False
    from .quant_linear import QuantLoraLinear

    return not isinstance(layer, QuantLoraLinear)


def _base_fp32(layer, what: str, transpose: bool) -> torch.Tensor:
    weight = layer.get_base_layer().weight
    _check_float(weight, what, type(layer.get_base_layer()).__name__)
    # the residual is swapped in as a new tensor (never written in place), so this may alias the weight
    W = weight.detach().to(torch.float32)
    return W.t() if transpose and layer.fan_in_fan_out else W


def _finish_factors(layer, name: str, W32: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    base = layer.get_base_layer()
    _set_pair(layer, name, A, B)
    W = _residual(W32, B, A, layer.scaling[name]).to(base.weight.dtype)
    base.weight.data = W.t() if layer.fan_in_fan_out else W


def freeze_adapter_weight(layer, adapter_name: str, weight_name: str) -> None:
    """Keep ``layer.<weight_name>[adapter_name]`` frozen through set_adapter / set_requires_grad (peft's
    ``frozen_peft_weight_names``; MiCA trains A only)."""
    frozen = dict(getattr(layer, "frozen_peft_weight_names", {}) or {})
    names = frozen.get(adapter_name, ())
    if weight_name not in names:
        frozen[adapter_name] = names + (weight_name,)
    layer.frozen_peft_weight_names = frozen
    container = getattr(layer, weight_name)
    if adapter_name in container:
        container[adapter_name].requires_grad_(False)


def _mica_embedding(layer, name: str, freeze_B: bool) -> None:
    weight = layer.get_base_layer().weight
    _check_float(weight, "mica", "Embedding")
    W = weight.detach().to(torch.float32).T  # the table's projection is [dim, num_embeddings]
    r = layer.r[name]
    if r > min(W.shape):
        raise ValueError(f"MiCA requires `r` <= min(num_embeddings, embedding_dim) but got r={r} for an embedding "
                         f"layer with weight shape {tuple(weight.shape)} (max usable r is {min(W.shape)}).")
    U = torch.linalg.svd(W, full_matrices=False)[0]
    with torch.no_grad():
        layer.lora_embedding_B[name].data = U[:, -r:].contiguous().to(weight.dtype)
        layer.lora_embedding_A[name].data = torch.zeros(r, W.shape[1], device=W.device).to(weight.dtype)
    if freeze_B:
        freeze_adapter_weight(layer, name, "lora_embedding_B")


def _orthogonal(layer, name: str) -> None:
    r = layer.r[name]
    if r % 2 != 0:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
    # peft's order of draws on the default CPU generator: X, then A's, then B's
    Q = torch.linalg.qr(torch.randn(r, r))[0]
    dtype = layer.get_base_layer().weight.dtype
    A = torch.randn(layer.in_features, r // 2).mm(Q[0::2, :]).T / 10.0
    B = torch.randn(r // 2, layer.out_features).T.mm(Q[1::2, :]) / 10.0
    layer.lora_A[name].weight = nn.Parameter(A.contiguous().to(dtype))
    layer.lora_B[name].weight = nn.Parameter(B.contiguous().to(dtype))


def _corda(layer, name: str) -> None:
    base = layer.get_base_layer()
    _check_float(base.weight, "corda", type(base).__name__)
    eigens = getattr(base, "eigens", None)
    if eigens is None:
        raise ValueError("`eigens` attribute not found for layer, please run `preprocess_corda` first "
                         f"(fastpeft.tuners.lora.corda.preprocess_corda) on {type(base).__name__}.")
    U, S, V = eigens.U_WC, eigens.S_WC, eigens.V_WC
    for label, t in (("S", S), ("U", U), ("V", V)):
        if torch.isnan(t).any() or torch.isinf(t).any():
            raise ValueError(f"CorDA: invalid value (NaN/inf) found in matrix {label} of the preprocessed eigens")
    r = layer.r[name]
    out_dim, in_dim = layer.out_features, layer.in_features
    expected = {"U": (out_dim, r), "S": (r,), "V": (in_dim, r)}
    for label, t in (("U", U), ("S", S), ("V", V)):
        if tuple(t.shape) != expected[label]:
            raise ValueError(f"CorDA: matrix {label} has shape {tuple(t.shape)}, expected {expected[label]}. Make "
                             "sure the lora_config and model given to preprocess_corda match get_peft_model's (and "
                             "a cache file was built with the same model and rank).")
    s = layer.scaling[name]
    S = S / s
    A = V.t().mul(S.sqrt().view(-1, 1)).contiguous()
    B = U.mul(S.sqrt()).contiguous()
    _set_pair(layer, name, A, B)
    delta = s * B @ A
    W = base.weight.detach().to(torch.float32) - (delta.t() if layer.fan_in_fan_out else delta)
    base.weight.data = W.to(base.weight.dtype)
    del base.eigens


def _lora_ga(layer, name: str, config: Any) -> None:
    base = layer.get_base_layer()
    grad = getattr(base, "_peft_loraga_grad", None)
    if grad is None:  # loading a saved adapter: its weights come from the file (peft does the same)
        return layer._init_adapter_weights(name, True)
    config = read_sub_config(config, LoraGAConfig, "lora_ga_config")
    if config is None:
        raise ValueError("lora_ga_config must be provided when init_lora_weights='lora_ga'. "
                         "Please pass lora_ga_config=LoraGAConfig(...) to LoraConfig.")
    dtype = base.weight.dtype
    grad = grad.to(torch.float32)
    if layer.fan_in_fan_out:
        grad = grad.t()
    r = layer.r[name]
    U, S, V = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    Vh = V.t()
    U, S, Vh = U[:, :2 * r], S[:2 * r], Vh[:2 * r, :]
    if config.direction == "ArBr":
        A, B_idx = Vh[1:2 * r:2, :], slice(0, 2 * r, 2)
    elif config.direction == "A2rBr":
        A, B_idx = Vh[r:2 * r, :], slice(0, r)
    elif config.direction == "ArB2r":
        A, B_idx = Vh[:r, :], slice(r, 2 * r)
    elif config.direction == "random":
        idx = torch.randperm(2 * r)[:r]
        A, B_idx = Vh[idx, :], idx
    else:
        raise ValueError(f"lora_ga_config.direction must be one of 'ArBr', 'A2rBr', 'ArB2r', 'random'; got "
                         f"{config.direction!r}")
    S_B = S[B_idx]
    B = U[:, B_idx] @ torch.diag(S_B)
    s = layer.scaling[name]
    W32 = base.weight.detach().to(torch.float32)
    if layer.fan_in_fan_out:
        W32 = W32.t()
    if config.scale == "stable":
        B = B * ((W32.shape[0] ** 0.25) / (config.stable_gamma ** 0.5))
    elif config.scale == "weight_svd":
        weight_S = torch.svd_lowrank(W32, q=r, niter=4)[1]
        if S_B[0] > 0:
            B = B * (weight_S[0] / S_B[0])
    elif config.scale == "gd_scale":
        A, B = A / s, B / s
    elif config.scale != "unit":
        raise ValueError(f"lora_ga_config.scale must be one of 'stable', 'weight_svd', 'gd_scale', 'unit'; got "
                         f"{config.scale!r}")
    # the adapters in the base dtype first, so the residual matches what the forward pass adds back
    A, B = A.to(dtype).contiguous(), B.to(dtype).contiguous()
    _set_pair(layer, name, A, B)
    W = (W32 - s * (B.float() @ A.float())).to(dtype)
    base.weight.data = W.t() if layer.fan_in_fan_out else W
    del base._peft_loraga_grad


def warn_if_mixed_with_base_changing(configs: list) -> None:
    """peft's warning when an adapter that rewrote the base weight shares the model with other adapters."""
    if len(configs) < 2:
        return
    for value, label, guide in (("pissa", "PiSSA", "pissa_finetuning#convert-pissa-to-lora"),
                                ("corda", "CorDA", "corda_finetuning#convert-corda-to-lora"),
                                ("olora", "OLoRA", "olora_finetuning#olora-and-lora")):
        if any(getattr(c, "init_lora_weights", None) == value for c in configs):
            warnings.warn(f"{label} changes the base weights of the model and should thus not be used with other "
                          f"adapters. Consider converting the {label} adapter into a normal LoRA adapter: "
                          f"https://github.com/huggingface/peft/tree/main/examples/{guide}")
            return
