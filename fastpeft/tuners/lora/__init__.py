"""LoRA for fastpeft: layers (fused through fastpeft.ops), injection (LoraModel), and
``accelerate`` which speeds up an existing HF peft model in place."""
from .conv import Conv1d, Conv2d, Conv3d
from .conv1d import Conv1D
from .embedding import Embedding
from .layer import LoraLayer
from .linear import Linear
from .model import LoraModel

from .config import BdLoraConfig, LoraConfig, LoraRuntimeConfig
from .loftq import LoftQConfig
from .init_configs import CordaConfig, EvaConfig, LoraGAConfig
from .eva import get_eva_state_dict, initialize_lora_eva_weights  # EVA / LoRA-GA: peft's entry points
from .loraga import preprocess_loraga

__all__ = ["BdLoraConfig", "CordaConfig", "EvaConfig", "LoraGAConfig", "get_eva_state_dict", "initialize_lora_eva_weights",
           "preprocess_loraga", "LoftQConfig", "LoraConfig", "LoraRuntimeConfig", "LoraModel", "LoraLayer", "Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding"]
