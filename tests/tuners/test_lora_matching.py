"""Which modules get LoRA, with which rank/alpha: fastpeft must choose exactly what peft chooses."""
import re

import pytest
from torch import nn

from fastpeft.tuners.lora import LoraConfig, LoraModel
from fastpeft.tuners.tuners_utils import layer_index_of, pattern_value, target_matches
from fastpeft.utils.constants import LORA_DEFAULT_TARGET_MODULES
from _support.models import Plain, tiny_model
from _support.twins import lora_names, lora_twins

ARCHS = ["llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox", "bert", "roberta", "t5"]


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_equal_peft(arch):
    ours, theirs = lora_twins(tiny_model(arch))  # target_modules=None -> per-architecture defaults
    assert lora_names(ours) == lora_names(theirs)
    assert len(lora_names(ours)) > 0
    assert set(ours.peft_config["default"].target_modules) == set(theirs.peft_config["default"].target_modules)


def test_defaults_table_covers_required_archs():
    for arch in ARCHS:
        assert LORA_DEFAULT_TARGET_MODULES[arch], arch


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta", "opt"])
def test_all_linear_equal_peft(arch):
    ours, theirs = lora_twins(tiny_model(arch), target_modules="all-linear")
    assert lora_names(ours) == lora_names(theirs)
    assert set(ours.peft_config["default"].target_modules) == set(theirs.peft_config["default"].target_modules)


def test_all_linear_excludes_output_head_but_not_on_plain_modules():
    ours, _ = lora_twins(tiny_model("llama"), target_modules="all-linear")
    assert "model.lm_head" not in lora_names(ours)
    assert not hasattr(ours.model.lm_head, "lora_A")
    # a plain nn.Module has no declared output head: every linear is taken (as peft does)
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    ours, theirs = lora_twins(seq, target_modules="all-linear")
    assert lora_names(ours) == lora_names(theirs) == ["model.0", "model.2"]


def test_all_linear_skips_modules_to_save():
    ours, theirs = lora_twins(tiny_model("roberta"), target_modules="all-linear", modules_to_save=["classifier"])
    assert lora_names(ours) == lora_names(theirs)
    assert not any("classifier" in n for n in lora_names(ours))


@pytest.mark.parametrize("cfg", [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.q_proj", "layers.1.mlp.up_proj", "lm_head"]),
    dict(target_modules=r".*\.0\.self_attn\.(q|k)_proj"),
    dict(target_modules=".*proj", exclude_modules=["q_proj", "model.layers.1.mlp.up_proj"]),
    dict(target_modules=".*proj", exclude_modules=".*mlp.*"),
    dict(target_modules=["q_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=0, layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=["h", "layers"]),
    dict(target_modules=["embed_tokens", "q_proj"]),
])
def test_matching_rules_equal_peft(cfg):
    ours, theirs = lora_twins(tiny_model("llama"), **cfg)
    assert lora_names(ours) == lora_names(theirs)


def test_list_entry_is_suffix_at_dot_boundary_only():
    # "proj" is not a dotted suffix of "q_proj": nothing matches -> ValueError
    with pytest.raises(ValueError, match="proj"):
        LoraModel(tiny_model("llama"), LoraConfig(target_modules=["proj"]), "default")
    cfg = LoraConfig(target_modules=["q_proj"])
    assert target_matches(cfg, "model.layers.0.self_attn.q_proj")
    assert target_matches(cfg, "q_proj")
    assert not target_matches(cfg, "model.layers.0.self_attn.xq_proj")


def test_regex_is_full_match():
    cfg = LoraConfig(target_modules=r"q_proj")
    assert not target_matches(cfg, "model.layers.0.self_attn.q_proj")
    assert target_matches(LoraConfig(target_modules=r".*q_proj"), "model.layers.0.self_attn.q_proj")


def test_layer_index_rules():
    assert layer_index_of("model.layers.1.self_attn.q_proj", None) == 1
    assert layer_index_of("layers.1.q", None) is None  # peft needs a name before the block list
    assert layer_index_of("layers.1.q", "layers") == 1
    assert layer_index_of("transformer.h.3.attn.c_attn", ["layers", "h"]) == 3
    assert layer_index_of("model.layers.1.self_attn.q_proj", "self_attn") is None


def test_layers_pattern_on_plain_module_equal_peft():
    ours, theirs = lora_twins(Plain(), target_modules=["0", "2"], layers_to_transform=[0, 2], layers_pattern="layers")
    assert lora_names(ours) == lora_names(theirs) == ["model.layers.0.0", "model.layers.0.2",
                                                       "model.layers.2.0", "model.layers.2.2"]


@pytest.mark.parametrize("rp,ap", [
    ({"q_proj": 4, "layers.1.self_attn.v_proj": 2, "^model.layers.0.self_attn.v_proj": 3, "mlp.*": 5,
      "model.layers.1.mlp.down_proj": 7}, {"k_proj": 32, "layers.0.mlp.gate_proj": 64}),
    ({"model.layers.1.mlp.down_proj": 7, "mlp.*": 5}, {}),
    ({"v_proj": 9, "layers.1.self_attn.v_proj": 2}, {".*v_proj": 3}),
    ({"layers.1.self_attn.v_proj": 2, "v_proj": 9}, {"f_attn.v_proj": 3}),
])
def test_rank_alpha_pattern_equal_peft(rp, ap):
    ours, theirs = lora_twins(tiny_model("llama"), target_modules="all-linear", r=8, lora_alpha=16,
                         rank_pattern=rp, alpha_pattern=ap)
    got = {n: (m.r["default"], m.lora_alpha["default"], m.scaling["default"], m.lora_A["default"].weight.shape)
           for n, m in ours.model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "r")}
    want = {n: (m.r["default"], m.lora_alpha["default"], m.scaling["default"], m.lora_A["default"].weight.shape)
            for n, m in theirs.model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "r")}
    assert got == want
    assert len(set(v[0] for v in got.values())) > 1  # the patterns really changed something


def test_unmatched_pattern_key_warns():
    with pytest.warns(RuntimeWarning, match="up"):
        LoraModel(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], rank_pattern={"up": 3}), "default")


def test_pattern_value_first_match_wins():
    assert pattern_value({"v_proj": 9, "layers.1.v_proj": 2}, "m.layers.1.v_proj", 8) == 9
    assert pattern_value({"layers.1.v_proj": 2, "v_proj": 9}, "m.layers.1.v_proj", 8) == 2
    assert pattern_value({"f_attn.v_proj": 2}, "m.self_attn.v_proj", 8) == 8


def test_rslora_scaling():
    ours, theirs = lora_twins(tiny_model("llama"), target_modules=["q_proj"], r=4, lora_alpha=8, use_rslora=True)
    m = ours.model.model.layers[0].self_attn.q_proj
    assert m.scaling["default"] == pytest.approx(8 / 2.0)
    assert m.scaling["default"] == theirs.model.model.layers[0].self_attn.q_proj.scaling["default"]


def test_no_match_error_names_targets_and_lists_modules():
    with pytest.raises(ValueError) as ei:
        LoraModel(tiny_model("llama"), LoraConfig(target_modules=["nope_proj"]), "default")
    msg = str(ei.value)
    assert "nope_proj" in msg
    assert "model.embed_tokens" in msg  # some existing module names are shown
    shown = re.search(r"Some module names that exist: \[(.*)\]", msg).group(1)
    assert len(shown.split(",")) <= 10


def test_unsupported_fields_raise_not_implemented():
    cfg = LoraConfig(target_modules=["q_proj"], kasa_config={"beta": 0.1})  # (use_qalora is implemented now)
    assert "kasa_config" in cfg.unsupported_fields()
    with pytest.raises(NotImplementedError, match="kasa_config"):
        LoraModel(tiny_model("llama"), cfg, "default")


def test_unsupported_layer_type_and_default_targets():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.ConvTranspose2d(2, 2, 1)  # peft has no LoRA layer for it either

    with pytest.raises(ValueError, match="ConvTranspose2d"):
        LoraModel(M(), LoraConfig(target_modules=["conv"]), "default")
    with pytest.raises(ValueError, match="target_modules"):
        LoraModel(M(), LoraConfig(), "default")  # no model_type -> no defaults


def test_fan_in_fan_out_fixed_with_warning():
    cfg = LoraConfig(target_modules=["c_attn"])
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        ours = LoraModel(tiny_model("gpt2"), cfg, "default")
    assert cfg.fan_in_fan_out is True
    assert ours.model.transformer.h[0].attn.c_attn.fan_in_fan_out is True
    cfg = LoraConfig(target_modules=["q_proj"], fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        ours = LoraModel(tiny_model("llama"), cfg, "default")
    assert cfg.fan_in_fan_out is False
    assert ours.model.model.layers[0].self_attn.q_proj.fan_in_fan_out is False


def test_modules_to_save_suffix_rule_equal_peft():
    ours, theirs = lora_twins(Plain(), target_modules=["head"], modules_to_save=["norm", "layers.1.2"])
    k1 = list(ours.state_dict())
    k2 = list(theirs.state_dict())
    assert k1 == k2
    assert "model.norm.modules_to_save.default.weight" in k1


def test_second_adapter_with_bias_is_refused():
    m = LoraModel(Plain(), LoraConfig(target_modules=["head"], bias="all"), "default")
    m.peft_config["two"] = LoraConfig(target_modules=["head"], bias="all")
    with pytest.raises(ValueError, match="bias"):
        m.inject_adapter(m.model, "two")
