"""fastpeft.ops.lora_conv against autograd on the plain formula (float64): outputs and grads of x, A, B with and
without dropout (the same mask, regenerated from the seed), every geometry peft's conv layers meet; what the op
saves for backward; the fold path; 16-bit x; torch.compile(fullgraph=True); errors that name the tensor."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastpeft import ops
from fastpeft.ops import Adapter, ConvSpec, adapter_seed, draw_seed, dropout_mask, lora_conv

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _reference(x, W, b, adapters, spec, masks):
    """base conv (with its padding mode) + sum_i s_i conv1x1_g(conv(D_i x, A_i; dilation 1, zeros), B_i)."""
    d = x.dim() - 2
    conv = _CONV[d]
    y = None
    if W is not None:
        if spec.padding_mode != "zeros":
            pads = [p for i in reversed(range(d)) for p in (spec.padding[i], spec.padding[i])]
            y = conv(F.pad(x, pads, mode=spec.padding_mode), W, b, spec.stride, 0, spec.dilation, spec.groups)
        else:
            y = conv(x, W, b, spec.stride, spec.padding, spec.dilation, spec.groups)
    for a, m in zip(adapters, masks):
        xd = x if m is None else x * m / (1 - a.dropout_p)
        t = a.scale * conv(conv(xd, a.A, None, spec.stride, spec.padding), a.B, groups=spec.groups)
        y = t if y is None else y + t
    return y


CASES = [  # (x shape, C_out, kernel, ranks, spec)
    ((2, 6, 7, 9), 5, 3, [4], ConvSpec((1, 1), (1, 1), (1, 1))),
    ((2, 6, 7, 9), 8, 3, [4, 2], ConvSpec((2, 2), (1, 0), (1, 1), groups=2)),
    ((2, 6, 7, 9), 5, 4, [3], ConvSpec((1, 1), "same", (2, 2))),  # even kernel: asymmetric pads
    ((2, 6, 7, 9), 5, 3, [4], ConvSpec((1, 1), (1, 1), (1, 1), padding_mode="reflect")),
    ((3, 6, 11), 9, 3, [3], ConvSpec((2,), (2,), (1,), groups=3, padding_mode="circular")),
    ((2, 4, 5, 6, 7), 5, 3, [2], ConvSpec((1, 2, 1), (1, 1, 0), (1, 1, 1), padding_mode="replicate")),
    ((2, 4, 5, 6, 7), 5, 1, [2], ConvSpec((1, 1, 1), (0, 0, 0), (1, 1, 1))),
]


def _inputs(xs, C_out, k, ranks, spec, p, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, grp = len(xs) - 2, spec.groups
    W = torch.randn(C_out, xs[1] // grp, *([k] * d), generator=g, dtype=dtype) / 3
    b = torch.randn(C_out, generator=g, dtype=dtype)
    As = [(torch.randn(r, xs[1], *([k] * d), generator=g, dtype=dtype) / 3).requires_grad_() for r in ranks]
    Bs = [torch.randn(C_out, r // grp, *([1] * d), generator=g, dtype=dtype).requires_grad_() for r in ranks]
    x = torch.randn(*xs, generator=g, dtype=dtype).requires_grad_()
    return x, W, b, [Adapter(A, B, 0.7 + i, p) for i, (A, B) in enumerate(zip(As, Bs))]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_outputs_and_grads_match_autograd_float64(case, p):
    xs, C_out, k, ranks, spec = CASES[case]
    x, W, b, ads = _inputs(xs, C_out, k, ranks, spec, p)
    torch.manual_seed(3)
    seed = int(draw_seed())
    torch.manual_seed(3)  # the op draws the same seed
    y = lora_conv(x, W, b, ads, spec, training=True)
    masks = [dropout_mask(adapter_seed(seed, i), x.shape, p, x.device) if p else None for i in range(len(ads))]
    if p:
        assert all(0 < m.sum() < m.numel() for m in masks)
    ref = _reference(x, W, b, ads, spec, masks)
    leaves = [x] + [a.A for a in ads] + [a.B for a in ads]
    dy = torch.randn_like(y)
    got, want = torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-11, atol=1e-11)
    # eval (no dropout): fold where the geometry allows it, else separate; both equal the plain formula
    with torch.no_grad():
        y_eval = lora_conv(x, W, b, ads, spec, training=False)
    ref_eval = _reference(x, W, b, [Adapter(a.A, a.B, a.scale) for a in ads], spec, [None] * len(ads))
    torch.testing.assert_close(y_eval, ref_eval, rtol=1e-12, atol=1e-12)


def test_lora_only_and_trainable_base_and_bias():
    xs, C_out, k, ranks, spec = CASES[1]
    x, W, b, ads = _inputs(xs, C_out, k, ranks, spec, 0.0)
    y = lora_conv(x, None, b.requires_grad_(), ads, spec)
    ref = _reference(x, None, None, ads, spec, [None, None]) + b.view(1, -1, 1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    W.requires_grad_()
    leaves = [x, W, b, ads[0].A]
    got = torch.autograd.grad(lora_conv(x, W, b, ads, spec).sum(), leaves)
    want = torch.autograd.grad(_reference(x, W, b, ads, spec, [None, None]).sum(), leaves)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-11, atol=1e-11)


def test_dora_col_scale():
    xs, C_out, k, ranks, spec = CASES[0]
    x, W, b, ads = _inputs(xs, C_out, k, ranks, spec, 0.0)
    g = torch.rand(C_out, dtype=torch.float64).add_(0.5).requires_grad_()
    y = lora_conv(x, W, b, ads, spec, col_scale=g)
    ref = g.view(1, -1, 1, 1) * (_reference(x, W, None, ads, spec, [None])) + b.view(1, -1, 1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(y.square().sum(), [x, g, ads[0].A])
    want = torch.autograd.grad(ref.square().sum(), [x, g, ads[0].A])
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-11, atol=1e-11)
    with torch.no_grad():  # fold: one conv with g * (W + s B A)
        torch.testing.assert_close(lora_conv(x, W, b, ads, spec, col_scale=g), ref, rtol=1e-12, atol=1e-12)


def test_dropout_saves_no_mask_and_no_dropped_copy_of_x():
    xs, C_out, k, ranks, spec = (2, 8, 16, 16), 8, 3, [4], ConvSpec((1, 1), (1, 1), (1, 1))
    x, W, b, ads = _inputs(xs, C_out, k, ranks, spec, 0.3, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_conv(x, W, b, ads, spec, training=True)
    big = [t for t in saved if t.numel() >= x.numel()]
    # x itself (by reference) and nothing else of x's size: no mask, no dropout(x) (peft keeps the latter)
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert [tuple(t.shape) for t in saved if t.shape[2:] == (16, 16)] == [(2, 8, 16, 16), (2, 4, 16, 16)]  # x, S
    y.sum().backward()
    assert x.grad is not None and ads[0].A.grad is not None


def test_16bit_x_with_fp32_adapters():
    xs, C_out, k, ranks, spec = CASES[0]
    x, W, b, ads = _inputs(xs, C_out, k, ranks, spec, 0.0, dtype=torch.float32)
    ref = _reference(x, W, b, ads, spec, [None])
    for dt in (torch.bfloat16, torch.float16):
        xb, Wb, bb = x.detach().to(dt), W.to(dt), b.to(dt)
        with torch.no_grad():
            y = lora_conv(xb, Wb, bb, [Adapter(ads[0].A, ads[0].B, ads[0].scale)], spec)
        assert y.dtype == dt
        err = (y.float() - ref.detach()).norm() / ref.detach().norm()
        assert err < 2e-2, (dt, err)


def test_channels_last_and_unbatched_input():
    xs, C_out, k, ranks, spec = CASES[0]
    x, W, b, ads = _inputs(xs, C_out, k, ranks, spec, 0.0)
    ref = _reference(x, W, b, ads, spec, [None])
    y = lora_conv(x.detach().to(memory_format=torch.channels_last), W, b, ads, spec)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    y1 = lora_conv(x[0], W, b, ads, spec)
    torch.testing.assert_close(y1, ref[0], rtol=1e-12, atol=1e-12)


def test_errors_name_the_tensor():
    xs, C_out, k, ranks, spec = CASES[0]
    x, W, b, ads = _inputs(xs, C_out, k, ranks, spec, 0.0)
    bad_B = Adapter(ads[0].A, torch.zeros(C_out + 1, 4, 1, 1, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \[C_out=5"):
        lora_conv(x, W, b, [bad_B], spec)
    with pytest.raises(ValueError, match=r"bias must be \[5\]"):
        lora_conv(x, W, b[:3], ads, spec)
    with pytest.raises(ValueError, match="x must be"):
        lora_conv(x[:, :, 0, 0], W, b, ads, spec)
    dilated = ConvSpec((1, 1), (2, 2), (2, 2))
    with pytest.raises(ValueError, match="dilation 1, as peft builds it"):
        lora_conv(x, W, b, ads, dilated)


def _compile_step(fn, leaves, x):
    for t in leaves:
        t.grad = None
    torch.manual_seed(0)
    y = fn(x)
    y.square().sum().backward()
    return [y.detach()] + [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_compile_fullgraph_matches_eager(p):
    xs, C_out, k, ranks, spec = CASES[1]
    x, W, b, ads = _inputs(xs, C_out, k, ranks, spec, p, dtype=torch.float32)
    x = x.detach().requires_grad_()
    leaves = [x] + [a.A for a in ads] + [a.B for a in ads]

    def f(inp):
        return torch.tanh(lora_conv(inp, W, b, ads, spec, training=True))

    torch._dynamo.reset()
    eager = _compile_step(f, leaves, x)
    compiled = _compile_step(torch.compile(f, fullgraph=True, backend="aot_eager"), leaves, x)
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_delta_weight_is_the_fold():
    xs, C_out, k, ranks, spec = CASES[0]
    x, W, b, ads = _inputs(xs, C_out, k, ranks, spec, 0.0)
    a = ads[0]
    delta = ops.lora_conv_delta_weight(a.A, a.B, a.scale)
    assert delta.shape == W.shape
    torch.testing.assert_close(F.conv2d(x, W + delta, b, padding=1), _reference(x, W, b, ads, spec, [None]),
                               rtol=1e-12, atol=1e-12)
