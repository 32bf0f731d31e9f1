"""Helpers shared by the prompt-learning tests: config factories for fastpeft and peft, a tiny tokenizer."""
from __future__ import annotations

import os

import torch

# model kind (tests/_support/models.py) -> task type
KINDS = {"opt": "CAUSAL_LM", "llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "roberta": "SEQ_CLS",
         "roberta_tok": "TOKEN_CLS", "t5": "SEQ_2_SEQ_LM"}
METHODS = ["prompt", "ptuning_mlp", "ptuning_lstm", "prefix", "prefix_proj"]


def make_config(lib, method: str, task_type: str, nvt: int = 3, **extra):
    """The same adapter config built with ``lib`` (the fastpeft or the peft module)."""
    if method == "prompt":
        return lib.PromptTuningConfig(task_type=task_type, num_virtual_tokens=nvt, **extra)
    if method == "ptuning_mlp":
        return lib.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=nvt, encoder_hidden_size=8, **extra)
    if method == "ptuning_lstm":
        return lib.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=nvt, encoder_hidden_size=8,
                                       encoder_reparameterization_type="LSTM", **extra)
    if method == "prefix":
        return lib.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=nvt, **extra)
    if method == "prefix_proj":
        return lib.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=nvt, prefix_projection=True,
                                      encoder_hidden_size=8, **extra)
    raise ValueError(method)


def perturb_prompt(model, seed: int = 7) -> None:
    """Move every prompt parameter away from its initial value (so a test sees trained-looking values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def save_word_tokenizer(folder: str, vocab_size: int = 64, wrap: bool = False) -> str:
    """A word-level tokenizer with ids < vocab_size, saved so AutoTokenizer.from_pretrained(folder) loads it.

    Words are <pad> <unk> <s> </s> w0 w1 ... (ids 0, 1, 2, 3, 4, ...); ``wrap=True`` makes it add
    <s> ... </s> around every text, as many real tokenizers do.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if wrap:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2),
                                                                                               ("</s>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    os.makedirs(folder, exist_ok=True)
    fast.save_pretrained(folder)
    return folder
