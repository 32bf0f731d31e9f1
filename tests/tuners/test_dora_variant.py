"""DoRA layers (use_dora=True) against HF peft: same keys and files, same outputs and gradients, round
trips both ways, merge and unmerge, several adapters, quantized bases, the norm cache."""
from __future__ import annotations

import os
import tempfile
import warnings

import peft
import pytest
import torch
from _support.twins import copy_weights, max_abs_diff, peft_model_twins
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import fastpeft
from fastpeft.ops import dora as dora_ops
from fastpeft.quant import QuantLinear


class _Net(nn.Module):
    """Every layer type fastpeft's DoRA covers: Linear (with a zero row of W), GPT-2 Conv1D, Embedding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 16)
        self.lin = nn.Linear(16, 12)
        self.c1 = Conv1D(12, 16)
        with torch.no_grad():
            self.lin.weight[3] = 0

    def forward(self, ids):
        h = self.emb(ids)
        return self.lin(h) + self.c1(h)


TARGETS = ["emb", "lin", "c1"]
IDS = torch.tensor([[1, 2, 3, 10, 4], [5, 0, 7, 8, 9]])


def _cfg(**kw):
    return dict(dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False), **kw)


def _perturb_magnitudes(*models):
    """Magnitudes start at n (g = 1); scale them so that g really acts (same values in every model)."""
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(torch.linspace(0.5, 1.5, p.numel()))


def _grads(model):
    return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_init_keys_outputs_and_gradients_equal_peft(use_rslora):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = peft_model_twins(_Net(), _cfg(use_rslora=use_rslora), same_weights=False)
    # same keys; peft's magnitude init (n of the initial W + s B A) from the same A and B
    sd_t = theirs.state_dict()
    copy_weights(theirs, ours)
    for mod in ours.modules():  # recompute our magnitudes from the copied A, B (our own init on peft's weights)
        if isinstance(getattr(mod, "lora_variant", None), dict) and "default" in mod.lora_variant:
            mod.lora_variant["default"].init_magnitude(mod, "default")
    for k, v in ours.state_dict().items():
        if "lora_magnitude_vector" in k:
            torch.testing.assert_close(v, sd_t[k], rtol=1e-6, atol=1e-6)
    _perturb_magnitudes(ours, theirs)
    ours.train(), theirs.train()
    y_o, y_t = ours(IDS), theirs(IDS)
    assert max_abs_diff(y_o, y_t) < 1e-6 * y_t.abs().max().item()
    assert max_abs_diff(y_o, _Net()(IDS)) > 1e-2  # the adapters act
    y_o.square().sum().backward()
    y_t.square().sum().backward()
    g_o, g_t = _grads(ours), _grads(theirs)
    assert set(g_o) == set(g_t) and any("magnitude" in k for k in g_o)
    for k in g_t:
        err = max_abs_diff(g_o[k], g_t[k]) / max(g_t[k].abs().max().item(), 1e-6)
        assert err < 1e-5, (k, err)


def test_zero_row_gives_no_nan_where_peft_gives_nan():
    """lin.weight[3] = 0, peft's default init (B = 0): m = n = 0 in that row. peft's output is NaN there;
    fastpeft's is the bias, as the all-zero row itself gives, and training stays finite."""
    cfg = _cfg(init_lora_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = peft_model_twins(_Net(), cfg)
    assert torch.isnan(theirs(IDS)).any()
    y = ours(IDS)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, _Net()(IDS))  # B = 0 and m = n: the base model's output
    y.square().sum().backward()
    assert all(torch.isfinite(g).all() for g in _grads(ours).values())


def test_files_round_trip_both_ways():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = peft_model_twins(_Net(), _cfg())
    _perturb_magnitudes(ours, theirs)
    ours.eval(), theirs.eval()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.save_pretrained(os.path.join(d, "ours"))
        theirs.save_pretrained(os.path.join(d, "theirs"))
        f_o = load_file(os.path.join(d, "ours", "adapter_model.safetensors"))
        f_t = load_file(os.path.join(d, "theirs", "adapter_model.safetensors"))
        assert sorted(f_o) == sorted(f_t)
        assert "base_model.model.lin.lora_magnitude_vector" in f_o
        for k in f_t:
            torch.testing.assert_close(f_o[k], f_t[k])
        # peft loads ours, we load peft's
        theirs2 = peft.PeftModel.from_pretrained(_Net(), os.path.join(d, "ours")).eval()
        ours2 = fastpeft.PeftModel.from_pretrained(_Net(), os.path.join(d, "theirs")).eval()
    with torch.no_grad():
        ref = theirs(IDS)
        assert max_abs_diff(theirs2(IDS), ref) < 1e-6
        assert max_abs_diff(ours2(IDS), ref) < 1e-5


def test_merge_unmerge_and_merge_and_unload_equal_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = peft_model_twins(_Net(), _cfg())
    _perturb_magnitudes(ours, theirs)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        y = ours(IDS)
        w_before = {n: m.weight.clone() for n, m in _Net().named_children()}
        ours.merge_adapter()
        assert max_abs_diff(ours(IDS), y) < 1e-5
        ours.unmerge_adapter()
        for name in ("emb", "lin", "c1"):
            base = getattr(ours.base_model.model, name).get_base_layer()
            assert max_abs_diff(base.weight, w_before[name]) < 1e-6 * w_before[name].abs().max().item()
        merged_o, merged_t = ours.merge_and_unload(), theirs.merge_and_unload()
        for name in ("emb", "lin", "c1"):
            w_t = getattr(merged_t, name).weight
            assert max_abs_diff(getattr(merged_o, name).weight, w_t) < 1e-6 * w_t.abs().max().item()
        assert max_abs_diff(merged_o(IDS), y) < 1e-5


def test_several_active_adapters_chain_as_in_peft():
    """peft applies active adapters in order; a DoRA adapter rescales the output of those before it."""
    extra = [("plain", dict(r=2, lora_alpha=4, target_modules=["lin", "c1", "emb"], init_lora_weights=False)),
             ("second", _cfg(r=3, lora_alpha=3))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = peft_model_twins(_Net(), _cfg(), extra=extra)
    _perturb_magnitudes(ours, theirs)
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "plain", "second"])
    with torch.no_grad():
        assert max_abs_diff(ours.eval()(IDS), theirs.eval()(IDS)) < 1e-5
    ours.train(), theirs.train()
    ours(IDS).square().sum().backward()
    theirs(IDS).square().sum().backward()
    g_o, g_t = _grads(ours), _grads(theirs)
    assert set(g_o) == set(g_t)
    for k in g_t:
        assert max_abs_diff(g_o[k], g_t[k]) <= 1e-4 * max(1.0, g_t[k].abs().max().item()), k


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_quantized_base_equals_peft_on_the_dequantized_weight(fmt):
    """DoRA over a packed QuantLinear gives peft's DoRA over an nn.Linear holding the dequantized weight."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    ql = QuantLinear.from_linear(lin, fmt, blocksize=64)
    deq = nn.Linear(64, 24)
    with torch.no_grad():
        deq.weight.copy_(ql.dequantize(torch.float32))
        deq.bias.copy_(lin.bias)
    cfg = dict(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, init_lora_weights=False)
    ours = fastpeft.get_peft_model(nn.Sequential(ql), fastpeft.LoraConfig(**cfg))
    theirs = peft.get_peft_model(nn.Sequential(deq), peft.LoraConfig(**cfg))
    sd = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    ours.load_state_dict(sd, strict=False)
    layer = ours.base_model.model[0]
    layer.lora_variant["default"].init_magnitude(layer, "default")
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight,
                               theirs.base_model.model[0].lora_magnitude_vector["default"].weight, rtol=1e-5, atol=1e-5)
    _perturb_magnitudes(ours, theirs)
    x = torch.randn(3, 5, 64)
    y_o, y_t = ours(x), theirs(x)
    assert max_abs_diff(y_o, y_t) < 1e-4
    y_o.square().sum().backward()
    y_t.square().sum().backward()
    g_o, g_t = _grads(ours), _grads(theirs)
    for k in g_t:
        assert max_abs_diff(g_o[k], g_t[k]) <= 1e-4 * max(1.0, g_t[k].abs().max().item()), k
    # merge dequantizes, scales by g and gives peft's merged weight
    with torch.no_grad():
        merged = ours.merge_and_unload()[0].weight
        assert max_abs_diff(merged, theirs.merge_and_unload()[0].weight) < 1e-5


def test_bf16_model_keeps_fp32_magnitudes_like_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = peft_model_twins(_Net().to(torch.bfloat16), _cfg())
    dt_o = {k: v.dtype for k, v in ours.named_parameters()}
    dt_t = {k: v.dtype for k, v in theirs.named_parameters()}
    assert dt_o == dt_t and dt_o["base_model.model.lin.lora_magnitude_vector.default.weight"] == torch.float32
    with torch.no_grad():
        y_o, y_t = ours.eval()(IDS), theirs.eval()(IDS)
    assert max_abs_diff(y_o, y_t) <= 2e-2 * y_t.abs().max().item()


def test_norm_is_kept_for_inference_and_recomputed_when_weights_change(monkeypatch):
    model = fastpeft.get_peft_model(_Net(), fastpeft.LoraConfig(**_cfg()))
    calls = []
    real_norm, real_sq = dora_ops.weight_norm, dora_ops.weight_row_sq_norm
    monkeypatch.setattr(dora_ops, "weight_norm", lambda *a, **k: calls.append("n") or real_norm(*a, **k))
    monkeypatch.setattr(dora_ops, "weight_row_sq_norm", lambda *a, **k: calls.append("w") or real_sq(*a, **k))
    model.eval()
    with torch.no_grad():
        y1 = model(IDS)
        first = list(calls)
        y2 = model(IDS)
        assert calls == first and torch.equal(y1, y2)  # decode-style reuse: no norm at all
        assert "w" not in first  # ||W||^2 was computed once, at init
        lin = model.base_model.model.lin
        lin.lora_B["default"].weight.mul_(2.0)  # an in-place change: new version, new norm
        calls.clear()
        y3 = model(IDS)
        assert calls == ["n"]
        n_fresh = dora_ops.weight_norm(lin._op_base(), *lin._adapter_weights("default"), lin.scaling["default"])
        torch.testing.assert_close(lin.lora_variant["default"].weight_norm(lin, "default"), n_fresh)
        assert max_abs_diff(y3, y1) > 1e-3
    model.train()
    calls.clear()
    model(IDS).sum().backward()
    assert calls.count("n") == 3 and "w" not in calls  # training: n every forward, ||W||^2 still kept


def test_refusals_match_peft():
    for lib in (peft, fastpeft):
        with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA, please pass use_dora=False"):
            lib.LoraConfig(target_modules=["lin"], use_dora=True, lora_bias=True)


def test_ephemeral_gpu_offload_is_accepted_and_the_magnitude_is_the_row_norm():
    """runtime_config=LoraRuntimeConfig(ephemeral_gpu_offload=True) is accepted (the GPU branch needs a GPU);
    every layer's magnitude is peft's init, the row norm of W + s B A in the adapter's layout."""
    model = fastpeft.get_peft_model(_Net(), fastpeft.LoraConfig(
        **_cfg(), runtime_config=fastpeft.LoraRuntimeConfig(ephemeral_gpu_offload=True)))
    for name in TARGETS:
        layer = getattr(model.base_model.model, name)
        A, B = layer._adapter_weights("default")
        W = layer._op_base().weight
        want = (W.double() + layer.scaling["default"] * B.double() @ A.double()).norm(dim=1)
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight.double(), want, rtol=1e-6,
                                   atol=1e-6)


def test_dora_model_under_torch_compile_fullgraph_trains_like_eager():
    """The norm cache steps aside under torch.compile (it is keyed on data_ptr and versions); the compiled
    model traces the norm, with dropout, and gives eager's outputs and gradients for the same seed."""
    model = fastpeft.get_peft_model(_Net(), fastpeft.LoraConfig(**_cfg(lora_dropout=0.2)))
    _perturb_magnitudes(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(7)
    y_eager = model(IDS)
    g_eager = torch.autograd.grad(y_eager.square().sum(), params)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(7)
    y_comp = compiled(IDS)
    g_comp = torch.autograd.grad(y_comp.square().sum(), params)
    torch.testing.assert_close(y_comp, y_eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_weighted_adapter_of_dora_adapters_equals_peft(combination):
    """add_weighted_adapter on DoRA adapters: the new adapter is DoRA too, with peft's A, B and magnitude."""
    extra = [("b", _cfg(r=4, lora_alpha=4))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = peft_model_twins(_Net(), _cfg(target_modules=["lin", "c1"]), extra=[
            (n, dict(c, target_modules=["lin", "c1"])) for n, c in extra])
        for model in (ours, theirs):
            torch.manual_seed(1)
            model.add_weighted_adapter(["default", "b"], [0.5, 0.7], "mix", combination_type=combination)
    sd_o = {k: v for k, v in ours.state_dict().items() if ".mix" in k}
    sd_t = {k: v for k, v in theirs.state_dict().items() if ".mix" in k}
    assert sorted(sd_o) == sorted(sd_t) and any("lora_magnitude_vector" in k for k in sd_t)
    for k in sd_t:
        assert max_abs_diff(sd_o[k], sd_t[k]) < 1e-5 * max(1.0, sd_t[k].abs().max().item()), k
