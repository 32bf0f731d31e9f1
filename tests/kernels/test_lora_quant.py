"""Quantized-weight LoRA kernels (kernels/lora_quant.py) against float64 dequantize-then-matmul.

W is packed (nf4 incl. double quant and blocks straddling rows, int4 incl. g_idx and partial groups,
int8) and dequantized inside the kernel; the reference is fastpeft.quant.formats.dequantize (the
oracle) rounded to x's dtype, then everything in float64. Outputs are NaN-poisoned.
"""
import itertools

import pytest
import torch

from _support.reference import DEVICE, assert_close, mask, randn, ref_backward, ref_forward

from fastpeft.kernels.lora_quant import (
    get_lora_quant_configs, lora_quant_bwd, lora_quant_fwd, lora_quant_kernel_tuned, prune_lora_quant_configs,
)
from fastpeft.quant.formats import QuantizedWeight, dequantize, pack_nibbles, quantize_weight

N, K = 53, 97
CFG = {"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
SHRINK = {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
CONFIGS = {"quant": CFG, "shrink": SHRINK, "wgrad": {"BLOCK_P": 16, "BLOCK_Q": 32, "BLOCK_M": 32, "num_warps": 4,
                                                      "num_stages": 2}}


def _qw(fmt, n=N, k=K, **kw) -> QuantizedWeight:
    torch.manual_seed(n * 7 + k)
    w = torch.randn(n, k) * 0.1
    if fmt == "int4_gidx":
        gs = kw.pop("group_size", 32)
        qw = quantize_weight(w, "int4", group_size=gs)
        # act-order (GPTQ): a shuffled column -> group map, random codes, scales and zeros (up to 16)
        g = torch.randperm(k) % (-(-k // gs))
        G = int(g.max()) + 1
        scales = torch.rand(n, G) * 0.02 + 0.005
        zeros = torch.randint(0, 17, (n, G), dtype=torch.uint8)  # 16 is a legal (GPTQ) zero
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        qw = qw._replace(qdata=pack_nibbles(codes), scales=scales, zeros=zeros, g_idx=g.to(torch.int32))
    else:
        qw = quantize_weight(w, fmt, **kw)
    return QuantizedWeight(*[t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in qw])


def _ref_fwd(x, qw, bias, a, b, scale, d):
    """(Y, S) of the float64 reference with W = the dequantized weight rounded to x's dtype."""
    return ref_forward(x, dequantize(qw, x.dtype), bias, a, b, scale, d)


def _ref_bwd(dy, x, qw, a, b, scale, d):
    """(dX, dA, dB, dS) of the float64 reference with W = the dequantized weight rounded to x's dtype."""
    return ref_backward(dy, x, dequantize(qw, x.dtype), a, b, scale, d)


# (format, quantize kwargs, N, K, x dtype, M, r, bias, dropout p)
CASES = [
    ("nf4", dict(blocksize=32), N, K, torch.float32, 3, 16, True, 0.0),           # blocks straddle rows
    ("nf4", dict(blocksize=64), N, 128, torch.bfloat16, 17, 1, False, 0.3),
    ("nf4", dict(blocksize=32, double_quant=True), 97, 130, torch.float16, 1, 64, True, 0.0),  # 395 blocks
    ("nf4", dict(blocksize=64, double_quant=True), N, K, torch.bfloat16, 3, 16, False, 0.1),
    ("int4", dict(group_size=32), N, K, torch.float32, 17, 64, False, 0.2),       # partial last group
    ("int4", dict(group_size=64), N, 128, torch.bfloat16, 1, 16, True, 0.0),
    ("int4_gidx", dict(group_size=32), N, K, torch.float16, 3, 1, True, 0.5),
    ("int8", {}, N, K, torch.bfloat16, 17, 16, True, 0.0),
    ("int8", {}, N, K, torch.float32, 1, 1, False, 0.3),
]


@pytest.mark.parametrize("fmt,kw,n,k,dtype,m,r,has_bias,p", CASES)
def test_quant_fwd_bwd_match_float64(fmt, kw, n, k, dtype, m, r, has_bias, p, poison_outputs):
    qw = _qw(fmt, n, k, **kw)
    torch.manual_seed(m * 100 + r)
    x, a, b = randn(m, k, dtype=dtype), randn(r, k, scale=0.1), randn(n, r)
    bias = randn(n, dtype=dtype) if has_bias else None
    scale, seed = 1.5, 777
    y, s = lora_quant_fwd(x, qw, bias, a, b, scale, p, seed, config=CFG, shrink_config=SHRINK)
    assert y.dtype == dtype and y.shape == (m, n) and s.shape == (m, r)
    d = mask(seed, m, k, p)
    yr, sr = _ref_fwd(x, qw, bias, a, b, scale, d)
    assert_close("S", s, sr, dtype)
    assert_close("Y", y, yr, dtype)
    # the base GEMM alone (B = 0) too: the LoRA term is of the same size as x W^T in these cases,
    # so a wrong one fails the full check above and a wrong base fails this one
    yb, _ = lora_quant_fwd(x, qw, None, a, torch.zeros_like(b), scale, p, seed, config=CFG, shrink_config=SHRINK)
    assert_close("Y (base)", yb, _ref_fwd(x, qw, None, a, torch.zeros_like(b), scale, d)[0], dtype)

    dy = randn(m, n, dtype=dtype)
    dx, da, db = lora_quant_bwd(dy, x, qw, a, b, s, scale, p, seed, configs=CONFIGS)
    dxr, dar, dbr, _ = _ref_bwd(dy, x, qw, a, b, scale, d)
    assert_close("dX", dx, dxr, dtype)
    assert_close("dA", da, dar, dtype)
    assert_close("dB", db, dbr, dtype)
    assert dx.dtype == dtype and da.dtype == a.dtype and db.dtype == b.dtype


# (format, quantize kwargs, N, K, x dtype, M, bias, dropout p, explicit configs)
RANK0_CASES = [
    ("nf4", dict(blocksize=32, double_quant=True), N, K, torch.bfloat16, 1, True, 0.3, True),  # odd K: per-element
    ("nf4", dict(blocksize=64), N, 128, torch.float32, 17, False, 0.0, True),                  # packed tile
    ("int4_gidx", dict(group_size=32), N, K, torch.float16, 3, True, 0.0, False),              # default configs
    ("int8", {}, N, K, torch.float32, 1, False, 0.5, True),
]


@pytest.mark.parametrize("fmt,kw,n,k,dtype,m,has_bias,p,explicit", RANK0_CASES)
def test_quant_rank0_is_the_dequant_gemm(fmt, kw, n, k, dtype, m, has_bias, p, explicit, poison_outputs):
    """r = 0 (a quantized layer without adapter): the same fused dequant GEMM with a LoRA step of
    no iteration; Y = x deq(W)^T (+ bias), dX = dY deq(W) (dropout touches only the LoRA term),
    S / dA / dB empty."""
    qw = _qw(fmt, n, k, **kw)
    torch.manual_seed(m * 10 + k)
    x, dy = randn(m, k, dtype=dtype), randn(m, n, dtype=dtype)
    a, b = randn(0, k), randn(n, 0)
    bias = randn(n, dtype=dtype) if has_bias else None
    cfg, shrink, cfgs = (CFG, SHRINK, CONFIGS) if explicit else (None, None, None)
    y, s = lora_quant_fwd(x, qw, bias, a, b, 2.0, p, 5, config=cfg, shrink_config=shrink)
    assert y.dtype == dtype and y.shape == (m, n) and s.dtype == torch.float32 and s.shape == (m, 0)
    assert_close("Y", y, _ref_fwd(x, qw, bias, a, b, 2.0, mask(5, m, k, p))[0], dtype)
    dx, da, db = lora_quant_bwd(dy, x, qw, a, b, s, 2.0, p, 5, configs=cfgs)
    assert_close("dX", dx, dy.double().cpu() @ dequantize(qw, dtype).double().cpu(), dtype)
    assert dx.dtype == dtype and da.shape == (0, k) and db.shape == (n, 0)


@pytest.mark.parametrize("fmt,kw,k", [("nf4", dict(blocksize=32), 70), ("nf4", dict(blocksize=32), 71),
                                      ("nf4", dict(blocksize=64, double_quant=True), 70),
                                      ("int4", dict(group_size=32), 71), ("int4_gidx", {}, 70), ("int8", {}, 70)])
def test_in_kernel_dequant_is_bit_exact(fmt, kw, k, poison_outputs):
    """Y = I deq(W)^T and dX = I deq(W) (fp32, exact dots, zero LoRA) equal the oracle bit for bit,
    on the packed-tile path (int4, nf4 with even K) and the per-element path (nf4 with odd K)."""
    n = 37
    qw = _qw(fmt, n, k, **kw)
    w = dequantize(qw, torch.float32).cpu()
    a, b = torch.zeros(1, k, device=DEVICE), torch.zeros(n, 1, device=DEVICE)
    y, _ = lora_quant_fwd(torch.eye(k, device=DEVICE), qw, None, a, b, 1.0, config=CFG, shrink_config=SHRINK)
    assert torch.equal(y.cpu(), w.T)
    dx, _, _ = lora_quant_bwd(torch.eye(n, device=DEVICE), torch.zeros(n, k, device=DEVICE), qw, a, b,
                              torch.zeros(n, 1, device=DEVICE), 1.0, needs_da=False, needs_db=False, configs=CONFIGS)
    assert torch.equal(dx.cpu(), w)


def test_default_configs_and_strided_x(poison_outputs):
    """No explicit config (the interpreter runs the first config the pruning rule keeps), a strided x."""
    qw = _qw("nf4", N, K, blocksize=64)
    torch.manual_seed(1)
    x = randn(K, 5, dtype=torch.bfloat16).t()
    a, b = randn(8, K, scale=0.1), randn(N, 8)
    y, s = lora_quant_fwd(x, qw, None, a, b, 0.5)
    assert_close("Y", y, _ref_fwd(x, qw, None, a, b, 0.5, 1.0)[0], torch.bfloat16)


def test_pruning_rule_decode_and_prefill():
    x16 = torch.empty(0, dtype=torch.bfloat16)
    dec = prune_lora_quant_configs(get_lora_quant_configs(), {"M_BUCKET": 16, "P": 4096, "Q": 4096, "x_ptr": x16})
    assert dec and all(c.kwargs["BLOCK_M"] == 16 for c in dec)
    pre = prune_lora_quant_configs(get_lora_quant_configs(), {"M_BUCKET": 4096, "P": 4096, "Q": 4096, "x_ptr": x16})
    assert any(c.kwargs["BLOCK_M"] >= 64 for c in pre)
    for c in pre:  # the register-built W tile stays small enough not to spill
        assert c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"] <= 32 * 32 * c.num_warps
    for mb, p, q, dt, drop, prec in itertools.product((16, 32, 4096), (8, 53, 4096), (8, 97, 4096),
                                                      (torch.float16, torch.float32), (False, True), ("tf32", "ieee")):
        kept = prune_lora_quant_configs(get_lora_quant_configs(), {"M_BUCKET": mb, "P": p, "Q": q,
                                                                   "x_ptr": torch.empty(0, dtype=dt)},
                                        OUT_DROPOUT=drop, INPUT_PRECISION=prec)
        assert kept and all(c.kwargs["BLOCK_M"] <= max(mb, 16) for c in kept)
    # the autotuner silently ignores a key that is not an argument name (a typo would merge keys)
    tuned = lora_quant_kernel_tuned
    assert not [k for k in tuned.keys if k not in tuned.arg_names]


def test_argument_errors():
    qw = _qw("int8", 6, 8)
    x, a, b = randn(4, 8), randn(2, 8), randn(6, 2)
    with pytest.raises(ValueError, match=r"x must be \[M, K=8\]"):
        lora_quant_fwd(randn(4, 9), qw, None, a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \[N=6, r=2\]"):
        lora_quant_fwd(x, qw, None, a, randn(6, 3), 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_quant_fwd(x, qw, None, a, b, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="int4 weight needs zeros"):
        lora_quant_fwd(x, qw._replace(fmt="int4"), None, a, b, 1.0)


# -- through fastpeft.ops.lora_quant_linear with FASTPEFT_BACKEND=triton ----------------------------
def test_supports_quant_reasons():
    from fastpeft.ops import Adapter, Base, LoraCall
    from fastpeft.ops import triton_backend as tb

    qw = _qw("int4", 6, 8, group_size=4)
    x, a, b = randn(4, 8), randn(2, 8), randn(6, 2)

    def why(qw, a=a, b=b):
        return tb.supports(LoraCall(x, Base.quantized(qw), (Adapter(a, b, 1.0),)))

    assert why(qw) is None
    assert tb.supports(LoraCall(x, Base.quantized(qw), ())) is None  # rank 0: the dequant GEMM alone
    assert "int4 g_idx" in why(qw._replace(g_idx=torch.zeros(3, dtype=torch.int32)))
    assert "format 'fp4'" in why(qw._replace(fmt="fp4"))  # a format without a kernel (fp8's: test_lora_quant_fp8)
    assert "r=300" in why(qw, randn(300, 8), randn(6, 300))


def test_shape_errors_come_from_the_one_validator():
    from fastpeft.ops import lora_quant_linear

    qw = _qw("int4", 6, 8, group_size=4)
    with pytest.raises(ValueError, match=r"lora_quant_linear: quantized weight is \[N=6, K=8\] but lora_A is \(2, 9\)"):
        lora_quant_linear(randn(4, 8), qw, None, randn(2, 9), randn(6, 2), 1.0)
    with pytest.raises(ValueError, match=r"x.s last dim must be K=8; got x \(4, 9\)"):
        lora_quant_linear(randn(4, 9), qw, None, randn(2, 8), randn(6, 2), 1.0)


@pytest.mark.parametrize("fmt,kw,dtype,p", [("nf4", dict(blocksize=32, double_quant=True), torch.bfloat16, 0.25),
                                            ("int4_gidx", {}, torch.float32, 0.0),
                                            ("int8", {}, torch.float16, 0.1)])
def test_lora_quant_linear_triton_end_to_end(fmt, kw, dtype, p, monkeypatch, poison_outputs):
    from fastpeft.ops import Adapter, Base, LoraCall, dispatch, draw_seed, lora_quant_linear

    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    qw = _qw(fmt, N, K, **kw)
    torch.manual_seed(3)
    x = randn(2, 3, K, dtype=dtype).requires_grad_()
    a, b = randn(16, K, scale=0.1).requires_grad_(), randn(N, 16).requires_grad_()
    bias = randn(N, dtype=dtype).requires_grad_()
    assert dispatch.choose(LoraCall(x.detach().reshape(-1, K), Base.quantized(qw, bias), (Adapter(a, b, 2.0, p),))) \
        == "triton"
    torch.manual_seed(99)
    seed = int(draw_seed())
    torch.manual_seed(99)
    y = lora_quant_linear(x, qw, bias, a, b, 2.0, dropout_p=p, training=True)
    assert y.shape == (2, 3, N) and y.dtype == dtype
    dy = randn(2, 3, N, dtype=dtype)
    y.backward(dy)
    d = mask(seed, 6, K, p)
    x2 = x.detach().reshape(6, K)
    yr, _ = _ref_fwd(x2, qw, bias.detach(), a.detach(), b.detach(), 2.0, d)
    assert_close("Y", y.reshape(6, N), yr, dtype)
    dxr, dar, dbr, _ = _ref_bwd(dy.reshape(6, N), x2, qw, a.detach(), b.detach(), 2.0, d)
    assert_close("dX", x.grad.reshape(6, K), dxr, dtype)
    assert_close("dA", a.grad, dar, dtype)
    assert_close("dB", b.grad, dbr, dtype)
    assert_close("dbias", bias.grad, dy.reshape(6, N).double().cpu().sum(0), dtype)
