"""DoRA in the op (fastpeft/ops/dora.py, the torch backend's DoRA forms): against the float64 formula.

The reference is peft's formula written out: n = ||W + s B A||_row detached, g = m / n,
y = x W^T + b + (g - 1) (D x) W^T + g s (D x) A^T B^T (dropout on), which is g (x W^T + s x A^T B^T) + b
without dropout.
"""
from __future__ import annotations

import pytest
import torch

from fastpeft import ops
from fastpeft.ops import dora
from fastpeft.quant.formats import dequantize, quantize_weight


def _inputs(M, K, N, r, dtype=torch.float64, zero_row=None, zero_m=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=dtype)
    W = torch.randn(N, K, generator=g, dtype=dtype) / K ** 0.5
    b = torch.randn(N, generator=g, dtype=dtype)
    A = torch.randn(r, K, generator=g, dtype=dtype) / K ** 0.5
    B = torch.randn(N, r, generator=g, dtype=dtype)
    if zero_row is not None:
        W[zero_row] = 0
        B[zero_row] = 0
    n = (W.double() + 0.7 * B.double() @ A.double()).norm(dim=1)
    m = (n * (0.5 + torch.rand(N, generator=g, dtype=torch.float64))).to(dtype)
    if zero_m is not None:
        m[zero_m] = 0
    return x, W, b, A, B, m


def _reference(x, W, b, A, B, m, s, D):
    n = (W + s * B @ A).norm(dim=1).detach().clamp_min(1e-12)
    g = m / n
    xd = D * x
    y = x @ W.T + (g - 1) * (xd @ W.T) + g * s * (xd @ A.T @ B.T)
    return y if b is None else y + b


@pytest.mark.parametrize("M,K,N,r", [(1, 7, 5, 1), (13, 17, 11, 3), (6, 32, 29, 16)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dora_forward_and_grads_match_float64_formula(M, K, N, r, p, with_bias):
    x, W, b, A, B, m = _inputs(M, K, N, r, zero_row=N // 2, zero_m=0)
    b = b if with_bias else None
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B, m)]
    torch.manual_seed(11)
    seed = int(ops.draw_seed())
    torch.manual_seed(11)
    y = ops.lora(leaves[0], ops.Base.dense(W, b), [ops.Adapter(leaves[1], leaves[2], 0.7, p, magnitude=leaves[3])],
                 training=True)
    D = (ops.dropout_mask(seed, (M, K), p, "cpu").double() / (1 - p)) if p else torch.ones(M, K, dtype=torch.float64)
    refs = [t.clone().requires_grad_(True) for t in (x, A, B, m)]
    y_ref = _reference(refs[0], W, b, refs[1], refs[2], refs[3], 0.7, D)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    dY = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dY)
    grads_ref = torch.autograd.grad(y_ref, refs, dY)
    for name, got, want in zip(("x", "A", "B", "magnitude"), grads, grads_ref):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda s: f"grad {name}: {s}")


def test_zero_rows_give_no_nan_where_peft_gives_nan():
    """A zero row of W with B's row zero (peft's init) and m = ||W|| = 0: peft divides 0 by 0. fastpeft's
    floor gives g = 0, the row's output is its bias, and every gradient is finite."""
    x, W, b, A, B, _ = _inputs(5, 9, 7, 2, dtype=torch.float32, zero_row=3)
    B.zero_()
    m = W.norm(dim=1).requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    y = ops.lora(x, ops.Base.dense(W, b), [ops.Adapter(A, B, 2.0, magnitude=m)], training=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 3], b[3].expand(5))
    torch.testing.assert_close(y, x @ W.T + b)  # B = 0 and m = n: DoRA starts as the base layer
    y.square().sum().backward()
    for t in (m, A, B):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("fmt", ["nf4", "int8", "int4"])
def test_weight_norm_packed_base_equals_norm_of_dequantized_weight(fmt):
    """The norm over a packed base uses the fused dequant GEMM for W A^T, never W + s B A."""
    g = torch.Generator().manual_seed(3)
    N, K, r = 24, 128, 4
    qw = quantize_weight(torch.randn(N, K, generator=g), fmt, group_size=64)
    Wd = dequantize(qw, torch.float32)
    A, B = torch.randn(r, K, generator=g) * 0.1, torch.randn(N, r, generator=g)
    n = dora.weight_norm(ops.Base.quantized(qw), A, B, 0.5)
    torch.testing.assert_close(n, (Wd.double() + 0.5 * B.double() @ A.double()).norm(dim=1).float(),
                               rtol=2e-6, atol=1e-6)
    x = torch.randn(3, K, generator=g)
    m = n * 1.3
    y = ops.lora(x, ops.Base.quantized(qw), [ops.Adapter(A, B, 0.5, magnitude=m)])
    torch.testing.assert_close(y, 1.3 * (x @ Wd.T + 0.5 * x @ A.T @ B.T), rtol=1e-4, atol=1e-4)


def test_weight_norm_dense_is_chunked_and_rounded_like_peft(monkeypatch):
    """||W||^2 and W A^T go over row chunks (bounded temporaries), and n is rounded to the dtype peft's
    W + s B A has: bf16 for a bf16 W with bf16 adapters, fp32 with fp32 adapters."""
    monkeypatch.setattr(dora, "_CHUNK_ELEMS", 64)  # 2 rows of K = 32 per chunk
    g = torch.Generator().manual_seed(5)
    W = torch.randn(9, 32, generator=g)
    A, B = torch.randn(3, 32, generator=g), torch.randn(9, 3, generator=g)
    exact = (W.double() + 0.25 * B.double() @ A.double()).norm(dim=1)
    torch.testing.assert_close(dora.weight_norm(ops.Base.dense(W), A, B, 0.25).double(), exact, rtol=1e-6, atol=1e-6)
    Wb = W.bfloat16()
    n16 = dora.weight_norm(ops.Base.dense(Wb), A.bfloat16(), B.bfloat16(), 0.25)
    assert n16.dtype == torch.float32 and torch.equal(n16, n16.bfloat16().float())
    n32 = dora.weight_norm(ops.Base.dense(Wb), A, B, 0.25)
    assert not torch.equal(n32, n32.bfloat16().float())


def test_given_weight_norm_is_used_and_not_recomputed(monkeypatch):
    x, W, b, A, B, m = _inputs(4, 8, 6, 2, dtype=torch.float32)
    n = dora.weight_norm(ops.Base.dense(W), A, B, 1.0)
    calls = []
    monkeypatch.setattr(dora, "weight_norm", lambda *a, **k: calls.append(1) or n)
    y1 = ops.lora(x, ops.Base.dense(W, b), [ops.Adapter(A, B, 1.0, magnitude=m, weight_norm=n)])
    assert calls == []
    y2 = ops.lora(x, ops.Base.dense(W, b), [ops.Adapter(A, B, 1.0, magnitude=m)])
    assert calls == [1]
    torch.testing.assert_close(y1, y2)
    # the op applies exactly the given n: twice the norm halves g
    y3 = ops.lora(x, ops.Base.dense(W, None), [ops.Adapter(A, B, 1.0, magnitude=m, weight_norm=2 * n)])
    torch.testing.assert_close(y3, (y1 - b) / 2)


@pytest.mark.parametrize("case,match", [
    ("two_adapters", "holds that adapter only"),
    ("no_base", "needs the base weight"),
    ("bad_m", r"magnitude must be a float \[N=6\]; got \(5,\)"),
    ("bad_n", r"weight_norm must be a float \[N=6\]; got \(6, 1\)"),
])
def test_bad_dora_calls_are_refused_with_the_reason(case, match):
    x, W, b, A, B, m = _inputs(4, 8, 6, 2, dtype=torch.float32)
    base, ads = ops.Base.dense(W, b), [ops.Adapter(A, B, 1.0, magnitude=m)]
    if case == "two_adapters":
        ads = ads + [ops.Adapter(A, B, 1.0)]
    elif case == "no_base":
        base = ops.Base.none(b)
    elif case == "bad_m":
        ads = [ops.Adapter(A, B, 1.0, magnitude=m[:5])]
    else:
        ads = [ops.Adapter(A, B, 1.0, magnitude=m, weight_norm=m[:, None])]
    with pytest.raises(ValueError, match=match):
        ops.lora(x, base, ads)


def test_dora_traces_under_torch_compile_fullgraph():
    x, W, b, A, B, m = _inputs(5, 16, 12, 4, dtype=torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (A, B, m)]

    def f(x, A, B, m):
        return ops.lora(x, ops.Base.dense(W, b), [ops.Adapter(A, B, 0.5, magnitude=m)], training=True)

    y_eager = f(x, *leaves)
    g_eager = torch.autograd.grad(y_eager.square().sum(), leaves)
    y_comp = torch.compile(f, fullgraph=True, backend="aot_eager")(x, *leaves)
    g_comp = torch.autograd.grad(y_comp.square().sum(), leaves)
    torch.testing.assert_close(y_comp, y_eager)
    for a, e in zip(g_comp, g_eager):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_dots_in_row_blocks_equal_the_plain_sum(monkeypatch, dtype):
    monkeypatch.setattr(dora, "_DOT_BLOCK_BYTES", 7 * 13 * 4)  # a few rows per block, a ragged last block
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, 13, generator=g).to(dtype), torch.randn(50, 13, generator=g).to(dtype)
    want = (a.double() * b.double()).sum(0)
    got = dora.column_dots(a, b, torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)
