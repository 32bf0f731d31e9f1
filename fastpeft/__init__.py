"""fastpeft: peft-compatible parameter-efficient fine-tuning on fused kernels.

The public names mirror peft's, so `from fastpeft import LoraConfig, get_peft_model, PeftModel`
works where `from peft import ...` did.

The names load on first use (PEP 562 ``__getattr__``): importing the package, or a low layer of it
such as fastpeft.ops or fastpeft.kernels, must not import transformers or the model code above it.
"""
from .utils.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_EXPORTS = {
    "AutoPeftModel": "auto",
    "AutoPeftModelForCausalLM": "auto",
    "AutoPeftModelForFeatureExtraction": "auto",
    "AutoPeftModelForQuestionAnswering": "auto",
    "AutoPeftModelForSeq2SeqLM": "auto",
    "AutoPeftModelForSequenceClassification": "auto",
    "AutoPeftModelForTokenClassification": "auto",
    "PEFT_TYPE_TO_CONFIG_MAPPING": "mapping",  # (fastpeft.config's dict, with every implemented type registered)
    "PEFT_TYPE_TO_PREFIX_MAPPING": "mapping",
    "PEFT_TYPE_TO_TUNER_MAPPING": "mapping",
    "get_peft_config": "mapping",
    "PeftWarning": "utils.warning",
    "TunerLayerStatus": "tuners.status",
    "TunerModelStatus": "tuners.status",
    "get_layer_status": "tuners.status",
    "get_model_status": "tuners.status",
    "get_base_model_state_dict": "utils.save_and_load",
    "PeftConfig": "config",
    "PeftConfigMixin": "config",
    "register_peft_config": "config",
    "get_peft_model": "mapping",
    "inject_adapter_in_model": "mapping",
    "QuantLinear": "quant",  # quantized base weights (QLoRA)
    "quantize": "quant",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING": "peft_model",
    "PeftModel": "peft_model",
    "PeftModelForCausalLM": "peft_model",
    "PeftModelForFeatureExtraction": "peft_model",
    "PeftModelForQuestionAnswering": "peft_model",
    "PeftModelForSeq2SeqLM": "peft_model",
    "PeftModelForSequenceClassification": "peft_model",
    "PeftModelForTokenClassification": "peft_model",
    "LoraConfig": "tuners.lora",
    "EvaConfig": "tuners.lora",  # EVA / LoRA-GA inits (tuners/lora/eva.py, loraga.py)
    "LoraGAConfig": "tuners.lora",
    "get_eva_state_dict": "tuners.lora",
    "initialize_lora_eva_weights": "tuners.lora",
    "preprocess_loraga": "tuners.lora",
    "LoftQConfig": "tuners.lora",
    "replace_lora_weights_loftq": "utils.loftq_utils",
    "LoraRuntimeConfig": "tuners.lora",
    "BdLoraConfig": "tuners.lora",
    "LoraModel": "tuners.lora",
    "accelerate": "tuners.lora.accelerate",
    "PrefixTuningConfig": "tuners.prompt",
    "PromptEncoderConfig": "tuners.prompt",
    "PromptEncoderReparameterizationType": "tuners.prompt",
    "PromptLearningConfig": "tuners.prompt",
    "PromptTuningConfig": "tuners.prompt",
    "PromptTuningInit": "tuners.prompt",
    "PeftType": "utils.peft_types",
    "TaskType": "utils.peft_types",
    "get_peft_model_state_dict": "utils.save_and_load",
    "load_peft_weights": "utils.save_and_load",
    "set_peft_model_state_dict": "utils.save_and_load",
    "prepare_model_for_kbit_training": "utils.training",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

# transformers' Trainer, accelerate and TRL treat fastpeft models as peft models (see integrations/ecosystem.py).
# Registering only installs an import hook (stdlib only); the patches run when those libraries' modules load.
from .integrations import ecosystem as _ecosystem  # noqa: E402

_ecosystem.register()
