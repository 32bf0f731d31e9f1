"""lora_embedding vs peft's LoRA Embedding and a float64 formula; lora_delta_weight."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.ops import lora_delta_weight, lora_embedding

from _support.reference import rel_err


def _tables(V=23, D=12, r=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(V, D, generator=g).to(dtype)
    A = torch.randn(r, V, generator=g).requires_grad_(True)
    B = torch.randn(D, r, generator=g).requires_grad_(True)
    return W, A, B


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_matches_float64_formula_and_grads(padding_idx):
    W, A, B = _tables()
    ids = torch.tensor([[0, 3, 5, 22], [3, 3, 1, 7]])
    y = lora_embedding(ids, W, A, B, 0.75, padding_idx=padding_idx)
    A64, B64 = (t.detach().double().requires_grad_(True) for t in (A, B))
    ref = W.double()[ids] + 0.75 * A64.t()[ids] @ B64.t()
    assert y.shape == (2, 4, 12) and rel_err(y, ref) < 1e-6
    g = torch.randn(y.shape)
    y.backward(g)
    ref.backward(g.double())
    dA_ref = A64.grad.clone()
    if padding_idx is not None:
        dA_ref[:, padding_idx] = 0  # F.embedding gives the padding row no gradient
    assert rel_err(A.grad, dA_ref) < 1e-6 and rel_err(B.grad, B64.grad) < 1e-6


def test_weight_none_and_16bit_base():
    W, A, B = _tables(dtype=torch.bfloat16)
    ids = torch.tensor([1, 2, 2, 9])
    y = lora_embedding(ids, W, A, B, 2.0)
    assert y.dtype == torch.bfloat16
    ref = W.double()[ids] + 2.0 * A.detach().double().t()[ids] @ B.detach().double().t()
    assert rel_err(y, ref) < 1e-2
    y0 = lora_embedding(ids, None, A, B, 2.0)
    assert rel_err(y0, 2.0 * A.detach().double().t()[ids] @ B.detach().double().t()) < 1e-6


def test_same_as_peft_embedding():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(31, 16, padding_idx=2))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = pm.base_model.model[0]
    A = layer.lora_embedding_A["default"]
    B = layer.lora_embedding_B["default"]
    with torch.no_grad():
        A.normal_()
        B.normal_()
    ids = torch.tensor([[2, 5, 30, 2, 7]])
    y_peft = pm(ids)
    y_peft.square().sum().backward()
    gA, gB = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    y = lora_embedding(ids, layer.base_layer.weight, A, B, layer.scaling["default"], padding_idx=2)
    y.square().sum().backward()
    torch.testing.assert_close(y, y_peft)
    torch.testing.assert_close(A.grad, gA)
    torch.testing.assert_close(B.grad, gB)


def test_bad_shapes():
    W, A, B = _tables()
    with pytest.raises(ValueError, match=r"weight must be \[V=23, D=12\]"):
        lora_embedding(torch.tensor([1]), W[:5], A, B, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_embedding(torch.tensor([1]), W, A, B[:, :3], 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_delta_weight(dtype):
    g = torch.Generator().manual_seed(4)
    A = torch.randn(8, 37, generator=g).to(dtype)
    B = torch.randn(29, 8, generator=g).to(dtype)
    d = lora_delta_weight(A, B, 0.25)
    assert d.shape == (29, 37) and d.dtype == dtype
    ref = 0.25 * B.double() @ A.double()
    # fp32 compute: the only error is the final rounding to dtype.
    tol = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    assert rel_err(d, ref) < tol
    assert lora_delta_weight(A, B, 0.25, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="lora_delta_weight"):
        lora_delta_weight(A, B[:, :3], 1.0)


def test_delta_weight_merge_equals_lora_linear():
    from fastpeft.ops import lora_linear
    x, W = torch.randn(6, 37), torch.randn(29, 37)
    A, B = torch.randn(8, 37), torch.randn(29, 8)
    merged = F.linear(x, W + lora_delta_weight(A, B, 0.5))
    assert rel_err(merged, lora_linear(x, W, None, A, B, 0.5)) < 1e-5
