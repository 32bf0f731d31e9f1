"""Adapter weights on disk: which tensors an adapter consists of, their file names, and safe loading.

File format (peft 0.21's, learned by saving with peft and reading the files back):
- keys are the PeftModel's state_dict keys (``base_model.model.`` + the user model's module path)
  with the adapter name removed: ``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``,
  ``...embed_tokens.lora_embedding_A.default`` -> ``...embed_tokens.lora_embedding_A``; a DoRA
  magnitude loses its ``.weight`` too: ``...q_proj.lora_magnitude_vector.default.weight`` ->
  ``...q_proj.lora_magnitude_vector``;
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

Distributed engines: keys are read through wrappers (DDP / DeepSpeedEngine ``module.``, FSDP1
``_fsdp_wrapped_module.``, checkpoint_wrapper, torch.compile ``_orig_mod.``) and sharded values are
gathered before saving (FSDP2 DTensors: ``full_tensor``; ZeRO-3 partitions: ``GatheredParameters``),
which are collectives: under those engines every rank saves (only the main process writes). Loading
copies into FSDP2 DTensors shard by shard and into ZeRO-3 partitions through GatheredParameters
(every rank loads); FSDP1's flat shards are refused (load before wrapping).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
from torch import nn

import safetensors
import safetensors.torch

from ..ops.contract import is_dtensor

__all__ = [
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "EMBEDDING_LAYER_NAMES",
    "AdapterLoadResult",
    "AdapterShapeMismatchError",
    "get_base_model_state_dict",
    "validate_adapter_name",
    "is_lora_layer",
    "is_modules_to_save_wrapper",
    "get_peft_model_state_dict",
    "adapter_state_dicts",
    "set_peft_model_state_dict",
    "unwrap_model",
    "canonical_key",
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
MAGNITUDE_SLOT = ".lora_magnitude_vector"  # DoRA's per-adapter magnitude module; saved without ".weight"


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


def _named_modules(root: nn.Module):
    """named_modules() with engine wrappers left out of the names (see :func:`canonical_key`)."""
    for name, mod in root.named_modules():
        yield canonical_key(name), mod


def _adapter_slots(root: nn.Module, prefix: str):
    """Yield (slot_key, container) for every per-adapter container of every LoRA layer.

    slot_key is ``<prefix><module path>.<attr>`` (e.g. "base_model.model.x.q_proj.lora_A"); container is
    the ModuleDict / ParameterDict keyed by adapter name.
    """
    for name, mod in _named_modules(root):
        if not is_lora_layer(mod):
            continue
        for attr in mod.adapter_layer_names:
            container = getattr(mod, attr, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                yield f"{prefix}{name}.{attr}" if name else f"{prefix}{attr}", container


def _wrappers(root: nn.Module, prefix: str):
    for name, mod in _named_modules(root):
        if is_modules_to_save_wrapper(mod):
            yield f"{prefix}{name}", mod


def _lora_layer_names(root: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}{n}" for n, m in _named_modules(root) if is_lora_layer(m) and n]


def _split_slot_key(key: str, slots: dict) -> Optional[tuple[str, str]]:
    """If ``key`` lies inside a LoRA slot, return (slot_key, rest after the slot), else None."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in slots:
            return head, ".".join(parts[i:])
    return None


# ----------------------------------------------------------------------------------------------------
# models wrapped by a distributed engine (DDP, FSDP1, FSDP2, DeepSpeed ZeRO-3) or torch.compile
# ----------------------------------------------------------------------------------------------------
# Attributes under which wrappers hold the module they wrap: DDP / DeepSpeedEngine / accelerate
# ("module"), FSDP1 ("_fsdp_wrapped_module"), torch.compile ("_orig_mod"), checkpoint_wrapper
# ("_checkpoint_wrapped_module"). A PeftModel itself never has a child under one of these names.
_WRAPPER_ATTRS = ("module", "_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module")
# path components that wrappers put inside module / state_dict names (FSDP1 and checkpoint_wrapper
# remove them from state_dict keys themselves; named_modules() keeps them; torch.compile keeps them)
_WRAPPER_PARTS = frozenset(("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP1 / DeepSpeedEngine / torch.compile / checkpoint wrappers (FSDP2 and
    ZeRO-3 partitioning change a model in place and need no unwrapping)."""
    while True:
        children = model._modules
        inner = next((children[a] for a in _WRAPPER_ATTRS if children.get(a) is not None), None)
        if inner is None:
            return model
        model = inner


def canonical_key(key: str) -> str:
    """A state_dict key or module name as the unwrapped PeftModel has it: wrapper components dropped,
    leading ``module.`` prefixes (DDP, DeepSpeedEngine) removed."""
    parts = key.split(".")
    start = 0
    while start < len(parts) - 1 and parts[start] == "module":
        start += 1
    return ".".join(p for p in parts[start:] if p not in _WRAPPER_PARTS)


def _is_fsdp1(module: nn.Module) -> bool:
    return type(module).__name__ == "FullyShardedDataParallel" and hasattr(module, "_fsdp_wrapped_module")


def _fsdp1_outer_shards(model: nn.Module) -> set:
    """Canonical names of the FSDP1-flattened parameters of ``model`` that no FSDP1 unit inside
    ``model`` owns: an FSDP1 unit around ``model`` owns them, and ``model.state_dict()`` holds only this
    rank's flat shard of them (FSDP1 gathers a unit's parameters in that unit's state_dict hook)."""
    flattened = [(n, p) for n, p in model.named_parameters() if getattr(p, "_fsdp_flattened", False)]
    if not flattened:
        return set()
    owned = {id(p) for m in model.modules() if _is_fsdp1(m) for p in m.parameters()}
    return {canonical_key(n) for n, p in flattened if id(p) not in owned}


def distributed_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _full_tensors(model: nn.Module, tensors: dict, outer_shards: set = frozenset()) -> dict:
    """``tensors`` (canonical key -> tensor) with every sharded value replaced by the full tensor.

    FSDP2 DTensors are all-gathered (``full_tensor``); DeepSpeed ZeRO-3 partitioned parameters (an empty
    placeholder in state_dict) are gathered with ``deepspeed.zero.GatheredParameters``. Both are
    collectives: every rank must call this with the same keys, in the same order (the keys come from
    the model's structure, which is the same on every rank). Values that are already full are kept.
    """
    ds_params = None
    pending = []  # (key, ZeRO-3 parameter)
    out = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        if is_dtensor(value):
            out[key] = value.full_tensor().detach()
            continue
        if key in outer_shards:
            raise RuntimeError(
                f"Cannot save {key!r}: it belongs to a FullyShardedDataParallel (FSDP1) unit that wraps this "
                f"model from outside, so this model only sees this rank's flat shard of it (shape "
                f"{tuple(value.shape)}). Pass the FSDP module to get_peft_model_state_dict, or gather a full state "
                f"dict on every rank and pass it on: `with FSDP.state_dict_type(fsdp_model, "
                f"StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)): "
                f"sd = fsdp_model.state_dict()`, then `model.save_pretrained(path, state_dict=sd)`."
            )
        if type(value).__name__ == "ShardedTensor":
            raise RuntimeError(
                f"Cannot save {key!r}: it is a ShardedTensor (FSDP1 SHARDED_STATE_DICT). Save adapters from a "
                f"FULL_STATE_DICT (the default state_dict type), or pass state_dict= with full tensors."
            )
        if ds_params is None:
            ds_params = {canonical_key(n): p for n, p in model.named_parameters() if hasattr(p, "ds_id")}
        param = ds_params.get(key)
        if param is not None and value.numel() != param.ds_numel:
            pending.append((key, param))
            out[key] = None  # keeps the order
            continue
        out[key] = value.detach()
    if pending:
        import deepspeed  # a ZeRO-3 model was built with it

        with deepspeed.zero.GatheredParameters([p for _, p in pending], modifier_rank=None):
            for key, param in pending:
                out[key] = param.data.detach().clone()
    return out


# ----------------------------------------------------------------------------------------------------
# state dict for saving
# ----------------------------------------------------------------------------------------------------
def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Optional[dict] = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers="auto",
) -> dict:
    """The tensors of adapter ``adapter_name`` under the keys they have in adapter_model.safetensors.

    ``model`` is a PeftModel (keys start with "base_model."), or a PeftModel wrapped by DDP, FSDP1,
    DeepSpeed or torch.compile (``unwrap_compiled`` is accepted for peft compatibility: wrappers are
    always looked through). ``state_dict`` (default: ``model.state_dict()``) is read under the
    unwrapped model's keys (``module.`` and ``_fsdp_wrapped_module.``-style components removed).

    Values are full tensors: FSDP2 DTensors and DeepSpeed ZeRO-3 partitioned parameters are gathered
    here, which is a collective, so under those engines call this on every rank (as
    ``save_pretrained`` does). A ``state_dict`` that already holds full tensors (e.g. from
    ``accelerator.get_state_dict``, which is empty on ranks other than 0) needs no collective.
    """
    return adapter_state_dicts(model, [adapter_name], state_dict, save_embedding_layers)[adapter_name]


def adapter_state_dicts(model: nn.Module, adapter_names: list, state_dict: Optional[dict] = None,
                        save_embedding_layers="auto") -> dict:
    """{adapter name: get_peft_model_state_dict(model, state_dict, name, ...)} from one model.state_dict()
    call (under FSDP1 that call gathers the whole model)."""
    outer = model
    model = unwrap_model(model)
    outer_shards: set = set()
    if state_dict is None:
        # a wrapper's own state_dict gathers what it shards (FSDP1 FULL_STATE_DICT)
        state_dict = outer.state_dict()
        if not _is_fsdp1(outer):
            outer_shards = _fsdp1_outer_shards(model)
    state_dict = {canonical_key(k): v for k, v in state_dict.items()}
    out = {}
    for name in adapter_names:
        config = model.peft_config[name]
        # select by key first (file key -> state_dict key), then gather only the selected tensors
        chosen = _peft_model_state_dict(model, {k: k for k in state_dict}, name, config, save_embedding_layers)
        sources = {src: state_dict[src] for src in chosen.values() if isinstance(src, str)}
        full = _full_tensors(model, sources, outer_shards)
        extra = _full_tensors(model, {k: v for k, v in chosen.items() if not isinstance(v, str)})
        out[name] = {k: full[v] if isinstance(v, str) else extra[k] for k, v in chosen.items()}
    return out


def _peft_model_state_dict(model: nn.Module, state_dict: dict, adapter_name: str, config,
                           save_embedding_layers) -> dict:
    """The selection and renaming of get_peft_model_state_dict (values as found in ``state_dict``)."""
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
                if slot_key.endswith(MAGNITUDE_SLOT) and tail == "weight":
                    tail = ""  # peft stores the magnitude under the slot's own name
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

    # 4. embedding layers in full: the layers peft picks (utils/embedding_layers.py), under their own keys
    from .embedding_layers import embedding_module_names

    for name in embedding_module_names(model, _named_modules(model), config, save_embedding_layers):
        for key, value in state_dict.items():
            if not key.startswith(name + ".") or _split_slot_key(key, slots) is not None:
                continue
            if ".original_module." not in key and ".modules_to_save." not in key:  # copies: saved in step 3
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
class AdapterShapeMismatchError(ValueError, RuntimeError):
    """A tensor in an adapter file does not have the shape the model expects.

    Also a RuntimeError because that is what peft raises in this case (torch's load_state_dict error), so
    callers written for peft that catch RuntimeError keep working.
    """


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
        if slot_key.endswith(MAGNITUDE_SLOT) and not rest:
            rest = "weight"
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

    Every shape is checked before the first copy: a mismatch raises AdapterShapeMismatchError (a ValueError
    and, as in peft, a RuntimeError) naming the key, the shape the model expects and the shape found
    (``source`` names the file). With ignore_mismatched_sizes=True mismatched tensors are skipped with peft's
    warning instead, and reported as missing. Parameters still on the meta device (created with
    low_cpu_mem_usage) are replaced by the loaded tensors, whatever ``low_cpu_mem_usage`` says here.
    """
    model = unwrap_model(model)
    if any(getattr(p, "_fsdp_flattened", False) for p in model.parameters()):
        raise NotImplementedError(
            "Loading adapter weights into a model wrapped by FullyShardedDataParallel (FSDP1) is not supported: "
            "FSDP1 holds flattened shards that a state dict cannot be copied into. Load the adapter before "
            "wrapping (PeftModel.from_pretrained / load_adapter), then wrap; or use FSDP2 (fully_shard)."
        )
    slots = dict(_adapter_slots(model, ""))
    wrapper_names = sorted((k for k, _ in _wrappers(model, "")), key=len, reverse=True)
    targets = {canonical_key(k): v for k, v in model.state_dict(keep_vars=True).items()}
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
    meta_plan = []
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
        if _logical_shape(target) != tuple(value.shape):
            mismatched.append((file_key, model_key, _logical_shape(target), tuple(value.shape)))
            continue
        if target.is_meta:  # created without storage (low_cpu_mem_usage): the loaded tensor takes its place
            meta_plan.append((model_key, target, value))
            continue
        plan.append((target, value))

    if mismatched and not ignore_mismatched_sizes:
        lines = [f"  {fk}: expected shape {list(exp)} (model key {mk}), found {list(found)}"
                 for fk, mk, exp, found in mismatched[:10]]
        more = f"\n  ... and {len(mismatched) - 10} more" if len(mismatched) > 10 else ""
        raise AdapterShapeMismatchError(
            f"Shape mismatch while loading adapter {adapter_name!r}{where}; the adapter was probably trained on a "
            f"different base model or with a different config (r, target_modules):\n" + "\n".join(lines) + more
        )
    if mismatched:
        # peft's text (callers filter on it); the skipped tensors keep their values and count as missing
        listed = "\n".join(f"- {mk}: found shape {torch.Size(found)} in the checkpoint and {torch.Size(exp)} in the "
                           f"model instantiated" for fk, mk, exp, found in mismatched)
        warnings.warn(f"Some weights of {type(model).__name__} were not initialized from the model checkpoint and "
                      f"are being ignored because you passed `ignore_mismatched_sizes=True`: {listed}.{where}")

    _copy_into(plan)
    if meta_plan:
        from .meta_init import materialize

        for model_key, target, value in meta_plan:
            materialize(model, model_key, target, value)

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
    skipped = {fk for fk, _, _, _ in mismatched}
    loaded = {prompt_key if (prompt and k == PROMPT_EMBEDDINGS_KEY) else
              _model_key_for(k, adapter_name, slots, wrapper_names) for k in peft_model_state_dict if k not in skipped}
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


def _logical_shape(target: torch.Tensor) -> tuple:
    """A parameter's shape as the model means it (a ZeRO-3 partitioned parameter holds a placeholder)."""
    ds_shape = getattr(target, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(target.shape)


def _copy_into(plan: list) -> None:
    """Copy each full ``value`` into its ``target``: a plain tensor in place, an FSDP2 DTensor shard by
    shard (every rank holds the whole file, so no communication), a ZeRO-3 partitioned parameter through
    ``deepspeed.zero.GatheredParameters`` (a collective: every rank loads)."""
    zero3 = [(t, v) for t, v in plan if hasattr(t, "ds_id")]
    with torch.no_grad():
        for target, value in plan:
            if hasattr(target, "ds_id"):
                continue
            if is_dtensor(target):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                          target.placements, src_data_rank=None)
                target.copy_(value)
            else:
                target.copy_(value.to(device=target.device))
        if zero3:
            import deepspeed  # a ZeRO-3 model was built with it

            with deepspeed.zero.GatheredParameters([t for t, _ in zero3], modifier_rank=0):
                for target, value in zero3:
                    target.data.copy_(value.to(device=target.device))


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
        if is_dtensor(value):
            raise ValueError(f"Adapter weight {key!r} is a sharded DTensor; gather it first (get_peft_model_state_dict "
                             f"returns full tensors)")
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


# peft exports it from this module; it lives in its own file (it reads the adapter layout, writes nothing)
from .base_model_state import get_base_model_state_dict  # noqa: E402
