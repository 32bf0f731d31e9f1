"""Which embedding layers save_pretrained stores in full (``save_embedding_layers``), decided as peft 0.21 does.

- ``True`` / ``False``: always / never.
- ``"auto"``: when an embedding layer (a module named ``embed_tokens`` or ``lm_head``) is a LoRA target,
  unless the adapter trains single token rows (trainable tokens exist to avoid saving the table); otherwise
  when the vocabulary was resized: the model's ``config.vocab_size`` differs from the base model's
  config.json (found next to ``base_model_name_or_path`` locally, or on the Hub).

The layers saved are the model's input and output embeddings (``get_input_embeddings()`` /
``get_output_embeddings()``): the whole module when it is not a LoRA target (it was resized, or asked
for), its base layer when it is one. A model without these methods (not a transformers model) saves
none, with peft's warning. The warning texts are peft's.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Optional

from torch import nn

__all__ = ["EMBEDDING_LAYER_NAMES", "embedding_is_targeted", "vocab_was_resized", "embedding_module_names"]

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _value(x):
    return getattr(x, "value", x)


def embedding_is_targeted(model: nn.Module, config) -> bool:
    """Whether ``config.target_modules`` names an embedding layer (a regex string: one of the model's modules
    named like an embedding layer matches it in full; a list/set: one of the names is in it)."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        if targets == "all-linear":
            return False
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        names = (n for n, _ in inner.named_modules()
                 if any(re.match(rf"(.*\.)?{e}$", n) for e in EMBEDDING_LAYER_NAMES))
        return any(re.fullmatch(targets, n) for n in names)
    return bool(targets) and any(n in targets for n in EMBEDDING_LAYER_NAMES)


def _base_config_exists(model_id: str) -> Optional[bool]:
    """Whether the base model's config.json exists (locally or on the Hub); None when that cannot be told."""
    if os.path.exists(os.path.join(model_id, "config.json")):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        return None
    try:
        from huggingface_hub import file_exists
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    try:
        return file_exists(model_id, "config.json")
    except (HFValidationError, EntryNotFoundError):
        return None
    except Exception as exc:  # network errors: the check is skipped, as in peft
        warnings.warn(f"Unable to fetch remote file due to the following error {exc} - silently ignoring the lookup "
                      f"for the file config.json in {model_id}.")
        return None


def vocab_was_resized(model: nn.Module, config) -> bool:
    """Whether the model's vocabulary size differs from its base model's (peft's "auto" check)."""
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    model_id = getattr(config, "base_model_name_or_path", None)
    if not model_id:
        return False
    exists = _base_config_exists(model_id)
    if exists is None:
        warnings.warn(f"Could not find a config file in {model_id} - will assume that the vocabulary was not modified.")
        return False
    if not (vocab_size and exists):
        return False
    if vocab_size != type(model.config).from_pretrained(model_id).vocab_size:
        warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                      "finetuning.")
        return True
    return False


def _decide(model: nn.Module, config, save_embedding_layers) -> tuple[bool, bool]:
    """(save them?, targeted?) for ``save_embedding_layers`` True / False / "auto"."""
    targeted = embedding_is_targeted(model, config)
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers), targeted
    trainable_tokens = (_value(getattr(config, "peft_type", None)) == "TRAINABLE_TOKENS"
                        or getattr(config, "trainable_token_indices", None) is not None)
    if targeted and not trainable_tokens:
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
        return True, targeted
    return vocab_was_resized(model, config), targeted


def embedding_module_names(model: nn.Module, named_modules, config, save_embedding_layers) -> list[str]:
    """Names (as in ``named_modules``, pairs of (name, module) of ``model``) of the modules whose state_dict
    entries are saved in full."""
    save, targeted = _decide(model, config, save_embedding_layers)
    if not save:
        return []
    if not hasattr(model, "get_input_embeddings"):
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.")
        return []
    named_modules = list(named_modules)
    out = []
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is None:
            continue
        base = getattr(layer, "base_layer", None)
        adapted = isinstance(base, (nn.Linear, nn.Embedding))
        if targeted and not adapted:
            continue  # a targeted run saves only embedding layers that carry LoRA (their base layer)
        wanted = base if targeted else layer  # (the layer comes before its base layer in named_modules)
        name = next((n for n, m in named_modules if m is wanted), None)
        if name and name not in out:
            out.append(name)
    return out
