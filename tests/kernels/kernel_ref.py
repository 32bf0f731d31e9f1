"""float64 references and error measures for the kernel tests (plain torch, written here)."""
import math

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error; inf when `got` has any NaN/inf (NaN never passes)."""
    got = got.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if not torch.isfinite(got).all():
        return math.inf
    den = ref.norm().item()
    return (got - ref).norm().item() / (den if den > 0 else 1.0)


def assert_close(name, got, ref, dtype):
    err = rel_err(got, ref)
    assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]:.0e} ({dtype})"


def mask(seed, m, k, p):
    """The kernels' dropout multiplier as a float64 [m, k] tensor (1/(1-p) kept, 0 dropped)."""
    from fastpeft.kernels._common import dropout_mask_dense

    if p == 0.0:
        return torch.ones(m, k, dtype=torch.float64)
    return dropout_mask_dense(seed, m, k, p, device=DEVICE).to("cpu", torch.float64)


def ref_forward(x, w, bias, a, b, scale, d):
    """(Y, S) in float64: S = (D x) A^T, Y = x W^T + scale S B^T + bias."""
    x, a, b = x.double().cpu(), a.double().cpu(), b.double().cpu()
    s = (d * x) @ a.T
    y = scale * s @ b.T
    if w is not None:
        y = y + x @ w.double().cpu().T
    if bias is not None:
        y = y + bias.double().cpu()
    return y, s


def ref_backward(dy, x, w, a, b, scale, d):
    """(dX, dA, dB, dS) in float64."""
    dy, x, a, b = dy.double().cpu(), x.double().cpu(), a.double().cpu(), b.double().cpu()
    s = (d * x) @ a.T
    ds = scale * dy @ b
    dx = d * (ds @ a)
    if w is not None:
        dx = dx + dy @ w.double().cpu()
    da = ds.T @ (d * x)
    db = scale * dy.T @ s
    return dx, da, db, ds


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype).to(DEVICE)
