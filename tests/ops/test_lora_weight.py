"""fastpeft.ops.lora_weight: W + s B A (or its transpose), 2-D and per expert, against float64 autograd."""
from __future__ import annotations

import pytest
import torch

from fastpeft import ops

from _support.reference import assert_close


def _leaves(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_(True) for s in shapes]


@pytest.mark.parametrize("experts", [None, 3])
@pytest.mark.parametrize("transpose", [False, True])
def test_matches_float64_reference_with_grads(experts, transpose):
    N, K, r, s = 12, 7, 3, 0.75
    lead = () if experts is None else (experts,)
    w_shape = lead + ((K, N) if transpose else (N, K))
    W, A, B = _leaves(w_shape, lead + (r, K), lead + (N, r))
    out = ops.lora_weight(W, A, B, s, transpose=transpose)
    W64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (W, A, B))
    delta = s * B64 @ A64
    ref = W64 + (delta.transpose(-2, -1) if transpose else delta)
    assert out.shape == w_shape and out.dtype == W.dtype
    assert_close("W'", out, ref, torch.float32)
    g = torch.randn(w_shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    ref.backward(g.double())
    for name, t, t64 in (("W", W, W64), ("A", A, A64), ("B", B, B64)):
        assert_close(f"grad {name}", t.grad, t64.grad, torch.float32)


def test_keeps_16bit_weight_dtype_under_autocast():
    W = torch.randn(3, 16, 8).bfloat16()
    A, B = torch.randn(3, 2, 8), torch.randn(3, 16, 2)  # fp32 adapters, as PeftModel keeps them
    with torch.autocast("cpu", dtype=torch.float16):
        out = ops.lora_weight(W, A, B, 0.5)
    assert out.dtype == torch.bfloat16
    ref = W.double() + 0.5 * B.double() @ A.double()
    assert_close("W' bf16", out, ref, torch.bfloat16)


def test_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"expected weight \(4, 5\).*got weight \(5, 4\)"):
        ops.lora_weight(torch.zeros(5, 4), torch.zeros(2, 5), torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match="must all be 2-D or all 3-D"):
        ops.lora_weight(torch.zeros(2, 4, 5), torch.zeros(2, 5), torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match=r"lora_A \(3, 2, 5\)"):  # expert counts differ
        ops.lora_weight(torch.zeros(2, 4, 5), torch.zeros(3, 2, 5), torch.zeros(2, 4, 2), 1.0)
    with pytest.raises(TypeError, match="torch.int8"):
        ops.lora_weight(torch.zeros(4, 5, dtype=torch.int8), torch.zeros(2, 5), torch.zeros(4, 2), 1.0)
