"""The variant seam (fastpeft/tuners/lora/variants) and peft's dynamic dispatch (_register_custom_module)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastpeft import LoraConfig, get_peft_model, ops
from fastpeft.tuners.lora import Linear as LoraLinear
from fastpeft.tuners.lora import LoraLayer
from fastpeft.tuners.lora.variants import LoraVariant, PlainLora


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 12)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _HalfScale(LoraVariant):
    """A test variant defined outside the package: plain LoRA at half the scale, through the same op."""

    name = "half"

    def op_adapter(self, layer, adapter_name):
        A, B = layer._adapter_weights(adapter_name)
        return ops.Adapter(A, B, 0.5 * layer.scaling[adapter_name], layer._dropout_p(adapter_name))

    def delta_weight(self, layer, adapter_name):
        A, B = layer._adapter_weights(adapter_name)
        return ops.lora_delta_weight(A, B, 0.5 * layer.scaling[adapter_name])


def _model(**cfg):
    cfg = dict(dict(target_modules=["up", "down"], r=4, lora_alpha=8, init_lora_weights=False), **cfg)
    return get_peft_model(_Mlp(), LoraConfig(**cfg))


def test_every_adapter_has_a_variant_and_delete_removes_it():
    m = _model()
    m.add_adapter("other", LoraConfig(target_modules=["up"], r=2, init_lora_weights=False))
    up = m.base_model.model.up
    assert isinstance(up.lora_variant["default"], PlainLora) and isinstance(up.lora_variant["other"], PlainLora)
    m.delete_adapter("other")
    assert "other" not in up.lora_variant and "other" not in up.r and "other" not in up.lora_bias


def test_a_new_variant_changes_forward_delta_and_merge_without_touching_the_layers():
    m = _model().eval()
    x = torch.randn(3, 12)
    with torch.no_grad():
        y_plain = m(x)
        for layer in (mod for mod in m.modules() if isinstance(mod, LoraLayer)):
            layer.lora_variant["default"] = _HalfScale()
        y_half = m(x)
        # the reference: plain LoRA with alpha halved
        ref = _model(lora_alpha=4).eval()
        ref.load_state_dict(m.state_dict())
        torch.testing.assert_close(y_half, ref(x), rtol=1e-6, atol=1e-6)
        assert (y_half - y_plain).abs().max() > 1e-3
        up = m.base_model.model.up
        torch.testing.assert_close(up.get_delta_weight("default"), ref.base_model.model.up.get_delta_weight("default"))
        w0 = up.base_layer.weight.detach().clone()
        m.merge_adapter()
        torch.testing.assert_close(m(x), y_half, rtol=1e-5, atol=1e-5)
        m.unmerge_adapter()
        torch.testing.assert_close(up.base_layer.weight, w0, rtol=0, atol=1e-6)


def test_several_active_adapters_are_one_op_call(monkeypatch):
    m = _model().train()
    m.add_adapter("b", LoraConfig(target_modules=["up"], r=3, lora_dropout=0.2, init_lora_weights=False))
    m.base_model.set_adapter(["default", "b"])
    calls = []
    real = ops.lora

    def spy(x, base, adapters, *a, **k):
        calls.append(len(adapters))
        return real(x, base, adapters, *a, **k)

    monkeypatch.setattr(ops, "lora", spy)
    m(torch.randn(2, 12)).sum().backward()
    assert calls == [2, 1]  # up: both adapters in one call; down: only "default" targets it


class _Scaler(nn.Module):
    """A layer type fastpeft does not know: y = x W^T * gain."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / 4)
        self.gain = 1.5
        self.in_features, self.out_features = n_in, n_out

    def forward(self, x):
        return (x @ self.weight.t()) * self.gain


class _ScalerLora(LoraLinear):
    """A user's LoRA layer for _Scaler: the fused op over the base weight times the gain, then LoRA."""

    seen_configs: list = []

    def __init__(self, base_layer, adapter_name, config=None, **kwargs):
        type(self).seen_configs.append(config)
        super().__init__(base_layer, adapter_name, **kwargs)

    def _op_base(self):
        base = self.get_base_layer()
        return ops.Base.dense(base.weight * base.gain)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.s = _Scaler(8, 6)
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        return self.lin(self.s(x))


def test_register_custom_module_dispatches_to_the_users_class():
    cfg = LoraConfig(target_modules=["s", "lin"], r=2, init_lora_weights=False)
    cfg._register_custom_module({_Scaler: _ScalerLora})
    _ScalerLora.seen_configs.clear()
    m = get_peft_model(_Net(), cfg).eval()
    s = m.base_model.model.s
    assert type(s) is _ScalerLora and _ScalerLora.seen_configs == [cfg]
    assert type(m.base_model.model.lin) is LoraLinear
    x = torch.randn(4, 8)
    A, B = s.lora_A["default"].weight, s.lora_B["default"].weight
    expected_s = (x @ s.base_layer.weight.t()) * 1.5 + s.scaling["default"] * (x @ A.t()) @ B.t()
    with torch.no_grad():
        torch.testing.assert_close(s(x), expected_s, rtol=1e-5, atol=1e-5)
    # a second adapter on the custom layer goes through its update_layer
    m.add_adapter("two", LoraConfig(target_modules=["s"], r=3, init_lora_weights=False))
    assert set(s.lora_A) == {"default", "two"}


def test_register_custom_module_takes_precedence_over_known_types():
    class MyLinearLora(LoraLinear):
        pass

    cfg = LoraConfig(target_modules=["up"], r=2)
    cfg._register_custom_module({nn.Linear: MyLinearLora})
    m = get_peft_model(_Mlp(), cfg)
    assert type(m.base_model.model.up) is MyLinearLora


def test_custom_module_registration_is_peft_compatible():
    """The same registration call works on peft's LoraConfig, and neither writes it to the saved config."""
    peft = pytest.importorskip("peft")
    for cls in (LoraConfig, peft.LoraConfig):
        cfg = cls(target_modules=["s"])
        cfg._register_custom_module({_Scaler: _ScalerLora})
        assert cfg._custom_modules == {_Scaler: _ScalerLora}
        assert "_custom_modules" not in cfg.to_dict()


def test_unknown_layer_type_error_names_the_way_out():
    with pytest.raises(ValueError, match="_register_custom_module"):
        get_peft_model(_Net(), LoraConfig(target_modules=["s"], r=2))


def test_deepcopy_gives_each_copy_its_own_variants():
    m = _model().eval()
    twin = copy.deepcopy(m)
    up, up2 = m.base_model.model.up, twin.base_model.model.up
    assert up2.lora_variant is not up.lora_variant and isinstance(up2.lora_variant["default"], PlainLora)
    up2.lora_variant["default"] = _HalfScale()  # changing the copy leaves the original alone
    x = torch.randn(2, 12)
    with torch.no_grad():
        assert isinstance(up.lora_variant["default"], PlainLora)
        assert (m(x) - twin(x)).abs().max() > 1e-3
