"""Adapter weights on disk: which tensors an adapter consists of, their file names, and safe loading.

File format (peft 0.21's, learned by saving with peft and reading the files back):
- keys are the PeftModel's state_dict keys (``base_model.model.`` + the user model's module path)
  with the adapter name removed: ``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``,
  ``...embed_tokens.lora_embedding_A.default`` -> ``...embed_tokens.lora_embedding_A``;
- a modules_to_save copy is stored under the wrapped module's own name:
  ``classifier.modules_to_save.default.dense.weight`` -> ``classifier.dense.weight``;
- ``bias="all"`` adds every state_dict entry whose key contains "bias", unchanged;
  ``bias="lora_only"`` adds the base bias of every LoRA-wrapped module, unchanged;
- embedding layers (``embed_tokens``/``lm_head``), when saved, are stored under their key unchanged.
- prompt-learning adapters (prompt tuning, p-tuning, prefix tuning) store one tensor,
  ``prompt_embeddings``: the prompt table as the model uses it (for p-tuning and projected prefixes
  the prompt network's output), plus their modules_to_save copies as above.

Loading maps a file key back by looking at the model's structure (which modules are LoRA layers,
which are ModulesToSaveWrappers) rather than by string heuristics, and checks every shape before
anything is written into the model, so a bad file never leaves a half-loaded adapter.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
from torch import nn

import safetensors
import safetensors.torch

__all__ = [
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "EMBEDDING_LAYER_NAMES",
    "AdapterLoadResult",
    "validate_adapter_name",
    "is_lora_layer",
    "is_modules_to_save_wrapper",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "load_peft_weights",
    "find_weights_file",
    "load_weights_file",
    "write_weights",
]

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
# peft's names for input/output embedding layers, saved in full when they are adapted (vocabulary
# changes usually go together with training them); the names are part of peft's save behaviour.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"


# ----------------------------------------------------------------------------------------------------
# adapter names
# ----------------------------------------------------------------------------------------------------
def validate_adapter_name(adapter_name: Any) -> str:
    """Return ``adapter_name`` if it can name an adapter, else raise ValueError saying why.

    Non-default adapters are saved into a subfolder named after them, so the name must be a single
    safe path component; it also becomes an nn.ModuleDict key (no '.').
    """
    if not isinstance(adapter_name, str):
        raise ValueError(f"adapter_name must be a string, got {type(adapter_name).__name__}: {adapter_name!r}")
    if adapter_name.strip() == "":
        raise ValueError(f"adapter_name must not be empty or whitespace, got {adapter_name!r}")
    if adapter_name in (".", ".."):
        raise ValueError(f"adapter_name {adapter_name!r} is not allowed: it would name a parent/current folder")
    bad = [c for c in ("/", "\\", "\0", ".") if c in adapter_name]
    if os.sep in adapter_name or (os.altsep and os.altsep in adapter_name):
        bad.append(os.sep)
    if bad:
        raise ValueError(
            f"adapter_name {adapter_name!r} is not a safe folder name: it contains {sorted(set(bad))!r}. "
            f"Adapter names become subfolder names and module keys, so they cannot hold path separators or '.'."
        )
    if hasattr(nn.ModuleDict(), adapter_name):
        # adapter names are keys of nn.ModuleDicts, which cannot hold names of nn.Module attributes
        raise ValueError(
            f"adapter_name {adapter_name!r} clashes with an attribute of torch.nn.Module; choose another name"
        )
    return adapter_name


# ----------------------------------------------------------------------------------------------------
# model structure helpers
# ----------------------------------------------------------------------------------------------------
def is_lora_layer(module: nn.Module) -> bool:
    # duck-typed so this file does not import the tuner (and works for any tuner with peft's layout)
    return isinstance(getattr(module, "adapter_layer_names", None), tuple) and hasattr(module, "base_layer")


def is_modules_to_save_wrapper(module: nn.Module) -> bool:
    return isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict) and hasattr(module, "original_module")


def _adapter_slots(root: nn.Module, prefix: str):
    """Yield (slot_key, container) for every per-adapter container of every LoRA layer.

    slot_key is ``<prefix><module path>.<attr>`` (e.g. "base_model.model.x.q_proj.lora_A"); container is
    the ModuleDict / ParameterDict keyed by adapter name.
    """
    for name, mod in root.named_modules():
        if not is_lora_layer(mod):
            continue
        for attr in mod.adapter_layer_names:
            container = getattr(mod, attr, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                yield f"{prefix}{name}.{attr}" if name else f"{prefix}{attr}", container


def _wrappers(root: nn.Module, prefix: str):
    for name, mod in root.named_modules():
        if is_modules_to_save_wrapper(mod):
            yield f"{prefix}{name}", mod


def _lora_layer_names(root: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}{n}" for n, m in root.named_modules() if is_lora_layer(m) and n]


def _split_slot_key(key: str, slots: dict) -> Optional[tuple[str, str]]:
    """If ``key`` lies inside a LoRA slot, return (slot_key, rest after the slot), else None."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in slots:
            return head, ".".join(parts[i:])
    return None


# ----------------------------------------------------------------------------------------------------
# state dict for saving
# ----------------------------------------------------------------------------------------------------
def _wants_embedding_layers(config, save_embedding_layers) -> bool:
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    targets = getattr(config, "target_modules", None)
    if not targets:
        return False
    # `in` on a regex string is a substring test, on a list/set a membership test (as peft)
    found = [n for n in EMBEDDING_LAYER_NAMES if n in targets]
    if found:
        warnings.warn(
            f"Saving the full weights of the embedding layers {found} as well, because they are LoRA targets "
            f"(save_embedding_layers='auto'); pass save_embedding_layers=False to save only the adapter."
        )
    return bool(found)


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Optional[dict] = None,
    adapter_name: str = "default",
    save_embedding_layers="auto",
) -> dict:
    """The tensors of adapter ``adapter_name`` under the keys they have in adapter_model.safetensors.

    ``model`` is a PeftModel (keys start with "base_model.model.").
    """
    config = model.peft_config[adapter_name]
    if state_dict is None:
        state_dict = model.state_dict()
    slots = dict(_adapter_slots(model, ""))
    out: dict = {}
    if getattr(config, "is_prompt_learning", False):
        _add_modules_to_save(model, state_dict, adapter_name, out)
        out[PROMPT_EMBEDDINGS_KEY] = model.get_prompt_embedding_to_save(adapter_name)
        return out

    # 1. this adapter's LoRA tensors, adapter name removed
    for key, value in state_dict.items():
        hit = _split_slot_key(key, slots)
        if hit is not None:
            slot_key, rest = hit
            adapter, _, tail = rest.partition(".")
            if adapter == adapter_name:
                out[slot_key + (f".{tail}" if tail else "")] = value

    # 2. biases (keys unchanged); LoRA tensors of other adapters never leak into this file
    bias = getattr(config, "bias", "none")
    if bias == "all":
        for key, value in state_dict.items():
            if "bias" in key and _split_slot_key(key, slots) is None:
                out.setdefault(key, value)
    elif bias == "lora_only":
        for layer_name in _lora_layer_names(model, ""):
            key = f"{layer_name}.base_layer.bias"
            if key in state_dict:
                out.setdefault(key, state_dict[key])
    elif bias != "none":
        raise NotImplementedError(f"bias={bias!r} is not implemented (expected 'none', 'all' or 'lora_only')")

    # 3. modules_to_save copies, stored under the wrapped module's name
    _add_modules_to_save(model, state_dict, adapter_name, out)

    # 4. embedding layers in full
    if _wants_embedding_layers(config, save_embedding_layers):
        targets = getattr(config, "target_modules", None) or ()
        names = [n for n in EMBEDDING_LAYER_NAMES if n in targets] or list(EMBEDDING_LAYER_NAMES)
        for key, value in state_dict.items():
            if _split_slot_key(key, slots) is not None:
                continue
            if any(n in key for n in names) and ".original_module." not in key and ".modules_to_save." not in key:
                out.setdefault(key, value)

    return out


def _add_modules_to_save(model: nn.Module, state_dict: dict, adapter_name: str, out: dict) -> None:
    for wrapper_key, wrapper in _wrappers(model, ""):
        if adapter_name not in wrapper.modules_to_save:
            continue
        inner = f"{wrapper_key}.modules_to_save.{adapter_name}."
        for key, value in state_dict.items():
            if key.startswith(inner):
                out[wrapper_key + "." + key[len(inner):]] = value


# ----------------------------------------------------------------------------------------------------
# loading into a model
# ----------------------------------------------------------------------------------------------------
class AdapterLoadResult:
    """What loading an adapter did: keys the file lacked and file keys the model has no place for.

    Iterable as (missing_keys, unexpected_keys), like torch's load_state_dict result.
    """

    def __init__(self, missing_keys: list[str], unexpected_keys: list[str]):
        self.missing_keys = missing_keys
        self.unexpected_keys = unexpected_keys

    def __iter__(self):
        return iter((self.missing_keys, self.unexpected_keys))

    def __repr__(self) -> str:
        return f"AdapterLoadResult(missing_keys={self.missing_keys}, unexpected_keys={self.unexpected_keys})"


def _model_key_for(file_key: str, adapter_name: str, slots: dict, wrapper_names: list[str]) -> str:
    """Map a key as stored in the file to the model's state_dict key for adapter ``adapter_name``."""
    hit = _split_slot_key(file_key, slots)
    if hit is not None:
        slot_key, rest = hit
        return f"{slot_key}.{adapter_name}" + (f".{rest}" if rest else "")
    for wrapper_key in wrapper_names:
        if file_key.startswith(wrapper_key + "."):
            rest = file_key[len(wrapper_key) + 1:]
            if rest.split(".", 1)[0] in ("original_module", "modules_to_save"):
                return file_key
            return f"{wrapper_key}.modules_to_save.{adapter_name}.{rest}"
    return file_key


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict,
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
    source: Optional[str] = None,
) -> AdapterLoadResult:
    """Copy file tensors into adapter ``adapter_name`` of PeftModel ``model``.

    Every shape is checked before the first copy: a mismatch raises ValueError naming the key, the
    shape the model expects and the shape found (``source`` names the file). With
    ignore_mismatched_sizes=True mismatched tensors are skipped with a warning instead.
    ``low_cpu_mem_usage`` is accepted for peft signature compatibility (tensors are copied in place
    either way).
    """
    slots = dict(_adapter_slots(model, ""))
    wrapper_names = sorted((k for k, _ in _wrappers(model, "")), key=len, reverse=True)
    targets = dict(model.state_dict(keep_vars=True))
    where = f" in {source}" if source else ""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    prompt = bool(getattr(config, "is_prompt_learning", False))
    prompt_key = f"prompt_encoder.{adapter_name}.embedding.weight"
    if prompt and not config.inference_mode and PROMPT_EMBEDDINGS_KEY in peft_model_state_dict \
            and (getattr(config, "encoder_reparameterization_type", None) is not None
                 or getattr(config, "prefix_projection", False)):
        warnings.warn(
            f"Loading saved prompt_embeddings{where} into adapter {adapter_name!r}, whose prompt network is still "
            f"active (inference_mode=False): the file holds the network's output, so the prompt will differ. Load "
            f"with PeftModel.from_pretrained(..., is_trainable=False) to use the saved prompt as it is."
        )

    plan = []
    unexpected = []
    mismatched = []
    for file_key, value in peft_model_state_dict.items():
        if prompt and file_key == PROMPT_EMBEDDINGS_KEY:
            model_key = prompt_key
        else:
            model_key = _model_key_for(file_key, adapter_name, slots, wrapper_names)
        if model_key not in targets:
            unexpected.append(file_key)
            continue
        target = targets[model_key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"Adapter weight {file_key!r}{where} is a {type(value).__name__}, not a tensor")
        if tuple(target.shape) != tuple(value.shape):
            mismatched.append((file_key, model_key, tuple(target.shape), tuple(value.shape)))
            continue
        plan.append((target, value))

    if mismatched and not ignore_mismatched_sizes:
        lines = [f"  {fk}: expected shape {list(exp)} (model key {mk}), found {list(found)}"
                 for fk, mk, exp, found in mismatched[:10]]
        more = f"\n  ... and {len(mismatched) - 10} more" if len(mismatched) > 10 else ""
        raise ValueError(
            f"Shape mismatch while loading adapter {adapter_name!r}{where}; the adapter was probably trained on a "
            f"different base model or with a different config (r, target_modules):\n" + "\n".join(lines) + more
        )
    for fk, mk, exp, found in mismatched:
        warnings.warn(f"Skipping {fk}{where}: expected shape {list(exp)}, found {list(found)}")

    with torch.no_grad():
        for target, value in plan:
            target.copy_(value.to(device=target.device))

    expected = set()
    for slot_key, container in slots.items():
        if adapter_name in container.keys():
            inner = f"{slot_key}.{adapter_name}"
            expected.update(k for k in targets if k == inner or k.startswith(inner + "."))
    for wrapper_key, wrapper in _wrappers(model, ""):
        if adapter_name in wrapper.modules_to_save:
            inner = f"{wrapper_key}.modules_to_save.{adapter_name}."
            expected.update(k for k in targets if k.startswith(inner))
    if prompt and prompt_key in targets:
        expected.add(prompt_key)
    loaded = {prompt_key if (prompt and k == PROMPT_EMBEDDINGS_KEY) else
              _model_key_for(k, adapter_name, slots, wrapper_names) for k in peft_model_state_dict}
    missing = sorted(expected - loaded)
    if missing:
        warnings.warn(
            f"Adapter {adapter_name!r}{where} has no weights for {len(missing)} tensor(s) of the model; they keep "
            f"their initial values. First ones: {missing[:5]}"
        )
    if unexpected:
        warnings.warn(
            f"{len(unexpected)} weight(s){where} match nothing in the model and were ignored. First ones: "
            f"{unexpected[:5]}"
        )
    return AdapterLoadResult(missing, unexpected)


# ----------------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------------
def find_weights_file(model_id: str, subfolder: Optional[str] = None, **hub_kwargs) -> str:
    base = os.fspath(model_id)
    folder = os.path.join(base, subfolder) if subfolder else base
    if os.path.isdir(folder):
        for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(
            f"No adapter weights in {folder!r}: expected {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}"
        )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise FileNotFoundError(f"{folder!r} is not a local folder and huggingface_hub is not installed") from None
    errors = []
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        try:
            return hf_hub_download(base, name, subfolder=subfolder, **hub_kwargs)
        except Exception as exc:  # try the next file name; report both failures below
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    raise FileNotFoundError(f"Could not find adapter weights for {base!r} locally or on the Hub: " + "; ".join(errors))


def load_weights_file(path: str, device: Optional[str] = None) -> dict:
    """Read one adapter weights file; any failure raises an error that names the file."""
    device = device or "cpu"
    if path.endswith(".safetensors"):
        try:
            return safetensors.torch.load_file(path, device=device)
        except Exception as exc:
            raise ValueError(
                f"Could not read adapter weights {path!r}: the safetensors file is truncated or corrupt "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    try:
        # weights_only=True: a pickle can run arbitrary code; adapter files only ever hold tensors
        data = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"Could not read adapter weights {path!r} with torch.load(weights_only=True): the file is corrupt or "
            f"holds objects other than tensors ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise ValueError(f"Adapter weights {path!r} must be a dict of name -> tensor, got {type(data).__name__}")
    return data


def load_peft_weights(model_id: str, device: Optional[str] = None, subfolder: Optional[str] = None,
                      **hub_kwargs) -> dict:
    """The tensors of an adapter folder (or Hub repo): adapter_model.safetensors, else adapter_model.bin."""
    path = find_weights_file(model_id, subfolder, **hub_kwargs)
    return load_weights_file(path, device=device)


# ----------------------------------------------------------------------------------------------------
# writing files (PeftModel.save_pretrained stages them in a temporary folder and moves them into place)
# ----------------------------------------------------------------------------------------------------
def _untie(state_dict: dict) -> dict:
    """Contiguous tensors with no shared storage (safetensors refuses tied/aliased tensors)."""
    seen = set()
    out = {}
    for key, value in state_dict.items():
        value = value.detach()
        ptr = (value.untyped_storage().data_ptr(), value.device) if value.numel() else None
        if ptr is not None and ptr in seen:
            value = value.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = value.contiguous()
    return out


def write_weights(state_dict: dict, path: str, safe_serialization: bool = True) -> None:
    """Serialize adapter tensors to ``path`` (no atomicity here: PeftModel.save_pretrained writes into a
    fastpeft.utils.atomic.staged_folder; use atomic_path for a single file)."""
    if safe_serialization:
        tensors = _untie(state_dict)
        # looked up through the module at call time so tests can make serialization fail midway
        safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    else:
        torch.save({k: v.detach() for k, v in state_dict.items()}, path)
