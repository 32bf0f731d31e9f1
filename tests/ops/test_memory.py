"""Activation memory saved for backward: fastpeft's LoRA Linear vs HF peft's LoRA Linear (lora_dropout=0.1).

Both are the libraries' real layers (fastpeft.tuners.lora.Linear, peft.tuners.lora.layer.Linear), made by
get_peft_model on twin models with the same config and the same weights.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastpeft.ops import lora_linear
from fastpeft.tuners.lora import Linear as FastLinear
from _support.twins import assert_same_outputs, peft_model_twins

peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402

K, R, M = 64, 8, 256


def _saved_activation_bytes(fn, x, params):
    """Bytes of the distinct non-parameter storages saved for backward while fn(x) runs."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return sum(storages.values()), out


def _twins(dropout=0.1):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(K, K), nn.ReLU(), nn.Linear(K, K), nn.ReLU(), nn.Linear(K, K))
    cfg = dict(r=R, lora_alpha=16, lora_dropout=dropout, target_modules=["0", "2", "4"],
               init_lora_weights=False)  # random B: the output comparison means something
    ours, theirs = peft_model_twins(base, cfg)
    layers = [ours.base_model.model[i] for i in (0, 2, 4)], [theirs.base_model.model[i] for i in (0, 2, 4)]
    assert all(type(m) is FastLinear for m in layers[0]), [type(m) for m in layers[0]]
    assert all(type(m) is PeftLinear for m in layers[1]), [type(m) for m in layers[1]]
    return ours, theirs


def test_same_output_as_peft_in_eval():
    ours, theirs = _twins()
    x = torch.randn(7, K)
    assert_same_outputs(ours, theirs, lambda m: m(x), tol=1e-5)


def test_saved_for_backward_is_clearly_less_than_peft():
    ours, theirs = _twins()
    ours.train()
    theirs.train()
    params = list(ours.parameters()) + list(theirs.parameters())
    x = torch.randn(M, K, requires_grad=True)
    peft_bytes, y_theirs = _saved_activation_bytes(theirs, x, params)
    ours_bytes, y = _saved_activation_bytes(ours, x, params)
    # peft keeps, per layer, x, dropout(x) and the dropout mask (+ S and the ReLU output); fastpeft keeps
    # x and S = [M, r] and redraws the mask from its seed.
    act = M * K * 4
    assert peft_bytes >= 3 * 2 * act, (peft_bytes, act)  # dropout(x) + mask, in each of the 3 layers
    assert ours_bytes < 0.6 * peft_bytes, (ours_bytes, peft_bytes)
    y.square().sum().backward()  # the hooks saw the tensors backward really uses
    y_theirs.square().sum().backward()
    for model in (ours, theirs):
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        assert len(grads) == 6 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_shared_input_saved_once():
    """q/k/v projections of one x: x is saved by reference, so it is stored once, not three times."""
    r, m = 4, 128
    x = torch.randn(m, K, requires_grad=True)
    Ws = [torch.randn(K, K) for _ in range(3)]
    As = [torch.randn(r, K, requires_grad=True) for _ in range(3)]
    Bs = [torch.randn(K, r, requires_grad=True) for _ in range(3)]

    def qkv(x):
        return [lora_linear(x, W, None, A, B, 1.0, 0.1, True) for W, A, B in zip(Ws, As, Bs)]

    nbytes, _ = _saved_activation_bytes(qkv, x, Ws + As + Bs)
    x_bytes = m * K * 4
    s_bytes = 3 * m * r * 4
    assert nbytes <= x_bytes + s_bytes + 3 * 64, (nbytes, x_bytes, s_bytes)
