"""Weight-derived init_lora_weights values (tuners/lora/inits.py) against HF peft 0.21.2, run side by side.

Same base weights, same torch RNG state before each library builds its model: A, B and the rewritten
base weights must be bit-identical (same SVD / QR / random draws), and so must outputs and gradients.
"""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

from fastpeft.tuners.lora import LoraConfig, LoraModel
from fastpeft.tuners.lora import inits

from _support.models import tiny_inputs, tiny_model

TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def _build(base, seed=5, **cfg):
    """(fastpeft LoraModel, peft LoraModel) from copies of ``base``; the RNG is reseeded before each."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        theirs = peft.LoraModel(copy.deepcopy(base), peft.LoraConfig(**cfg), "default")
        torch.manual_seed(seed)
        ours = LoraModel(copy.deepcopy(base), LoraConfig(**cfg), "default")
    return ours, theirs


def _assert_identical(ours, theirs):
    so, st = ours.state_dict(), theirs.state_dict()
    assert so.keys() == st.keys()
    for k in so:
        assert so[k].dtype == st[k].dtype, k
        if "lora_magnitude_vector" in k:  # DoRA's norm: fastpeft's formula rounds differently (not an init)
            assert torch.allclose(so[k], st[k], rtol=1e-6, atol=0), k
            continue
        assert torch.equal(so[k], st[k]), f"{k}: max diff {(so[k].double() - st[k].double()).abs().max():.3g}"
    grads_o = {n for n, p in ours.named_parameters() if p.requires_grad}
    grads_t = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads_o == grads_t


CASES = [("llama", "pissa"), ("llama", "pissa_niter_3"), ("llama", "olora"), ("llama", "mica"),
         ("llama", "orthogonal"), ("llama", "eva"), ("llama", "lora_ga"), ("llama", "PiSSA".lower()),
         ("gpt2", "pissa"), ("gpt2", "pissa_niter_2"), ("gpt2", "mica"), ("gpt2", "orthogonal"),
         ("llama", "OLoRA"), ("llama", "MICA")]


@pytest.mark.parametrize("kind,init", CASES)
def test_init_matches_peft(kind, init):
    base = tiny_model(kind)
    ours, theirs = _build(base, r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=init)
    _assert_identical(ours, theirs)
    inputs = tiny_inputs(kind)
    ours.eval()  # no dropout (GPT-2 has it in the base model); gradients still flow
    theirs.eval()
    y_o, y_t = ours(**inputs).logits, theirs(**inputs).logits
    assert torch.equal(y_o, y_t) or (y_o - y_t).abs().max() < 1e-6
    y_o.square().mean().backward()
    y_t.square().mean().backward()
    go = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    gt = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert go.keys() == gt.keys() and go
    for n in go:
        assert torch.allclose(go[n], gt[n], rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_init_keeps_the_output(init):
    base = tiny_model("llama")
    ours, _ = _build(base, r=4, lora_alpha=16, target_modules=TARGETS["llama"], init_lora_weights=init)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        y0 = base.eval()(**inputs).logits
        y1 = ours.eval()(**inputs).logits
    assert (y0 - y1).abs().max() < 1e-4  # W_res + s B A == W
    q = ours.model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.get_base_layer().weight, base.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("init", ["pissa", "olora", "mica"])
def test_half_precision_base(init, dtype):
    base = tiny_model("llama").to(dtype)
    ours, theirs = _build(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    _assert_identical(ours, theirs)


def test_pissa_with_dora_and_rslora_and_patterns():
    base = tiny_model("llama")
    ours, theirs = _build(base, r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights="pissa",
                          use_dora=True, rank_pattern={"up_proj": 2}, alpha_pattern={"q_proj": 3})
    _assert_identical(ours, theirs)
    ours, theirs = _build(base, r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights="olora",
                          use_rslora=True)
    _assert_identical(ours, theirs)


def test_second_adapter_and_mixing_warning():
    base = tiny_model("llama")
    model = LoraModel(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"]), "default")
    with pytest.warns(UserWarning, match="PiSSA changes the base weights"):
        model.add_adapter("p", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))


def test_mica_keeps_lora_B_frozen():
    base = tiny_model("llama")
    ours, theirs = _build(base, r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights="mica")
    _assert_identical(ours, theirs)
    for m in (ours, theirs):
        m.set_adapter("default")
        m.set_requires_grad("default", True)
    q = ours.model.model.layers[0].self_attn.q_proj
    assert not q.lora_B["default"].weight.requires_grad and q.lora_A["default"].weight.requires_grad
    emb = ours.model.model.embed_tokens
    assert not emb.lora_embedding_B["default"].requires_grad and emb.lora_embedding_A["default"].requires_grad
    _assert_identical(ours, theirs)
    ours.delete_adapter("default")
    assert "default" not in q.frozen_peft_weight_names


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(init_lora_weights="orthogonal", r=3), ValueError, "even"),
        (dict(init_lora_weights="pissa_niter_x"), ValueError, "integer"),
        (dict(init_lora_weights="pissa_foo"), ValueError, "pissa_niter_"),
        (dict(init_lora_weights="mica", r=20), ValueError, "MiCA requires"),
        (dict(init_lora_weights="mica", use_dora=True), ValueError, "mica"),
        (dict(init_lora_weights="corda"), ValueError, "preprocess_corda"),
    ],
)
def test_errors_like_peft(kwargs, error, match):
    base = tiny_model("llama")
    cfg = dict(dict(r=4, target_modules=["q_proj"]), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as ref:
            peft.LoraModel(copy.deepcopy(base), peft.LoraConfig(**cfg), "default")
        with pytest.raises(error, match=match):
            LoraModel(copy.deepcopy(base), LoraConfig(**cfg), "default")
    assert isinstance(ref.value, (ValueError, TypeError))


def test_olora_on_fan_in_fan_out_is_refused():
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        LoraModel(tiny_model("gpt2"), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="olora"), "d")


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.emb = nn.Embedding(10, 6)


@pytest.mark.parametrize("init", ["pissa", "olora", "lora_ga"])
def test_conv_and_embedding_like_peft(init):
    base = _ConvNet()
    for target in ("conv", "emb"):
        cfg = dict(r=2, target_modules=[target], init_lora_weights=init)
        try:
            torch.manual_seed(1)
            theirs = peft.LoraModel(copy.deepcopy(base), peft.LoraConfig(**cfg), "default")
        except ValueError:
            with pytest.raises(ValueError):
                LoraModel(copy.deepcopy(base), LoraConfig(**cfg), "default")
            continue
        torch.manual_seed(1)
        ours = LoraModel(copy.deepcopy(base), LoraConfig(**cfg), "default")
        _assert_identical(ours, theirs)


def test_low_cpu_mem_usage_skips_the_decomposition_and_loads(tmp_path):
    import fastpeft

    base = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                          init_lora_weights="mica"))
        theirs.save_pretrained(tmp_path)
        ours = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), low_cpu_mem_usage=True,
                                                  is_trainable=True)
    q = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.lora_B["default"].weight, theirs.base_model.model.model.layers[0].self_attn.q_proj
                       .lora_B["default"].weight)
    assert not q.lora_B["default"].weight.requires_grad


def test_supported_values():
    for v in ["pissa", "pissa_niter_4", "olora", "OLoRA", "corda", "lora_ga", "eva", "orthogonal", "mica", True,
              False, "gaussian"]:
        assert inits.is_supported_init(v), v
        assert "init_lora_weights" not in LoraConfig(init_lora_weights=v).unsupported_fields(), v
    for v in ["foo", 1, 0, None]:
        assert not inits.is_supported_init(v)


def test_sub_configs_like_peft(tmp_path):
    from fastpeft.tuners.lora.config import CordaConfig, EvaConfig

    for init, field, cls in (("eva", "eva_config", EvaConfig), ("corda", "corda_config", CordaConfig)):
        with pytest.warns(UserWarning, match=f"`{field}` is not specified"):
            cfg = LoraConfig(init_lora_weights=init, target_modules=["q_proj"])
        assert getattr(cfg, field) == cls() and cfg.unsupported_fields() == []
        cfg.save_pretrained(tmp_path / init)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = peft.LoraConfig(init_lora_weights=init, target_modules=["q_proj"])
        loaded = peft.PeftConfig.from_pretrained(str(tmp_path / init))
        assert loaded.to_dict()[field] == ref.to_dict()[field]
    with pytest.raises(ValueError, match="rho"):
        EvaConfig(rho=0.5)
    assert LoraConfig(lora_ga_config={"stable_gamma": 8}).unsupported_fields() == []
    with pytest.raises(TypeError, match="lora_ga_config"):
        from fastpeft.tuners.lora.init_configs import LoraGAConfig, read_sub_config
        read_sub_config({"gamma": 1}, LoraGAConfig, "lora_ga_config")
