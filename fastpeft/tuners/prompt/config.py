"""Configs of the prompt-learning methods: prompt tuning, p-tuning and prefix tuning.

Field names, defaults and the peft_type each config writes follow peft 0.21 (the adapter_config.json
format). The model-dependent fields (token_dim, num_layers, num_attention_heads,
num_transformer_submodules) may be left None: PeftModel fills them in from the base model's config
before the adapter is built, and they are saved filled in, as peft saves them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from fastpeft.config import PeftConfig, register_peft_config
from fastpeft.utils.peft_types import PeftType

__all__ = [
    "PromptLearningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PrefixTuningConfig",
]


class PromptEncoderReparameterizationType(str, enum.Enum):
    """How p-tuning turns its trainable virtual-token table into prompts."""

    MLP = "MLP"
    LSTM = "LSTM"


class PromptTuningInit(str, enum.Enum):
    """How prompt tuning initialises its virtual-token embeddings."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


def _check_positive(owner: str, name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__}: {value!r}")
    if value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {name}={value}")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the methods that add virtual tokens instead of changing layers."""

    num_virtual_tokens: int = field(default=None, metadata={"help": "How many virtual tokens are prepended."})
    token_dim: int = field(
        default=None,
        metadata={"help": "Width of one virtual token; taken from the base model (its hidden size) when None."},
    )
    num_transformer_submodules: Optional[int] = field(
        default=None,
        metadata={"help": "1 for encoder-only and decoder-only models, 2 for encoder-decoder; "
                          "from the task when None."},
    )
    num_attention_heads: Optional[int] = field(
        default=None, metadata={"help": "Attention heads of the base model; taken from its config when None."}
    )
    num_layers: Optional[int] = field(
        default=None, metadata={"help": "Transformer layers of the base model; taken from its config when None."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules (e.g. a classification head) trained in full and saved with the adapter."},
    )

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        # None is allowed here (peft allows it too) and rejected when the adapter is built.
        for name in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                     "num_layers"):
            _check_positive(owner, name, getattr(self, name))

    @property
    def is_prompt_learning(self) -> bool:
        return True


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: the virtual tokens are a trainable embedding table, used as they are."""

    prompt_tuning_init: Union[PromptTuningInit, str] = field(
        default=PromptTuningInit.RANDOM,
        metadata={"help": "Initialisation: RANDOM, SAMPLE_VOCAB (rows of the word embeddings at random token "
                          "ids) or TEXT (the embeddings of prompt_tuning_init_text's tokens)."},
    )
    prompt_tuning_init_text: Optional[str] = field(
        default=None, metadata={"help": "Text whose token embeddings initialise the prompt (TEXT init only)."}
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer (name or folder) used to tokenize the init text (TEXT init only)."}
    )
    tokenizer_kwargs: Optional[dict] = field(
        default=None, metadata={"help": "Extra kwargs for AutoTokenizer.from_pretrained (TEXT init only)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.PROMPT_TUNING
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        valid = [m.value for m in PromptTuningInit]
        if init not in valid:
            raise ValueError(f"PromptTuningConfig.prompt_tuning_init must be one of {valid}, got {init!r}")
        if init == PromptTuningInit.TEXT.value:
            if not self.tokenizer_name_or_path:
                raise ValueError(
                    "PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the tokenizer that "
                    f"turns prompt_tuning_init_text into token ids), got tokenizer_name_or_path="
                    f"{self.tokenizer_name_or_path!r}"
                )
            if not self.prompt_tuning_init_text:
                raise ValueError(
                    "PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text, got "
                    f"prompt_tuning_init_text={self.prompt_tuning_init_text!r}"
                )
        if self.tokenizer_kwargs and init != PromptTuningInit.TEXT.value:
            raise ValueError(
                f"PromptTuningConfig.tokenizer_kwargs is only used with prompt_tuning_init='TEXT', but "
                f"prompt_tuning_init={init!r}"
            )


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: a small network (MLP or bidirectional LSTM + MLP) produces the virtual tokens."""

    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = field(
        default=PromptEncoderReparameterizationType.MLP,
        metadata={"help": "The prompt network: MLP or LSTM."},
    )
    encoder_hidden_size: int = field(
        default=None, metadata={"help": "Hidden width of the prompt network; token_dim when None."}
    )
    encoder_num_layers: int = field(
        default=2, metadata={"help": "LSTM layers (LSTM only; the MLP always has three linear layers)."}
    )
    encoder_dropout: float = field(default=0.0, metadata={"help": "Dropout between LSTM layers (LSTM only)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.P_TUNING
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        valid = [m.value for m in PromptEncoderReparameterizationType]
        if kind not in valid:
            raise ValueError(
                f"PromptEncoderConfig.encoder_reparameterization_type must be one of {valid}, got {kind!r}"
            )
        _check_positive("PromptEncoderConfig", "encoder_hidden_size", self.encoder_hidden_size)
        _check_positive("PromptEncoderConfig", "encoder_num_layers", self.encoder_num_layers)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: trainable key/value vectors prepended in every attention layer."""

    init_weights: Optional[Literal["zero"]] = field(
        default=None,
        metadata={"help": "None: random normal prefix; 'zero': start from zeros (without prefix_projection only)."},
    )
    encoder_hidden_size: int = field(
        default=None, metadata={"help": "Hidden width of the projection network (prefix_projection only)."}
    )
    prefix_projection: bool = field(
        default=False,
        metadata={"help": "True: compute the prefix with a two-layer tanh MLP from a small embedding table."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.PREFIX_TUNING
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}")
        _check_positive("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size)


register_peft_config(PeftType.PROMPT_TUNING, PromptTuningConfig)
register_peft_config(PeftType.P_TUNING, PromptEncoderConfig)
register_peft_config(PeftType.PREFIX_TUNING, PrefixTuningConfig)
