"""float64 reference for the LoRA linear, shared by the ops tests."""
from __future__ import annotations

import torch

from fastpeft.ops import draw_seed, dropout_mask, lora_linear

# Relative norm error allowed per input dtype (design.md: fp32 < 1e-5, 16-bit dots < 1e-2).
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 5e-3, torch.float64: 1e-12}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.detach().double()
    ref = ref.detach().double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all(), "non-finite values"
    denom = ref.norm().item()
    diff = (got - ref).norm().item()
    return diff / denom if denom > 0 else diff


def reference(x, W, b, A, B, scale, keep=None, p=0.0):
    """Plain float64 autograd of Y = x W^T + b + s * (D*x) A^T B^T on detached float64 copies.

    Returns (Y, grads dict) for dY = G where the caller supplies G via .backward on the result.
    """
    def leaf(t):
        return None if t is None else t.detach().double().requires_grad_(True)

    x64, W64, b64, A64, B64 = (leaf(t) for t in (x, W, b, A, B))
    xd = x64.reshape(-1, x64.shape[-1])
    if keep is not None:
        xd = xd * keep.double() / (1.0 - p)
    y = scale * (xd @ A64.t()) @ B64.t()
    if W64 is not None:
        y = y + x64.reshape(-1, x64.shape[-1]) @ W64.t()
    if b64 is not None:
        y = y + b64
    y = y.reshape(*x.shape[:-1], B.shape[0])
    return y, dict(x=x64, weight=W64, bias=b64, A=A64, B=B64)


def run_and_compare(x, W, b, A, B, scale, p, dtype_tol, seed_base=1234):
    """Run lora_linear (training, dropout p) and the float64 reference with the same mask; compare
    the output and every grad. Returns the mask used (or None)."""
    keep = None
    if p > 0:
        torch.manual_seed(seed_base)
        seed = int(draw_seed())
        keep = dropout_mask(seed, (x.reshape(-1, x.shape[-1]).shape[0], x.shape[-1]), p, x.device)
    torch.manual_seed(seed_base)
    y = lora_linear(x, W, b, A, B, scale, dropout_p=p, training=True)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], B.shape[0])
    yref, leaves = reference(x, W, b, A, B, scale, keep, p)
    assert rel_err(y, yref) < dtype_tol, ("Y", rel_err(y, yref))
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    g = g.to(y.device)
    y.backward(g.to(y.dtype))
    # The reference sees the same (rounded) upstream grad the op got.
    yref.backward(g.to(y.dtype).double())
    for name, t in (("x", x), ("weight", W), ("bias", b), ("A", A), ("B", B)):
        if t is None or not t.requires_grad:
            continue
        assert t.grad is not None, f"no grad for {name}"
        assert t.grad.dtype == t.dtype, (name, t.grad.dtype, t.dtype)
        err = rel_err(t.grad, leaves[name].grad)
        assert err < dtype_tol, (f"grad {name}", err)
    return keep


def check_mask_consistency(device, dtype=torch.float32, K=64, M=96, p=0.25):
    """Backend-agnostic check that forward and backward used the same dropout mask, whatever RNG the
    chosen backend has: with weight None, A = B = I (r = K), scale 1 and x = 1, Y = D exactly, and
    then dX = D * dY and dA = dY^T D follow from the observed D."""
    eye = torch.eye(K, dtype=dtype, device=device)
    A = eye.clone().requires_grad_(True)
    B = eye.clone().requires_grad_(True)
    x = torch.ones(M, K, dtype=dtype, device=device, requires_grad=True)
    y = lora_linear(x, None, None, A, B, 1.0, dropout_p=p, training=True)
    D = y.detach()
    kept = D != 0
    assert 0 < kept.float().mean().item() < 1
    torch.testing.assert_close(D[kept], torch.full_like(D[kept], 1.0 / (1.0 - p)))
    g = torch.randn(M, K, dtype=dtype, device=device)
    y.backward(g)
    torch.testing.assert_close(x.grad, D * g)
    torch.testing.assert_close(A.grad, (g.t().double() @ D.double()).to(dtype))
    return D
