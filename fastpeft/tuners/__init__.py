"""fastpeft.tuners: the names peft exports from ``peft.tuners`` that fastpeft implements (loaded on first use)."""
from ..utils.lazy import lazy_exports

_EXPORTS = {
    "LoftQConfig": "lora",
    "EvaConfig": "lora",
    "LoraGAConfig": "lora",
    "get_eva_state_dict": "lora",
    "initialize_lora_eva_weights": "lora",
    "preprocess_loraga": "lora",
    "LoraConfig": "lora",
    "BdLoraConfig": "lora",
    "LoraModel": "lora",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
