"""Hot swapping LoRA adapters in place, peft's ``peft.utils.hotswap`` API.

``hotswap_adapter(model, path, adapter_name)`` loads a saved adapter into an existing adapter's tensors
instead of adding a new adapter: no new modules, no new parameters, so a torch.compile'd model keeps its
compiled graphs. ``prepare_model_for_compiled_hotswap(model, target_rank=...)`` makes that possible for
adapters of other ranks and scales, before compiling:

- every LoRA weight is zero-padded to ``target_rank`` (extra rows of A and columns of B that are zero add
  nothing to s * B A, so outputs do not change); a swapped-in adapter of lower rank fills the leading
  rows / columns and the rest is zeroed;
- every scaling becomes a 0-dim tensor, updated in place by a swap. fastpeft.ops folds a tensor scale into
  B inside the traced graph, so a new scale is new data, not a recompilation.

As in peft, the model's config (r, lora_alpha) and the layers' ``r`` keep the first adapter's values; the
scaling is the swapped-in adapter's (its lora_alpha / r, or / sqrt(r) with rsLoRA).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

# Config fields two adapters must share to be swapped (they change what the layers compute or which
# layers exist beyond weights and scale).
CONFIG_KEYS_TO_CHECK = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora", "lora_bias", "fan_in_fan_out",
                        "bias")


def _lora_layers(model: nn.Module):
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "scaling") and hasattr(mod, "base_layer"):
            yield name, mod


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or any(hasattr(m, "_orig_mod") for m in model.modules())


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))], dim=0)


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank: Optional[int] = None, config=None,
                                       check_compiled: str = "error") -> None:
    """Pad every LoRA weight to ``target_rank`` (default: the largest rank in the model, or in ``config``'s
    r and rank_pattern when given) and make every scaling a tensor. Call before torch.compile."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled must be 'error', 'warn' or 'ignore'; got {check_compiled!r}")
    if _is_compiled(model):
        msg = "Call prepare_model_for_compiled_hotswap *before* compiling the model"
        if check_compiled == "error":
            raise ValueError(msg)
        if check_compiled == "warn":
            warnings.warn(msg + "; the compiled graphs will be recompiled once.")
    layers = list(_lora_layers(model))
    if not layers:
        raise ValueError("prepare_model_for_compiled_hotswap: the model has no LoRA layers")
    if target_rank is None:
        cfgs = config.values() if isinstance(config, dict) else [config] if config is not None else []
        ranks = [c.r for c in cfgs] + [r for c in cfgs for r in (getattr(c, "rank_pattern", None) or {}).values()]
        ranks += [r for _, m in layers for r in m.r.values()]
        target_rank = max(ranks)
    for name, layer in layers:
        for adapter, scale in list(layer.scaling.items()):
            if not isinstance(scale, torch.Tensor):
                dev = next(layer.parameters()).device
                layer.scaling[adapter] = torch.tensor(float(scale), device=dev)
        for adapter in list(layer.lora_A):
            A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            r = A.shape[0]
            if r > target_rank:
                raise ValueError(f"prepare_model_for_compiled_hotswap: {name} adapter {adapter!r} has rank {r}, "
                                 f"above target_rank={target_rank}")
            if r < target_rank:
                with torch.no_grad():
                    layer.lora_A[adapter].weight = nn.Parameter(_pad_rows(A.data, target_rank),
                                                                requires_grad=A.requires_grad)
                    layer.lora_B[adapter].weight = nn.Parameter(_pad_rows(B.data.t(), target_rank).t().contiguous(),
                                                                requires_grad=B.requires_grad)
                layer.lora_A[adapter].out_features = target_rank
                layer.lora_B[adapter].in_features = target_rank


def check_hotswap_configs_compatible(config0, config1) -> None:
    """ValueError naming the first field (CONFIG_KEYS_TO_CHECK) whose values differ between the adapters."""
    d0, d1 = config0.to_dict(), config1.to_dict()
    for key in CONFIG_KEYS_TO_CHECK:
        if d0.get(key) != d1.get(key):
            raise ValueError(f"Incompatible PEFT configs found: {key!r} is {d0.get(key)!r} in the loaded adapter "
                             f"and {d1.get(key)!r} in the one to swap in")


def hotswap_adapter_from_state_dict(model: nn.Module, state_dict: dict, adapter_name: str, config,
                                    parameter_prefix: str = "lora_") -> None:
    """Copy a saved adapter's tensors (file keys, as in adapter_model.safetensors) into ``adapter_name``.

    Every key must land on an existing tensor and every LoRA tensor of the adapter must be given (a
    RuntimeError lists the keys otherwise, before anything is changed). Smaller ranks are zero-padded into
    padded tensors; a compiled model refuses a rank that does not fit."""
    from .save_and_load import _adapter_slots, _model_key_for, _wrappers, unwrap_model

    root = unwrap_model(model)
    slots = dict(_adapter_slots(root, ""))
    wrappers = sorted((k for k, _ in _wrappers(root, "")), key=len, reverse=True)
    targets = dict(root.state_dict(keep_vars=True))
    mapped = {_model_key_for(k, adapter_name, slots, wrappers): v for k, v in state_dict.items()}
    unexpected = sorted(k for k in mapped if k not in targets)
    if unexpected:
        raise RuntimeError(f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}")
    expected = sorted(k for k in targets if parameter_prefix in k
                      and any(k == f"{s}.{adapter_name}" or k.startswith(f"{s}.{adapter_name}.") for s in slots))
    missing = [k for k in expected if k not in mapped]
    if missing:
        raise RuntimeError(f"Hot swapping the adapter did not succeed, missing keys: {', '.join(missing)}")
    compiled = _is_compiled(model)
    plan = []
    for key, value in mapped.items():
        t = targets[key]
        if t.shape == value.shape:
            plan.append((key, t, value, None))
        elif t.dim() == 2 and "lora_A" in key and value.shape[1] == t.shape[1] and value.shape[0] <= t.shape[0]:
            plan.append((key, t, value, (slice(0, value.shape[0]), slice(None))))
        elif t.dim() == 2 and "lora_B" in key and value.shape[0] == t.shape[0] and value.shape[1] <= t.shape[1]:
            plan.append((key, t, value, (slice(None), slice(0, value.shape[1]))))
        elif not compiled:
            plan.append((key, t, value, "replace"))
        else:
            raise RuntimeError(f"Hot swapping {key}: the model holds {list(t.shape)} and the adapter {list(value.shape)}; "
                               f"call prepare_model_for_compiled_hotswap(target_rank=...) with a large enough rank "
                               f"before compiling")
    with torch.no_grad():
        for key, t, value, where in plan:
            if where is None:
                t.copy_(value)
            elif where == "replace":
                mod_name, _, attr = key.rpartition(".")
                mod = root.get_submodule(mod_name)
                setattr(mod, attr, nn.Parameter(value.to(device=t.device, dtype=t.dtype), requires_grad=t.requires_grad))
                if "lora_A" in key:
                    mod.out_features = value.shape[0]
                else:
                    mod.in_features = value.shape[1]
            else:
                t.zero_()
                t[where].copy_(value)
    # the new scale, per layer (rank_pattern / alpha_pattern of the swapped-in config apply)
    from ..tuners.tuners_utils import pattern_value

    for name, layer in _lora_layers(root):
        if adapter_name not in layer.scaling:
            continue
        key = name.split("base_model.model.", 1)[-1]
        r = pattern_value(getattr(config, "rank_pattern", None), key, config.r)
        alpha = pattern_value(getattr(config, "alpha_pattern", None), key, config.lora_alpha)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        cur = layer.scaling[adapter_name]
        if isinstance(cur, torch.Tensor):
            cur.fill_(scale)
        else:
            layer.scaling[adapter_name] = scale


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str, torch_device: Optional[str] = None,
                    **kwargs) -> None:
    """Load the adapter saved at ``model_name_or_path`` into the existing adapter ``adapter_name`` in place."""
    from ..config import PeftConfig
    from .save_and_load import load_peft_weights

    config = PeftConfig.from_pretrained(model_name_or_path, **kwargs)
    loaded = getattr(model, "peft_config", {}).get(adapter_name)
    if loaded is None:
        raise ValueError(f"hotswap_adapter: the model has no adapter {adapter_name!r} to swap into (it has "
                         f"{sorted(getattr(model, 'peft_config', {}))})")
    check_hotswap_configs_compatible(loaded, config)
    state_dict = load_peft_weights(model_name_or_path, device=torch_device)
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config)
