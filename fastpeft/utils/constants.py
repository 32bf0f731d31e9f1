"""Per-architecture defaults used when a LoraConfig leaves ``target_modules`` unset.

The values were learned by running peft 0.21 (get_peft_model with ``target_modules=None`` on tiny
configs of each architecture and reading back the chosen module names), so a fastpeft config and a
peft config resolve to the same modules. Keys are ``model.config.model_type``.
"""
from __future__ import annotations

_QV_PROJ = ["q_proj", "v_proj"]
_QV_BERT = ["query", "value"]
_FUSED_QKV = ["query_key_value"]

LORA_DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    # decoder-only, llama family (separate q/k/v projections)
    "llama": _QV_PROJ, "mistral": _QV_PROJ, "mixtral": _QV_PROJ, "qwen2": _QV_PROJ, "qwen3": _QV_PROJ,
    "gemma": _QV_PROJ, "gemma2": _QV_PROJ, "gemma3_text": _QV_PROJ, "stablelm": _QV_PROJ,
    "gptj": _QV_PROJ, "gpt_neo": _QV_PROJ, "opt": _QV_PROJ, "bart": _QV_PROJ,
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    # fused qkv projections
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "btlm": ["c_proj", "c_attn"],
    "gpt_neox": _FUSED_QKV, "falcon": _FUSED_QKV, "bloom": _FUSED_QKV, "chatglm": _FUSED_QKV,
    "RefinedWeb": _FUSED_QKV, "RefinedWebModel": _FUSED_QKV,
    "mpt": ["Wqkv"], "codegen": ["qkv_proj"],
    # encoders
    "bert": _QV_BERT, "roberta": _QV_BERT, "xlm-roberta": _QV_BERT, "electra": _QV_BERT,
    "layoutlm": _QV_BERT, "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    # encoder-decoder
    "t5": ["q", "v"], "mt5": ["q", "v"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
}


# Name of the LoRA parameter namespace; every LoRA parameter name contains it.
LORA_PREFIX = "lora_"
