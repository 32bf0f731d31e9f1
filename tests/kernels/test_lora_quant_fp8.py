"""fp8 (e4m3fn) base weights in the quantized-weight LoRA kernel (kernels/lora_quant.py, FORMAT = FMT_FP8)
against float64 dequantize-then-matmul, under the Triton interpreter on CPU (compiled on a GPU).

The codes are decoded in registers from their uint8 bits (kernels/lora_quant.py e4m3fn_to_f32) and
multiplied by their 128 x 128 block / output-channel / tensor scale; the reference is
fastpeft.quant.formats.dequantize rounded to x's dtype, then everything in float64. Outputs are
NaN-poisoned, shapes odd, r from 1 to 128.
"""
import pytest
import torch

from _support.reference import DEVICE, assert_close, mask, randn, ref_backward, ref_forward

from fastpeft.kernels.lora_quant import fp8_hw_convert, lora_quant_bwd, lora_quant_fwd
from fastpeft.quant.formats import QuantizedWeight, dequantize, quantize_weight

CFG = {"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
SHRINK = {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
CONFIGS = {"quant": CFG, "shrink": SHRINK, "wgrad": {"BLOCK_P": 16, "BLOCK_Q": 32, "BLOCK_M": 32, "num_warps": 4,
                                                      "num_stages": 2}}


def _qw(n, k, block, seed=0) -> QuantizedWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + n * 7 + k)) * 0.1
    qw = quantize_weight(w, "fp8", fp8_block_size=block)
    return QuantizedWeight(*[t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in qw])


# (fp8 block size, N, K, x dtype, M, r, bias, dropout p)
CASES = [
    (128, 53, 97, torch.float32, 3, 16, True, 0.0),        # one partial 128-block each way
    (128, 150, 131, torch.bfloat16, 17, 1, False, 0.3),    # blocks cut in both directions, r = 1
    (None, 53, 97, torch.float16, 1, 64, True, 0.0),       # per output channel, decode row
    ((16, 32), 53, 97, torch.bfloat16, 3, 128, False, 0.1),  # non-square blocks, r = 128
    ("tensor", 37, 70, torch.float32, 17, 8, True, 0.2),   # one scale for the tensor
]


@pytest.mark.parametrize("block,n,k,dtype,m,r,has_bias,p", CASES)
def test_fp8_fwd_bwd_match_float64(block, n, k, dtype, m, r, has_bias, p, poison_outputs):
    qw = _qw(n, k, block)
    torch.manual_seed(m * 100 + r)
    x, a, b = randn(m, k, dtype=dtype), randn(r, k, scale=0.1), randn(n, r)
    bias = randn(n, dtype=dtype) if has_bias else None
    scale, seed = 1.5, 321
    y, s = lora_quant_fwd(x, qw, bias, a, b, scale, p, seed, config=CFG, shrink_config=SHRINK)
    assert y.dtype == dtype and y.shape == (m, n) and s.shape == (m, r)
    d = mask(seed, m, k, p)
    w = dequantize(qw, dtype)
    yr, sr = ref_forward(x, w, bias, a, b, scale, d)
    assert_close("S", s, sr, dtype)
    assert_close("Y", y, yr, dtype)
    # the base GEMM alone (B = 0): a wrong dequantization cannot hide behind the LoRA term
    zb = torch.zeros_like(b)
    yb, _ = lora_quant_fwd(x, qw, None, a, zb, scale, p, seed, config=CFG, shrink_config=SHRINK)
    assert_close("Y (base)", yb, ref_forward(x, w, None, a, zb, scale, d)[0], dtype)
    dy = randn(m, n, dtype=dtype)
    dx, da, db = lora_quant_bwd(dy, x, qw, a, b, s, scale, p, seed, configs=CONFIGS)
    dxr, dar, dbr, _ = ref_backward(dy, x, w, a, b, scale, d)
    assert_close("dX", dx, dxr, dtype)
    assert_close("dA", da, dar, dtype)
    assert_close("dB", db, dbr, dtype)


@pytest.mark.parametrize("block,k", [(32, 70), (None, 71), ((8, 16), 45)])
def test_fp8_in_kernel_dequant_is_bit_exact(block, k, poison_outputs):
    """Y = I deq(W)^T and dX = I deq(W) (fp32, zero LoRA) equal the oracle bit for bit."""
    n = 37
    qw = _qw(n, k, block)
    w = dequantize(qw, torch.float32).cpu()
    a, b = torch.zeros(1, k, device=DEVICE), torch.zeros(n, 1, device=DEVICE)
    y, _ = lora_quant_fwd(torch.eye(k, device=DEVICE), qw, None, a, b, 1.0, config=CFG, shrink_config=SHRINK)
    assert torch.equal(y.cpu(), w.T)
    dx, _, _ = lora_quant_bwd(torch.eye(n, device=DEVICE), torch.zeros(n, k, device=DEVICE), qw, a, b,
                              torch.zeros(n, 1, device=DEVICE), 1.0, needs_da=False, needs_db=False, configs=CONFIGS)
    assert torch.equal(dx.cpu(), w)


# the integer decoding, and the fp8 type's conversion (FP8_CVT: the hardware's on sm_89+, numpy's in the
# interpreter; Triton has no e4m3 type for older GPUs)
HW_CVT = [False] + ([True] if DEVICE == "cpu" or fp8_hw_convert(DEVICE) else [])


@pytest.mark.parametrize("hw_cvt", HW_CVT)
def test_every_e4m3fn_code_decodes_exactly(hw_cvt, poison_outputs):
    """All 254 finite codes (both signs, subnormals, +-0, 448) through the kernel's decoding; the
    NaN codes 0x7F / 0xFF give NaN in (only) the outputs that read them."""
    bits = torch.arange(256, dtype=torch.uint8)
    bits[0x7F] = bits[0xFF] = 0
    qdata = bits.view(torch.float8_e4m3fn).reshape(8, 32).to(DEVICE)
    scales = torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0], [0.25], [7.0], [1.0]], device=DEVICE)
    qw = QuantizedWeight("fp8", 8, 32, qdata, scales, blocksize=32, blocksize2=1)
    a, b = torch.zeros(1, 32, device=DEVICE), torch.zeros(8, 1, device=DEVICE)
    y, _ = lora_quant_fwd(torch.eye(32, device=DEVICE), qw, None, a, b, 1.0, config=CFG, shrink_config=SHRINK,
                          fp8_cvt=hw_cvt)
    assert torch.equal(y.cpu().T, dequantize(qw).cpu())
    if hw_cvt and DEVICE == "cpu":
        return  # the interpreter's emulated e4m3 type decodes the NaN codes as numbers; GPUs give NaN (PTX cvt)
    nan = torch.zeros(256, dtype=torch.uint8)
    nan[5 * 32 + 3] = 0xFF
    qw = qw._replace(qdata=nan.view(torch.float8_e4m3fn).reshape(8, 32).to(DEVICE))
    y, _ = lora_quant_fwd(torch.eye(32, device=DEVICE), qw, None, a, b, 1.0, config=CFG, shrink_config=SHRINK,
                          fp8_cvt=hw_cvt)
    bad = y.cpu().isnan()
    assert bad[:, 5].all() and bad.sum() == 32  # the NaN at W[5, 3] spreads over column 5 only (x = I)


def test_fp8_rank0_default_configs_and_uint8_bits(poison_outputs):
    """r = 0 with the pruning rule's first config, and the codes given as their uint8 bits."""
    qw = _qw(53, 97, 128)
    x = randn(5, 97, dtype=torch.bfloat16)
    a, b = randn(0, 97), randn(53, 0)
    y, s = lora_quant_fwd(x, qw._replace(qdata=qw.qdata.view(torch.uint8)), None, a, b, 1.0)
    assert s.shape == (5, 0)
    assert_close("Y", y, ref_forward(x, dequantize(qw, x.dtype), None, a, b, 1.0, 1.0)[0], torch.bfloat16)


def test_fp8_supports_reasons():
    from fastpeft.ops import Adapter, Base, LoraCall
    from fastpeft.ops import triton_backend as tb

    qw = _qw(6, 8, 4)
    x, a, b = randn(4, 8), randn(2, 8), randn(6, 2)

    def why(qw):
        return tb.supports(LoraCall(x, Base.quantized(qw), (Adapter(a, b, 1.0),)))

    assert why(qw) is None
    assert "fp8 scales must be [2, 2]" in why(qw._replace(scales=qw.scales[:1]))
    assert "fp8 qdata must be float8_e4m3fn" in why(qw._replace(qdata=qw.qdata.float()))
    assert "scale blocks must be positive" in why(qw._replace(blocksize2=0))


@pytest.mark.parametrize("block,dtype,p", [(128, torch.bfloat16, 0.25), (None, torch.float32, 0.0)])
def test_fp8_lora_quant_linear_triton_end_to_end(block, dtype, p, monkeypatch, poison_outputs):
    from fastpeft.ops import Adapter, Base, LoraCall, dispatch, draw_seed, lora_quant_linear

    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    n, k = 53, 97
    qw = _qw(n, k, block)
    torch.manual_seed(3)
    x = randn(2, 3, k, dtype=dtype).requires_grad_()
    a, b = randn(16, k, scale=0.1).requires_grad_(), randn(n, 16).requires_grad_()
    bias = randn(n, dtype=dtype)
    assert dispatch.choose(LoraCall(x.detach().reshape(-1, k), Base.quantized(qw, bias), (Adapter(a, b, 2.0, p),))) \
        == "triton"
    torch.manual_seed(99)
    seed = int(draw_seed())
    torch.manual_seed(99)
    y = lora_quant_linear(x, qw, bias, a, b, 2.0, dropout_p=p, training=True)
    dy = randn(2, 3, n, dtype=dtype)
    y.backward(dy)
    d = mask(seed, 6, k, p)
    x2 = x.detach().reshape(6, k)
    w = dequantize(qw, dtype)
    assert_close("Y", y.reshape(6, n), ref_forward(x2, w, bias, a.detach(), b.detach(), 2.0, d)[0], dtype)
    dxr, dar, dbr, _ = ref_backward(dy.reshape(6, n), x2, w, a.detach(), b.detach(), 2.0, d)
    assert_close("dX", x.grad.reshape(6, k), dxr, dtype)
    assert_close("dA", a.grad, dar, dtype)
    assert_close("dB", b.grad, dbr, dtype)


@pytest.mark.parametrize("m,dtype", [(5, torch.float32), (19, torch.bfloat16)])
def test_fp8_mixed_batch_triton_matches_torch_backend(m, dtype, monkeypatch, poison_outputs):
    """Many adapters in one batch (a row_index; -1 = base only) over an fp8 base: the triton backend's
    mixed-batch GEMM (kernels/lora_mixed.py -> lora_quant_kernel) against the torch backend in float64."""
    from fastpeft import ops
    from fastpeft.ops import Adapter, AdapterSet, Base

    n, k = 29, 46
    qw = _qw(n, k, (8, 16))
    torch.manual_seed(m)
    x, bias = randn(m, k, dtype=dtype), randn(n, dtype=dtype)
    adapters = [Adapter(randn(r, k, scale=0.3), randn(n, r), 0.5 + 0.75 * i) for i, r in enumerate((16, 5, 64))]
    idx = torch.randint(-1, 3, (m,))
    idx[:3] = torch.tensor([-1, 0, 2])
    idx = idx.to(DEVICE)

    def run(x, base, ads, backend):
        monkeypatch.setenv("FASTPEFT_BACKEND", backend)
        leaves = [t.detach().clone().requires_grad_() for a in ads for t in (a.A, a.B)]
        xl = x.detach().clone().requires_grad_()
        y = ops.lora(xl, base, AdapterSet([Adapter(leaves[2 * i], leaves[2 * i + 1], a.scale)
                                           for i, a in enumerate(ads)], idx))
        return y, xl, leaves

    y, xl, leaves = run(x, Base.quantized(qw, bias), adapters, "triton")
    dy = randn(m, n, dtype=dtype)
    y.backward(dy)
    a64 = [Adapter(a.A.double(), a.B.double(), a.scale) for a in adapters]
    yr, xr, lr = run(x.double(), Base.dense(dequantize(qw, dtype).double(), bias.double()), a64, "torch")
    yr.backward(dy.double())
    assert_close("Y", y, yr, dtype)
    assert_close("dX", xl.grad, xr.grad, dtype)
    for i, (g, gr) in enumerate(zip(leaves, lr)):
        assert_close(f"{'AB'[i % 2]}_{i // 2} grad", g.grad, gr.grad, dtype)
