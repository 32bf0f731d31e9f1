"""accelerate(peft_model): HF peft LoRA Linear layers run on fastpeft.ops, same outputs, in place."""
import copy
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn

import fastpeft.tuners.lora.accelerate as acc_mod
from fastpeft.tuners.lora.accelerate import AccelerateReport, accelerate, restore
from _support.models import ids_for, tiny_model
from _support.reference import rel_err

TOL = 1e-5


def _peft(base, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(**cfg))


def _logits(m, ids):
    return m(ids).logits


@pytest.fixture
def counted(monkeypatch):
    calls = []  # the number of adapters of each fused call
    real = acc_mod.ops.lora

    def spy(x, base, adapters, *a, **k):
        calls.append(len(adapters))
        return real(x, base, adapters, *a, **k)

    monkeypatch.setattr(acc_mod.ops, "lora", spy)
    return calls


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_same_outputs_and_grads_several_adapters(arch, counted):
    base = tiny_model(arch).eval()
    targets = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "opt": ["q_proj", "fc1", "embed_tokens"],
               "gpt2": ["c_attn", "c_fc", "wte"]}[arch]
    pm = _peft(base, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("two", peft.LoraConfig(target_modules=targets[:2], r=3, lora_alpha=7, init_lora_weights=False))
    pm.base_model.set_adapter(["default", "two"])
    ref = copy.deepcopy(pm)
    keys = list(pm.state_dict())
    ids = ids_for(base)
    report = accelerate(pm)
    assert isinstance(report, AccelerateReport)
    n_linear = sum(isinstance(m, PeftLinear) for m in pm.modules())
    assert report.swapped == n_linear == len(report.swapped_modules) > 0
    assert len(report.skipped) == 1 and "embedding" in report.skipped[0][1]
    assert list(pm.state_dict()) == keys
    assert all(isinstance(pm.get_submodule(n), PeftLinear) for n in report.swapped_modules)

    y_ref = _logits(ref, ids)
    y = _logits(pm, ids)
    # one call per layer, carrying every active adapter of that layer (both where both target it)
    assert counted and 2 in counted and set(counted) <= {1, 2}
    assert (y - y_ref).abs().max().item() <= TOL
    y.pow(2).mean().backward()
    y_ref.pow(2).mean().backward()
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert got.keys() == g_ref.keys()
    for n in got:
        assert torch.allclose(got[n], g_ref[n], atol=1e-5, rtol=1e-4), n


def test_merge_disable_save_still_work(tmp_path):
    base = tiny_model("llama").eval()
    pm = _peft(copy.deepcopy(base), target_modules=["q_proj", "o_proj"], init_lora_weights=False, lora_dropout=0.2)
    pm.eval()
    ids = ids_for(base)
    with torch.no_grad():
        y = _logits(pm, ids)
        report = accelerate(pm)
        assert report.swapped == 4 and not report.skipped
        assert (_logits(pm, ids) - y).abs().max() <= TOL
        with pm.disable_adapter():
            assert (_logits(pm, ids) - base(ids).logits).abs().max() <= TOL
        pm.base_model.merge_adapter()
        assert (_logits(pm, ids) - y).abs().max() <= TOL
        pm.base_model.unmerge_adapter()
        assert (_logits(pm, ids) - y).abs().max() <= TOL
    pm.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert (_logits(loaded, ids) - y).abs().max() <= TOL
    # calling it again does not wrap twice; restore gives peft's forward back
    assert accelerate(pm).swapped == 4
    assert restore(pm) == 4
    assert "forward" not in vars(pm.base_model.model.model.layers[0].self_attn.q_proj)


def test_training_dropout_runs_on_ops(counted):
    base = tiny_model("llama")
    pm = _peft(base, target_modules=["q_proj", "v_proj"], lora_dropout=0.5, init_lora_weights=False)
    accelerate(pm)
    pm.train()
    ids = ids_for(base)
    y_train = _logits(pm, ids)
    y_train.sum().backward()
    assert len(counted) == 4
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.grad is not None and q.base_layer.weight.grad is None
    pm.eval()
    with torch.no_grad():
        assert (_logits(pm, ids) - y_train).abs().max() > 1e-4  # dropout acted while training


def test_left_alone_with_reasons():
    class MyLinear(nn.Linear):  # an unknown subclass (stands in for a quantized base)
        def forward(self, x):
            return super().forward(x) * 1.0

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), MyLinear(8, 8)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(M(), peft.LoraConfig(target_modules=["a", "c"], init_lora_weights=False))
        pm.add_adapter("dora", peft.LoraConfig(target_modules=["b"], use_dora=True))
        pm.add_adapter("lb", peft.LoraConfig(target_modules=["a"], lora_bias=True))
    report = accelerate(pm)
    reasons = dict(report.skipped)
    assert report.swapped == 1, report  # b: its only adapter is DoRA, which the op runs
    assert "base_model.model.b" not in reasons
    assert "lora_bias" in reasons["base_model.model.a"]
    assert "MyLinear" in reasons["base_model.model.c"]
    assert "left alone" in str(report)


def test_autocast_uses_fast_path(counted):
    base = tiny_model("llama").eval()
    pm = _peft(base, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    ref = copy.deepcopy(pm)
    accelerate(pm)
    ids = ids_for(base)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _logits(pm, ids)
        y_ref = _logits(ref, ids)
    assert len(counted) == 4 and y.dtype == y_ref.dtype
    assert rel_err(y, y_ref) < 2e-2


def test_accelerate_says_why_when_there_is_nothing_to_do():
    from fastpeft.tuners.lora.accelerate import accelerate

    report = accelerate(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert report.swapped == 0 and "no HF peft LoRA layer found" in str(report)


def test_dora_layers_run_on_ops_with_peft_outputs_and_gradients(counted):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(target_modules=["0", "2"], use_dora=True,
                                                       init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "magnitude" in n:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    x = torch.randn(5, 8)
    y_ref = pm(x)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [p for p in pm.parameters() if p.requires_grad])
    assert accelerate(pm).swapped == 2
    y = pm(x)
    g = torch.autograd.grad(y.square().sum(), [p for p in pm.parameters() if p.requires_grad])
    assert len(counted) == 2
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
