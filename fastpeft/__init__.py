"""fastpeft: peft-compatible parameter-efficient fine-tuning on fused kernels.

The public names mirror peft's, so `from fastpeft import LoraConfig, get_peft_model, PeftModel`
works where `from peft import ...` did.
"""
__version__ = "0.1.0"

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PEFT_TYPE_TO_CONFIG_MAPPING, PeftConfig, PeftConfigMixin, register_peft_config
from .mapping import get_peft_model, inject_adapter_in_model
from .quant import QuantLinear, quantize  # quantized base weights (QLoRA)
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .tuners.lora import LoraConfig, LoraModel
from .tuners.lora.accelerate import accelerate
from .tuners.prompt import (PrefixTuningConfig, PromptEncoderConfig, PromptEncoderReparameterizationType,
                            PromptLearningConfig, PromptTuningConfig, PromptTuningInit)
from .utils.peft_types import PeftType, TaskType
from .utils.save_and_load import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .utils.training import prepare_model_for_kbit_training
from .integrations import trainer as _trainer_integration

# transformers' Trainer saves fastpeft models as adapters, like peft models (see integrations/trainer.py)
_trainer_integration.register()

__all__ = [
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "LoraConfig", "LoraModel", "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING", "PeftConfig", "PeftConfigMixin", "PeftModel", "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "PeftType", "TaskType",
    "accelerate", "get_peft_model", "get_peft_model_state_dict", "inject_adapter_in_model",
    "load_peft_weights", "prepare_model_for_kbit_training", "register_peft_config", "set_peft_model_state_dict",
    "PrefixTuningConfig", "PromptEncoderConfig", "PromptEncoderReparameterizationType", "PromptLearningConfig",
    "PromptTuningConfig", "PromptTuningInit",
    "QuantLinear", "quantize",
]
