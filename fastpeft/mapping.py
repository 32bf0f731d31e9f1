"""get_peft_model: the entry point that turns a model plus a config into a PeftModel."""
from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from fastpeft.config import PEFT_TYPE_TO_CONFIG_MAPPING, PeftConfig
from fastpeft.peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel, _check_config, _tuner_class
from fastpeft.utils.peft_types import PeftType
from fastpeft.utils.save_and_load import validate_adapter_name

__all__ = ["get_peft_model", "inject_adapter_in_model", "get_peft_config", "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
           "PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING"]


def _implemented_tables() -> tuple[dict, dict]:
    """peft's public tables, holding only the adapter types fastpeft implements.

    Importing the tuner packages registers their config classes into PEFT_TYPE_TO_CONFIG_MAPPING (the
    dict object of fastpeft.config, shared, so `from fastpeft import PEFT_TYPE_TO_CONFIG_MAPPING` sees all
    of them even when the caller never imported a tuner). peft maps prompt-learning types to the module
    that makes the virtual tokens, LoRA to the model tuner; fastpeft has the same classes.
    """
    from fastpeft.tuners.lora import LoraModel
    from fastpeft.tuners.prompt import PrefixEncoder, PromptEmbedding, PromptEncoder

    tuners = {PeftType.LORA: LoraModel, PeftType.PROMPT_TUNING: PromptEmbedding, PeftType.P_TUNING: PromptEncoder,
              PeftType.PREFIX_TUNING: PrefixEncoder}
    # the prefix every parameter name of the method contains (peft's values; LoraModel.prefix is "lora_")
    prefixes = {PeftType.LORA: LoraModel.prefix, PeftType.PROMPT_TUNING: "prompt_tuning_",
                PeftType.P_TUNING: "p_tuning_", PeftType.PREFIX_TUNING: "prefix_tuning_"}
    return tuners, prefixes


PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING = _implemented_tables()


def get_peft_config(config_dict: dict) -> PeftConfig:
    """The config object for a dict holding ``peft_type`` (peft's function; unknown keys are refused by the
    config class's own __init__, as in peft)."""
    if not isinstance(config_dict, dict) or "peft_type" not in config_dict:
        raise TypeError(f"get_peft_config expects a dict with a 'peft_type' key, got "
                        f"{sorted(config_dict) if isinstance(config_dict, dict) else type(config_dict).__name__}")
    from fastpeft.config import get_peft_config_class

    return get_peft_config_class(config_dict["peft_type"])(**config_dict)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Add adapter ``adapter_name`` described by ``peft_config`` to ``model`` and wrap it.

    Returns the PeftModel subclass for ``peft_config.task_type`` (PeftModel when it is None).
    ``autocast_adapter_dtype`` upcasts fp16/bf16 adapter weights to fp32 (peft's default).
    ``model`` is modified in place (its target layers are replaced by LoRA layers).
    """
    validate_adapter_name(adapter_name)
    if mixed:
        raise NotImplementedError("mixed=True (PeftMixedModel, several adapter types at once) is not implemented "
                                  "in fastpeft")
    _check_config(peft_config)
    if isinstance(model, PeftModel) or hasattr(model, "peft_config"):
        warnings.warn(
            f"get_peft_model: {type(model).__name__} already has adapters (a `peft_config` attribute); adding "
            f"another wrapper on top is usually a mistake: use add_adapter() on the existing PeftModel instead."
        )
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(f"peft_config.revision={peft_config.revision!r} is replaced by revision={revision!r}")
        peft_config.revision = revision
    task = getattr(peft_config.task_type, "value", peft_config.task_type)
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task, PeftModel)
    return cls(model, peft_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False) -> nn.Module:
    """Put the adapter layers into ``model`` in place and return it, without any PeftModel wrapper.

    For users who manage saving and adapter switching themselves (peft's function of the same name).
    """
    validate_adapter_name(adapter_name)
    _check_config(peft_config)
    if peft_config.is_prompt_learning:
        raise ValueError(f"inject_adapter_in_model: {type(peft_config).__name__} is a prompt-learning config; its "
                         f"virtual tokens live in the PeftModel wrapper, so use get_peft_model instead")
    tuner = _tuner_class(peft_config.peft_type)(model, {adapter_name: peft_config}, adapter_name,
                                                low_cpu_mem_usage=low_cpu_mem_usage)
    return tuner.model
