"""fastpeft.ops.triton_backend: the spec's backend protocol on the Triton kernels."""
import pytest
import torch

from kernel_ref import DEVICE, assert_close, mask, randn, ref_backward, ref_forward

from fastpeft.ops import triton_backend as tb


def _args(m=5, k=33, n=17, r=4, dtype=torch.float32, adt=torch.float32):
    torch.manual_seed(0)
    return (randn(m, k, dtype=dtype), randn(n, k, dtype=dtype, scale=0.2), randn(n, dtype=dtype),
            randn(r, k, dtype=adt, scale=0.2), randn(n, r, dtype=adt))


def test_supports_reasons(monkeypatch):
    x, w, bias, a, b = _args()
    assert tb.supports(x, w, bias, a, b, 0.1) is None
    assert "r=300" in tb.supports(x, w, bias, randn(300, 33), randn(17, 300), 0.0)
    assert "torch.float64" in tb.supports(x.double(), None, None, a, b, 0.0)
    assert "lora_A dtype torch.float16" in tb.supports(x.bfloat16(), None, None, a.half(), b, 0.0)
    assert "weight dtype" in tb.supports(x, w.bfloat16(), None, a, b, 0.0)
    assert "weight must be [N=17, K=33]" in tb.supports(x, w[:, :30], None, a, b, 0.0)
    assert "dropout_p=1.0" in tb.supports(x, w, bias, a, b, 1.0)
    assert "lora_B must be [N, r=4]" in tb.supports(x, w, bias, a, randn(17, 5), 0.0)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET=1" in tb.supports(x, w, bias, a, b, 0.0)


@pytest.mark.parametrize("dtype,p", [(torch.float32, 0.0), (torch.bfloat16, 0.3)])
def test_backend_fwd_bwd(dtype, p, poison_outputs):
    x, w, bias, a, b = _args(m=7, dtype=dtype)
    y, s = tb.lora_fwd(x, w, bias, a, b, 1.5, p, 321)
    d = mask(321, 7, 33, p)
    yr, sr = ref_forward(x, w, bias, a, b, 1.5, d)
    assert_close("Y", y, yr, dtype)
    assert_close("S", s, sr, dtype)
    dy = randn(7, 17, dtype=dtype)
    dx, da, db = tb.lora_bwd(dy, x, w, a, b, s, 1.5, p, 321, True, True, True)
    dxr, dar, dbr, _ = ref_backward(dy, x, w, a, b, 1.5, d)
    assert_close("dX", dx, dxr, dtype)
    assert_close("dA", da, dar, dtype)
    assert_close("dB", db, dbr, dtype)
    assert tb.lora_bwd(dy, x, None, a, b, s, 1.5, p, 321, False, False, True)[:2] == (None, None)


def test_lora_linear_through_triton_backend(monkeypatch):
    """fastpeft.ops.lora_linear forced onto this backend: autograd matches the float64 reference."""
    ops = pytest.importorskip("fastpeft.ops")
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    x, w, bias, a, b = _args(m=6)
    x3 = x.reshape(2, 3, 33).requires_grad_()
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    y = ops.lora_linear(x3, w, bias, a_, b_, 0.5)
    dy = randn(2, 3, 17)
    y.backward(dy)
    d = mask(0, 6, 33, 0.0)
    yr, _ = ref_forward(x, w, bias, a, b, 0.5, d)
    dxr, dar, dbr, _ = ref_backward(dy.reshape(6, 17), x, w, a, b, 0.5, d)
    assert_close("Y", y.reshape(6, 17), yr, torch.float32)
    assert_close("dX", x3.grad.reshape(6, 33), dxr, torch.float32)
    assert_close("dA", a_.grad, dar, torch.float32)
    assert_close("dB", b_.grad, dbr, torch.float32)
