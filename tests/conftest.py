"""Shared tiny transformers models for the PeftModel / save-load / peft-compatibility tests.

Models are built from transformers configs with random weights (hidden 16, 2 layers, vocab 64).
Every build reseeds torch, so two calls with the same arguments give bit-identical twins: one is
wrapped by fastpeft, the other by HF peft, and their outputs are compared.

transformers is imported inside the fixtures only, so collecting the kernel/ops tests stays fast.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

VOCAB = 64


def build_tiny_model(kind: str, seed: int = 0):
    """A fresh tiny model of ``kind`` with weights fixed by ``seed``."""
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if kind == "opt":
        cfg = T.OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                          word_embed_proj_dim=16, max_position_embeddings=64, pad_token_id=1)
        return T.OPTForCausalLM(cfg)
    if kind == "llama":
        cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                            attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return T.LlamaForCausalLM(cfg)
    if kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return T.GPT2LMHeadModel(cfg)
    if kind in ("roberta", "roberta_tok", "roberta_qa"):
        cfg = T.RobertaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=72,
                              num_labels=2 if kind == "roberta_qa" else 3)
        cls = {"roberta": T.RobertaForSequenceClassification, "roberta_tok": T.RobertaForTokenClassification,
               "roberta_qa": T.RobertaForQuestionAnswering}[kind]
        return cls(cfg)
    if kind == "llama_seqcls":  # a head named "score"
        cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                            num_labels=2, pad_token_id=0)
        return T.LlamaForSequenceClassification(cfg)
    if kind == "bert":
        cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=64)
        return T.BertModel(cfg)
    if kind == "t5":
        cfg = T.T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=2,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return T.T5ForConditionalGeneration(cfg)
    raise ValueError(f"unknown tiny model kind {kind!r}")


def tiny_inputs(kind: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    """Model inputs for ``kind`` (token ids avoid the special ids 0-2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
    return out


def model_output(model, kind: str, inputs: dict) -> torch.Tensor:
    """The main output tensor (logits, or last hidden state / QA start+end logits), in eval mode."""
    model.eval()  # dropout off: outputs must be comparable
    with torch.no_grad():
        out = model(**inputs)
    if kind == "roberta_qa":
        return torch.cat([out.start_logits, out.end_logits], dim=-1)
    if hasattr(out, "logits"):
        return out.logits
    return out.last_hidden_state


@pytest.fixture
def tiny():
    """Namespace: tiny.model(kind, seed=0), tiny.inputs(kind, ...), tiny.output(model, kind, inputs)."""
    return SimpleNamespace(model=build_tiny_model, inputs=tiny_inputs, output=model_output)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """Factory: tiny_base_dir(kind) -> local folder with a saved tiny base model (made once per session)."""
    cache = {}

    def make(kind: str = "llama") -> str:
        if kind not in cache:
            path = tmp_path_factory.mktemp(f"base_{kind}")
            build_tiny_model(kind).save_pretrained(str(path))
            cache[kind] = str(path)
        return cache[kind]

    return make
