"""Trainable tokens: train selected rows of an embedding (peft's TrainableTokens), as LoraConfig's
``trainable_token_indices`` (wrapper.py) and as peft's standalone TrainableTokensConfig (model.py)."""
from .layer import TrainableTokensLayer
from .wrapper import TrainableTokensWrapper, inject_trainable_tokens, token_wrappers, uses_trainable_tokens

__all__ = ["TrainableTokensLayer", "TrainableTokensWrapper", "inject_trainable_tokens", "token_wrappers",
           "uses_trainable_tokens"]
