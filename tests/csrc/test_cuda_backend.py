"""The `cuda` backend (csrc fused LoRA decode GEMV) against a float64 reference.

CUDA tests build csrc just in time (about a minute, cached) and run on a GPU machine via
benchmarks/device_check.sh; the CPU tests check the parts that need no GPU: supports() reasons and
the torch-math backward.
"""
import math

import pytest
import torch

from fastpeft.ops import Adapter, Base, LoraCall, cuda_backend

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Output rounding dominates the error (fp32 accumulation of exact 16-bit products): allow one ulp.
RTOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def reference(x, w, bias, a, b, scale):
    """float64 Y and S."""
    s = x.double() @ a.double().t()
    y = scale * (s @ b.double().t())
    if w is not None:
        y = y + x.double() @ w.double().t()
    if bias is not None:
        y = y + bias.double()
    return y, s


def assert_close_to_ref(y, s, ref_y, ref_s, dtype, what):
    assert torch.isfinite(y).all(), f"{what}: Y has non-finite values (unwritten outputs stay NaN)"
    assert torch.isfinite(s).all(), f"{what}: S has non-finite values"
    err = (y.double() - ref_y).abs()
    bound = RTOL[dtype] * ref_y.abs() + 1e-3 * ref_y.abs().mean()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{what}: Y off at flat index {worst.item()}: got {y.flatten()[worst].item()}, "
        f"want {ref_y.flatten()[worst].item()}"
    )
    rel = (y.double() - ref_y).norm() / ref_y.norm()
    assert rel < 1e-2, f"{what}: relative norm error {rel.item()}"
    s_err = (s.double() - ref_s).abs()
    assert (s_err <= 1e-4 * ref_s.abs() + 1e-4).all(), f"{what}: S max error {s_err.max().item()}"


def make_inputs(M, K, N, r, dtype, ab_dtype, with_bias, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dt)

    x = rnd(M, K)
    w = rnd(N, K, std=1 / math.sqrt(K))
    a = rnd(r, K, std=1 / math.sqrt(K), dt=ab_dtype)
    b = rnd(N, r, std=1 / math.sqrt(r), dt=ab_dtype)  # LoRA term about as large as the base term
    bias = rnd(N) if with_bias else None
    return x, w, bias, a, b


@pytest.fixture(scope="module")
def module():
    mod = cuda_backend.load(torch.device("cuda"))
    assert not isinstance(mod, str), mod
    return mod


def run_poisoned(mod, x, w, bias, a, b, scale, use_pdl):
    M, N, r = x.shape[0], b.shape[0], a.shape[0]
    y = torch.full((M, N), float("nan"), device=x.device, dtype=x.dtype)
    s = torch.full((M, r), float("nan"), device=x.device, dtype=torch.float32)
    y2, s2 = cuda_backend.gemv(x, w, bias, a, b, scale, use_pdl, out=y, s_out=s)
    assert y2.data_ptr() == y.data_ptr() and s2.data_ptr() == s.data_ptr()
    return y, s


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("K,N", [(4096, 4096), (4099, 4101)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ab_fp32", [True, False])
def test_matches_float64_reference(module, K, N, dtype, ab_fp32):
    ab_dtype = torch.float32 if ab_fp32 else dtype
    for M in (1, 3, 8):
        for r in (1, 16, 64, 128):
            for with_bias in (False, True):
                x, w, bias, a, b = make_inputs(M, K, N, r, dtype, ab_dtype, with_bias, seed=M * 1000 + r)
                ref_y, ref_s = reference(x, w, bias, a, b, 0.75)
                for use_pdl in (True, False):
                    y, s = run_poisoned(module, x, w, bias, a, b, 0.75, use_pdl)
                    what = f"M={M} K={K} N={N} r={r} {dtype} ab={ab_dtype} bias={with_bias} pdl={use_pdl}"
                    assert_close_to_ref(y, s, ref_y, ref_s, dtype, what)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_misaligned_and_strided_inputs_use_scalar_path(module, dtype):
    # x and A start one element past a 16-byte boundary (scalar fallback); x also has row stride K+3.
    M, K, N, r = 5, 1024, 333, 16
    x, w, bias, a, b = make_inputs(M, K, N, r, dtype, torch.float32, True, seed=7)
    xbuf = torch.zeros(M, K + 3, device="cuda", dtype=dtype)
    xbuf[:, 1 : K + 1] = x
    abuf = torch.zeros(r, K + 1, device="cuda", dtype=torch.float32)
    abuf[:, 1:] = a
    xv, av = xbuf[:, 1 : K + 1], abuf[:, 1:]
    assert xv.data_ptr() % 16 != 0 and av.data_ptr() % 16 != 0
    ref_y, ref_s = reference(x, w, bias, a, b, 2.0)
    y, s = run_poisoned(module, xv, w, bias, av, b, 2.0, True)
    assert_close_to_ref(y, s, ref_y, ref_s, dtype, "misaligned")
    # inner stride != 1: the binding makes a contiguous copy
    xt = x.t().contiguous().t()
    assert xt.stride(1) != 1
    y, s = run_poisoned(module, xt, w, bias, a, b, 2.0, False)
    assert_close_to_ref(y, s, ref_y, ref_s, dtype, "transposed x")


@needs_cuda
@pytest.mark.cuda
def test_lora_only_without_weight_and_backend_entry_points(module):
    M, K, N, r = 2, 512, 96, 8
    x, w, bias, a, b = make_inputs(M, K, N, r, torch.bfloat16, torch.bfloat16, False, seed=3)
    ref_y, ref_s = reference(x, None, None, a, b, 1.5)
    y, s = run_poisoned(module, x, None, None, a, b, 1.5, True)
    assert_close_to_ref(y, s, ref_y, ref_s, torch.bfloat16, "weight=None")

    call = LoraCall(x, Base.dense(w), (Adapter(a, b, 1.5),))
    assert cuda_backend.supports(call) is None
    y, s = cuda_backend.forward(call)
    ref_y, ref_s = reference(x, w, None, a, b, 1.5)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32 and y.shape == (M, N) and s.shape == (M, r)
    assert_close_to_ref(y, s, ref_y, ref_s, torch.bfloat16, "forward")
    assert "M <= 8" in cuda_backend.supports(call.replace(x=torch.zeros(9, K, device="cuda", dtype=torch.bfloat16)))
    assert "dropout" in cuda_backend.supports(call.replace(adapters=(Adapter(a, b, 1.5, 0.1),)))
    assert "exactly one adapter" in cuda_backend.supports(call.replace(adapters=(Adapter(a, b, 1.5),) * 2))


# ---- CPU: no GPU needed -----------------------------------------------------------------------------

def test_supports_rejects_cpu_tensors_and_import_is_cpu_safe():
    x = torch.randn(1, 16, dtype=torch.bfloat16)
    reason = cuda_backend.supports(LoraCall(x, Base.none(), (Adapter(torch.randn(2, 16), torch.randn(8, 2), 1.0),)))
    assert isinstance(reason, str) and "CUDA" in reason


def test_shape_reasons_name_the_problem():
    K, N, r = 16, 8, 4
    x = torch.randn(3, K, dtype=torch.float16)
    a, b = torch.randn(r, K), torch.randn(N, r)
    w = torch.randn(N, K, dtype=torch.float16)
    assert cuda_backend._shape_reason(x, w, None, a, b) is None
    assert "r <= 128" in cuda_backend._shape_reason(x, w, None, torch.randn(129, K), torch.randn(N, 129))
    assert "float16 or bfloat16" in cuda_backend._shape_reason(x.float(), None, None, a, b)
    assert "bias must be in torch.float16" in cuda_backend._shape_reason(x, w, torch.randn(N), a, b)
    assert "share" in cuda_backend._shape_reason(x, w, None, a, b.half())


def test_lora_bwd_matches_autograd():
    torch.manual_seed(0)
    M, K, N, r, scale = 3, 24, 10, 4, 0.5
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(N, K, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(N, r, dtype=torch.float64, requires_grad=True)
    s = x @ a.t()
    y = x @ w.t() + scale * s @ b.t()
    dy = torch.randn(M, N, dtype=torch.float64)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), dy)
    call = LoraCall(x.detach(), Base.dense(w.detach()), (Adapter(a.detach(), b.detach(), scale),))
    dx, (da,), (db,) = cuda_backend.backward(call, dy, s.detach(), True, [True], [True])
    for got, want, name in ((dx, gx, "dX"), (da, ga, "dA"), (db, gb, "dB")):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    dx, (da,), (db,) = cuda_backend.backward(call.replace(base=Base.none()), dy, s.detach(), True, [False], [False])
    assert da is None and db is None
    torch.testing.assert_close(dx, scale * (dy @ b.detach()) @ a.detach(), rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.cuda
def test_dispatch_picks_cuda_for_decode_through_fastpeft_ops(module, monkeypatch):
    from fastpeft import ops

    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    M, K, N, r = 4, 256, 128, 8
    x, w, bias, a, b = make_inputs(M, K, N, r, torch.bfloat16, torch.float32, True, seed=11)
    assert ops.current_backend(x, w, bias, a, b) == "cuda"
    y = ops.lora_linear(x.view(2, 2, K), w, bias, a, b, 0.5)
    ref_y, ref_s = reference(x, w, bias, a, b, 0.5)
    assert y.shape == (2, 2, N) and y.dtype == torch.bfloat16
    # the op's own S (what backward uses) as well as Y
    y2, s = torch.ops.fastpeft.lora_fwd(x, w, bias, [], "", [], [a], [b], [0.5], [0.0], [None], None, None)
    torch.testing.assert_close(y2, y.reshape(M, N), rtol=0, atol=0)
    assert_close_to_ref(y2, s, ref_y, ref_s, torch.bfloat16, "fastpeft.ops.lora_linear")
    assert ops.current_backend(torch.zeros(16, K, device="cuda", dtype=torch.bfloat16), w, bias, a, b) != "cuda"


@needs_cuda
@pytest.mark.cuda
def test_binding_rejects_bad_inputs_by_name(module):
    x, w, bias, a, b = make_inputs(2, 64, 32, 4, torch.float16, torch.float32, True)
    with pytest.raises(RuntimeError, match="weight must be"):
        cuda_backend.gemv(x, w[:, :60], None, a, b, 1.0)
    with pytest.raises(RuntimeError, match="lora_A and lora_B must share"):
        cuda_backend.gemv(x, w, None, a, b.half(), 1.0)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        cuda_backend.gemv(x, w, None, a.cpu(), b, 1.0)
    with pytest.raises(RuntimeError, match="out must be"):
        cuda_backend.gemv(x, w, None, a, b, 1.0, out=torch.empty(2, 31, device="cuda", dtype=torch.float16))
