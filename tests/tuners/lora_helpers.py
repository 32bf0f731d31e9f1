"""Tiny models and peft-side twins shared by the tuners tests (no test functions here)."""
from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

import peft
import transformers
from fastpeft.tuners.lora import LoraConfig, LoraModel

transformers.logging.set_verbosity_error()
logging.getLogger("peft").setLevel(logging.ERROR)

SMALL = dict(num_hidden_layers=2, vocab_size=64)


def tiny(arch: str) -> nn.Module:
    """A 2-layer model of ``arch`` with hidden size 16, seeded so twins start identical."""
    torch.manual_seed(0)
    T = transformers
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                                num_key_value_heads=2, **SMALL))
    if arch == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                                    num_key_value_heads=2, **SMALL))
    if arch == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                                num_key_value_heads=2, **SMALL))
    if arch == "opt":
        return T.OPTForCausalLM(T.OPTConfig(hidden_size=16, ffn_dim=32, num_attention_heads=2,
                                            word_embed_proj_dim=16, max_position_embeddings=32, **SMALL))
    if arch == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                              bos_token_id=0, eos_token_id=0))
    if arch == "gpt_neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                                    max_position_embeddings=32, **SMALL))
    if arch == "bert":
        return T.BertModel(T.BertConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        max_position_embeddings=32, **SMALL))
    if arch == "roberta":
        return T.RobertaForSequenceClassification(T.RobertaConfig(hidden_size=16, intermediate_size=32,
                                                                  num_attention_heads=2, max_position_embeddings=40,
                                                                  **SMALL))
    if arch == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=2,
                                                       vocab_size=64, decoder_start_token_id=0))
    raise ValueError(arch)


class Plain(nn.Module):
    """A plain nn.Module with an embedding, a numbered block list, a head and biases everywhere."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8)) for _ in range(3)])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        h = self.emb(ids)
        for blk in self.layers:
            h = h + blk(h)
        return self.head(self.norm(h))


def ids_for(model: nn.Module, shape=(2, 6)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 20, shape, generator=g)


def run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(getattr(model, "config", None), transformers.T5Config) or "T5" in type(model).__name__:
        out = model(input_ids=ids, decoder_input_ids=ids)
    else:
        out = model(ids)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def twins(base: nn.Module, **cfg):
    """(fastpeft LoraModel, peft LoraModel) on copies of ``base`` with the same config and weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pcfg = peft.LoraConfig(**cfg)
        theirs = peft.LoraModel(copy.deepcopy(base), pcfg, "default")
        ours = LoraModel(copy.deepcopy(base), LoraConfig(**cfg), "default")
    return ours, theirs


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy every tensor of src into dst by identical state_dict key (errors on any mismatch)."""
    dst.load_state_dict(src.state_dict(), strict=True)


def lora_names(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
