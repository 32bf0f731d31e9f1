"""Adapters saved by HF peft (``init_lora_weights=False``: random A and B) for the bank tests, and their
peft models as the per-sample reference.

    a  rank 2, q_proj / v_proj only
    b  rank 4, every target, rsLoRA
    c  rank 8, q_proj / o_proj / down_proj, DoRA (magnitudes moved off their init so that g != 1)
    d  rank 4 with rank_pattern {v_proj: 2} and alpha_pattern {o_proj: 3}
"""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from _support.models import tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "a": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True),
    "c": dict(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "down_proj"], use_dora=True),
    "d": dict(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}),
}


def save_peft_adapter(path, seed: int, kind: str = "llama", **cfg):
    """An adapter made and saved by HF peft into ``path``; returns its peft model (eval mode)."""
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    base = tiny_model(kind)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **cfg))
    if cfg.get("use_dora"):
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(seed)) + 0.5)
    pm.save_pretrained(str(path))
    return pm.eval()


@pytest.fixture(scope="session")
def adapters(tmp_path_factory):
    """{name: (folder, peft model)} for ADAPTERS."""
    root = tmp_path_factory.mktemp("bank_adapters")
    return {name: (str(root / name), save_peft_adapter(root / name, seed=i + 1, **cfg))
            for i, (name, cfg) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="session")
def base_model():
    """The tiny Llama alone (the reference for "__base__" / -1 rows)."""
    return tiny_model("llama").eval()
