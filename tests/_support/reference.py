"""The float64 reference of the LoRA linear, the one error measure and the one tolerance table.

    S = (D * x) A^T                 D: the dropout multiplier (0 or 1/(1-p)), or 1
    Y = x W^T + b + s * S B^T       W and b optional

Every op/kernel test compares against this: the reference is plain torch autograd on float64 copies
(grads follow from the forward formula, not from hand-written backward formulas that could share a
kernel's mistake), and ``rel_err`` is the relative Frobenius error. Tolerances are by the dtype of
the inputs (the project rule, docs/ops.md): fp32 < 1e-5 relative, 16-bit dots < 1e-2 relative
norm error, NaN/inf never passes.

fastpeft is imported inside the functions only: the kernel tests set TRITON_INTERPRET before
fastpeft.kernels is first imported.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative norm error allowed, by input dtype. fp16 keeps the stricter bound the ops tests always had
# (fp16 has 3 more mantissa bits than bf16; the measured errors are ~5e-4). float64 inputs: the op
# must agree with the reference to rounding.
TOL = {
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 5e-3,
    torch.float64: 1e-12,
}


def rel_err(got: Tensor, ref: Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (the absolute error when ref is all zero).

    inf when either side has a NaN or inf, so a NaN never passes a ``< tol`` check; shapes must match.
    """
    got = got.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    assert got.shape == ref.shape, (tuple(got.shape), tuple(ref.shape))
    if not (torch.isfinite(got).all() and torch.isfinite(ref).all()):
        return math.inf
    den = ref.norm().item()
    diff = (got - ref).norm().item()
    return diff / den if den > 0 else diff


def tolerance(dtype_or_tol: Union[torch.dtype, float]) -> float:
    return TOL[dtype_or_tol] if isinstance(dtype_or_tol, torch.dtype) else float(dtype_or_tol)


def assert_close(name: str, got: Tensor, ref: Tensor, dtype_or_tol: Union[torch.dtype, float]) -> None:
    """rel_err(got, ref) <= the tolerance of this dtype (or the given float)."""
    tol = tolerance(dtype_or_tol)
    err = rel_err(got, ref)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.0e} ({dtype_or_tol})"


# --------------------------------------------------------------------------------------- the formula
def _leaf(t: Optional[Tensor], device) -> Optional[Tensor]:
    return None if t is None else t.detach().to(device, torch.float64).requires_grad_(True)


def lora_reference(x: Tensor, W: Optional[Tensor], b: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
                   D: Union[None, float, Tensor] = None, device=None):
    """float64 autograd graph of Y = x W^T + b + s * (D*x) A^T B^T on fresh leaves.

    x may have leading batch dims ([..., K]); D (None = no dropout, a number, or a multiplier
    broadcastable to x's [M, K] rows) is a constant. Runs on ``device`` (default: x's device).
    Returns (Y [..., N], S [M, r], leaves) with leaves = dict(x, weight, bias, A, B) (None where absent);
    call Y.backward(dY) and read ``leaves[name].grad`` (``S.grad`` after ``S.retain_grad()``).
    """
    device = x.device if device is None else device
    x64, W64, b64, A64, B64 = (_leaf(t, device) for t in (x, W, b, A, B))
    x2 = x64.reshape(-1, x64.shape[-1])
    xd = x2 if D is None else x2 * (D.to(device, torch.float64) if isinstance(D, Tensor) else float(D))
    S = xd @ A64.t()
    y = scale * (S @ B64.t())
    if W64 is not None:
        y = y + x2 @ W64.t()
    if b64 is not None:
        y = y + b64
    y = y.reshape(*x.shape[:-1], B.shape[0])
    return y, S, dict(x=x64, weight=W64, bias=b64, A=A64, B=B64)


def keep_multiplier(keep: Optional[Tensor], p: float):
    """The dropout multiplier D from a keep mask (bool or 0/1) and p: keep / (1 - p)."""
    return None if keep is None else keep.to(torch.float64) / (1.0 - p)


def reference(x, W, b, A, B, scale, keep=None, p=0.0):
    """(Y, leaves) of :func:`lora_reference` with dropout given as a keep mask and p, on x's device."""
    y, _, leaves = lora_reference(x, W, b, A, B, scale, keep_multiplier(keep, p))
    return y, leaves


def ref_forward(x, w, bias, a, b, scale, d):
    """(Y, S) in float64 on the CPU (kernel tests: x is [M, K], d the multiplier or 1.0)."""
    y, s, _ = lora_reference(x, w, bias, a, b, scale, d, device="cpu")
    return y.detach(), s.detach()


def ref_backward(dy, x, w, a, b, scale, d):
    """(dX, dA, dB, dS) in float64 on the CPU, by autograd of the reference forward."""
    y, s, leaves = lora_reference(x, w, None, a, b, scale, d, device="cpu")
    s.retain_grad()
    y.backward(dy.detach().to("cpu", torch.float64))
    dx = leaves["x"].grad
    return dx, leaves["A"].grad, leaves["B"].grad, s.grad


# ------------------------------------------------------------------------------------ kernel inputs
def mask(seed: int, m: int, k: int, p: float) -> Tensor:
    """The Triton kernels' dropout multiplier as a float64 [m, k] CPU tensor (1/(1-p) kept, 0 dropped)."""
    from fastpeft.kernels._common import dropout_mask_dense

    if p == 0.0:
        return torch.ones(m, k, dtype=torch.float64)
    return dropout_mask_dense(seed, m, k, p, device=DEVICE).to("cpu", torch.float64)


def randn(*shape, dtype=torch.float32, scale=1.0) -> Tensor:
    """Normal values drawn in fp32 from torch's global RNG, scaled, cast to dtype, on DEVICE."""
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------- fastpeft.ops op
def run_and_compare(x, W, b, A, B, scale, p, dtype_tol, seed_base=1234):
    """Run fastpeft.ops.lora_linear (training, dropout p) and the float64 reference with the same mask;
    compare the output and every grad to ``dtype_tol`` (a dtype or a float). Returns the mask (or None)."""
    from fastpeft.ops import draw_seed, dropout_mask, lora_linear

    tol = tolerance(dtype_tol)
    keep = None
    if p > 0:
        torch.manual_seed(seed_base)
        seed = int(draw_seed())
        keep = dropout_mask(seed, (x.reshape(-1, x.shape[-1]).shape[0], x.shape[-1]), p, x.device)
    torch.manual_seed(seed_base)
    y = lora_linear(x, W, b, A, B, scale, dropout_p=p, training=True)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], B.shape[0])
    yref, leaves = reference(x, W, b, A, B, scale, keep, p)
    assert rel_err(y, yref) < tol, ("Y", rel_err(y, yref))
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    g = g.to(y.device)
    y.backward(g.to(y.dtype))
    # The reference sees the same (rounded) upstream grad the op got.
    yref.backward(g.to(y.dtype).double())
    checked = 0
    for name, t in (("x", x), ("weight", W), ("bias", b), ("A", A), ("B", B)):
        if t is None or not t.requires_grad:
            continue
        assert t.grad is not None, f"no grad for {name}"
        assert t.grad.dtype == t.dtype, (name, t.grad.dtype, t.dtype)
        err = rel_err(t.grad, leaves[name].grad)
        assert err < tol, (f"grad {name}", err)
        checked += 1
    assert checked > 0, "nothing requires grad: the backward was not checked"
    return keep


def check_mask_consistency(device, dtype=torch.float32, K=64, M=96, p=0.25):
    """Backend-agnostic check that forward and backward used the same dropout mask, whatever RNG the
    chosen backend has: with weight None, A = B = I (r = K), scale 1 and x = 1, Y = D exactly, and
    then dX = D * dY and dA = dY^T D follow from the observed D."""
    from fastpeft.ops import lora_linear

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
