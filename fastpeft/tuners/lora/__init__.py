"""LoRA for fastpeft: layers (fused through fastpeft.ops), injection (LoraModel), and
``accelerate`` which speeds up an existing HF peft model in place."""
from .conv1d import Conv1D
from .embedding import Embedding
from .layer import LoraLayer
from .linear import Linear
from .model import LoraModel

from .config import LoraConfig, LoraRuntimeConfig

__all__ = ["LoraConfig", "LoraRuntimeConfig", "LoraModel", "LoraLayer", "Linear", "Conv1D", "Embedding"]
