"""Adapters move between HF peft and fastpeft unchanged: same file keys, same tensors, same outputs.

Each case builds twin tiny models (same seed), adapts one with peft and one with fastpeft, and
round-trips the saved folder in both directions. Trainable tensors are perturbed before saving so
LoRA B, biases and modules_to_save heads are all non-trivial (a load that skipped any of them
would change the output).
"""
from __future__ import annotations

import json
import logging
import os

import peft
import pytest
import torch
from safetensors.torch import load_file

from fastpeft.mapping import get_peft_model
from fastpeft.peft_model import PeftModel, PeftModelForCausalLM, PeftModelForSequenceClassification
from fastpeft.tuners.lora.config import LoraConfig

logging.getLogger("peft").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TOL = 1e-5

CASES = {
    # OPT: bias of the adapted layers trains too
    "opt": dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"],
                bias="lora_only"),
    # Llama: attention + MLP + an embedding target (saved with the embedding base weight, as peft does)
    "llama": dict(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                              "gate_proj", "embed_tokens"]),
    # GPT-2: transformers Conv1D (weights stored [in, out])
    "gpt2": dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    # RoBERTa sequence classification: automatic modules_to_save head, every bias trains
    "roberta": dict(task_type="SEQ_CLS", r=4, lora_alpha=8, bias="all"),
}


def _perturb_trainable(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _weights(folder: str) -> dict:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def _assert_same_files(a: str, b: str) -> None:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    ca = json.load(open(os.path.join(a, "adapter_config.json")))
    cb = json.load(open(os.path.join(b, "adapter_config.json")))
    for cfg in (ca, cb):
        cfg.pop("peft_version")  # fastpeft stamps its own version
        for key in ("target_modules", "exclude_modules"):  # sets, written in arbitrary order
            if isinstance(cfg.get(key), list):
                cfg[key] = sorted(cfg[key])
        if cfg.get("modules_to_save"):
            # peft appends its automatic heads again each time it loads a SEQ_CLS adapter (a duplicate
            # that means nothing); fastpeft does not
            cfg["modules_to_save"] = list(dict.fromkeys(cfg["modules_to_save"]))
    assert ca == cb


@pytest.mark.parametrize("kind", sorted(CASES))
def test_peft_to_fastpeft(kind, tiny, tmp_path):
    inputs = tiny.inputs(kind)
    base_out = tiny.output(tiny.model(kind), kind, inputs)

    pp = peft.get_peft_model(tiny.model(kind), peft.LoraConfig(init_lora_weights=False, **CASES[kind]))
    _perturb_trainable(pp, seed=3)
    pp.eval()
    ref = tiny.output(pp, kind, inputs)
    assert (ref - base_out).abs().max() > 1e-3  # the adapter really changes the model
    pp.save_pretrained(str(tmp_path / "peft"))

    fm = PeftModel.from_pretrained(tiny.model(kind), str(tmp_path / "peft"))
    expected_cls = PeftModelForSequenceClassification if kind == "roberta" else PeftModelForCausalLM
    assert type(fm) is expected_cls
    out = tiny.output(fm, kind, inputs)
    assert (out - ref).abs().max().item() <= TOL

    # saving again with fastpeft reproduces peft's file: keys, tensors and config
    fm.save_pretrained(str(tmp_path / "fast"))
    _assert_same_files(str(tmp_path / "peft"), str(tmp_path / "fast"))


@pytest.mark.parametrize("kind", sorted(CASES))
def test_fastpeft_to_peft(kind, tiny, tmp_path):
    inputs = tiny.inputs(kind)
    fm = get_peft_model(tiny.model(kind), LoraConfig(init_lora_weights=False, **CASES[kind]))
    _perturb_trainable(fm, seed=4)
    fm.eval()
    ref = tiny.output(fm, kind, inputs)
    fm.save_pretrained(str(tmp_path / "fast"))

    pp = peft.PeftModel.from_pretrained(tiny.model(kind), str(tmp_path / "fast"))
    out = tiny.output(pp, kind, inputs)
    assert (out - ref).abs().max().item() <= TOL

    pp.save_pretrained(str(tmp_path / "peft"))
    _assert_same_files(str(tmp_path / "fast"), str(tmp_path / "peft"))


def test_same_keys_as_peft_for_fresh_adapters(tiny, tmp_path):
    """Independently created adapters (no round trip) give the same file layout in both libraries."""
    for kind, cfg in CASES.items():
        peft.get_peft_model(tiny.model(kind), peft.LoraConfig(**cfg)).save_pretrained(str(tmp_path / kind / "p"))
        get_peft_model(tiny.model(kind), LoraConfig(**cfg)).save_pretrained(str(tmp_path / kind / "f"))
        wp, wf = _weights(str(tmp_path / kind / "p")), _weights(str(tmp_path / kind / "f"))
        assert wp and sorted(wp) == sorted(wf), kind
        assert all(wp[k].shape == wf[k].shape for k in wp), kind


def test_several_adapters_peft_to_fastpeft(tiny, tmp_path):
    kind = "llama"
    inputs = tiny.inputs(kind)
    pp = peft.get_peft_model(tiny.model(kind), peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False,
                                                               target_modules=["q_proj", "v_proj"]))
    pp.add_adapter("second", peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, init_lora_weights=False,
                                             target_modules=["k_proj", "up_proj"]))
    pp.eval()
    refs = {}
    for name in ("default", "second"):
        pp.set_adapter(name)
        refs[name] = tiny.output(pp, kind, inputs)
    assert (refs["default"] - refs["second"]).abs().max() > 1e-3
    pp.save_pretrained(str(tmp_path / "peft"))
    assert os.path.isfile(tmp_path / "peft" / "second" / "adapter_model.safetensors")

    fm = PeftModel.from_pretrained(tiny.model(kind), str(tmp_path / "peft"))
    fm.load_adapter(str(tmp_path / "peft" / "second"), adapter_name="second")
    assert fm.active_adapter == "default"
    for name in ("default", "second"):
        fm.set_adapter(name)
        assert (tiny.output(fm, kind, inputs) - refs[name]).abs().max().item() <= TOL

    # and back: fastpeft writes the same two folders
    fm.save_pretrained(str(tmp_path / "fast"))
    _assert_same_files(str(tmp_path / "peft"), str(tmp_path / "fast"))
    _assert_same_files(str(tmp_path / "peft" / "second"), str(tmp_path / "fast" / "second"))


def test_several_adapters_fastpeft_to_peft(tiny, tmp_path):
    kind = "opt"
    inputs = tiny.inputs(kind)
    fm = get_peft_model(tiny.model(kind), LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
    fm.add_adapter("other", LoraConfig(task_type="CAUSAL_LM", r=8, init_lora_weights=False,
                                       target_modules=["k_proj", "out_proj"]))
    fm.eval()
    refs = {}
    for name in ("default", "other"):
        fm.set_adapter(name)
        refs[name] = tiny.output(fm, kind, inputs)
    fm.save_pretrained(str(tmp_path / "fast"))

    pp = peft.PeftModel.from_pretrained(tiny.model(kind), str(tmp_path / "fast"))
    pp.load_adapter(str(tmp_path / "fast" / "other"), adapter_name="other")
    for name in ("default", "other"):
        pp.set_adapter(name)
        assert (tiny.output(pp, kind, inputs) - refs[name]).abs().max().item() <= TOL


def test_bin_adapter_from_peft(tiny, tmp_path):
    """peft's safe_serialization=False files (adapter_model.bin) load too (with weights_only=True)."""
    kind = "gpt2"
    inputs = tiny.inputs(kind)
    pp = peft.get_peft_model(tiny.model(kind), peft.LoraConfig(init_lora_weights=False, **CASES[kind]))
    pp.eval()
    ref = tiny.output(pp, kind, inputs)
    pp.save_pretrained(str(tmp_path), safe_serialization=False)
    assert os.path.isfile(tmp_path / "adapter_model.bin")
    fm = PeftModel.from_pretrained(tiny.model(kind), str(tmp_path))
    assert (tiny.output(fm, kind, inputs) - ref).abs().max().item() <= TOL


def test_print_trainable_parameters_matches_peft(tiny, capsys):
    for kind, cfg in CASES.items():
        peft.get_peft_model(tiny.model(kind), peft.LoraConfig(**cfg)).print_trainable_parameters()
        expected = capsys.readouterr().out
        fm = get_peft_model(tiny.model(kind), LoraConfig(**cfg))
        fm.print_trainable_parameters()
        assert capsys.readouterr().out == expected, kind
        assert expected.startswith("trainable params: ")
        pp = peft.get_peft_model(tiny.model(kind), peft.LoraConfig(**cfg))
        assert fm.get_nb_trainable_parameters() == pp.get_nb_trainable_parameters()


def test_merged_model_matches_peft(tiny):
    kind = "gpt2"
    inputs = tiny.inputs(kind)
    pp = peft.get_peft_model(tiny.model(kind), peft.LoraConfig(init_lora_weights=False, **CASES[kind]))
    fm = get_peft_model(tiny.model(kind), LoraConfig(init_lora_weights=False, **CASES[kind]))
    fm.load_state_dict(pp.state_dict())  # identical keys: peft's state dict loads into fastpeft directly
    merged_p = pp.merge_and_unload().eval()
    merged_f = fm.merge_and_unload().eval()
    assert type(merged_f) is type(merged_p)
    assert (tiny.output(merged_f, kind, inputs) - tiny.output(merged_p, kind, inputs)).abs().max().item() <= TOL
