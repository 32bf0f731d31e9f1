"""Prompt-learning configs: peft's names, fields, defaults and file format; clear errors on bad values."""
import dataclasses
import json
import warnings

import pytest

import fastpeft
from fastpeft import (PeftConfig, PeftType, PrefixTuningConfig, PromptEncoderConfig,
                      PromptEncoderReparameterizationType, PromptLearningConfig, PromptTuningConfig, PromptTuningInit)

peft = pytest.importorskip("peft")

CLASSES = ["PromptLearningConfig", "PromptEncoderConfig", "PromptTuningConfig", "PrefixTuningConfig"]


def _defaults(cls):
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = getattr(f.default, "value", f.default)
        else:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("name", CLASSES)
def test_fields_and_defaults_match_peft(name):
    ours, theirs = getattr(fastpeft, name), getattr(peft, name)
    assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]
    assert _defaults(ours) == _defaults(theirs)
    for f in dataclasses.fields(ours):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


def test_enums_match_peft():
    for ours, theirs in ((PromptEncoderReparameterizationType, peft.PromptEncoderReparameterizationType),
                         (PromptTuningInit, peft.PromptTuningInit)):
        assert {m.name: m.value for m in ours} == {m.name: m.value for m in theirs}
        assert all(m == m.value and isinstance(m, str) for m in ours)  # str enums: compare equal to JSON values


@pytest.mark.parametrize("name,ptype", [("PromptEncoderConfig", "P_TUNING"), ("PromptTuningConfig", "PROMPT_TUNING"),
                                        ("PrefixTuningConfig", "PREFIX_TUNING")])
def test_peft_type_and_json_both_ways(tmp_path, name, ptype):
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=7, token_dim=16, num_layers=2, num_attention_heads=2,
              num_transformer_submodules=1)
    ours = getattr(fastpeft, name)(**kw)
    assert ours.peft_type == ptype and ours.is_prompt_learning
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert type(theirs).__name__ == name
    getattr(peft, name)(**kw).save_pretrained(str(tmp_path / "theirs"))
    back = PeftConfig.from_pretrained(tmp_path / "theirs")
    assert type(back) is getattr(fastpeft, name)
    a = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    a.pop("peft_version"), b.pop("peft_version")
    assert a == b


def test_bad_num_virtual_tokens_names_field():
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"num_virtual_tokens.*{bad}"):
            PromptTuningConfig(num_virtual_tokens=bad)
        with pytest.raises(ValueError, match="num_virtual_tokens"):
            PromptEncoderConfig(num_virtual_tokens=bad)
        with pytest.raises(ValueError, match="num_virtual_tokens"):
            PrefixTuningConfig(num_virtual_tokens=bad)
    with pytest.raises(TypeError, match="num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens="5")


def test_text_init_needs_tokenizer_and_text():
    with pytest.raises(ValueError, match="tokenizer_name_or_path.*None"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hello")
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", tokenizer_name_or_path="tok")
    with pytest.raises(ValueError, match="tokenizer_kwargs"):
        PromptTuningConfig(num_virtual_tokens=3, tokenizer_kwargs={"use_fast": True})
    with pytest.raises(ValueError, match="prompt_tuning_init.*'WORDS'"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="WORDS")
    cfg = PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init=PromptTuningInit.TEXT,
                             prompt_tuning_init_text="hi", tokenizer_name_or_path="tok")
    assert cfg.prompt_tuning_init == "TEXT"


def test_other_bad_values():
    with pytest.raises(ValueError, match="encoder_reparameterization_type.*'GRU'"):
        PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="encoder_hidden_size=0"):
        PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=0)
    with pytest.raises(ValueError, match="init_weights.*'ones'"):
        PrefixTuningConfig(num_virtual_tokens=3, init_weights="ones")
    with pytest.raises(ValueError, match="token_dim=-1"):
        PrefixTuningConfig(num_virtual_tokens=3, token_dim=-1)


def test_base_class_dispatch_and_registry(tmp_path):
    assert issubclass(PromptTuningConfig, PromptLearningConfig)
    for ptype, cls in (("P_TUNING", PromptEncoderConfig), ("PROMPT_TUNING", PromptTuningConfig),
                       ("PREFIX_TUNING", PrefixTuningConfig)):
        assert fastpeft.PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(ptype)] is cls
        assert type(PeftConfig.from_dict({"peft_type": ptype, "num_virtual_tokens": 4})) is cls
    with pytest.raises(ValueError, match="PREFIX_TUNING"):
        PromptTuningConfig.from_dict({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeftConfig.from_dict(PromptEncoderConfig(num_virtual_tokens=2).to_dict())
