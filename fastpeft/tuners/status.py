"""get_layer_status / get_model_status: what every adapter layer of a model holds and does, as peft reports it.

The dataclasses and their values follow peft 0.21 (learned by running both on the same models): one
TunerLayerStatus per adapter layer (LoRA layers and modules_to_save wrappers), in named_modules order,
named relative to the tuner (``model.<path>`` for a PeftModel, as peft has it), and one TunerModelStatus
that folds them; where layers disagree the model value is "irregular", which means the model is in an
inconsistent state.

Layers are recognised by their layout (``adapter_layer_names`` + ``base_layer`` for adapter layers,
``original_module`` + ``modules_to_save`` for wrappers), so layer types added later are covered as long as
they keep peft's layout.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from torch import nn

from fastpeft.utils.save_and_load import is_lora_layer, is_modules_to_save_wrapper

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[Optional[str], Irregular]


def _fold(values: list) -> Union[bool, Irregular]:
    """True / False when all values are that (and bools), else "irregular"."""
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _containers(module: nn.Module, names) -> list[tuple[str, object]]:
    return [(n, getattr(module, n, None)) for n in names]


def _params_of(item) -> list[torch.Tensor]:
    if isinstance(item, nn.Module):
        return list(item.parameters())
    if isinstance(item, torch.Tensor):
        return [item]
    return []


def _layer_views(module: nn.Module) -> tuple[tuple, tuple, list[str], list[str], list[str]]:
    """(weight containers, other per-adapter containers, active, merged, available) of one adapter layer."""
    if is_modules_to_save_wrapper(module):
        # one full copy per adapter; a wrapper is active for an adapter only when it holds a copy of it (peft
        # deactivates wrappers that lack the model's active adapter, and forward then uses the original)
        active = module.active_adapter
        active_list = [active] if active in module.modules_to_save else []
        return ("modules_to_save",), (), active_list, [], sorted(module.modules_to_save.keys())
    weights = tuple(module.adapter_layer_names)
    available = set()
    for _, container in _containers(module, weights):
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            available.update(container.keys())
    return (weights, tuple(getattr(module, "other_param_names", ())), list(module.active_adapters),
            list(module.merged_adapters), sorted(available))


def _module_type(module: nn.Module) -> str:
    # peft's definition: the start of the repr, e.g. "lora.Linear" or "ModulesToSaveWrapper"
    return repr(module).partition("(")[0]


def _status_of(name: str, module: nn.Module) -> TunerLayerStatus:
    weights, others, active, merged, available = _layer_views(module)
    grads: dict[str, list[bool]] = collections.defaultdict(list)
    for _, container in _containers(module, weights):
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            for key, item in container.items():
                grads[key].extend(p.requires_grad for p in _params_of(item))
    devices: dict[str, list[str]] = collections.defaultdict(list)
    for _, container in _containers(module, weights + others):
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            for key, item in container.items():
                devices[key].extend(p.device.type for p in _params_of(item))
    backend = getattr(module, "quantization_backend", None)
    return TunerLayerStatus(
        name=name,
        module_type=_module_type(module),
        enabled=not module.disable_adapters,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={k: _fold(v) for k, v in grads.items()},
        available_adapters=available,
        devices={k: sorted(set(v)) for k, v in devices.items()},
        quantization_backend=getattr(backend, "backend_name", None) if backend is not None else None,
    )


def _is_peft_model(model) -> bool:
    from fastpeft.peft_model import PeftModel

    return isinstance(model, PeftModel)


def _refuse_prompt_learning(model, fn: str) -> None:
    if model.__dict__.get("_is_prompt_learning"):
        # peft's text: its prompt-learning PeftModels have no tuner to report on either
        raise TypeError(f"{fn}() got an invalid PeftModel instance; prefix tuning and adaption prompt are not "
                        f"supported.")


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One TunerLayerStatus per adapter layer of ``model`` (a PeftModel, or any module with adapters in it).

    Raises ValueError when the model has no adapter layer at all, TypeError for a prompt-learning PeftModel.
    """
    if _is_peft_model(model):
        _refuse_prompt_learning(model, "get_layer_status")
        root = model.base_model
    else:
        root = model
    found = [_status_of(name, module) for name, module in root.named_modules()
             if is_lora_layer(module) or is_modules_to_save_wrapper(module)]
    if not found:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you "
                         "have PEFT adapters injected in the model.")
    return found


def _merged_over_layers(layers: list[TunerLayerStatus]) -> Union[list[str], Irregular]:
    # an adapter merged in some layer must be merged in every layer that has it
    merged_anywhere = set().union(*(s.merged_adapters for s in layers))
    for s in layers:
        if (set(s.available_adapters) - set(s.merged_adapters)) & merged_anywhere:
            return "irregular"
    return sorted(merged_anywhere)


def _count_parameters(model: nn.Module) -> tuple[int, int]:
    from fastpeft.peft_model import PeftModel

    # PeftModel's counting (ZeRO-3 placeholders, 4-bit packing) applies to any module
    return PeftModel.get_nb_trainable_parameters(model)


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter state of the whole model, folded over get_layer_status(model) (see the module docstring)."""
    if _is_peft_model(model):
        _refuse_prompt_learning(model, "get_model_status")
        base_model_type = type(model.get_base_model()).__name__
        trainable, total = model.get_nb_trainable_parameters()
        peft_types = {name: str(getattr(cfg.peft_type, "value", cfg.peft_type))
                      for name, cfg in model.base_model.peft_config.items()}
        adapter_model_type = type(model.base_model).__name__
    else:
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover - transformers is optional for plain modules
            PreTrainedModel = ()
        base_model_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        trainable, total = _count_parameters(model)
        peft_types, adapter_model_type = {}, "None"

    layers = get_layer_status(model)
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    grads: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, list[str]] = collections.defaultdict(list)
    for s in layers:
        for key, value in s.requires_grad.items():
            grads[key].append(value)
        for key, value in s.devices.items():
            devices[key].extend(value)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters=_merged_over_layers(layers),
        requires_grad={k: _fold(v) for k, v in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={k: sorted(set(v)) for k, v in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
