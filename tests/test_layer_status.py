"""get_layer_status / get_model_status of fastpeft against peft's on twin models, through the life of a model
(two adapters, modules_to_save, set_adapter, disable, merge, delete) and for every layer type fastpeft has."""
from __future__ import annotations

import dataclasses
import warnings

import peft
import pytest
import torch

import fastpeft
from _support.models import tiny_model
from _support.twins import peft_model_twins


def _layers(model):
    return [dataclasses.asdict(s) for s in model.get_layer_status()]


def _model(model):
    return dataclasses.asdict(model.get_model_status())


def _same(ours, theirs):
    assert _layers(ours) == _layers(theirs)
    assert _model(ours) == _model(theirs)
    # the module-level functions answer the same as the methods
    assert [dataclasses.asdict(s) for s in fastpeft.get_layer_status(ours)] == _layers(ours)
    assert dataclasses.asdict(fastpeft.get_model_status(ours)) == _model(ours)


@pytest.fixture
def twins():
    base = tiny_model("llama")
    cfg = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"], init_lora_weights=False)
    return peft_model_twins(base, cfg, extra=[("other", dict(target_modules=["q_proj", "k_proj"],
                                                             modules_to_save=["lm_head"]))])


def test_status_through_the_life_of_a_model(twins):
    ours, theirs = twins
    _same(ours, theirs)
    status = _model(ours)
    assert status["adapter_model_type"] == "LoraModel" and status["peft_types"] == {"default": "LORA", "other": "LORA"}
    assert status["requires_grad"] == {"default": True, "other": False}
    assert {s["module_type"] for s in _layers(ours)} == {"lora.Linear", "lora.Embedding", "ModulesToSaveWrapper"}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in (lambda m: m.set_adapter("other"),  # layers without "other" keep "default": irregular
                     lambda m: m.set_adapter("default", inference_mode=True),
                     lambda m: m.set_adapter("default"),
                     lambda m: m.merge_adapter(),
                     lambda m: m.unmerge_adapter(),
                     # an inactive one: after deleting the active adapter peft's own get_model_status fails
                     # (its PeftModel keeps the deleted name as active_adapter)
                     lambda m: m.set_adapter("other"),
                     lambda m: m.delete_adapter("default")):
            step(ours)
            step(theirs)
            _same(ours, theirs)
        with ours.disable_adapter(), theirs.disable_adapter():
            _same(ours, theirs)
            assert _model(ours)["enabled"] is False
    assert _model(ours)["available_adapters"] == ["other"]


def test_irregular_merge_is_reported(twins):
    ours, theirs = twins
    for m in (ours, theirs):
        m.base_model.model.model.layers[0].self_attn.q_proj.merge()  # one layer only
    _same(ours, theirs)
    assert _model(ours)["merged_adapters"] == "irregular"


@pytest.mark.parametrize("kind,cfg", [
    ("gpt2", dict(target_modules=["c_attn", "c_fc"])),  # transformers Conv1D
    ("llama", dict(target_modules=["q_proj", "embed_tokens"], use_dora=True)),  # DoRA magnitudes
    ("llama_seqcls", dict(target_modules=["q_proj"], task_type="SEQ_CLS")),  # task head wrapper ("score")
])
def test_status_per_layer_type(kind, cfg):
    ours, theirs = peft_model_twins(tiny_model(kind), cfg)
    _same(ours, theirs)


def test_status_of_models_without_peft_model_wrapper():
    base = tiny_model("llama")
    ours, theirs = peft_model_twins(base, dict(target_modules=["q_proj"]))
    # a transformers model with adapters inside: base_model_type is its class, no adapter model type
    a, b = fastpeft.get_model_status(ours.get_base_model()), peft.get_model_status(theirs.get_base_model())
    assert dataclasses.asdict(a) == dataclasses.asdict(b)
    assert a.base_model_type == "LlamaForCausalLM" and a.adapter_model_type == "None"
    # no adapter layers at all: both refuse with the same error
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    for fn in ("get_layer_status", "get_model_status"):
        with pytest.raises(ValueError) as ours_exc:
            getattr(fastpeft, fn)(plain)
        with pytest.raises(ValueError) as theirs_exc:
            getattr(peft, fn)(plain)
        assert str(ours_exc.value) == str(theirs_exc.value)


def test_inject_adapter_in_model_status_matches():
    cfg = dict(target_modules=["q_proj", "v_proj"])
    ours = fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(**cfg), tiny_model("llama"))
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), tiny_model("llama"))
    a, b = fastpeft.get_model_status(ours), peft.get_model_status(theirs)
    assert dataclasses.asdict(a) == dataclasses.asdict(b)


def test_prompt_learning_model_is_refused_like_peft():
    cfg = dict(task_type="CAUSAL_LM", num_virtual_tokens=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fastpeft.get_peft_model(tiny_model("llama"), fastpeft.PromptTuningConfig(**cfg))
        theirs = peft.get_peft_model(tiny_model("llama"), peft.PromptTuningConfig(**cfg))
    for fn in ("get_layer_status", "get_model_status"):
        with pytest.raises(TypeError) as ours_exc:
            getattr(ours, fn)()
        with pytest.raises(TypeError) as theirs_exc:
            getattr(theirs, fn)()
        assert str(ours_exc.value) == str(theirs_exc.value)
