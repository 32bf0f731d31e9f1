"""fastpeft.ops.triton_backend: the op contract (contract.py) on the Triton kernels, against float64."""
import pytest
import torch

from _support.reference import DEVICE, assert_close, mask, randn

from fastpeft.ops import Adapter, Base, LoraCall, adapter_seed, dispatch, lora
from fastpeft.ops import triton_backend as tb
from fastpeft.quant.formats import dequantize, quantize_weight


def _args(m=5, k=33, n=17, r=4, dtype=torch.float32, adt=torch.float32):
    torch.manual_seed(0)
    return (randn(m, k, dtype=dtype), randn(n, k, dtype=dtype, scale=0.2), randn(n, dtype=dtype),
            randn(r, k, dtype=adt, scale=0.2), randn(n, r, dtype=adt))


def _call(x, w, bias, adapters, seed=0):
    return LoraCall(x, Base(weight=w, bias=bias), tuple(adapters), seed)


def test_supports_reasons(monkeypatch):
    x, w, bias, a, b = _args()
    assert tb.supports(_call(x, w, bias, [Adapter(a, b, 1.0, 0.1)])) is None
    assert "r=300" in tb.supports(_call(x, w, bias, [Adapter(randn(300, 33), randn(17, 300), 1.0)]))
    assert "torch.float64" in tb.supports(_call(x.double(), None, None, [Adapter(a, b, 1.0)]))
    assert "lora_A dtype torch.float16" in tb.supports(_call(x.bfloat16(), None, None, [Adapter(a.half(), b, 1.0)]))
    assert "dropout_p=1.0" in tb.supports(_call(x, w, bias, [Adapter(a, b, 1.0, 1.0)]))
    assert "bias dtype torch.int64" in tb.supports(_call(x, w, bias.long(), [Adapter(a, b, 1.0)]))
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET=1" in tb.supports(_call(x, w, bias, [Adapter(a, b, 1.0)]))


def _ref_multi(x, w, bias, adapters, ds, dy):
    """float64 (Y, dX, [dA_i], [dB_i]) of Y = x W^T + b + sum_i s_i (d_i * x) A_i^T B_i^T, by autograd."""
    x64 = x.detach().to("cpu", torch.float64).requires_grad_()
    leaves = [(a.A.detach().to("cpu", torch.float64).requires_grad_(),
               a.B.detach().to("cpu", torch.float64).requires_grad_()) for a in adapters]
    y = torch.zeros(x.shape[0], adapters[0].B.shape[0], dtype=torch.float64) if w is None else \
        x64 @ w.detach().to("cpu", torch.float64).t()
    if bias is not None:
        y = y + bias.detach().to("cpu", torch.float64)
    for a, (A, B), d in zip(adapters, leaves, ds):
        y = y + a.scale * ((d * x64) @ A.t()) @ B.t()
    y.backward(dy.detach().to("cpu", torch.float64))
    return y.detach(), x64.grad, [A.grad for A, _ in leaves], [B.grad for _, B in leaves]


@pytest.mark.parametrize("dtype,ps,with_w", [(torch.float32, (0.0, 0.0, 0.0), True),
                                             (torch.bfloat16, (0.3, 0.0, 0.2), True),
                                             (torch.float32, (0.25, 0.1, 0.0), False),
                                             (torch.float16, (0.2, 0.4, 0.1), True)])
def test_several_adapters_in_one_call(dtype, ps, with_w, poison_outputs):
    """Adapters of ranks 3, 1 and 16 in one call: S side by side, one GEMM; each its own mask."""
    x, w, bias, _, _ = _args(m=7, k=37, n=19, dtype=dtype)
    torch.manual_seed(1)
    adapters = [Adapter(randn(r, 37, scale=0.2), randn(19, r), s, p) for r, s, p in zip((3, 1, 16), (0.5, 2.0, 1.0), ps)]
    call = _call(x, w if with_w else None, bias, adapters, seed=77)
    y, s = tb.forward(call)
    assert s.shape == (7, 20) and s.dtype == torch.float32
    ds = [mask(adapter_seed(77, i), 7, 37, p) for i, p in enumerate(ps)]
    dy = randn(7, 19, dtype=dtype)
    yr, dxr, dar, dbr = _ref_multi(x, call.base.weight, bias, adapters, ds, dy)
    assert_close("Y", y, yr, dtype)
    for i, sl in enumerate(call.r_slices()):
        sr = (ds[i] * x.double().cpu()) @ adapters[i].A.double().cpu().t()
        assert_close(f"S_{i}", s[:, sl], sr, dtype)
    dx, das, dbs = tb.backward(call, dy, s, True, [True, True, True], [True, False, True])
    assert_close("dX", dx, dxr, dtype)
    for i in range(3):
        assert_close(f"dA_{i}", das[i], dar[i], dtype)
    assert dbs[1] is None
    assert_close("dB_0", dbs[0], dbr[0], dtype)
    assert_close("dB_2", dbs[2], dbr[2], dtype)


def test_zero_adapters_is_the_base_gemm(poison_outputs):
    x, w, bias, _, _ = _args(m=1, k=31, n=13)
    y, s = tb.forward(_call(x, w, bias, []))
    assert s.shape == (1, 0)
    assert_close("Y", y, x.double().cpu() @ w.double().cpu().t() + bias.double().cpu(), torch.float32)


def test_lora_through_the_op_forced_triton(monkeypatch):
    """fastpeft.ops.lora forced onto this backend: autograd of two adapters matches float64."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    x, w, bias, a, b = _args(m=6)
    x3 = x.reshape(2, 3, 33).requires_grad_()
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_(),
              randn(2, 33, scale=0.3).requires_grad_(), randn(17, 2).requires_grad_()]
    adapters = [Adapter(leaves[0], leaves[1], 0.5), Adapter(leaves[2], leaves[3], 1.5)]
    assert dispatch.choose(_call(x, w, bias, adapters)) == "triton"
    y = lora(x3, Base.dense(w, bias), adapters)
    dy = randn(2, 3, 17)
    y.backward(dy)
    ones = [torch.ones(6, 33, dtype=torch.float64)] * 2
    yr, dxr, dar, dbr = _ref_multi(x, w, bias, adapters, ones, dy.reshape(6, 17))
    assert_close("Y", y.reshape(6, 17), yr, torch.float32)
    assert_close("dX", x3.grad.reshape(6, 33), dxr, torch.float32)
    for i in range(2):
        assert_close(f"dA_{i}", leaves[2 * i].grad, dar[i], torch.float32)
        assert_close(f"dB_{i}", leaves[2 * i + 1].grad, dbr[i], torch.float32)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quant_linear_without_lora_runs_the_fused_dequant_gemm(fmt, monkeypatch, poison_outputs):
    """A QuantLinear no adapter targets goes through the triton backend at rank 0 (the bug of issue 8:
    the kernels refused r = 0, so it fell back to dequantize + torch)."""
    from fastpeft.quant import QuantLinear

    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 24).to(DEVICE)
    q = QuantLinear.from_linear(lin, fmt, blocksize=64)
    seen = []
    real = tb.forward

    def spy(call):
        seen.append(len(call.adapters))
        return real(call)

    monkeypatch.setattr(tb, "forward", spy)
    x = randn(3, 64).requires_grad_()
    y = q(x)
    w = dequantize(q.quantized(), torch.float32).double().cpu()
    assert seen == [0]
    assert_close("Y", y, x.detach().double().cpu() @ w.t() + lin.bias.detach().double().cpu(), torch.float32)
    dy = randn(3, 24)
    y.backward(dy)
    assert_close("dX", x.grad, dy.double().cpu() @ w, torch.float32)


def test_quantized_base_with_several_adapters(poison_outputs):
    torch.manual_seed(4)
    w = torch.randn(24, 64) * 0.1
    qw = quantize_weight(w.to(DEVICE), "int4", group_size=32)
    x = randn(5, 64)
    adapters = [Adapter(randn(4, 64, scale=0.2), randn(24, 4), 0.5, 0.2), Adapter(randn(8, 64, scale=0.2),
                                                                                  randn(24, 8), 2.0, 0.0)]
    call = LoraCall(x, Base.quantized(qw), tuple(adapters), 5)
    y, s = tb.forward(call)
    wd = dequantize(qw, torch.float32)
    ds = [mask(adapter_seed(5, i), 5, 64, a.dropout_p) for i, a in enumerate(adapters)]
    dy = randn(5, 24)
    yr, dxr, dar, dbr = _ref_multi(x, wd, None, adapters, ds, dy)
    assert_close("Y", y, yr, torch.float32)
    dx, das, dbs = tb.backward(call, dy, s, True, [True, True], [True, True])
    assert_close("dX", dx, dxr, torch.float32)
    for i in range(2):
        assert_close(f"dA_{i}", das[i], dar[i], torch.float32)
        assert_close(f"dB_{i}", dbs[i], dbr[i], torch.float32)
