"""DoRA on the Triton kernels (column scale g = m / max(n, EPS) [N]) against float64.

    dropout off:  Y = g * (x W^T + s S B^T) + bias
    dropout on:   Z_d = (D x) W^T + s S B^T,  Y = x W^T - (D x) W^T + g * Z_d + bias   (peft's semantics)

D is the kernels' Philox mask (`mask`, the one the shrink draws for S): the reference uses one D for S
and for the masked base product, so a kernel whose base product drew another mask fails. The reference
is float64 autograd of that forward with g a constant (the backends get no magnitude gradient; the op
computes it, checked in the last tests through fastpeft.ops.lora). Outputs (Y, S, Z_d, dX) are
NaN-poisoned, so an element a kernel does not write fails.
"""
import pytest
import torch

from _support.reference import DEVICE, assert_close, mask, randn

from fastpeft.kernels import _common, lora_fwd as fwd_mod, lora_quant as quant_mod
from fastpeft.kernels.lora_bwd import lora_bwd
from fastpeft.kernels.lora_fwd import lora_fwd
from fastpeft.kernels.lora_quant import lora_quant_bwd, lora_quant_fwd
from fastpeft.quant.formats import dequantize, quantize_weight

N, K = 53, 97  # not multiples of any block size
MM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
SHRINK = {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
WGRAD = {"BLOCK_P": 16, "BLOCK_Q": 32, "BLOCK_M": 16, "num_warps": 4, "num_stages": 2}
BWD = {"shrink": SHRINK, "matmul": MM, "fused": MM, "wgrad": WGRAD, "split_m": 2}
QCFG = {"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
QBWD = {"quant": QCFG, "shrink": SHRINK, "wgrad": WGRAD}


def dora_reference(x, W, bias, A, B, s, g, D):
    """float64 (Y, S, Z_d, leaves) of DoRA's forward on fresh CPU leaves x, A, B (g, D, W constants).
    One formula for both cases: with D = 1 it is g * (x W^T + s S B^T) + bias."""
    x64, A64, B64 = (t.detach().to("cpu", torch.float64).requires_grad_() for t in (x, A, B))
    W64, g64 = W.detach().to("cpu", torch.float64), g.detach().to("cpu", torch.float64)
    xd = x64 * D.to("cpu", torch.float64)
    S = xd @ A64.t()
    Zd = xd @ W64.t() + s * (S @ B64.t())
    Y = x64 @ W64.t() - xd @ W64.t() + g64 * Zd
    if bias is not None:
        Y = Y + bias.detach().to("cpu", torch.float64)
    return Y, S, Zd, dict(x=x64, A=A64, B=B64)


def _check_all(name, y, s, zd, dx, da, db, x, W, bias, a, b, scale, g, d, dy, dtype):
    yr, sr, zr, leaves = dora_reference(x, W, bias, a, b, scale, g, d)
    assert y.dtype == dtype and y.shape == yr.shape and s.dtype == torch.float32
    assert_close(f"{name} S", s, sr, dtype)
    assert_close(f"{name} Y", y, yr, dtype)
    if zd is not None:
        assert zd.dtype == dtype
        assert_close(f"{name} Z_d", zd, zr, dtype)
    yr.backward(dy.detach().to("cpu", torch.float64))
    assert dx.dtype == dtype and da.dtype == a.dtype and db.dtype == b.dtype
    assert_close(f"{name} dX", dx, leaves["x"].grad, dtype)
    assert_close(f"{name} dA", da, leaves["A"].grad, dtype)
    assert_close(f"{name} dB", db, leaves["B"].grad, dtype)


def _g(n, zero_cols=()):
    """A column scale around 1 (0.4..1.6), exactly 0 at zero_cols (m = 0)."""
    g = torch.rand(n) * 1.2 + 0.4
    g[list(zero_cols)] = 0.0
    return g.to(DEVICE)


# -- the dense kernels (kernels/lora_fwd.py, lora_bwd.py) ----------------------------------------------
# (variant, dtype, M, r, bias, dropout p, adapters in x's dtype)
DENSE = [
    ("fused", torch.float32, 1, 16, True, 0.0, False),
    ("fused", torch.bfloat16, 37, 128, False, 0.0, True),
    ("split", torch.float16, 3, 1, True, 0.0, False),
    ("split", torch.float32, 37, 16, True, 0.3, False),
    ("split", torch.bfloat16, 1, 128, True, 0.5, False),
    ("auto", torch.float16, 17, 16, False, 0.2, True),   # small M with dropout: auto takes the split path
    ("auto", torch.bfloat16, 31, 1, True, 0.1, False),
]


@pytest.mark.parametrize("variant,dtype,m,r,has_bias,p,same_dtype", DENSE)
def test_dora_dense_fwd_bwd_match_float64(variant, dtype, m, r, has_bias, p, same_dtype, poison_outputs):
    torch.manual_seed(m * 1000 + r)
    adt = dtype if same_dtype else torch.float32
    x, w = randn(m, K, dtype=dtype), randn(N, K, dtype=dtype, scale=0.1)
    a, b = randn(r, K, dtype=adt, scale=0.1), randn(N, r, dtype=adt, scale=0.5)
    bias = randn(N, dtype=dtype) if has_bias else None
    g, scale, seed = _g(N, zero_cols=(5,)), 1.5, 4242
    out = lora_fwd(x, w, bias, a, b, scale, p, seed, variant=variant, config=MM, shrink_config=SHRINK, col_scale=g)
    assert len(out) == (3 if p > 0 else 2)
    y, s = out[:2]
    zd = out[2] if p > 0 else None
    dy = randn(m, N, dtype=dtype)
    dx, da, db = lora_bwd(dy, x, w, a, b, s, scale, p, seed, variant=variant, configs=BWD, col_scale=g)
    _check_all(variant, y, s, zd, dx, da, db, x, w, bias, a, b, scale, g, mask(seed, m, K, p), dy, dtype)


def test_dora_default_configs_and_strided(poison_outputs):
    """No explicit configs (the interpreter runs the first config the pruning rule keeps for the DoRA
    constexprs), strided x / W / dY views, and the needs_* flags."""
    torch.manual_seed(3)
    m, r, p, seed = 13, 8, 0.25, 9
    x = randn(K, m, dtype=torch.bfloat16).t()
    w = randn(K, N, dtype=torch.bfloat16, scale=0.1).t()
    a, b = randn(r, K, scale=0.1), randn(N, r)
    dy = randn(N, m, dtype=torch.bfloat16).t()
    g = _g(N)
    y, s, zd = lora_fwd(x, w, None, a, b, 0.5, p, seed, col_scale=g)
    dx, da, db = lora_bwd(dy, x, w, a, b, s, 0.5, p, seed, col_scale=g)
    _check_all("default", y, s, zd, dx, da, db, x, w, None, a, b, 0.5, g, mask(seed, m, K, p), dy, torch.bfloat16)
    dx2, da2, db2 = lora_bwd(dy, x, w, a, b, s, 0.5, p, seed, col_scale=g, needs_dx=False, needs_db=False)
    assert dx2 is None and db2 is None and torch.equal(da2, da)


def test_dora_zero_row_zero_magnitude_gives_no_nan(poison_outputs):
    """A row of W that is all zero, its B row zero and m = 0 there (Llama's o_proj has such rows): the
    norm is 0, g = 0 / EPS = 0, and the output column is the bias; nothing is NaN."""
    from fastpeft.ops import Adapter, Base, LoraCall

    torch.manual_seed(4)
    m_, r, j = 5, 4, 7
    x, w = randn(m_, K), randn(N, K, scale=0.1)
    a, b = randn(r, K, scale=0.1), randn(N, r)
    w[j] = 0.0
    b[j] = 0.0
    bias = randn(N)
    mag = torch.rand(N, device=DEVICE) + 0.5
    mag[j] = 0.0
    call = LoraCall(x, Base.dense(w, bias), (Adapter(a, b, 1.0, 0.0, mag, torch.zeros(N, device=DEVICE)),))
    g = call.col_scale()
    assert g[j] == 0 and torch.isfinite(g).all()
    for p in (0.0, 0.3):
        out = lora_fwd(x, w, bias, a, b, 1.0, p, 1, col_scale=g, config=MM, shrink_config=SHRINK)
        dx, da, db = lora_bwd(randn(m_, N), x, w, a, b, out[1], 1.0, p, 1, col_scale=g, configs=BWD)
        for t in (*out, dx, da, db):
            assert torch.isfinite(t).all()
        assert torch.equal(out[0][:, j], bias[j].expand(m_))


def test_dora_dropout_is_not_fused():
    """DoRA with dropout needs two accumulators: the fused kernel refuses it, by name."""
    x, w, a, b = randn(4, 8), randn(6, 8), randn(2, 8), randn(6, 2)
    g = torch.ones(6, device=DEVICE)
    with pytest.raises(ValueError, match="DoRA with dropout runs on the split path"):
        lora_fwd(x, w, None, a, b, 1.0, 0.1, 0, variant="fused", col_scale=g)
    with pytest.raises(ValueError, match="DoRA with dropout runs dX on the split path"):
        lora_bwd(randn(4, 6), x, w, a, b, torch.zeros(4, 2, device=DEVICE), 1.0, 0.1, 0, variant="fused", col_scale=g)
    with pytest.raises(ValueError, match=r"column scale must be a float \[6\]"):
        lora_fwd(x, w, None, a, b, 1.0, col_scale=torch.ones(5, device=DEVICE))


# -- the packed-weight kernel (kernels/lora_quant.py) --------------------------------------------------
def _qw(fmt, n, k, **kw):
    torch.manual_seed(n * 7 + k)
    qw = quantize_weight(torch.randn(n, k) * 0.1, fmt, **kw)
    return type(qw)(*[t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in qw])


# (format, quantize kwargs, K, x dtype, M, r, bias, dropout p)
QUANT = [
    ("nf4", dict(blocksize=32), K, torch.float32, 3, 16, True, 0.0),                 # odd K: per-element bytes
    ("nf4", dict(blocksize=64, double_quant=True), 128, torch.bfloat16, 17, 16, False, 0.3),  # packed tile
    ("int4", dict(group_size=32), K, torch.float16, 1, 1, True, 0.2),
    ("int4", dict(group_size=64), 128, torch.float32, 3, 128, False, 0.0),
    ("int8", {}, K, torch.bfloat16, 5, 16, True, 0.5),
    ("int8", {}, K, torch.float16, 17, 1, False, 0.0),
]


@pytest.mark.parametrize("fmt,kw,k,dtype,m,r,has_bias,p", QUANT)
def test_dora_quant_fwd_bwd_match_float64(fmt, kw, k, dtype, m, r, has_bias, p, poison_outputs):
    qw = _qw(fmt, N, k, **kw)
    torch.manual_seed(m * 100 + r)
    x, a, b = randn(m, k, dtype=dtype), randn(r, k, scale=0.1), randn(N, r, scale=0.5)
    bias = randn(N, dtype=dtype) if has_bias else None
    g, scale, seed = _g(N, zero_cols=(0,)), 2.0, 777
    out = lora_quant_fwd(x, qw, bias, a, b, scale, p, seed, config=QCFG, shrink_config=SHRINK, col_scale=g)
    assert len(out) == (3 if p > 0 else 2)
    dy = randn(m, N, dtype=dtype)
    dx, da, db = lora_quant_bwd(dy, x, qw, a, b, out[1], scale, p, seed, configs=QBWD, col_scale=g)
    # W as the kernel sees it: dequantized, rounded to x's dtype (the quant tests' reference)
    _check_all(fmt, out[0], out[1], out[2] if p > 0 else None, dx, da, db, x, dequantize(qw, dtype), bias, a, b,
               scale, g, mask(seed, m, k, p), dy, dtype)


# -- pruning of the two-accumulator variants -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dual_pruning_keeps_small_enough_tiles(dtype):
    """DoRA with dropout (DUAL) keeps configs for every shape class, each with both accumulators and,
    forward, the x tile's keep mask within the register budget (`_common.dual_tile_ok`); dX's output
    mask as for plain dX."""
    prec = "ieee" if dtype == torch.float32 else "tf32"
    for mb in (16, 64, 4096):
        for dual in (1, 2):
            named = {"M_BUCKET": mb, "N": 4096, "K": 4096, "x_ptr": torch.empty(0, dtype=dtype)}
            kept = fwd_mod.prune_lora_matmul_configs(fwd_mod.get_lora_matmul_configs(), named, DUAL=dual,
                                                     INPUT_PRECISION=prec)
            assert kept
            if mb == 4096:  # not the fallback: the rule accepted them
                for c in kept:
                    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
                    assert _common.dual_tile_ok(bm, bn, bk if dual == 1 else 0, c.num_warps)
                    assert dual == 1 or _common.dropout_tile_ok(bm, bn, c.num_warps)
            qnamed = {"M_BUCKET": mb, "P": 4096, "Q": 4096, "x_ptr": torch.empty(0, dtype=dtype)}
            qkept = quant_mod.prune_lora_quant_configs(quant_mod.get_lora_quant_configs(), qnamed, DUAL=dual,
                                                       INPUT_PRECISION=prec)
            assert qkept and all(c.kwargs["BLOCK_M"] <= max(16, mb) for c in qkept)


# -- through fastpeft.ops.lora, forced onto the triton backend ------------------------------------------
def _triton_mask_in_torch_backend(monkeypatch):
    """Make the torch backend draw the Triton kernels' Philox mask, so that it is the float64 oracle of
    a DoRA call with dropout on the same mask (its own RNG differs)."""
    from fastpeft.ops import torch_backend

    def keep01(seed, shape, p, device):
        return (mask(seed, shape[0], shape[1], p) != 0).to(torch.int16)

    monkeypatch.setattr(torch_backend, "_keep01", keep01)


def _run_op(x, base, a, b, mag, scale, p, seed_base=1234):
    from fastpeft.ops import Adapter, lora

    torch.manual_seed(seed_base)  # the op draws its dropout seed from torch's CPU generator: same seed
    return lora(x, base, [Adapter(a, b, scale, p, magnitude=mag)], training=True)


# (base kind, x dtype, bias, dropout p, M)
OP_CASES = [
    ("dense", torch.float32, True, 0.0, 6),
    ("dense", torch.bfloat16, False, 0.3, 6),
    ("dense", torch.float16, True, 0.1, 1),
    ("nf4", torch.bfloat16, True, 0.2, 5),
    ("int8", torch.float32, False, 0.0, 3),
]


@pytest.mark.parametrize("kind,dtype,has_bias,p,m", OP_CASES)
def test_dora_through_the_op_matches_torch_backend_float64(kind, dtype, has_bias, p, m, monkeypatch, poison_outputs):
    """fastpeft.ops.lora with a DoRA adapter, FASTPEFT_BACKEND=triton: Y and the grads of x, A, B and
    the magnitude m match the torch backend run in float64 on the same inputs and the same mask."""
    from fastpeft.ops import Base

    _triton_mask_in_torch_backend(monkeypatch)
    torch.manual_seed(11)
    k, r, scale, j = 64, 8, 2.0, 3
    w = randn(N, k, scale=0.1)
    w[j] = 0.0  # an all-zero row of W (its norm comes from s B A alone)
    if kind == "dense":
        base_w, base_64 = w.to(dtype), w.to(dtype).double()
        base = lambda bias: Base.dense(base_w, bias)  # noqa: E731
        base64 = lambda bias: Base.dense(base_64, bias)  # noqa: E731
    else:
        qw = quantize_weight(w, kind, **({"blocksize": 32} if kind == "nf4" else {}))
        wd = dequantize(qw, dtype).double()
        base = lambda bias: Base.quantized(qw, bias)  # noqa: E731
        base64 = lambda bias: Base.dense(wd, bias)  # noqa: E731
    x = randn(2, m, k, dtype=dtype)
    a, b, mag = randn(r, k, scale=0.2), randn(N, r, scale=0.3), torch.rand(N, device=DEVICE) + 0.5
    mag[j + 1] = 0.0  # a zero magnitude: its gradient comes from the rows of W (dora.magnitude_grad)
    bias = randn(N, dtype=dtype) if has_bias else None
    dy = randn(2, m, N, dtype=dtype)

    def leaves(*ts, dt=None):
        return [t.detach().clone().to(dt or t.dtype).requires_grad_() for t in ts]

    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    xt, at, bt, mt = leaves(x, a, b, mag)
    y = _run_op(xt, base(bias), at, bt, mt, scale, p)
    assert y.dtype == dtype and y.shape == (2, m, N)
    y.backward(dy)

    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    x64, a64, b64, m64 = leaves(x, a, b, mag, dt=torch.float64)
    y64 = _run_op(x64, base64(None if bias is None else bias.double()), a64, b64, m64, scale, p)
    y64.backward(dy.double())

    assert_close("Y", y, y64, dtype)
    for name, got, ref in (("dX", xt, x64), ("dA", at, a64), ("dB", bt, b64), ("dm", mt, m64)):
        assert got.grad is not None and got.grad.dtype == got.dtype, name
        assert_close(name, got.grad, ref.grad, dtype)


def test_supports_dora_calls():
    from fastpeft.ops import Adapter, Base, LoraCall
    from fastpeft.ops import triton_backend as tb

    x, w, a, b = randn(4, 8), randn(6, 8), randn(2, 8), randn(6, 2)
    mag, norm = torch.ones(6, device=DEVICE), torch.ones(6, device=DEVICE)
    assert tb.supports(LoraCall(x, Base.dense(w), (Adapter(a, b, 1.0, 0.1, mag, norm),))) is None
    assert "weight_norm" in tb.supports(LoraCall(x, Base.dense(w), (Adapter(a, b, 1.0, 0.0, mag),)))
