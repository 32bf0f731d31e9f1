"""Merge/unmerge/unload, several adapters, enable/disable, delete: outputs must stay right."""
import copy
import warnings

import peft
import pytest
import torch
from torch import nn

from fastpeft.tuners.lora import Linear, LoraConfig, LoraModel
from _support.models import Plain, ids_for, run, tiny_model
from _support.twins import copy_weights, lora_twins

TOL = 1e-5


def _max(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("arch,cfg", [
    ("llama", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"])),
    ("plain", dict(target_modules=["emb", "head", "0"], modules_to_save=["norm"], lora_bias=False)),
    ("opt", dict(target_modules=["q_proj", "fc2"], lora_bias=True)),
])
def test_merge_unmerge_merge_and_unload_unload(arch, cfg):
    base = Plain() if arch == "plain" else tiny_model(arch)
    base.eval()
    cfg = dict(cfg)
    if arch == "plain":
        cfg["target_modules"] = ["emb", "head", "layers.0.0", "layers.1.2"]
    lm = LoraModel(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **cfg), "default").eval()
    if arch == "plain":
        with torch.no_grad():
            lm.model.norm.modules_to_save["default"].weight.add_(0.5)
    ids = ids_for(base)
    with torch.no_grad():
        y0 = run(base, ids)
        y = run(lm.model, ids)
        assert _max(y, y0) > 1e-4
        lm.merge_adapter()
        lora_layers = [m for m in lm.model.modules() if hasattr(m, "merged_adapters")]
        assert lora_layers and all(m.merged for m in lora_layers)
        assert _max(run(lm.model, ids), y) <= TOL
        lm.unmerge_adapter()
        assert _max(run(lm.model, ids), y) <= TOL
        # disabling gives the base model back (bias none), also when merged
        lm.merge_adapter()
        lm.disable_adapter_layers()
        assert _max(run(lm.model, ids), y0) <= TOL
        lm.enable_adapter_layers()
        assert _max(run(lm.model, ids), y) <= TOL
        merged = copy.deepcopy(lm).merge_and_unload()
        assert not any(hasattr(m, "lora_A") or hasattr(m, "original_module") for m in merged.modules())
        assert _max(run(merged, ids), y) <= TOL
        assert set(merged.state_dict()) == set(base.state_dict())
        unloaded = lm.unload()
        assert set(unloaded.state_dict()) == set(base.state_dict())
        if arch != "plain":  # the plain model keeps its trained modules_to_save copy (as peft does)
            assert _max(run(unloaded, ids), y0) <= TOL


def test_merge_matches_peft_merge_and_unload():
    ours, theirs = lora_twins(tiny_model("gpt2"), target_modules=["c_attn", "c_proj"], init_lora_weights=False,
                         fan_in_fan_out=True)
    copy_weights(theirs, ours)
    a = ours.merge_and_unload().state_dict()
    b = theirs.merge_and_unload().state_dict()
    assert a.keys() == b.keys()
    assert max(_max(a[k], b[k]) for k in a) <= TOL


def test_safe_merge_detects_nan():
    m = Linear(nn.Linear(8, 8), "a", r=2, lora_alpha=2, init_lora_weights=False)
    w0 = m.base_layer.weight.detach().clone()
    m.lora_B["a"].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN.*a"):
        m.merge(safe_merge=True)
    assert torch.equal(m.base_layer.weight, w0) and not m.merged  # untouched


def test_merge_twice_warns_and_merges_once():
    m = Linear(nn.Linear(8, 8), "a", r=2, lora_alpha=2, init_lora_weights=False)
    x = torch.randn(3, 8)
    y = m(x)
    m.merge()
    with pytest.warns(UserWarning, match="already merged"):
        m.merge()
    assert m.merged_adapters == ["a"]
    assert torch.allclose(m(x), y, atol=TOL)
    m.unmerge()
    assert torch.allclose(m(x), y, atol=TOL)


def _two_adapter_twins(base):
    ours, theirs = lora_twins(base, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.peft_config["two"] = peft.LoraConfig(target_modules=["q_proj", "k_proj"], r=3, lora_alpha=5,
                                                    init_lora_weights=False)
        theirs.inject_adapter(theirs.model, "two")
    ours.peft_config["two"] = LoraConfig(target_modules=["q_proj", "k_proj"], r=3, lora_alpha=5,
                                         init_lora_weights=False)
    ours.inject_adapter(ours.model, "two")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    copy_weights(theirs, ours)
    return ours.eval(), theirs.eval()


def test_several_adapters_equal_peft():
    base = tiny_model("llama").eval()
    ours, theirs = _two_adapter_twins(base)
    ids = ids_for(base)
    q = ours.model.model.layers[0].self_attn.q_proj
    assert not q.lora_A["two"].weight.requires_grad and q.lora_A["default"].weight.requires_grad
    with torch.no_grad():
        for active in ["default", "two", ["default", "two"], ["two", "default"]]:
            ours.set_adapter(active)
            theirs.set_adapter(active)
            assert ours.active_adapters == (active if isinstance(active, list) else [active])
            assert _max(run(ours.model, ids), run(theirs.model, ids)) <= TOL, active
        both = run(ours.model, ids)
        assert q.lora_A["two"].weight.requires_grad and q.lora_A["default"].weight.requires_grad
        ours.merge_adapter()  # both active adapters
        assert q.merged_adapters == ["two", "default"]  # the active order
        assert _max(run(ours.model, ids), both) <= TOL
        ours.unmerge_adapter()
        merged = copy.deepcopy(ours).merge_and_unload(adapter_names=["two"])
        ours.set_adapter("two")
        assert _max(run(merged, ids), run(ours.model, ids)) <= TOL


def test_delete_adapter():
    base = tiny_model("llama").eval()
    ours, theirs = _two_adapter_twins(base)
    ids = ids_for(base)
    ours.set_adapter("two")
    with pytest.warns(UserWarning, match="two was active"):
        ours.delete_adapter("two")
    assert ours.active_adapter == "default" and list(ours.peft_config) == ["default"]
    assert not any(".two." in k for k in ours.state_dict())
    theirs.delete_adapter("two")
    with torch.no_grad():
        assert _max(run(ours.model, ids), run(theirs.model, ids)) <= TOL
    with pytest.raises(ValueError, match="nope"):
        ours.delete_adapter("nope")
    with pytest.raises(ValueError, match="nope"):
        ours.set_adapter("nope")


def test_disable_with_bias_warns():
    lm = LoraModel(Plain(), LoraConfig(target_modules=["head"], bias="all"), "default")
    with pytest.warns(UserWarning, match="bias"):
        lm.disable_adapter_layers()


def test_getattr_and_forward_pass_through():
    base = tiny_model("llama")
    lm = LoraModel(base, LoraConfig(target_modules=["q_proj"]), "default")
    assert lm.config is base.config  # falls back to the wrapped model
    assert lm.model.peft_config is lm.peft_config
    ids = ids_for(base)
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, base(ids).logits)
    assert lm.targeted_module_names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_add_adapter_registers_and_rolls_back():
    lm = LoraModel(Plain(), LoraConfig(target_modules=["head"]), "default")
    lm.add_adapter("x", LoraConfig(target_modules=["head", "layers.0.0"], r=2))
    assert set(lm.model.head.lora_A) == {"default", "x"} and lm.active_adapter == "default"
    with pytest.raises(ValueError, match="already exists"):
        lm.add_adapter("x", LoraConfig(target_modules=["head"]))
    with pytest.raises(ValueError, match="missing_mod"):
        lm.add_adapter("y", LoraConfig(target_modules=["missing_mod"]))
    assert list(lm.peft_config) == ["default", "x"]


def test_extra_forward_arguments_are_refused():
    m = Linear(nn.Linear(8, 8), "a", r=2, lora_alpha=2)
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="training mode"):  # adapter_names is peft's (test_mixed_batch.py)
        m(x, adapter_names=["a", "a"])
    with pytest.raises(TypeError, match="extra"):
        m(x, 3)
