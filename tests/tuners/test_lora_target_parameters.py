"""LoraConfig.target_parameters (fastpeft/tuners/lora/param_wrapper.py) against HF peft 0.21.2.

Twins (same base weights, peft's adapter tensors copied into fastpeft by state_dict key, strict) on a plain
module with 3-D expert stacks in both layouts ([E, out, in], and [E, in, out] with ``is_transposed``) and a
2-D weight, and on tiny transformers MoE models (Llama4 text, GPT-OSS, Qwen3-MoE: expert weights are
nn.Parameters there). Compared: state_dict keys and shapes, outputs, every LoRA grad, merge / unmerge /
merge_and_unload, files saved by one and loaded by the other, and the refusals (peft's errors).
"""
from __future__ import annotations

import copy
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastpeft

from _support.twins import max_abs_diff, peft_model_twins

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class Experts(nn.Module):
    """Two expert stacks used with bmm: [E, out, in] (read transposed), or [E, in, out] with is_transposed."""

    def __init__(self, transposed: bool, E: int = 3):
        super().__init__()
        self.is_transposed = transposed
        self.gate_up = nn.Parameter(torch.randn(E, 8, 12) if transposed else torch.randn(E, 12, 8))
        self.down = nn.Parameter(torch.randn(E, 6, 8) if transposed else torch.randn(E, 8, 6))

    def forward(self, x):  # x [E, tokens, 8]
        gu = self.gate_up if self.is_transposed else self.gate_up.transpose(1, 2)
        dn = self.down if self.is_transposed else self.down.transpose(1, 2)
        return torch.bmm(torch.relu(torch.bmm(x, gu)[..., :6]), dn)


class Net(nn.Module):
    def __init__(self, transposed: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.experts = Experts(transposed)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.experts(x))


TARGETS = ["experts.gate_up", "experts.down", "proj.weight"]


def _x(seed: int = 2) -> torch.Tensor:
    return torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(seed))


def _twins(base: nn.Module, extra=(), **cfg):
    cfg = dict(dict(target_parameters=TARGETS, r=2, lora_alpha=4, init_lora_weights=False), **cfg)
    return peft_model_twins(base, cfg, extra)


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_outputs_and_grads(ours, theirs, forward, tol=1e-5):
    y_ours, y_theirs = forward(ours), forward(theirs)
    assert max_abs_diff(y_ours, y_theirs) <= tol
    dy = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(9))
    (y_ours * dy).sum().backward()
    (y_theirs * dy).sum().backward()
    g_ours, g_theirs = _grads(ours), _grads(theirs)
    assert sorted(g_ours) == sorted(g_theirs) and g_ours
    assert all("lora_" in k for k in g_ours)
    for k in g_ours:
        assert max_abs_diff(g_ours[k], g_theirs[k]) <= tol * max(1.0, g_theirs[k].abs().max().item()), k
    return y_ours


# --------------------------------------------------------------------------------- plain module
@pytest.mark.parametrize("transposed", [False, True], ids=["E_out_in", "E_in_out_is_transposed"])
def test_layout_outputs_grads_and_merge_match_peft(transposed):
    base = Net(transposed)
    ours, theirs = _twins(base)
    assert _shapes(ours) == _shapes(theirs)
    # nesting: first registered parameter innermost; shapes of A [E*r, in], B [out, E*r]
    sd = _shapes(ours)
    pre = "base_model.model.experts."
    assert sd[pre + "base_layer.base_layer.gate_up"] == tuple(base.experts.gate_up.shape)
    in_f, out_f = 8, 12  # gate_up maps 8 -> 12 features in both layouts
    assert sd[pre + "base_layer.lora_A.default.weight"] == (3 * 2, in_f)
    assert sd[pre + "base_layer.lora_B.default.weight"] == (out_f, 3 * 2)
    assert sd["base_model.model.proj.lora_A.default.weight"] == (2, 8)
    assert ours.base_model.targeted_parameter_names == theirs.base_model.targeted_parameter_names
    x = _x()
    y = _check_outputs_and_grads(ours, theirs, lambda m: m(x))
    assert max_abs_diff(y, base(x)) > 1e-2  # the adapters act
    with torch.no_grad():
        # the reference: each expert's own W_e + s B_e A_e, with peft's interleaved B columns
        inner = ours.base_model.model.experts.base_layer
        A, B, s = inner.lora_A["default"].weight, inner.lora_B["default"].weight, inner.scaling["default"]
        e = 1
        delta = s * B[:, e::3] @ A[e * 2:(e + 1) * 2]
        got = inner.get_delta_weight("default")[e]
        assert max_abs_diff(got, delta.t() if transposed else delta) < 1e-6
        ours.merge_adapter()
        assert max_abs_diff(ours(x), y) < 1e-5
        ours.unmerge_adapter()
        assert max_abs_diff(ours(x), y) < 1e-5
        assert max_abs_diff(ours.base_model.model.experts.get_param(), base.experts.down) < 1e-5
        merged_ours = copy.deepcopy(ours).merge_and_unload()
        merged_theirs = copy.deepcopy(theirs).merge_and_unload()
        assert type(merged_ours.experts) is Experts and type(merged_ours.proj) is nn.Linear
        for k, v in merged_theirs.state_dict().items():
            assert max_abs_diff(merged_ours.state_dict()[k], v) < 1e-5, k
        assert max_abs_diff(merged_ours(x), y) < 1e-5
        assert max_abs_diff(copy.deepcopy(ours).unload()(x), base(x)) < 1e-5
        with ours.disable_adapter():
            assert max_abs_diff(ours(x), base(x)) < 1e-5


def test_two_adapters_same_parameters():
    ours, theirs = _twins(Net(), extra=[("b", dict(target_parameters=TARGETS, r=3, init_lora_weights=False))])
    assert _shapes(ours) == _shapes(theirs)
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert trainable and not any(".b." in n for n in trainable)  # the new adapter starts frozen
    x = _x()
    for active in (["default", "b"], "b"):
        ours.base_model.set_adapter(active)
        theirs.base_model.set_adapter(active)
        with torch.no_grad():
            assert max_abs_diff(ours(x), theirs(x)) < 1e-5


def test_adapter_on_other_parameters_refused_like_peft():
    ours, theirs = _twins(Net())
    other = dict(target_parameters=["experts.gate_up"], r=2)
    with pytest.raises(ValueError) as peft_err:
        theirs.add_adapter("other", peft.LoraConfig(**other))
    with pytest.raises(ValueError) as ours_err:
        ours.add_adapter("other", fastpeft.LoraConfig(**other))
    assert str(ours_err.value) == str(peft_err.value)
    assert "other" not in ours.peft_config


def test_rslora_and_gaussian_init():
    ours, _ = _twins(Net(), use_rslora=True, init_lora_weights="gaussian", r=4, lora_alpha=8)
    inner = ours.base_model.model.experts.base_layer
    assert inner.scaling["default"] == 8 / 2.0
    assert torch.count_nonzero(inner.lora_B["default"].weight) == 0
    x = _x()
    with torch.no_grad():
        assert max_abs_diff(ours(x), Net()(x)) < 1e-6  # B = 0: starts as the base model


# ------------------------------------------------------------------------------- transformers MoE
MOE = {
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", ["feed_forward.experts.gate_up_proj",
                                                              "feed_forward.experts.down_proj"],
                    dict(vocab_size=64, hidden_size=16, intermediate_size=16, intermediate_size_mlp=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         num_local_experts=4, num_experts_per_tok=1, max_position_embeddings=64,
                         interleave_moe_layer_step=1, no_rope_layers=[1, 1], attention_chunk_size=64,
                         moe_layers=[0, 1])),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                dict(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                     max_position_embeddings=64, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                  dict(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=12,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=64, decoder_sparse_step=1, mlp_only_layers=[])),
}


def _moe(kind: str) -> nn.Module:
    import transformers as T

    T.logging.set_verbosity_error()
    cfg_cls, model_cls, _, kw = MOE[kind]
    torch.manual_seed(0)
    model = getattr(T, model_cls)(getattr(T, cfg_cls)(**kw))
    with torch.no_grad():  # some expert stacks start as torch.empty / zeros: give them values
        for n, p in model.named_parameters():
            if "experts" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    return model


def _ids():
    return torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(MOE))
def test_transformers_moe_match_peft_and_round_trip(kind, tmp_path):
    base = _moe(kind)
    targets = MOE[kind][2]
    ours, theirs = _twins(base, target_parameters=targets, r=2, lora_alpha=4)
    assert _shapes(ours) == _shapes(theirs)
    assert len(ours.base_model.targeted_parameter_names) == 4  # 2 layers x 2 stacks
    ids = _ids()
    y = _check_outputs_and_grads(ours, theirs, lambda m: m(input_ids=ids).logits, tol=1e-4)
    with torch.no_grad():
        assert max_abs_diff(y, base(input_ids=ids).logits) > 1e-3
        merged = copy.deepcopy(ours).merge_and_unload()
        assert max_abs_diff(merged(input_ids=ids).logits, y) < 1e-4

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    f_ours = load_file(os.path.join(tmp_path / "ours", "adapter_model.safetensors"))
    f_theirs = load_file(os.path.join(tmp_path / "theirs", "adapter_model.safetensors"))
    assert sorted(f_ours) == sorted(f_theirs)
    for k in f_ours:
        assert torch.equal(f_ours[k], f_theirs[k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_from_peft = fastpeft.PeftModel.from_pretrained(_moe(kind), tmp_path / "theirs")
        peft_from_ours = peft.PeftModel.from_pretrained(_moe(kind), tmp_path / "ours")
    with torch.no_grad():
        assert max_abs_diff(ours_from_peft(input_ids=ids).logits, y) < 1e-4
        assert max_abs_diff(peft_from_ours(input_ids=ids).logits, y) < 1e-4


# ------------------------------------------------------------------------------------------ refusals
class Top(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, 4))
        self.lin = nn.Linear(4, 4)
        self.vec = nn.Module()
        self.vec.b = nn.Parameter(torch.randn(4))


def _error(lib, base, **cfg):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**cfg))
    except Exception as e:  # noqa: BLE001 - compared between the libraries
        return e
    raise AssertionError(f"{lib.__name__} accepted {cfg}")


@pytest.mark.parametrize("base,cfg", [
    (Net(), dict(target_parameters=TARGETS, lora_dropout=0.1)),
    (Net(), dict(target_parameters=TARGETS, use_dora=True)),
    (Net(), dict(target_parameters=TARGETS, lora_bias=True)),
    (Net(), dict(target_parameters=TARGETS, fan_in_fan_out=True)),
    (Top(), dict(target_parameters=["w"])),
    (Top(), dict(target_parameters=["vec.b"])),
    (Top(), dict(target_modules=["lin"], target_parameters=["lin.weight"])),
    (Top(), dict(target_parameters=["nothing.here"])),
], ids=["dropout", "dora", "lora_bias", "fan_in_fan_out", "top_level", "1d", "module_and_param", "no_match"])
def test_refusals_with_peft_errors(base, cfg):
    theirs, ours = _error(peft, base, **cfg), _error(fastpeft, base, **cfg)
    assert isinstance(ours, ValueError) and isinstance(theirs, ValueError)
    assert str(ours) == str(theirs)


def test_warns_when_only_modules_match():
    with pytest.warns(RuntimeWarning, match="were set but no parameter was matched"):
        fastpeft.get_peft_model(Top(), fastpeft.LoraConfig(target_modules=["lin"], target_parameters=["nope"]))


def test_mixed_adapter_batch_refused_like_peft():
    ours, theirs = _twins(Net())
    x = _x()
    names = ["default", "__base__", "default"]
    with pytest.raises(ValueError) as peft_err:
        theirs.eval()(x, adapter_names=names)
    with pytest.raises(ValueError) as ours_err:
        ours.eval()(x, adapter_names=names)
    assert str(ours_err.value) == str(peft_err.value) == "lora.ParamWrapper does not support mixed adapter batches yet."
