"""Saving a base-rewriting adapter (PiSSA, OLoRA, CorDA, LoRA-GA) as a plain LoRA of the ORIGINAL model.

Those inits keep W_res = W - s B0 A0 in the base model. After training (A, B) the model computes
W_res + s B A = W + s (B A - B0 A0), which is the plain LoRA [A; A0], [B, -B0] of rank 2r with the
same scale s (alpha and r both doubled; alpha * sqrt(2) with rsLoRA). peft 0.21.2's
``save_pretrained(..., path_initial_model_for_weight_conversion=<folder of the adapter saved right
after init>)`` writes exactly that, and so does this module:

- the folder's adapter_config.json is rewritten with ``init_lora_weights=True`` (so it loads as a
  plain adapter and is not decomposed again), then loaded as a temporary adapter named after the
  folder, its weights (A0, B0) read, and the temporary adapter deleted;
- only the lora_A / lora_B tensors are written (as peft: other tensors of the adapter are left out);
- the saved config: init_lora_weights=True, r and lora_alpha doubled (alpha * sqrt(2) with rsLoRA),
  rank_pattern / alpha_pattern values doubled. rsLoRA with rank/alpha patterns is refused, since
  the doubled pattern ranks would not keep each layer's scale.
"""
from __future__ import annotations

import copy
import os
import warnings

import torch

__all__ = ["check_conversion_config", "converted_config", "subtract_initial_adapter", "weights_for_initial_model"]


def check_conversion_config(config) -> None:
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`.")
    if not any(str(config.init_lora_weights).lower().startswith(p)
               for p in ("pissa", "corda", "olora", "lora_ga", "true")):
        warnings.warn("`path_initial_model_for_weight_conversion` only works for converting a "
                      "PiSSA/CorDA/OLoRA/LoRA-GA adapter to a LoRA adapter")


def subtract_initial_adapter(trained: dict, initial: dict, source: str) -> dict:
    """{key: [A; A0] or [B, -B0]} for the lora_A / lora_B keys of ``trained`` (file keys, as saved)."""
    out = {}
    for key, value in trained.items():
        if "lora_A" not in key and "lora_B" not in key:
            continue
        if key not in initial:
            raise KeyError(f"{key!r} is in the adapter being saved but not in the initial adapter at {source!r}; "
                           f"was that folder saved from this model right after initialisation?")
        if "lora_A" in key:
            out[key] = torch.cat([value, initial[key].to(value.device)], dim=0)
        else:
            out[key] = torch.cat([value, -initial[key].to(value.device)], dim=1)
    return out


def weights_for_initial_model(peft_model, adapter_name: str, weights: dict, path: str) -> dict:
    """``weights`` (file keys) of ``adapter_name`` converted to a plain LoRA against the original base.

    Rewrites ``path``'s adapter_config.json as a plain LoRA config (see the module docstring)."""
    from fastpeft.utils.save_and_load import adapter_state_dicts

    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    # (peft checks its already-rewritten copy, so its "only works for PiSSA/..." warning never fires; the
    # adapter's own init is checked here)
    check_conversion_config(config)
    config.init_lora_weights = True
    config.save_pretrained(path)
    initial_name = os.path.basename(os.path.normpath(path))
    if initial_name in peft_model.peft_config:
        raise ValueError(f"The initial adapter folder's name {initial_name!r} is also the name of a loaded adapter; "
                         f"rename the folder (its name is used as a temporary adapter name, as in peft)")
    peft_model.load_adapter(os.path.dirname(os.path.normpath(path)), subfolder=initial_name, adapter_name=initial_name)
    try:
        init = str(peft_model.peft_config[initial_name].init_lora_weights).lower()
        if init.startswith("pissa") or init in ("corda", "olora", "lora_ga"):
            raise ValueError("The `init_lora_weights` parameter of the initial adapter should be set to `True`. "
                             "Otherwise, `self.load_adapter` will subtract the decomposed values again based on the "
                             "residual model.")
        initial = adapter_state_dicts(peft_model, [initial_name])[initial_name]
        return subtract_initial_adapter(weights, initial, path)
    finally:
        peft_model.delete_adapter(initial_name)


def converted_config(config):
    """The config saved next to converted weights: a plain rank-2r LoRA with the same scale."""
    config = copy.copy(config)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha = config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2)
    if config.rank_pattern:
        config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    if config.alpha_pattern:
        config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return config
