"""Activation memory saved for backward: lora_linear vs HF peft's lora.Linear (lora_dropout=0.1)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastpeft.ops import lora_linear

peft = pytest.importorskip("peft")


class _OpsLora(nn.Module):
    """A peft-shaped LoRA linear (same parameters) whose forward is one fastpeft.ops.lora_linear."""

    def __init__(self, peft_layer):
        super().__init__()
        self.base = peft_layer.base_layer
        self.A = peft_layer.lora_A["default"].weight
        self.B = peft_layer.lora_B["default"].weight
        self.scale = peft_layer.scaling["default"]
        self.p = getattr(peft_layer.lora_dropout["default"], "p", 0.0)  # nn.Identity when 0

    def forward(self, x):
        return lora_linear(x, self.base.weight, self.base.bias, self.A, self.B, self.scale, self.p,
                           self.training)


def _saved_activation_bytes(model, x, params):
    """Bytes of distinct non-parameter storages saved for backward during one forward."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(storages.values()), out


def _models(K=64, r=8):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(K, K), nn.ReLU(), nn.Linear(K, K), nn.ReLU(), nn.Linear(K, K))
    cfg = peft.LoraConfig(r=r, lora_alpha=16, lora_dropout=0.1, target_modules=["0", "2", "4"])
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    for name, p in pm.named_parameters():
        if "lora_B" in name:  # peft zero-inits B; random B makes the output comparison meaningful
            nn.init.normal_(p, std=0.1)
    seq = pm.base_model.model
    ours = nn.Sequential(*[_OpsLora(m) if hasattr(m, "lora_A") else m for m in seq])
    return pm, ours


def test_same_output_as_peft_in_eval():
    pm, ours = _models()
    pm.eval()
    ours.eval()
    x = torch.randn(7, 64)
    torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-5)


def test_saved_for_backward_is_clearly_less_than_peft():
    pm, ours = _models()
    pm.train()
    ours.train()
    params = list(pm.parameters())
    x = torch.randn(256, 64, requires_grad=True)
    peft_bytes, _ = _saved_activation_bytes(pm, x, params)
    ours_bytes, y = _saved_activation_bytes(ours, x, params)
    # peft keeps x, dropout(x) and the dropout mask per layer; we keep x and S = [M, r].
    assert ours_bytes < 0.6 * peft_bytes, (ours_bytes, peft_bytes)
    y.sum().backward()  # the hooks really saw the tensors backward uses
    assert x.grad is not None


def test_shared_input_saved_once():
    """q/k/v projections of one x: x is saved by reference, so it is stored once, not three times."""
    K, r, M = 64, 4, 128
    x = torch.randn(M, K, requires_grad=True)
    Ws = [torch.randn(K, K) for _ in range(3)]
    As = [torch.randn(r, K, requires_grad=True) for _ in range(3)]
    Bs = [torch.randn(K, r, requires_grad=True) for _ in range(3)]

    def qkv(x):
        return [lora_linear(x, W, None, A, B, 1.0, 0.1, True) for W, A, B in zip(Ws, As, Bs)]

    nbytes, _ = _saved_activation_bytes(qkv, x, Ws + As + Bs)
    x_bytes = M * K * 4
    s_bytes = 3 * M * r * 4
    assert nbytes <= x_bytes + s_bytes + 3 * 64, (nbytes, x_bytes, s_bytes)
