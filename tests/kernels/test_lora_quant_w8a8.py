"""fp8 W8A8 in the packed GEMM (kernels/lora_quant.py `fp8_w8a8_step`, constexpr FP8_DOT).

The reference quantizes x as the kernel is specified to: per row and 128 columns, s = amax / 448
(fp32), codes = e4m3fn(x / s) with torch's cast (round to nearest even), then float64
(codes * s) @ deq(W)^T + the exact LoRA term. The fp8 encoder (`f32_to_e4m3fn_bits`) is checked bit
for bit against torch's cast on every code, the midpoints between codes and their neighbours, and
random values. Outputs NaN-poisoned; the same bits on a second run; dispatch (FASTPEFT_FP8_DOT) and
its refusals.
"""
import pytest
import torch
import triton
import triton.language as tl

from _support.reference import DEVICE, assert_close, randn

from fastpeft import ops
from fastpeft.kernels.lora_quant import f32_to_e4m3fn_bits, fp8_dot_reason, launch_lora_quant, lora_quant_fwd
from fastpeft.quant.formats import FP8_DTYPE, dequantize, quantize_weight

CFG = {"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 128, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
SHRINK = {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}


@triton.jit
def _encode_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < n
    tl.store(out_ptr + r, f32_to_e4m3fn_bits(tl.load(x_ptr + r, mask=ok, other=0.0)).to(tl.uint8), mask=ok)


def test_encoder_matches_torch_cast_bit_for_bit():
    codes = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    codes = torch.sort(codes[torch.isfinite(codes)]).values
    mids = (codes[:-1] + codes[1:]) / 2  # ties: round to the even code
    up, down = torch.full_like(mids, 1e9), torch.full_like(mids, -1e9)
    torch.manual_seed(0)
    vals = torch.cat([codes, mids, torch.nextafter(mids, up), torch.nextafter(mids, down),
                      torch.randn(20000) * 40, torch.rand(20000) * 0.03 - 0.015, torch.tensor([0.0, -0.0, 1e-30])])
    vals = vals.clamp(-448, 448).contiguous().to(DEVICE)
    out = torch.full(vals.shape, 0x7F, dtype=torch.uint8, device=DEVICE)  # 0x7F (NaN) where unwritten
    _encode_kernel[(triton.cdiv(vals.numel(), 1024),)](vals, out, vals.numel(), BLOCK=1024)
    ref = vals.to(FP8_DTYPE).view(torch.uint8)
    bad = out != ref
    assert not bad.any(), (vals[bad][:5], out[bad][:5], ref[bad][:5])


def _fp8(n, k, block):
    torch.manual_seed(n + k)
    qw = quantize_weight(torch.randn(n, k) * 0.3, "fp8", fp8_block_size=block)
    return type(qw)(*[t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in qw])


def _w8a8_reference(x, qw, bias, a, b, scale):
    """float64 Y of the W8A8 spec (x per row and 128 columns to e4m3, scale amax / 448) + the exact LoRA term."""
    m, k = x.shape
    g = x.detach().float().cpu().reshape(m, k // 128, 128)
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 448.0
    xq = ((g / s).to(FP8_DTYPE).float() * s).reshape(m, k).double()
    y = xq @ dequantize(qw, torch.float32).cpu().double().t()
    x64 = x.detach().cpu().double()
    y = y + scale * (x64 @ a.cpu().double().t()) @ b.cpu().double().t()
    return y + bias.cpu().double() if bias is not None else y


# (N, K, block: (block_n, block_k) / 128 / None = per channel, x dtype, M, r, bias)
CASES = [
    (53, 256, 128, torch.bfloat16, 1, 16, True),      # partial last row block
    (37, 384, None, torch.float16, 17, 1, False),     # per output channel
    (29, 128, (1, 128), torch.float32, 5, 64, True),
    (64, 256, (64, 256), torch.bfloat16, 3, 0, False),  # r = 0; one scale block over two K tiles
]


@pytest.mark.parametrize("n,k,block,dtype,m,r,has_bias", CASES)
def test_w8a8_forward_matches_its_float64_spec(n, k, block, dtype, m, r, has_bias, poison_outputs):
    qw = _fp8(n, k, block)
    torch.manual_seed(m * 10 + r)
    x = randn(m, k, dtype=dtype)
    x[0, :128] = 0.0  # an all-zero activation group: scale floor, codes 0, no NaN
    a, b = randn(r, k, scale=0.1), randn(n, r)
    bias = randn(n, dtype=dtype) if has_bias else None
    y, s = lora_quant_fwd(x, qw, bias, a, b, 1.25, config=CFG, shrink_config=SHRINK, fp8_dot=True)
    assert y.dtype == dtype and not torch.isnan(y).any()
    assert_close("Y (W8A8)", y, _w8a8_reference(x, qw, bias, a, b, 1.25), dtype)
    y2, _ = lora_quant_fwd(x, qw, bias, a, b, 1.25, config=CFG, shrink_config=SHRINK, fp8_dot=True)
    assert torch.equal(y, y2)
    # W8A8 is not the dequantized path: x's quantization shows (a check that the flag reaches the kernel)
    y_exact, _ = lora_quant_fwd(x, qw, bias, a, b, 1.25, config=CFG, shrink_config=SHRINK)
    assert not torch.equal(y, y_exact)


def test_w8a8_split_k_decode_matches_spec(poison_outputs):
    qw = _fp8(45, 512, 128)
    x, a, b = randn(2, 512, dtype=torch.bfloat16), randn(8, 512, scale=0.1), randn(45, 8)
    y, _ = lora_quant_fwd(x, qw, None, a, b, 0.5, config=CFG, shrink_config=SHRINK, fp8_dot=True, split_k=3)
    assert_close("Y (W8A8, split 3)", y, _w8a8_reference(x, qw, None, a, b, 0.5), torch.bfloat16)


def test_w8a8_refusals():
    assert "multiples of 128" in fp8_dot_reason(_fp8(8, 96, None))
    assert "fp8 weights, not int8" in fp8_dot_reason(quantize_weight(torch.randn(8, 128), "int8"))
    qw = _fp8(8, 128, 128)
    x, s = randn(2, 8), torch.zeros(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="dX"):
        launch_lora_quant(x, qw, s, randn(128, 4), None, torch.empty(2, 128, device=DEVICE), 1.0, False,
                          fp8_dot=True)


def test_w8a8_dispatch_through_ops(monkeypatch, poison_outputs):
    """FASTPEFT_FP8_DOT=1 runs W8A8 through fastpeft.ops (triton backend); unset on CPU: the exact path;
    forced on a weight it cannot take: an error naming the reason."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    qw = _fp8(33, 256, 128)
    x, a, b = randn(3, 256, dtype=torch.bfloat16), randn(4, 256, scale=0.1), randn(33, 4)
    adapter = ops.Adapter(a, b, 2.0)
    monkeypatch.setenv("FASTPEFT_FP8_DOT", "1")
    y = ops.lora(x, ops.Base.quantized(qw), [adapter])
    assert_close("ops W8A8", y, _w8a8_reference(x, qw, None, a, b, 2.0), torch.bfloat16)
    monkeypatch.delenv("FASTPEFT_FP8_DOT")
    y_exact = ops.lora(x, ops.Base.quantized(qw), [adapter])
    assert not torch.equal(y, y_exact)
    monkeypatch.setenv("FASTPEFT_FP8_DOT", "1")
    bad = _fp8(33, 96, None)
    with pytest.raises(RuntimeError, match="FASTPEFT_FP8_DOT=1 forces fp8 W8A8.*multiples of 128"):
        ops.lora(randn(3, 96, dtype=torch.bfloat16), ops.Base.quantized(bad), [ops.Adapter(randn(4, 96), b, 1.0)])
