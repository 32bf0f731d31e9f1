"""Tied embeddings: which modules share the input embedding's weight, and peft's rules and warnings.

A transformers model with ``tie_word_embeddings=True`` uses the input embedding's Parameter as the
output head's weight. An adapter that changes one of them must change the other the same way or
the model stops being what it was trained as; peft's rules for that (learned by running peft 0.21.2):

- trainable tokens on the input embedding also wrap the tied head, sharing the same rows;
- ``ensure_weight_tying=True`` with the embedding in ``modules_to_save`` or ``target_modules`` makes
  peft tie the head's copy / LoRA to the embedding's (not implemented in fastpeft: refused, see
  :func:`check_weight_tying`); without them it only warns;
- an embedding in ``modules_to_save`` / ``target_modules`` of a tied model without
  ``ensure_weight_tying`` warns that the adapter breaks the tie.

Tied modules are found by identity (the modules whose weight *is* the input embedding's Parameter),
on models whose config says ``tie_word_embeddings`` and that declare ``_tied_weights_keys``, which is
when peft's own lookup finds any.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional

from torch import nn

__all__ = ["EMBEDDING_LAYER_NAMES", "check_weight_tying", "input_embeddings", "input_embeddings_name",
           "tied_module_names", "weights_tied"]

# peft's short names for input/output embedding layers (its weight-tying checks look for these)
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")

TIE_WARNING = ("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but `ensure_weight_tying` "
               "is not set to True. This can lead to complications, for example when merging the adapter or "
               "converting your model to formats other than safetensors. Check the discussion here: "
               "https://github.com/huggingface/peft/issues/2777")


def weights_tied(model: nn.Module) -> bool:
    """The model config's ``tie_word_embeddings`` (False for models without a config)."""
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        return bool(config.get("tie_word_embeddings", False))
    return bool(getattr(config, "tie_word_embeddings", False))


def input_embeddings(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError):  # declared but not implemented by the model class
        return None


def input_embeddings_name(model: nn.Module, default: Optional[str] = None) -> Optional[str]:
    """The module name of the model's input embedding (``default`` when the model has none)."""
    emb = input_embeddings(model)
    if emb is None:
        return default
    return next((name for name, mod in model.named_modules() if mod is emb), default)


def _own_weight(module: nn.Module):
    """The weight Parameter a module holds itself or through adapter wrappers (not a merged view)."""
    while True:
        inner = next((module._modules[a] for a in ("token_adapter", "base_layer", "original_module")
                      if module._modules.get(a) is not None), None)
        if inner is None:
            return module._parameters.get("weight")
        module = inner


def _outer_name(name: str) -> str:
    # a weight inside an adapter wrapper belongs to the wrapped module's place in the model
    changed = True
    while changed:
        changed = False
        for tail in (".token_adapter.base_layer", ".base_layer", ".original_module"):
            if name.endswith(tail):
                name, changed = name[: -len(tail)], True
    return name


def tied_module_names(model: nn.Module) -> list[str]:
    """Names of the modules (other than the input embedding) whose weight is the input embedding's."""
    if not weights_tied(model) or not getattr(model, "_tied_weights_keys", None):
        return []
    emb = input_embeddings(model)
    weight = _own_weight(emb) if emb is not None else None
    if weight is None:
        return []
    emb_name = input_embeddings_name(model)
    found = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is weight:
            module = _outer_name(name.rpartition(".")[0])
            if module != emb_name and not (emb_name and module.startswith(emb_name + ".")):
                found.add(module)
    return sorted(found)


def _names_embedding(names) -> bool:
    return any(str(m).split(".")[-1] in EMBEDDING_LAYER_NAMES for m in names)


def check_weight_tying(model: nn.Module, config) -> None:
    """peft's checks of a LoraConfig against a model's tied embeddings (run before injection): its warnings,
    and a refusal of the ensure_weight_tying cases fastpeft does not implement."""
    to_save = _names_embedding(getattr(config, "modules_to_save", None) or [])
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        in_target = any(re.fullmatch(targets, n) for n in EMBEDDING_LAYER_NAMES)
    else:
        in_target = _names_embedding(targets or [])
    tied = tied_module_names(model)
    if getattr(config, "ensure_weight_tying", False):
        if not tied:
            warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model")
        elif to_save or in_target:
            where = "modules_to_save" if to_save else "target_modules"
            raise NotImplementedError(
                f"ensure_weight_tying=True with an embedding layer in {where} (tied modules: {tied}) is not "
                f"implemented in fastpeft: peft would tie the output head's adapter to the embedding's. Set "
                f"ensure_weight_tying=False (the adapter then trains the embedding alone, as peft warns), use "
                f"trainable_token_indices (tied heads follow the embedding), or use HF peft for this adapter.")
        else:
            warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                          "`modules_to_save` or `target_modules`")
    elif (to_save or in_target) and tied:
        warnings.warn(TIE_WARNING)
