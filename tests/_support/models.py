"""Tiny models for the tests: transformers configs with random weights (hidden 16, 2 layers, vocab 64).

Every build reseeds torch's global RNG, so two calls with the same arguments give bit-identical twins
(one is wrapped by fastpeft, the other by HF peft, and their outputs are compared).
transformers is imported inside the functions only, so collecting the kernel/ops tests stays fast.
"""
from __future__ import annotations

import torch
from torch import nn

VOCAB = 64

# kind -> (config class, model class, config kwargs). Extra keyword arguments of tiny_model() override
# the kwargs (e.g. a wider Llama for quantized blocks of 64).
_LLAMA = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64)
_ROBERTA = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=72)
_DECODER = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64)
KINDS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(_LLAMA, attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "llama_seqcls": ("LlamaConfig", "LlamaForSequenceClassification",  # a head named "score"
                     dict(_LLAMA, num_labels=2, pad_token_id=0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                 word_embed_proj_dim=16, max_position_embeddings=64, pad_token_id=1)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=64)),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", dict(_ROBERTA, num_labels=3)),
    "roberta_tok": ("RobertaConfig", "RobertaForTokenClassification", dict(_ROBERTA, num_labels=3)),
    "roberta_qa": ("RobertaConfig", "RobertaForQuestionAnswering", dict(_ROBERTA, num_labels=2)),
    "bert": ("BertConfig", "BertModel",
             dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=64)),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=2, decoder_start_token_id=0,
                pad_token_id=0, eos_token_id=1)),
}


def tiny_config(kind: str, **overrides):
    """The transformers config of ``kind`` (see KINDS), with ``overrides`` applied."""
    import transformers as T

    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r} (known: {sorted(KINDS)})")
    config_cls, _, kwargs = KINDS[kind]
    return getattr(T, config_cls)(**dict(kwargs, **overrides))


def tiny_model(kind: str, seed: int = 0, **overrides) -> nn.Module:
    """A fresh tiny model of ``kind`` with weights fixed by ``seed`` (config ``overrides`` applied)."""
    import transformers as T

    T.logging.set_verbosity_error()
    cfg = tiny_config(kind, **overrides)
    torch.manual_seed(seed)
    return getattr(T, KINDS[kind][1])(cfg)


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


def ids_for(model: nn.Module = None, shape=(2, 6)) -> torch.Tensor:
    """Token ids in [1, 20): valid for Plain and every tiny model."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 20, shape, generator=g)


def run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """model(ids) -> the output tensor (T5 gets ids as decoder input too): logits or last hidden state."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "t5" or "T5" in type(model).__name__:
        out = model(input_ids=ids, decoder_input_ids=ids)
    else:
        out = model(ids)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
