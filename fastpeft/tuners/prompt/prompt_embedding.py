"""Prompt tuning's virtual-token table (peft's ``PromptEmbedding`` layout: one ``embedding`` table)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import PromptTuningInit


def _init_value(config) -> str:
    return getattr(config.prompt_tuning_init, "value", config.prompt_tuning_init)


def text_init_token_ids(config, total_virtual_tokens: int) -> list[int]:
    """Token ids of ``prompt_tuning_init_text``, cut or repeated to exactly ``total_virtual_tokens``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(
            f"PromptTuningConfig.prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no tokens with "
            f"tokenizer {config.tokenizer_name_or_path!r}; cannot initialise the prompt from it"
        )
    # repeat a short text until it covers every virtual token, then cut
    ids = ids * math.ceil(total_virtual_tokens / len(ids))
    return ids[:total_virtual_tokens]


class PromptEmbedding(nn.Module):
    """``embedding``: [num_virtual_tokens * num_transformer_submodules, token_dim], used as the prompt."""

    def __init__(self, config, word_embeddings: nn.Module):
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        init = _init_value(config)
        if init == PromptTuningInit.RANDOM.value or config.inference_mode:
            # inference: the weights come from the adapter file, no need to read a tokenizer
            return
        vocab = word_embeddings.weight.shape[0]
        if init == PromptTuningInit.SAMPLE_VOCAB.value:
            ids = torch.randint(0, vocab, (total,), device=word_embeddings.weight.device)
        else:  # TEXT
            ids = torch.tensor(text_init_token_ids(config, total), device=word_embeddings.weight.device)
            too_big = ids[ids >= vocab]
            if too_big.numel():
                raise ValueError(
                    f"Tokenizer {config.tokenizer_name_or_path!r} produced token id {int(too_big[0])} for "
                    f"prompt_tuning_init_text, but the model's vocabulary has only {vocab} entries"
                )
        with torch.no_grad():
            rows = word_embeddings(ids).detach().to(torch.float32)
            self.embedding.weight.copy_(rows)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)
