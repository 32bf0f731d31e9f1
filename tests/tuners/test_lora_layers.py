"""LoRA layers: same state_dict keys and outputs as peft, gradients, init, bias options."""
import math

import pytest
import torch
from torch import nn

from fastpeft.tuners.lora import Conv1D, Embedding, Linear, LoraConfig, LoraModel
from fastpeft.tuners.modules_to_save import ModulesToSaveWrapper
from _support.models import Plain, ids_for, run
from _support.models import tiny_model as tiny
from _support.twins import copy_weights
from _support.twins import lora_twins as twins

CASES = [
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules=["q_proj", "v_proj", "embed_tokens"], lora_dropout=0.1)),
    ("opt", dict(target_modules=["q_proj", "v_proj", "fc1"], lora_bias=True)),
    ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    ("roberta", dict(target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only")),
    ("t5", dict(target_modules=["q", "v", "wo"], use_rslora=True, r=4, lora_alpha=32)),
]


@pytest.mark.parametrize("arch,cfg", CASES)
def test_state_dict_keys_and_outputs_equal_peft(arch, cfg):
    base = tiny(arch)
    ours, theirs = twins(base, init_lora_weights=False, **cfg)
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    copy_weights(theirs, ours)  # strict: same keys, same shapes
    ours.eval(), theirs.eval()
    ids = ids_for(base)
    with torch.no_grad():
        y_ours, y_theirs, y_base = run(ours.model, ids), run(theirs.model, ids), run(base.eval(), ids)
    assert (y_ours - y_theirs).abs().max().item() <= 1e-5
    assert (y_ours - y_base).abs().max().item() > 1e-4  # the adapters really act


@pytest.mark.parametrize("arch,cfg", CASES[:4])
def test_gradients_equal_peft_without_dropout(arch, cfg):
    cfg = {k: v for k, v in cfg.items() if k != "lora_dropout"}
    base = tiny(arch)
    ours, theirs = twins(base, init_lora_weights=False, **cfg)
    copy_weights(theirs, ours)
    ours.eval(), theirs.eval()  # the models' own dropout would differ between the twins
    ids = ids_for(base)
    run(ours.model, ids).float().pow(2).mean().backward()
    run(theirs.model, ids).float().pow(2).mean().backward()
    p_theirs = dict(theirs.named_parameters())
    n = 0
    for name, p in ours.named_parameters():
        q = p_theirs[name]
        assert p.requires_grad == q.requires_grad, name
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
            n += 1
    assert n > 0


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_gradients_reach_only_adapters_and_requested_biases(bias):
    ours, theirs = twins(Plain(), target_modules=r"layers\.\d\.0", bias=bias, modules_to_save=["head"],
                         init_lora_weights=False)
    assert _trainable(ours) == _trainable(theirs)
    ids = ids_for(ours.model)
    ours.model(ids).sum().backward()
    for n, p in ours.named_parameters():
        allowed = ("lora_" in n or ".modules_to_save." in n
                   or (bias == "all" and n.endswith("bias") and ".original_module." not in n)
                   or (bias == "lora_only" and n.endswith("base_layer.bias")))
        assert (p.grad is not None) == allowed, n
    assert ours.model.head.original_module.weight.grad is None


def test_linear_init_true_gaussian_false():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    m = Linear(lin, "a", r=8, lora_alpha=16)
    A, B = m.lora_A["a"].weight, m.lora_B["a"].weight
    assert torch.count_nonzero(B) == 0
    bound = 1 / math.sqrt(64)  # kaiming-uniform with a=sqrt(5) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound
    m.update_layer("g", 16, lora_alpha=16, init_lora_weights="gaussian")
    assert torch.count_nonzero(m.lora_B["g"].weight) == 0
    assert m.lora_A["g"].weight.std().item() == pytest.approx(1 / 16, rel=0.1)
    m.update_layer("f", 4, lora_alpha=4, init_lora_weights=False)
    assert torch.count_nonzero(m.lora_B["f"].weight) > 0
    x = torch.randn(3, 64)
    m.set_adapter(["a", "g"])
    assert torch.equal(m(x), lin(x))  # zero-B adapters start as the identity change
    with pytest.raises(ValueError, match="positive integer"):
        m.update_layer("bad", 0, lora_alpha=1)


def test_embedding_init_and_layout():
    emb = nn.Embedding(30, 6, padding_idx=0)
    m = Embedding(emb, "a", r=4, lora_alpha=8)
    assert m.lora_embedding_A["a"].shape == (4, 30) and m.lora_embedding_B["a"].shape == (6, 4)
    assert torch.count_nonzero(m.lora_embedding_A["a"]) == 0
    assert m.lora_embedding_B["a"].std() > 0.5  # standard normal
    with pytest.raises(ValueError, match="lora_bias"):
        Embedding(nn.Embedding(3, 2), "a", lora_bias=True)


def test_conv1d_layer_uses_transposed_weight():
    from transformers.pytorch_utils import Conv1D as HFConv1D
    torch.manual_seed(0)
    c = HFConv1D(12, 8)  # nf=12 outputs, nx=8 inputs; weight [8, 12]
    m = Conv1D(c, "a", r=2, lora_alpha=4, init_lora_weights=False)
    assert (m.in_features, m.out_features) == (8, 12) and m.fan_in_fan_out
    x = torch.randn(2, 3, 8)
    A, B = m.lora_A["a"].weight, m.lora_B["a"].weight
    want = c(x) + 2.0 * (x @ A.t() @ B.t())
    assert torch.allclose(m(x), want, atol=1e-6)
    assert m.get_delta_weight("a").shape == c.weight.shape


def test_forward_dtype_and_bf16_base():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    m = Linear(lin, "a", r=4, lora_alpha=4, init_lora_weights=False)
    assert m.lora_A["a"].weight.dtype == torch.bfloat16  # follows the base until PeftModel upcasts
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    ref = lin(x).float() + (x.float() @ m.lora_A["a"].weight.float().t() @ m.lora_B["a"].weight.float().t())
    assert (y.float() - ref).abs().max() < 5e-2


def test_cast_adapter_dtype_upcasts_16bit_adapters():
    model = Plain().to(torch.bfloat16)
    lm = LoraModel(model, LoraConfig(target_modules=["emb", "head"]), "default")
    lm._cast_adapter_dtype("default")
    assert lm.model.head.lora_A["default"].weight.dtype == torch.float32
    assert lm.model.emb.lora_embedding_A["default"].dtype == torch.float32
    assert lm.model.head.base_layer.weight.dtype == torch.bfloat16
    y = lm.model(ids_for(lm.model))
    assert y.dtype == torch.bfloat16


def test_modules_to_save_wrapper():
    ours, _ = twins(Plain(), target_modules=["head"], modules_to_save=["norm"])
    w = ours.model.norm
    assert isinstance(w, ModulesToSaveWrapper)
    assert not w.original_module.weight.requires_grad and w.modules_to_save["default"].weight.requires_grad
    with torch.no_grad():
        w.modules_to_save["default"].weight.add_(1.0)
    x = torch.randn(2, 8)
    assert torch.allclose(w(x), w.modules_to_save["default"](x))
    w.enable_adapters(False)
    assert torch.allclose(w(x), w.original_module(x))
    assert w.normalized_shape == (8,)  # attribute fall-through to the wrapped module


def test_training_dropout_changes_lora_branch_only():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    m = Linear(lin, "a", r=4, lora_alpha=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(64, 16)
    m.eval()
    y_eval = m(x)
    m.train()
    torch.manual_seed(1)
    y1 = m(x)
    torch.manual_seed(1)
    y2 = m(x)
    assert torch.equal(y1, y2)  # the mask comes from torch's RNG
    assert not torch.allclose(y1, y_eval)
    m.lora_B["a"].weight.data.zero_()
    assert torch.allclose(m(x), lin(x), atol=1e-6)  # dropout never touches the base path


def test_autocast_bf16_on_fp32_model_close_to_peft():
    base = tiny("llama").eval()
    ours, theirs = twins(base, target_modules="all-linear", init_lora_weights=False)
    copy_weights(theirs, ours)
    ids = ids_for(base)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours = run(ours.model, ids)
        y_theirs = run(theirs.model, ids)
    assert y_ours.dtype == y_theirs.dtype
    err = ((y_ours.float() - y_theirs.float()).norm() / y_theirs.float().norm()).item()
    assert err < 2e-2
    y_ours.float().sum().backward()
    assert ours.model.model.layers[0].mlp.up_proj.lora_A["default"].weight.grad is not None


def test_second_adapter_all_linear_and_inference_mode():
    lm = LoraModel(tiny("llama"), LoraConfig(target_modules=["q_proj"]), "default")
    lm.peft_config["two"] = LoraConfig(target_modules="all-linear", inference_mode=True)
    lm.inject_adapter(lm.model, "two")
    q = lm.model.model.layers[0].self_attn.q_proj
    assert set(q.lora_A) == {"default", "two"}
    assert "two" in lm.model.model.layers[1].mlp.down_proj.lora_A
    assert not any(p.requires_grad for n, p in lm.named_parameters() if ".two." in n)
    assert q.lora_A["default"].weight.requires_grad
