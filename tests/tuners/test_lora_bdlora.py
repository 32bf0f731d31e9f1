"""BD-LoRA (use_bdlora=BdLoraConfig(...): block-diagonal lora_A or lora_B per module) against HF peft 0.21.2:
config and export paths, state_dict keys / shapes / dtypes, init, forward and gradients, files saved by one
and loaded by the other, merge / unmerge / merge_and_unload, mixed batches, and peft's refusals."""
import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.tuners.lora.variants.bdlora import BdLora, BlockDiagonalLinear
from tests._support.models import tiny_inputs, tiny_model
from tests._support.twins import copy_weights, max_abs_diff, peft_model_twins

peft = pytest.importorskip("peft")

# the serving layout BD-LoRA is meant for: row-sharded layers get a block-diagonal A, column-sharded a B
BD = dict(target_modules_bd_a=["o_proj", "down_proj"],
          target_modules_bd_b=["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj"], nblocks=2)
LLAMA = dict(task_type="CAUSAL_LM", target_modules="all-linear", r=4, lora_alpha=8, use_bdlora=BD)


def _randomize(theirs, ours=None, seed=0):
    """Random values for every LoRA tensor of peft's model (a BD B starts at zero), copied into ours."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    if ours is not None:
        copy_weights(theirs, ours)


def _twins(cfg=LLAMA, extra=(), **kw):
    ours, theirs = peft_model_twins(tiny_model("llama", **kw), cfg, extra=extra, same_weights=False)
    _randomize(theirs, ours)
    return ours, theirs


def _logits(model, inputs, **kw):
    return model(**inputs, **kw).logits


def _lora_shapes(model):
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if "lora_" in k}


# ---------------------------------------------------------------------------------------------------- config
def test_bdlora_config_paths_fields_and_conversion():
    import fastpeft.tuners
    import fastpeft.tuners.lora
    import fastpeft.tuners.lora.config as fconfig

    cls = fastpeft.BdLoraConfig
    assert cls is fastpeft.tuners.BdLoraConfig is fastpeft.tuners.lora.BdLoraConfig is fconfig.BdLoraConfig
    ours = [(f.name, f.default) for f in dataclasses.fields(cls)]
    assert ours == [(f.name, f.default) for f in dataclasses.fields(peft.BdLoraConfig)]

    # a dict (as read from JSON) becomes the class, unknown keys dropped, as in peft
    d = {"target_modules_bd_a": ["o"], "nblocks": 2, "not_a_field": 1}
    assert fastpeft.LoraConfig(use_bdlora=d).use_bdlora == cls(target_modules_bd_a=["o"], nblocks=2)
    assert peft.LoraConfig(use_bdlora=d).use_bdlora == peft.BdLoraConfig(target_modules_bd_a=["o"], nblocks=2)
    # peft's object is taken over field by field
    got = fastpeft.LoraConfig(use_bdlora=peft.BdLoraConfig(target_modules_bd_b=["q"], nblocks=4)).use_bdlora
    assert got == cls(target_modules_bd_b=["q"], nblocks=4)
    # to_dict / JSON: peft's nested dict
    assert fastpeft.LoraConfig(use_bdlora=BD).to_dict()["use_bdlora"] == peft.LoraConfig(use_bdlora=BD).to_dict()[
        "use_bdlora"]
    # refusals: the same exception types (and peft's words where the value reaches BD-LoRA's own check)
    for bad in (True, 3, "x"):
        with pytest.raises(TypeError) as theirs:
            peft.LoraConfig(use_bdlora=bad)
        with pytest.raises(TypeError, match="`use_bdlora` must be a config object, a dict, or None"):
            fastpeft.LoraConfig(use_bdlora=bad)
        assert "`BdLoraConfig` must be a `BdLoraConfig`, a dict, or None" in str(theirs.value)
    with pytest.raises(ValueError) as theirs:
        peft.BdLoraConfig(target_modules_bd_a=["a", "b"], target_modules_bd_b=["b"])
    with pytest.raises(ValueError) as ours_err:
        cls(target_modules_bd_a=["a", "b"], target_modules_bd_b=["b"])
    assert str(ours_err.value) == str(theirs.value)
    assert fastpeft.LoraConfig(use_bdlora=BD).unsupported_fields() == []


def test_config_file_round_trip_both_ways(tmp_path):
    peft.LoraConfig(**LLAMA).save_pretrained(tmp_path / "p")
    ours = fastpeft.LoraConfig.from_pretrained(tmp_path / "p")
    assert isinstance(ours.use_bdlora, fastpeft.BdLoraConfig) and ours.use_bdlora.nblocks == 2
    ours.save_pretrained(tmp_path / "f")
    theirs = peft.LoraConfig.from_pretrained(tmp_path / "f")
    assert theirs.use_bdlora == peft.BdLoraConfig(**BD)
    a = json.loads((tmp_path / "p" / "adapter_config.json").read_text())["use_bdlora"]
    b = json.loads((tmp_path / "f" / "adapter_config.json").read_text())["use_bdlora"]
    assert a == b


# ------------------------------------------------------------------------------------------ layers and init
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keys_shapes_dtypes_and_init_equal_peft(dtype):
    base = tiny_model("llama").to(dtype)
    ours, theirs = peft_model_twins(base, LLAMA, same_weights=False)
    assert _lora_shapes(ours) == _lora_shapes(theirs)
    sd = ours.state_dict()
    pre = "base_model.model.model.layers.0."
    assert sd[pre + "self_attn.q_proj.lora_B.default.weight"].shape == (16, 2)  # [out, r / 2]
    assert sd[pre + "self_attn.o_proj.lora_A.default.weight"].shape == (4, 8)  # [r, in / 2]
    assert sd[pre + "mlp.down_proj.lora_A.default.weight"].shape == (4, 16)
    layer = ours.base_model.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.lora_B["default"], BlockDiagonalLinear)
    assert isinstance(layer.self_attn.o_proj.lora_A["default"], BlockDiagonalLinear)
    assert repr(layer.self_attn.q_proj.lora_variant["default"]) == "BdLora(side='B', nblocks=2)"
    # peft's init: a BD B is zero (the adapter starts as a no-op), a BD A is Kaiming-uniform(a=0) over in / n
    for name, mod in ours.named_modules():
        if isinstance(mod, BlockDiagonalLinear) and ".lora_B." in name:
            assert torch.count_nonzero(mod.weight) == 0
        elif isinstance(mod, BlockDiagonalLinear):
            bound = math.sqrt(6.0 / (mod.in_features // mod.nblocks))
            assert 0.5 * bound < mod.weight.abs().max() <= bound
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        assert torch.equal(_logits(ours, inputs), _logits(base, inputs))


def test_init_lora_weights_false_keeps_bd_b_zero_like_peft():
    cfg = dict(LLAMA, init_lora_weights=False)
    ours, theirs = peft_model_twins(tiny_model("llama"), cfg, same_weights=False)
    for model in (ours, theirs):
        q = model.base_model.model.model.layers[0].self_attn.q_proj
        assert torch.count_nonzero(q.lora_B["default"].weight) == 0 and torch.count_nonzero(q.lora_A["default"].weight)
        o = model.base_model.model.model.layers[0].self_attn.o_proj
        assert torch.count_nonzero(o.lora_B["default"].weight)  # plain B: random with init False


# ------------------------------------------------------------------------------------ forward and gradients
@pytest.mark.parametrize("nblocks", [2, 4])
def test_forward_and_gradients_equal_peft(nblocks):
    ours, theirs = _twins(dict(LLAMA, use_bdlora=dict(BD, nblocks=nblocks)))
    inputs = tiny_inputs("llama", batch=3, seq=5)
    ours.train(), theirs.train()
    y_o, y_t = _logits(ours, inputs), _logits(theirs, inputs)
    assert max_abs_diff(y_o, y_t) < 1e-5
    g = torch.randn_like(y_t)
    (y_o * g).sum().backward()
    (y_t * g).sum().backward()
    grads_t = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    grads_o = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads_o.keys() == grads_t.keys() and len(grads_o) == 2 * 7 * 2
    for n, gt in grads_t.items():
        assert grads_o[n].shape == gt.shape, n
        assert max_abs_diff(grads_o[n], gt) <= 1e-5 * max(1.0, gt.abs().max().item()), n


def test_bf16_base_forward_close_to_peft():
    ours, theirs = _twins()
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        y_o, y_t = _logits(ours.eval(), inputs).float(), _logits(theirs.eval(), inputs).float()
    assert max_abs_diff(y_o, y_t) <= 2e-2 * max(1.0, y_t.abs().max().item())


def test_match_strict_false_gives_plain_lora_elsewhere():
    cfg = dict(LLAMA, use_bdlora=dict(target_modules_bd_a=["o_proj"], nblocks=2, match_strict=False))
    ours, theirs = _twins(cfg)
    assert _lora_shapes(ours) == _lora_shapes(theirs)
    layer = ours.base_model.model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj.lora_variant["default"], BdLora)
    assert type(layer.self_attn.q_proj.lora_A["default"]) is nn.Linear
    with torch.no_grad():
        assert max_abs_diff(_logits(ours.eval(), tiny_inputs("llama")),
                            _logits(theirs.eval(), tiny_inputs("llama"))) < 1e-5


def test_lora_bias_like_peft():
    # a BD A keeps an nn.Linear B with its bias; a BD B has none (peft's forward adds no bias there)
    # (attention layers only: the tiny Llama's MLP has no bias to merge a LoRA bias into)
    ours, theirs = _twins(dict(LLAMA, lora_bias=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    keys = sorted(k for k in ours.state_dict() if k.endswith(".bias") and "lora_B" in k)
    assert keys == sorted(k for k in theirs.state_dict() if k.endswith(".bias") and "lora_B" in k)
    assert len(keys) == 2 and all("o_proj" in k for k in keys)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        assert max_abs_diff(_logits(ours.eval(), inputs), _logits(theirs.eval(), inputs)) < 1e-5
        y = _logits(ours, inputs)
        merged = copy.deepcopy(ours).merge_and_unload()  # peft raises AttributeError here (no bias on a BD B)
        assert max_abs_diff(_logits(merged, inputs), y) < 1e-5


# --------------------------------------------------------------------------------------------- files
def test_saved_by_peft_loads_in_fastpeft_and_back(tmp_path):
    ours, theirs = _twins()
    inputs = tiny_inputs("llama")
    theirs.save_pretrained(tmp_path / "p")
    loaded = fastpeft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "p").eval()
    with torch.no_grad():
        y_t = _logits(theirs.eval(), inputs)
        assert max_abs_diff(_logits(loaded, inputs), y_t) < 1e-5
    loaded.save_pretrained(tmp_path / "f")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "p" / "adapter_model.safetensors"), load_file(tmp_path / "f" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(torch.equal(a[k], b[k]) for k in a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "f").eval()
    with torch.no_grad():
        assert max_abs_diff(_logits(back, inputs), y_t) < 1e-5


def test_low_cpu_mem_usage_load(tmp_path):
    ours, theirs = _twins()
    theirs.save_pretrained(tmp_path / "p")
    loaded = fastpeft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "p", low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        assert max_abs_diff(_logits(loaded.eval(), inputs), _logits(theirs.eval(), inputs)) < 1e-5


def test_saved_by_fastpeft_loads_in_peft(tmp_path):
    ours, _ = _twins()
    ours.save_pretrained(tmp_path / "f")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "f").eval()
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        assert max_abs_diff(_logits(ours.eval(), inputs), _logits(theirs, inputs)) < 1e-5


# ------------------------------------------------------------------------------------------------- merge
def test_merge_unmerge_and_merge_and_unload_equal_peft():
    ours, theirs = _twins()
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        y = _logits(ours.eval(), inputs)
        m_o, m_t = copy.deepcopy(ours).merge_and_unload(), copy.deepcopy(theirs).merge_and_unload()
        for (k, w_o), (k2, w_t) in zip(m_o.state_dict().items(), m_t.state_dict().items()):
            assert k == k2 and max_abs_diff(w_o, w_t) < 1e-6, k
        assert max_abs_diff(_logits(m_o, inputs), y) < 1e-5
        q = ours.base_model.model.model.layers[0].self_attn.q_proj
        w0 = q.base_layer.weight.clone()
        # (peft's layer.get_delta_weight ignores the blocks and fails; its variant has the BD-LoRA delta)
        from peft.tuners.lora.variants import BdLoraLinearVariant

        q_t = theirs.base_model.model.model.layers[0].self_attn.q_proj
        assert max_abs_diff(q.get_delta_weight("default"),
                            BdLoraLinearVariant._get_bdlora_delta_weight(q_t, "default")) < 1e-6
        ours.merge_adapter(safe_merge=True)
        assert max_abs_diff(_logits(ours, inputs), y) < 1e-5
        ours.unmerge_adapter()
        assert max_abs_diff(q.base_layer.weight, w0) < 1e-6
        assert max_abs_diff(_logits(ours, inputs), y) < 1e-6


# ------------------------------------------------------------------------------------------ mixed batches
def test_mixed_batch_equal_peft_and_sees_weight_changes():
    extra = [("other", dict(LLAMA, use_bdlora=dict(BD, nblocks=4), r=8))]
    ours, theirs = _twins(extra=extra)
    inputs = tiny_inputs("llama", batch=3)
    names = ["default", "__base__", "other"]
    with torch.no_grad():
        ours.eval(), theirs.eval()
        assert max_abs_diff(_logits(ours, inputs, adapter_names=names),
                            _logits(theirs, inputs, adapter_names=names)) < 1e-5
        # the same names again after an in-place change of a stored block: the pool must be rebuilt
        for model in (ours, theirs):
            model.base_model.model.model.layers[1].mlp.up_proj.lora_B["other"].weight.mul_(3.0)
        assert max_abs_diff(_logits(ours, inputs, adapter_names=names),
                            _logits(theirs, inputs, adapter_names=names)) < 1e-5
        ours.set_adapter("other")
        single = _logits(ours, inputs)
        assert max_abs_diff(_logits(ours, inputs, adapter_names=["other"] * 3), single) < 1e-5


# ------------------------------------------------------------------------------------------------ refusals
def _both_raise(base, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as theirs:
            peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
        with pytest.raises(Exception) as ours:
            fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    return ours.value, theirs.value


@pytest.mark.parametrize("case", ["strict", "both", "divisible_r", "divisible_in"])
def test_refusals_with_peft_words(case):
    cfg = {
        "strict": dict(LLAMA, use_bdlora=dict(target_modules_bd_a=["o_proj"], nblocks=2)),
        "both": dict(LLAMA, use_bdlora=dict(target_modules_bd_a=["proj"], target_modules_bd_b=["q_proj"], nblocks=2)),
        "divisible_r": dict(LLAMA, r=3),
        "divisible_in": dict(LLAMA, use_bdlora=dict(BD, nblocks=32), r=32),
    }[case]
    ours, theirs = _both_raise(tiny_model("llama"), cfg)
    assert type(ours) is type(theirs) is ValueError
    assert str(ours) == str(theirs)


@pytest.mark.parametrize("extra", [dict(use_dora=True), dict(alora_invocation_tokens=[5])])
def test_variant_combinations_refused_like_peft(extra):
    ours, theirs = _both_raise(tiny_model("llama"), dict(LLAMA, **extra))
    assert type(ours) is type(theirs) is ValueError
    assert str(theirs).startswith("Invalid or unsupported variant combination") and str(ours).startswith(str(theirs))


def test_non_linear_layers_refuse_like_peft():
    bd = dict(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj", "embed_tokens"], nblocks=2)
    cfg = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj", "embed_tokens"], r=4, use_bdlora=bd)
    ours, theirs = _both_raise(tiny_model("llama"), cfg)
    assert type(ours) is type(theirs) is ValueError
    assert str(ours).startswith(str(theirs)) and "Embedding" in str(ours)


def test_conv1d_refused_clearly():
    # peft fails with an AttributeError building the factor from Conv1D.in_features; fastpeft names the case
    bd = dict(target_modules_bd_b=["c_attn"], target_modules_bd_a=["c_proj"], nblocks=2)
    cfg = dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"], r=4, use_bdlora=bd)
    ours, theirs = _both_raise(tiny_model("gpt2"), cfg)
    assert isinstance(theirs, AttributeError)
    assert isinstance(ours, ValueError) and "Conv1D" in str(ours) and "nn.Linear" in str(ours)


def test_quantized_base_ignores_bdlora_like_peft_bnb_layers():
    from fastpeft.quant import quantize

    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    quantize(model, "int8")
    m = fastpeft.get_peft_model(model, fastpeft.LoraConfig(**dict(LLAMA, target_modules=["q_proj", "o_proj"])))
    q = m.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q.lora_B["default"]) is nn.Linear and not isinstance(q.lora_variant["default"], BdLora)


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 8, 6))


class _Odd(nn.Module):
    """An nn.Parameter target and a MultiheadAttention: layer types peft gives no BD-LoRA."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.experts, self.attn, self.lin = _Experts(), nn.MultiheadAttention(8, 2), nn.Linear(8, 8)


@pytest.mark.parametrize("target", [dict(target_modules=[], target_parameters=["experts.w"]),
                                    dict(target_modules=["attn"])])
def test_parameter_and_mha_targets_refuse_like_peft(target):
    cfg = dict(r=2, use_bdlora=dict(target_modules_bd_a=["experts", "attn"], nblocks=2), **target)
    ours, theirs = _both_raise(_Odd(), cfg)
    assert type(ours) is type(theirs) is ValueError
    assert str(theirs) == "Invalid or unsupported variant combination: ('use_bdlora',)"
    assert str(ours).startswith(str(theirs))


def test_block_diagonal_factor_called_directly_equals_peft():
    ours, theirs = _twins()
    x = torch.randn(3, 5, 16)
    for mod in ("self_attn.q_proj", "self_attn.o_proj"):
        get = lambda m: m.base_model.model.model.layers[0].get_submodule(mod)  # noqa: E731
        for f in ("lora_A", "lora_B"):
            a, b = getattr(get(ours), f)["default"], getattr(get(theirs), f)["default"]
            xin = x if a.in_features == 16 else x[..., : a.in_features]
            assert max_abs_diff(a(xin), b(xin)) < 1e-5, (mod, f)
