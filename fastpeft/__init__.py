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
    "PEFT_TYPE_TO_CONFIG_MAPPING": "config",
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
    "LoraRuntimeConfig": "tuners.lora",
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
