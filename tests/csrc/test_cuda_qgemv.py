"""The cuda backend's quantized decode GEMV (csrc/lora_qgemv.cu via fastpeft/ops/cuda_quant.py).

CUDA tests (run on a GPU machine by benchmarks/device_check.sh) compare the kernel with the torch backend on a
float64 copy of the call (dequantize(qw, float64): the exact fp32 weight values) for every format (nf4 with and
without double quant, int4 with fp16 / bf16 scales and with g_idx, int8, fp8 with block and per-channel scales),
M in {1, 3, 8}, odd N, r in {0, 1, 16, 128}, bias on and off, DoRA's column scale, outputs poisoned with NaN
beforehand, layouts that take the element path, and bitwise determinism. The CPU tests check what needs no
GPU: supports() reasons, auto_ok, and the arguments forward() hands the binding (through a stand-in module).
The dequantization itself is checked bit for bit on the CPU by test_qgemv_decode.py.
"""
import dataclasses
import math

import pytest
import torch

from fastpeft.ops import Adapter, Base, LoraCall, RowPlan, cuda_backend, cuda_quant, torch_backend
from fastpeft.quant.formats import quantize_weight

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
RTOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}

# (name, quantize_weight kwargs, scale dtype for int4 or None, with g_idx)
VARIANTS = [
    ("nf4", dict(fmt="nf4", blocksize=64), None, False),
    ("nf4-dq", dict(fmt="nf4", blocksize=64, double_quant=True), None, False),
    ("int4-f16", dict(fmt="int4", group_size=128), torch.float16, False),
    ("int4-bf16-gidx", dict(fmt="int4", group_size=64), torch.bfloat16, True),
    ("int8", dict(fmt="int8"), None, False),
    ("fp8-block", dict(fmt="fp8", fp8_block_size=128), None, False),
    ("fp8-channel", dict(fmt="fp8", fp8_block_size=None), None, False),
]


def make_qw(N, K, kwargs, scale_dtype, gidx, device, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    qw = quantize_weight(w, **kwargs)
    if scale_dtype is not None:
        qw = qw._replace(scales=qw.scales.to(scale_dtype))
    if gidx:
        qw = qw._replace(g_idx=(torch.arange(K) // qw.blocksize)[torch.randperm(K, generator=g)].to(torch.int32))
    return qw._replace(**{f: getattr(qw, f).to(device) for f in qw._fields
                          if isinstance(getattr(qw, f), torch.Tensor)})


def make_inputs(M, K, N, r, dtype, ab_dtype, with_bias, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dt)

    x = rnd(M, K)
    a = rnd(r, K, std=1 / math.sqrt(K), dt=ab_dtype) if r else None
    b = rnd(N, r, std=1 / math.sqrt(r), dt=ab_dtype) if r else None
    bias = rnd(N) if with_bias else None
    return x, a, b, bias


def reference(x, qw, bias, a, b, scale, col_scale=None):
    """float64 Y and S: the torch backend on a float64 copy (W = dequantize(qw, float64))."""
    def d(t):
        return None if t is None else t.double()

    adapters = (Adapter(d(a), d(b), scale),) if a is not None else ()
    y, s = torch_backend.forward(LoraCall(d(x), Base.quantized(qw, None), adapters))
    if col_scale is not None:
        y = y * col_scale.double()
    if bias is not None:
        y = y + bias.double()
    return y, (s if a is not None else torch.zeros(x.shape[0], 0, dtype=torch.float64, device=x.device))


def assert_close(y, s, ref_y, ref_s, dtype, what):
    assert torch.isfinite(y).all(), f"{what}: Y has non-finite values (unwritten outputs stay NaN)"
    assert torch.isfinite(s).all(), f"{what}: S has non-finite values"
    err = (y.double() - ref_y).abs()
    bound = RTOL[dtype] * ref_y.abs() + 1e-3 * ref_y.abs().mean()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{what}: Y off at flat index {worst.item()}: got {y.flatten()[worst].item()}, "
                                  f"want {ref_y.flatten()[worst].item()}")
    assert s.shape == ref_s.shape, f"{what}: S shape {tuple(s.shape)} != {tuple(ref_s.shape)}"
    if s.numel():
        s_err = (s.double() - ref_s).abs()
        assert (s_err <= 1e-4 * ref_s.abs() + 1e-4).all(), f"{what}: S max error {s_err.max().item()}"


def run_poisoned(mod, x, qw, bias, a, b, scale, use_pdl, col_scale=None):
    M, N, r = x.shape[0], qw.N, 0 if a is None else a.shape[0]
    y = torch.full((M, N), float("nan"), device=x.device, dtype=x.dtype)
    s = torch.full((M, r), float("nan"), device=x.device, dtype=torch.float32)
    y2, s2 = cuda_quant.qgemv(mod, x, qw, bias, a, b, scale, use_pdl, out=y, s_out=s, col_scale=col_scale)
    assert y2.data_ptr() == y.data_ptr() and s2.data_ptr() == s.data_ptr()
    return y, s


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("K,N", [(4096, 4101), (1024, 333)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_float64_reference(module, variant, K, N, dtype):
    name, kwargs, sdt, gidx = variant
    qw = make_qw(N, K, kwargs, sdt, gidx, "cuda", seed=K + N)
    for M in (1, 3, 8):
        for r in (0, 1, 16, 128):
            with_bias = (M + r) % 2 == 0
            ab_dtype = torch.float32 if r % 2 == 0 else dtype
            x, a, b, bias = make_inputs(M, K, N, r, dtype, ab_dtype, with_bias, "cuda", seed=M * 1000 + r)
            ref_y, ref_s = reference(x, qw, bias, a, b, 0.75)
            for use_pdl in (True, False):
                y, s = run_poisoned(module, x, qw, bias, a, b, 0.75, use_pdl)
                assert_close(y, s, ref_y, ref_s, dtype, f"{name} M={M} K={K} N={N} r={r} {dtype} bias={with_bias} "
                                                        f"pdl={use_pdl}")


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_dora_column_scale_and_determinism(module, variant):
    name, kwargs, sdt, gidx = variant
    M, K, N, r, dtype = 3, 2048, 517, 16, torch.bfloat16
    qw = make_qw(N, K, kwargs, sdt, gidx, "cuda", seed=5)
    x, a, b, bias = make_inputs(M, K, N, r, dtype, torch.float32, True, "cuda", seed=9)
    g = 0.5 + torch.rand(N, device="cuda")
    ref_y, ref_s = reference(x, qw, bias, a, b, 2.0, col_scale=g)
    y, s = run_poisoned(module, x, qw, bias, a, b, 2.0, True, col_scale=g)
    assert_close(y, s, ref_y, ref_s, dtype, f"{name} DoRA")
    y2, s2 = run_poisoned(module, x, qw, bias, a, b, 2.0, True, col_scale=g)
    assert torch.equal(y, y2) and torch.equal(s, s2), f"{name}: two runs differ (the reduction must be fixed-order)"
    y_plain, _ = run_poisoned(module, x, qw, bias, a, b, 2.0, True)
    assert not torch.equal(y_plain, y), f"{name}: the column scale had no effect"


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("fmt,K,kwargs", [
    ("nf4", 100, dict(fmt="nf4", blocksize=64)),  # K % 32 != 0: rows start mid-chunk, the element path
    ("int4", 200, dict(fmt="int4", group_size=64)),  # 100-byte rows: not 16-byte aligned
    ("int4", 129, dict(fmt="int4", group_size=32)),  # odd K
    ("int4", 256, dict(fmt="int4", group_size=48)),  # groups that do not hold whole chunks
    ("fp8", 100, dict(fmt="fp8", fp8_block_size=(2, 20))),
])
def test_element_path_layouts_and_misaligned_x(module, fmt, K, kwargs):
    M, N, r, dtype = 5, 77, 8, torch.float16
    qw = make_qw(N, K, kwargs, None, False, "cuda", seed=K)
    x, a, b, bias = make_inputs(M, K, N, r, dtype, torch.float32, True, "cuda", seed=K + 1)
    ref_y, ref_s = reference(x, qw, bias, a, b, 1.5)
    y, s = run_poisoned(module, x, qw, bias, a, b, 1.5, False)
    assert_close(y, s, ref_y, ref_s, dtype, f"{fmt} K={K}")
    xbuf = torch.zeros(M, K + 3, device="cuda", dtype=dtype)  # x one element past 16 bytes, row stride K + 3
    xbuf[:, 1:K + 1] = x
    y, s = run_poisoned(module, xbuf[:, 1:K + 1], qw, bias, a, b, 1.5, False)
    assert_close(y, s, ref_y, ref_s, dtype, f"{fmt} K={K} misaligned x")


@needs_cuda
@pytest.mark.cuda
def test_backend_entry_points_and_dispatch(module, monkeypatch):
    from fastpeft.ops import dispatch

    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    M, K, N, r = 2, 512, 96, 8
    qw = make_qw(N, K, dict(fmt="nf4", blocksize=64, double_quant=True), None, False, "cuda", seed=1)
    x, a, b, bias = make_inputs(M, K, N, r, torch.bfloat16, torch.float32, True, "cuda", seed=2)
    call = LoraCall(x, Base.quantized(qw, bias), (Adapter(a, b, 0.5),))
    assert cuda_backend.supports(call) is None, cuda_backend.supports(call)
    assert dispatch.choose(call) == "cuda"
    y, s = cuda_backend.forward(call)
    ref_y, ref_s = reference(x, qw, bias, a, b, 0.5)
    assert_close(y, s, ref_y, ref_s, torch.bfloat16, "forward()")
    base_only = call.replace(adapters=())
    assert cuda_backend.supports(base_only) is None
    y0, s0 = cuda_backend.forward(base_only)
    assert s0.shape == (M, 0)
    ref_y0, _ = reference(x, qw, bias, None, None, 0.0)
    assert_close(y0, s0, ref_y0, torch.zeros(M, 0, dtype=torch.float64, device="cuda"), torch.bfloat16, "r = 0")


@needs_cuda
@pytest.mark.cuda
def test_binding_rejects_bad_inputs_by_name(module):
    M, K, N = 2, 128, 32
    qw = make_qw(N, K, dict(fmt="int4", group_size=64), torch.float16, False, "cuda", seed=3)
    x, a, b, _ = make_inputs(M, K, N, 4, torch.float16, torch.float32, False, "cuda", seed=4)
    with pytest.raises(RuntimeError, match=r"int4 zeros must be uint8 \[N=32, G=2\]"):
        cuda_quant.qgemv(module, x, qw._replace(zeros=qw.zeros[:, :1]), None, a, b, 1.0, False)
    with pytest.raises(RuntimeError, match=r"int4 scales must be"):
        cuda_quant.qgemv(module, x, qw._replace(scales=qw.scales.double()), None, a, b, 1.0, False)
    with pytest.raises(RuntimeError, match=r"lora_B must be \[N=32, r=4\]"):
        cuda_quant.qgemv(module, x, qw, None, a, b[:31], 1.0, False)
    with pytest.raises(RuntimeError, match="scales must be a CUDA tensor"):
        cuda_quant.qgemv(module, x, qw._replace(scales=qw.scales.cpu()), None, a, b, 1.0, False)
    with pytest.raises(RuntimeError, match=r"col_scale must be \[N=32\]"):
        cuda_quant.qgemv(module, x, qw, None, a, b, 1.0, False, col_scale=torch.ones(31, device="cuda"))
    nf4 = make_qw(N, K, dict(fmt="nf4", blocksize=64), None, False, "cuda", seed=5)
    with pytest.raises(RuntimeError, match="nf4 needs its code book"):
        cuda_quant.qgemv(module, x, nf4._replace(code=None), None, a, b, 1.0, False)


# ---- CPU: no GPU needed -----------------------------------------------------------------------------

def _cpu_call(fmt_kwargs, M=2, K=64, N=24, r=4, p=0.0, adapters=1, dtype=torch.bfloat16, **qw_changes):
    qw = make_qw(N, K, fmt_kwargs, None, False, "cpu", seed=0)._replace(**qw_changes)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(dtype)
    ads = tuple(Adapter(torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), 0.5, p)
                for _ in range(adapters))
    return LoraCall(x, Base.quantized(qw, torch.randn(N, generator=g).to(dtype)), ads)


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_every_format_is_accepted_without_a_gpu(variant):
    name, kwargs, sdt, gidx = variant
    call = _cpu_call(kwargs)
    qw = make_qw(24, 64, kwargs, sdt, gidx, "cpu", seed=0)  # the variant's scale dtype and g_idx
    call = call.replace(base=Base.quantized(qw, call.base.bias))
    assert cuda_quant.quant_reason(qw, call.x) is None, name
    assert cuda_backend._call_reason(call) is None, name
    assert cuda_backend._packed_reason(call) is None, name


def test_quant_reasons_name_the_problem():
    nf4 = dict(fmt="nf4", blocksize=64)
    x = torch.zeros(2, 66, dtype=torch.bfloat16)
    odd = quantize_weight(torch.randn(8, 65), "nf4")
    assert "odd K=65" in cuda_quant.quant_reason(odd, x)
    call = _cpu_call(nf4)
    qw = call.base.packed
    assert "power of two >= 32" in cuda_quant.quant_reason(qw._replace(blocksize=16), call.x)
    assert "code book" in cuda_quant.quant_reason(qw._replace(code=None), call.x)
    assert "is on meta" in cuda_quant.quant_reason(qw._replace(scales=qw.scales.to("meta")), call.x)
    int4 = make_qw(24, 64, dict(fmt="int4", group_size=32), torch.float64, False, "cpu", seed=0)
    assert "int4 scales dtype torch.float64" in cuda_quant.quant_reason(int4, call.x)
    assert "has no CUDA decode kernel" in cuda_quant.quant_reason(qw._replace(fmt="int2"), call.x)
    assert "r <= 128" in cuda_backend._packed_reason(_cpu_call(nf4, r=129))
    assert "share" in cuda_backend._packed_reason(
        call.replace(adapters=(dataclasses.replace(call.adapters[0], B=call.adapters[0].B.double()),)))


def test_call_rules_for_a_packed_base():
    nf4 = dict(fmt="nf4", blocksize=64)
    assert cuda_backend._call_reason(_cpu_call(nf4, adapters=0)) is None  # r = 0: the quantized GEMV alone
    assert "dropout" in cuda_backend._call_reason(_cpu_call(nf4, p=0.1))
    assert "exactly one adapter" in cuda_backend._call_reason(_cpu_call(nf4, adapters=2))
    two = _cpu_call(nf4, M=3, adapters=2)
    mixed = two.replace(plan=RowPlan.build(torch.tensor([0, -1, 1]), 2))
    assert "mixed batch" in cuda_backend._call_reason(mixed)
    assert cuda_backend.auto_ok(_cpu_call(nf4, M=cuda_quant.QUANT_AUTO_MAX_M))
    assert not cuda_backend.auto_ok(_cpu_call(nf4, M=cuda_quant.QUANT_AUTO_MAX_M + 1))


def test_stale_module_without_qgemv_refuses_packed_calls_only():
    call = _cpu_call(dict(fmt="int8"))

    class Old:
        FEATURES = ("col_scale", "mixed")

    class New:
        FEATURES = ("col_scale", "mixed", "qgemv")

    assert "qgemv" in cuda_backend._module_reason(Old(), call)
    assert cuda_backend._module_reason(New(), call) is None
    dense = LoraCall(call.x, Base.dense(torch.zeros(24, 64, dtype=torch.bfloat16)), call.adapters)
    assert cuda_backend._module_reason(Old(), dense) is None


class _Recorder:
    """Stands in for the compiled module: records lora_qgemv's arguments, returns empty outputs."""
    FEATURES = ("col_scale", "mixed", "qgemv")

    def __init__(self):
        self.calls = []

    def lora_qgemv(self, x, fmt, *args, out=None, s_out=None, col_scale=None):
        self.calls.append((x, fmt, args, col_scale))
        r = 0 if args[12] is None else args[12].shape[0]  # lora_A [r, K]
        return torch.empty(x.shape[0], args[8]), torch.empty(x.shape[0], r), ""


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_forward_hands_the_binding_every_field(monkeypatch, variant):
    name, kwargs, sdt, gidx = variant
    call = _cpu_call(kwargs)
    qw = make_qw(24, 64, kwargs, sdt, gidx, "cpu", seed=0)
    call = call.replace(base=Base.quantized(qw, call.base.bias))
    rec = _Recorder()
    monkeypatch.setattr(cuda_backend, "load", lambda device: rec)
    y, s = cuda_backend.forward(call)
    assert y.shape == (2, 24) and s.shape == (2, 4)
    ((x, fmt, args, col_scale),) = rec.calls
    qdata, scales, zeros, code, code2, absmax2, offset, g_idx, N, bs, bs2, bias, A, B, scale, use_pdl = args
    assert x is call.x and fmt == qw.fmt and qdata is qw.qdata and scales is qw.scales and zeros is qw.zeros
    assert code is qw.code and code2 is qw.code2 and absmax2 is qw.absmax2 and offset is qw.offset
    assert g_idx is qw.g_idx and N == 24 and bs == qw.blocksize
    assert bs2 == (qw.blocksize2 if qw.fmt in ("nf4", "fp8") else 0)
    a = call.adapters[0]
    assert bias is call.base.bias and A is a.A and B is a.B and scale == 0.5 and col_scale is None
    assert use_pdl is False  # PDL only for M = 1
    rec.calls.clear()
    y, s = cuda_backend.forward(call.replace(adapters=()))
    assert s.shape == (2, 0) and rec.calls[0][2][12] is None and rec.calls[0][2][13] is None
