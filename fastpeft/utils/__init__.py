"""fastpeft.utils: the names peft exports from ``peft.utils`` that fastpeft implements (loaded on first use)."""
from .lazy import lazy_exports

_EXPORTS = {
    "PeftType": "peft_types",
    "TaskType": "peft_types",
    "PeftWarning": "warning",
    "get_peft_model_state_dict": "save_and_load",
    "set_peft_model_state_dict": "save_and_load",
    "load_peft_weights": "save_and_load",
    "get_base_model_state_dict": "save_and_load",
    "SAFETENSORS_WEIGHTS_NAME": "save_and_load",
    "WEIGHTS_NAME": "save_and_load",
    "prepare_model_for_kbit_training": "training",
    "replace_lora_weights_loftq": "loftq_utils",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
