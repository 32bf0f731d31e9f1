"""Prompt-learning adapters: prompt tuning, p-tuning (PromptEncoder) and prefix tuning."""
from .config import (PrefixTuningConfig, PromptEncoderConfig, PromptEncoderReparameterizationType,
                     PromptLearningConfig, PromptTuningConfig, PromptTuningInit)
from .prefix_encoder import PrefixEncoder
from .prompt_embedding import PromptEmbedding
from .prompt_encoder import PromptEncoder

__all__ = ["PrefixEncoder", "PrefixTuningConfig", "PromptEmbedding", "PromptEncoder", "PromptEncoderConfig",
           "PromptEncoderReparameterizationType", "PromptLearningConfig", "PromptTuningConfig", "PromptTuningInit"]
