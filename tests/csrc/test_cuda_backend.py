"""The `cuda` backend (csrc fused LoRA decode GEMV) against a float64 reference.

CUDA tests build csrc just in time (about a minute, cached) and run on a GPU machine via
benchmarks/device_check.sh; the CPU tests check the parts that need no GPU: supports() reasons, the
arguments forward() hands the kernel, and the torch-math backward (plain LoRA, DoRA and mixed batches).
Mixed batches (each row its own adapter, csrc's BGMV kernels) are checked against the torch backend's
_mixed_forward in float64, for M in {1, 3, 8}, mixed ranks with rank 0 and -1 rows, bias on and off, and for
bitwise determinism across runs.
"""
import dataclasses
import math
import re

import pytest
import torch

from fastpeft.ops import Adapter, Base, LoraCall, RowPlan, cuda_backend, dora, torch_backend
from fastpeft.ops.contract import DORA_EPS

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


def run_poisoned(mod, x, w, bias, a, b, scale, use_pdl, col_scale=None):
    M, N, r = x.shape[0], b.shape[0], a.shape[0]
    y = torch.full((M, N), float("nan"), device=x.device, dtype=x.dtype)
    s = torch.full((M, r), float("nan"), device=x.device, dtype=torch.float32)
    y2, s2 = cuda_backend.gemv(x, w, bias, a, b, scale, use_pdl, out=y, s_out=s, col_scale=col_scale)
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
    y2, s, _ = torch.ops.fastpeft.lora_fwd(x, w, bias, [], "", [], [a], [b], [0.5], [0.0], [None], [None], None,
                                           None, None, [], [], 0)
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
    with pytest.raises(RuntimeError, match=r"col_scale must be \[N=32\]"):
        cuda_backend.gemv(x, w, None, a, b, 1.0, col_scale=torch.ones(31, device="cuda"))
    with pytest.raises(RuntimeError, match="col_scale must be float32"):
        cuda_backend.gemv(x, w, None, a, b, 1.0, col_scale=torch.ones(32, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match="col_scale must be a CUDA tensor"):
        cuda_backend.gemv(x, w, None, a, b, 1.0, col_scale=torch.ones(32))


# ---- DoRA: the output column scale g in the GEMV epilogue --------------------------------------------

def dora_call(x, w, bias, a, b, scale, seed=0):
    """A DoRA call as fastpeft.ops.lora hands it to a backend: n = ||W + s B A||_row from dora.weight_norm,
    and a magnitude m = n * U(0.5, 1.5) (fp32, as peft keeps it), so g = m / n spans [0.5, 1.5]."""
    n = dora.weight_norm(Base.dense(w), a, b, scale)
    g = torch.Generator(device=x.device).manual_seed(seed)
    m = n * (0.5 + torch.rand(n.shape, generator=g, device=x.device))
    return LoraCall(x, Base.dense(w, bias), (Adapter(a, b, scale, 0.0, m, n),))


def with_magnitude(call, m):
    return call.replace(adapters=(dataclasses.replace(call.adapters[0], magnitude=m),))


def dora_reference(call):
    """float64 (Y, S): the torch backend (the oracle) on a float64 copy of the call."""
    a = call.adapters[0]

    def d(t):
        return None if t is None else t.double()

    call64 = LoraCall(d(call.x), Base.dense(d(call.base.weight), d(call.base.bias)),
                      (Adapter(d(a.A), d(a.B), a.scale, 0.0, d(a.magnitude), d(a.weight_norm)),))
    y, s = torch_backend.forward(call64)
    assert y.dtype == torch.float64 and s.dtype == torch.float64
    return y, s


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("K,N", [(4096, 4096), (4099, 4101)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ab_fp32", [True, False])
def test_dora_decode_matches_float64_reference(module, K, N, dtype, ab_fp32):
    ab_dtype = torch.float32 if ab_fp32 else dtype
    for M in (1, 3):
        for r in (1, 16, 128):
            for with_bias in (False, True):
                x, w, bias, a, b = make_inputs(M, K, N, r, dtype, ab_dtype, with_bias, seed=M * 1000 + r + 7)
                call = dora_call(x, w, bias, a, b, 0.75, seed=M + r)
                assert cuda_backend.supports(call) is None, cuda_backend.supports(call)
                ref_y, ref_s = dora_reference(call)
                g = cuda_backend.col_scale_arg(call)
                assert g.dtype == torch.float32 and g.is_contiguous() and g.shape == (N,) and g.device == x.device
                what = f"DoRA M={M} K={K} N={N} r={r} {dtype} ab={ab_dtype} bias={with_bias}"
                for use_pdl in (True, False):
                    y, s = run_poisoned(module, x, w, bias, a, b, 0.75, use_pdl, col_scale=g)
                    assert_close_to_ref(y, s, ref_y, ref_s, dtype, f"{what} pdl={use_pdl}")
                y, s = cuda_backend.forward(call)  # the backend entry point passes call.col_scale() itself
                assert y.dtype == dtype and s.dtype == torch.float32 and y.shape == (M, N) and s.shape == (M, r)
                assert_close_to_ref(y, s, ref_y, ref_s, dtype, f"{what} forward()")
                # g really is applied: the same call without the magnitude is plain LoRA and differs
                y_plain, _ = cuda_backend.gemv(x, w, bias, a, b, 0.75)
                assert not torch.equal(y_plain, y), what


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dora_zero_rows_with_zero_magnitude_give_the_bias_not_nan(module, dtype, with_bias):
    """Rows where W and B are zero (peft's init for B; Llama's o_proj has all-zero rows of W) have n = 0 and
    m = 0: g = 0 / max(0, EPS) = 0, so the kernel must write the bias (or 0) there, never NaN."""
    K, N, r = 1024, 96, 8
    zero = torch.tensor([0, 17, N - 1], device="cuda")
    for M in (1, 3):
        x, w, bias, a, b = make_inputs(M, K, N, r, dtype, torch.float32, with_bias, seed=50 + M)
        w[zero] = 0
        b[zero] = 0
        call = dora_call(x, w, bias, a, b, 2.0, seed=M)
        assert (call.adapters[0].weight_norm[zero] == 0).all()
        m = call.adapters[0].magnitude.clone()
        m[zero] = 0
        call = with_magnitude(call, m)
        g = cuda_backend.col_scale_arg(call)
        assert torch.isfinite(g).all() and (g[zero] == 0).all()
        assert cuda_backend.supports(call) is None
        ref_y, ref_s = dora_reference(call)
        want = (bias[zero] if with_bias else torch.zeros(len(zero), device="cuda", dtype=dtype)).expand(M, -1)
        for use_pdl in (True, False):
            y, s = run_poisoned(module, x, w, bias, a, b, 2.0, use_pdl, col_scale=g)
            assert_close_to_ref(y, s, ref_y, ref_s, dtype, f"zero rows M={M} bias={with_bias} pdl={use_pdl}")
            assert torch.equal(y[:, zero], want), f"zero rows M={M}: {y[:, zero]} != {want}"
        y, s = cuda_backend.forward(call)
        assert torch.isfinite(y).all() and torch.equal(y[:, zero], want)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dora_decode_through_fastpeft_ops_runs_cuda_forward_and_matching_grads(module, monkeypatch, dtype):
    """fastpeft.ops.lora with a magnitude at M = 3 dispatches forward and backward to the cuda backend;
    Y and the grads of x, A, B, m match peft's formula in float64 (the backward is the torch backend's
    _dora_backward, run from the cuda backend's backward on the kernel's S and Y)."""
    from fastpeft import ops
    from fastpeft.ops import dispatch

    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    M, K, N, r, scale = 3, 512, 384, 16, 0.5
    x, w, bias, a, b = make_inputs(M, K, N, r, dtype, torch.float32, True, seed=13)
    n = dora.weight_norm(Base.dense(w), a, b, scale)
    m = n * 1.3
    m[5] = 0.0  # a zero magnitude: dora.magnitude_grad takes Z from W's rows there
    call = LoraCall(x, Base.dense(w, bias), (Adapter(a, b, scale, 0.0, m, n),))
    assert dispatch.choose(call) == "cuda"

    ran = []
    for name in ("forward", "backward"):
        real = getattr(cuda_backend, name)
        monkeypatch.setattr(cuda_backend, name, lambda *args, _real=real, _name=name: ran.append(_name) or _real(*args))
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b, m)]
    y = ops.lora(leaves[0].view(1, M, K), Base.dense(w, bias), [Adapter(leaves[1], leaves[2], scale, 0.0, leaves[3])])
    dy = torch.randn(1, M, N, device="cuda", dtype=dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    assert ran == ["forward", "backward"], ran

    refs = [t.detach().double().requires_grad_(True) for t in (x, a, b, m)]
    xr, ar, br, mr = refs
    g = mr / n.double().clamp_min(DORA_EPS)  # n detached, peft's semantics
    y_ref = g * (xr @ w.double().t() + scale * (xr @ ar.t()) @ br.t()) + bias.double()
    grads_ref = torch.autograd.grad(y_ref, refs, dy.reshape(M, N).double())
    tol = {torch.bfloat16: 1e-2, torch.float16: 5e-3}[dtype]

    def rel(got, want):
        assert torch.isfinite(got).all()
        return ((got.double() - want).norm() / want.norm()).item()

    assert y.shape == (1, M, N) and y.dtype == dtype
    assert rel(y.reshape(M, N), y_ref) < tol
    for name, got, want in zip(("x", "lora_A", "lora_B", "magnitude"), grads, grads_ref):
        assert got.dtype == (dtype if name == "x" else torch.float32), (name, got.dtype)  # each leaf's dtype
        assert rel(got, want) < tol, f"grad {name}: relative error {rel(got, want)}"


# ---- CPU: supports() reasons and forward()'s kernel arguments for DoRA ----------------------------------

def _cpu_dora_call(M=2, K=16, N=8, r=4, p=0.0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    a, b = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)
    n = dora.weight_norm(Base.dense(w), a, b, 0.5)
    return LoraCall(x, Base.dense(w, torch.randn(N, generator=g).to(dtype)), (Adapter(a, b, 0.5, p, n * 1.1, n),))


def test_dora_call_reasons_without_a_gpu():
    call = _cpu_dora_call()
    assert cuda_backend._call_reason(call) is None  # DoRA without dropout: the kernel runs it
    assert "CUDA" in cuda_backend.supports(call)  # on CPU tensors the device rule comes first
    reason = cuda_backend._call_reason(_cpu_dora_call(p=0.1))
    assert "DoRA" in reason and "dropout" in reason
    a = call.adapters[0]
    plain = dataclasses.replace(a, magnitude=None, weight_norm=None)
    assert "exactly one adapter" in cuda_backend._call_reason(call.replace(adapters=(plain, plain)))
    assert "dropout" in cuda_backend._call_reason(call.replace(adapters=(dataclasses.replace(plain, dropout_p=0.2),)))
    assert "weight_norm" in cuda_backend._call_reason(call.replace(adapters=(dataclasses.replace(a, weight_norm=None),)))
    meta = dataclasses.replace(a, magnitude=a.magnitude.to("meta"))
    assert "magnitude is on meta" in cuda_backend._call_reason(call.replace(adapters=(meta,)))


def test_stale_module_without_col_scale_refuses_dora_only():
    call = _cpu_dora_call()
    plain = call.replace(adapters=(dataclasses.replace(call.adapters[0], magnitude=None, weight_norm=None),))

    class Old:  # an ahead-of-time fastpeft._C built before the column scale: no FEATURES
        pass

    class New:
        FEATURES = ("col_scale",)

    assert "col_scale" in cuda_backend._module_reason(Old(), call)
    assert cuda_backend._module_reason(Old(), plain) is None
    assert cuda_backend._module_reason(New(), call) is None
    assert cuda_backend._module_reason("no nvcc", call) == "no nvcc"


def test_forward_passes_dora_col_scale_to_the_kernel(monkeypatch):
    seen = {}

    def fake_gemv(x2d, weight, bias, A, B, scale, use_pdl=None, out=None, s_out=None, col_scale=None):
        seen.update(x=x2d, weight=weight, bias=bias, A=A, B=B, scale=scale, col_scale=col_scale)
        return "Y", "S"

    monkeypatch.setattr(cuda_backend, "gemv", fake_gemv)
    call = _cpu_dora_call()
    assert cuda_backend.forward(call) == ("Y", "S")
    g = seen["col_scale"]
    assert g.dtype == torch.float32 and g.is_contiguous() and g.device == call.x.device
    torch.testing.assert_close(g, call.col_scale(), rtol=0, atol=0)
    assert seen["x"] is call.x and seen["weight"] is call.base.weight and seen["bias"] is call.base.bias
    a = call.adapters[0]
    # float64 magnitudes: g rounded to the kernel's fp32
    cuda_backend.forward(call.replace(adapters=(dataclasses.replace(a, magnitude=a.magnitude.double()),)))
    assert seen["col_scale"].dtype == torch.float32
    # plain LoRA: no column scale argument at all
    cuda_backend.forward(call.replace(adapters=(dataclasses.replace(a, magnitude=None, weight_norm=None),)))
    assert seen["col_scale"] is None


def test_dora_backward_is_the_torch_backends():
    """The cuda backend's backward of a DoRA decode call is torch_backend's (_dora_backward: the LoRA
    backward on g * dY) and matches autograd of g * (x W^T + s x A^T B^T) in float64."""
    torch.manual_seed(1)
    M, K, N, r, scale = 3, 24, 10, 4, 0.5
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(N, K, dtype=torch.float64)
    a = torch.randn(r, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(N, r, dtype=torch.float64, requires_grad=True)
    n = dora.weight_norm(Base.dense(w), a, b, scale)
    m = n * torch.rand(N, dtype=torch.float64)
    m[2] = 0.0
    s = x @ a.t()
    y = (m / n.clamp_min(DORA_EPS)) * (x @ w.t() + scale * s @ b.t())
    dy = torch.randn(M, N, dtype=torch.float64)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), dy)
    call = LoraCall(x.detach(), Base.dense(w), (Adapter(a.detach(), b.detach(), scale, 0.0, m, n),))
    dx, (da,), (db,) = cuda_backend.backward(call, dy, s.detach(), True, [True], [True])
    for got, want, name in ((dx, gx, "dX"), (da, ga, "dA"), (db, gb, "dB")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
    want = torch_backend.backward(call, dy, s.detach(), True, [True], [True])
    got = cuda_backend.backward(call, dy, s.detach(), True, [True], [True])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1][0], want[1][0]) and torch.equal(got[2][0], want[2][0])


# ---- mixed batches (BGMV): every row its own adapter ---------------------------------------------------

MIXED_SCALES = (0.75, 1.5, 0.5, 2.0, 0.25, 1.25, 1.0, 0.6)


def mixed_call(M, K, N, ranks, row_index, dtype, ab_dtype, with_bias, device="cuda", seed=0, base=True):
    """A mixed-batch LoraCall as fastpeft.ops hands it to a backend: adapter k has rank ranks[k] (0 allowed) and
    scale MIXED_SCALES[k]; row i takes adapter row_index[i] (-1: the base alone)."""
    x, w, bias, _, _ = make_inputs(M, K, N, 1, dtype, ab_dtype, with_bias, device=device, seed=seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    adapters = []
    for k, r in enumerate(ranks):
        a = (torch.randn(r, K, generator=g, device=device) / math.sqrt(K)).to(ab_dtype)
        b = (torch.randn(N, r, generator=g, device=device) / math.sqrt(max(r, 1))).to(ab_dtype)
        adapters.append(Adapter(a, b, MIXED_SCALES[k]))
    plan = RowPlan.build(torch.tensor(row_index, device=device), len(ranks))
    return LoraCall(x, Base.dense(w if base else None, bias), tuple(adapters), plan=plan)


def mixed_reference(call):
    """float64 (Y, S [M, max r]): the torch backend (the oracle, _mixed_forward) on a float64 copy of the call."""
    def d(t):
        return None if t is None else t.double()

    call64 = LoraCall(d(call.x), Base.dense(d(call.base.weight), d(call.base.bias)),
                      tuple(Adapter(d(a.A), d(a.B), a.scale) for a in call.adapters), plan=call.plan)
    y, s = torch_backend.forward(call64)
    assert y.dtype == torch.float64 and s.shape == (call.M, call.r_total)
    return y, s


def run_mixed_poisoned(call, use_pdl):
    """gemv_mixed on NaN-filled outputs (every element the kernels must write stays NaN otherwise)."""
    M, N, R = call.M, call.N, call.r_total
    y = torch.full((M, N), float("nan"), device=call.x.device, dtype=call.x.dtype)
    s = torch.full((M, R), float("nan"), device=call.x.device, dtype=torch.float32)
    y2, s2 = cuda_backend.gemv_mixed(call.x, call.base.weight, call.base.bias, *cuda_backend.mixed_args(call),
                                     use_pdl=use_pdl, out=y, s_out=s)
    assert y2.data_ptr() == y.data_ptr() and s2.data_ptr() == s.data_ptr()
    return y, s


# (ranks, row patterns): rank-0 adapters, -1 rows, adapters without rows (S is still max r wide), one row per
# adapter and several rows per adapter; M = 1, 3 and 8 (the kernel's MAX_M).
MIXED_CASES = [
    ((16, 0, 64, 1, 128, 8), [[-1], [0], [1], [4]]),
    ((16, 0, 64, 1, 128, 8), [[2, -1, 1], [0, 0, 3], [-1, -1, -1], [1, 1, 1]]),
    ((16, 0, 64, 1, 128, 8), [[0, 3, -1, 1, 2, 0, 4, 3], [5, 4, 3, 2, 1, 0, -1, 5], [2] * 8]),
    ((8, 32, 0), [[1, 0, 2], [0, 1, 0, 1, 0, 1, 0, 1]]),
    ((0, 0), [[0, -1, 1]]),  # every adapter rank 0: S has no columns, Y is the base
]


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("K,N", [(4096, 4096), (4099, 4101)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ab_fp32", [True, False])
def test_mixed_decode_matches_float64_reference(module, K, N, dtype, ab_fp32):
    ab_dtype = torch.float32 if ab_fp32 else dtype
    for ci, (ranks, patterns) in enumerate(MIXED_CASES):
        for pi, rows in enumerate(patterns):
            for with_bias in (False, True):
                call = mixed_call(len(rows), K, N, ranks, rows, dtype, ab_dtype, with_bias, seed=100 * ci + 10 * pi)
                assert cuda_backend.supports(call) is None, cuda_backend.supports(call)
                ref_y, ref_s = mixed_reference(call)
                what = f"mixed ranks={ranks} rows={rows} K={K} N={N} {dtype} ab={ab_dtype} bias={with_bias}"
                outs = []
                for use_pdl in (True, False):
                    y, s = run_mixed_poisoned(call, use_pdl)
                    assert_close_to_ref(y, s, ref_y, ref_s, dtype, f"{what} pdl={use_pdl}")
                    outs.append((y, s))
                y, s = cuda_backend.forward(call)
                assert y.dtype == dtype and s.dtype == torch.float32
                assert y.shape == (len(rows), N) and s.shape == (len(rows), call.r_total), what
                assert_close_to_ref(y, s, ref_y, ref_s, dtype, f"{what} forward()")
                # deterministic (no atomics): bitwise equal across runs and with / without PDL
                for y2, s2 in outs + [cuda_backend.forward(call)]:
                    assert torch.equal(y2, y) and torch.equal(s2, s), f"{what}: results differ between runs"
                # rows past their adapter's rank, and base rows, hold exact zeros in S
                for i, k in enumerate(rows):
                    r = ranks[k] if k >= 0 else 0
                    assert (s[i, r:] == 0).all(), f"{what}: S row {i} not zero past r={r}"


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_decode_without_weight_and_one_adapter_for_all_rows(module, dtype):
    # no base weight (LoRA terms + bias only), and a batch whose rows all take one adapter
    for rows in ([1, -1, 0], [1, 1, 1, 1]):
        for base in (False, True):
            call = mixed_call(len(rows), 1024, 300, (4, 16), rows, dtype, torch.float32, True, seed=21, base=base)
            assert cuda_backend.supports(call) is None
            ref_y, ref_s = mixed_reference(call)
            y, s = run_mixed_poisoned(call, True)
            assert_close_to_ref(y, s, ref_y, ref_s, dtype, f"rows={rows} base={base}")


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_pool_views_misaligned_and_strided_inputs(module, dtype):
    """Adapters as views of one storage (what an adapter pool hands the op: B's row stride is the storage's R,
    not r), one A starting off a 16-byte boundary (scalar shrink), and x with an odd row stride."""
    M, K, N = 5, 1032, 333
    ranks, starts = (8, 16, 0, 3), (0, 9, 25, 25)  # slot j: rank rows starts[j] : starts[j] + ranks[j]
    g = torch.Generator(device="cuda").manual_seed(5)
    R = 40
    A_all = torch.randn(R, K, generator=g, device="cuda") / math.sqrt(K)
    B_all = torch.randn(N, R, generator=g, device="cuda") / 4
    adapters = [Adapter(A_all[st:st + r], B_all[:, st:st + r], MIXED_SCALES[k])
                for k, (st, r) in enumerate(zip(starts, ranks))]
    # adapter 3's A one element past a 16-byte boundary: the shrink falls back to scalar loads for the call
    abuf = torch.zeros(3, K + 1, device="cuda")
    abuf[:, 1:] = A_all[25:28]
    adapters[3] = Adapter(abuf[:, 1:], B_all[:, 25:28], MIXED_SCALES[3])
    assert adapters[3].A.data_ptr() % 16 != 0 and adapters[1].B.stride(0) == R
    x, w, bias, _, _ = make_inputs(M, K, N, 1, dtype, torch.float32, True, seed=6)
    xbuf = torch.zeros(M, K + 3, device="cuda", dtype=dtype)
    xbuf[:, 1:K + 1] = x
    xv = xbuf[:, 1:K + 1]
    rows = [3, 1, -1, 0, 2]
    plan = RowPlan.build(torch.tensor(rows, device="cuda"), len(ranks))
    for xx in (x, xv):
        call = LoraCall(xx, Base.dense(w, bias), tuple(adapters), plan=plan)
        assert cuda_backend.supports(call) is None
        ref_y, ref_s = mixed_reference(call.replace(x=x))
        for use_pdl in (True, False):
            y, s = run_mixed_poisoned(call, use_pdl)
            assert_close_to_ref(y, s, ref_y, ref_s, dtype, f"views x_strided={xx is xv} pdl={use_pdl}")


@needs_cuda
@pytest.mark.cuda
def test_mixed_row_naming_an_adapter_outside_the_table_is_nan_not_base(module):
    """The kernel's table holds the adapters it was given; a row whose row_index names another (a stale CUDA
    graph replay) comes out NaN in Y and S, never silently as the base alone."""
    call = mixed_call(3, 512, 96, (4, 8), [0, 1, -1], torch.bfloat16, torch.float32, True, seed=9)
    ref_y, ref_s = mixed_reference(call)
    a0 = call.adapters[0]
    y, s = cuda_backend.gemv_mixed(call.x, call.base.weight, call.base.bias, [a0.A], [a0.B], [a0.scale], [0],
                                   call.plan.row_index, 8)
    assert torch.isnan(y[1]).all() and torch.isnan(s[1]).all()
    assert_close_to_ref(y[[0, 2]], s[[0, 2]], ref_y[[0, 2]], ref_s[[0, 2]], torch.bfloat16, "rows 0, 2")


@needs_cuda
@pytest.mark.cuda
def test_mixed_binding_rejects_bad_inputs_by_name(module):
    call = mixed_call(3, 64, 32, (4, 2), [0, 1, -1], torch.float16, torch.float32, True, seed=2)
    x, w, bias = call.x, call.base.weight, call.base.bias
    (a0, a1), idx = call.adapters, call.plan.row_index

    def run(As, Bs, ids, row_index=idx, s_cols=4, **kw):
        return module.lora_gemv_mixed(x, w, bias, As, Bs, [1.0] * len(As), ids, row_index, s_cols, False, **kw)

    assert run([a0.A, a1.A], [a0.B, a1.B], [0, 1])[2] == ""
    cases = [
        (run([a0.A, a1.A.half()], [a0.B, a1.B.half()], [0, 1]), "same lora_A/lora_B dtype"),
        (run([a0.A, a1.A], [a0.B, a1.B], [0, 0]), "distinct"),
        (run([a0.A, a1.A], [a0.B, a1.B], [0, -1]), "adapter_ids must be >= 0"),
        (run([a0.A], [a0.B], [0], s_cols=3), "must be <= s_cols=3"),
        (run([a0.A], [a0.B], [0], s_cols=129), r"s_cols .* must be in \[0, 128\]"),
        (run([a0.A], [a0.B], [0], row_index=idx.int()), "row_index must be int64"),
        (run([a0.A], [a0.B], [0], row_index=idx[:2]), r"row_index must be int64 \[M=3\]"),
        (run([a0.A], [a0.B], [0], row_index=idx.cpu()), "row_index must be a CUDA tensor"),
        (run([a0.A], [a0.B[:5]], [0]), r"lora_B \(adapter 0\) must be \[N=32, r=4\]"),
        (run([a0.A], [a0.B, a1.B], [0]), "one entry per adapter"),
        (run([a0.A] * 9, [a0.B] * 9, list(range(9))), "at most 8 adapters"),
        (run([a0.A], [a0.B], [0], s_out=torch.empty(3, 5, device="cuda")), r"s_out must be float32 \[M=3, s_cols=4\]"),
    ]
    for (y, s, err), want in cases:
        assert y is None and s is None and re.search(want, err), (want, err)
    with pytest.raises(RuntimeError, match="same lora_A/lora_B dtype"):
        cuda_backend.gemv_mixed(x, w, bias, [a0.A, a1.A.half()], [a0.B, a1.B.half()], [1.0, 1.0], [0, 1], idx, 4)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_decode_through_fastpeft_ops_runs_cuda_forward_and_matching_grads(module, monkeypatch, dtype):
    """fastpeft.ops.lora with row_index at M = 4 dispatches forward and backward to the cuda backend; Y and the
    grads of x and every adapter's A and B match a row-wise float64 reference (the backward is the torch
    backend's _mixed_backward on the kernel's S)."""
    from fastpeft import ops
    from fastpeft.ops import dispatch

    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    rows = [2, -1, 0, 2]
    call = mixed_call(len(rows), 512, 384, (8, 4, 16), rows, dtype, torch.float32, True, seed=31)
    assert dispatch.choose(call) == "cuda"
    ran = []
    for name in ("forward", "backward"):
        real = getattr(cuda_backend, name)
        monkeypatch.setattr(cuda_backend, name, lambda *args, _real=real, _name=name: ran.append(_name) or _real(*args))
    w, bias = call.base.weight, call.base.bias
    leaves = [call.x.detach().clone().requires_grad_(True)]
    for a in call.adapters:
        leaves += [a.A.detach().clone().requires_grad_(True), a.B.detach().clone().requires_grad_(True)]
    adapters = [Adapter(leaves[1 + 2 * k], leaves[2 + 2 * k], a.scale) for k, a in enumerate(call.adapters)]
    idx = torch.tensor(rows, device="cuda")
    y = ops.lora(leaves[0].view(2, 2, -1), Base.dense(w, bias), ops.AdapterSet(adapters, idx))
    dy = torch.randn(2, 2, w.shape[0], device="cuda", dtype=dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    assert ran == ["forward", "backward"], ran

    refs = [t.detach().double().requires_grad_(True) for t in leaves]
    out = []
    for i, k in enumerate(rows):
        yi = refs[0][i] @ w.double().t() + bias.double()
        if k >= 0:
            yi = yi + call.adapters[k].scale * (refs[0][i] @ refs[1 + 2 * k].t()) @ refs[2 + 2 * k].t()
        out.append(yi)
    y_ref = torch.stack(out)
    grads_ref = torch.autograd.grad(y_ref, refs, dy.reshape(len(rows), -1).double(), allow_unused=True)
    tol = {torch.bfloat16: 1e-2, torch.float16: 5e-3}[dtype]

    def rel(got, want):
        assert torch.isfinite(got).all()
        return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()

    assert y.shape == (2, 2, w.shape[0]) and y.dtype == dtype
    assert rel(y.reshape(len(rows), -1), y_ref) < tol
    for i, (got, want) in enumerate(zip(grads, grads_ref)):
        assert got.dtype == leaves[i].dtype, (i, got.dtype)
        if want is None:  # adapter 1 has no rows: zero gradients
            assert (got == 0).all(), i
        else:
            assert rel(got, want) < tol, f"grad {i}: relative error {rel(got, want)}"


# ---- mixed batches on CPU: refusal reasons, the table forward() hands the kernel, backward ----------------

def _cpu_mixed_call(M=None, ranks=(4, 0, 8), rows=(0, -1, 1, 2), dtype=torch.bfloat16, ab_dtypes=None,
                    dropout=None, base="dense", bias=True):
    """A mixed call on CPU tensors: by default every adapter has rows, adapter 1 of rank 0, and one -1 row."""
    M = len(rows) if M is None else M
    g = torch.Generator().manual_seed(0)
    K, N = 16, 8
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    ab_dtypes = ab_dtypes or [torch.float32] * len(ranks)
    dropout = dropout or [0.0] * len(ranks)
    ads = tuple(Adapter(torch.randn(r, K, generator=g).to(t), torch.randn(N, r, generator=g).to(t), 0.5 + k, p)
                for k, (r, t, p) in enumerate(zip(ranks, ab_dtypes, dropout)))
    plan = RowPlan.build(torch.tensor(list(rows)), len(ranks))
    return LoraCall(x, Base.dense(w if base == "dense" else None, b), ads, plan=plan)


def test_mixed_call_reasons_without_a_gpu():
    call = _cpu_mixed_call()
    assert cuda_backend._call_reason(call) is None  # several adapters, rank 0, -1 rows: the kernel runs them
    assert cuda_backend._mixed_shape_reason(call) is None
    assert "CUDA" in cuda_backend.supports(call)  # on CPU tensors the device rule comes first
    assert cuda_backend._call_reason(_cpu_mixed_call(base="none")) is None
    # zero adapters with rows (every row -1) and a plan over no adapters at all
    assert cuda_backend._call_reason(_cpu_mixed_call(rows=(-1, -1, -1))) is None
    assert cuda_backend._mixed_shape_reason(_cpu_mixed_call(rows=(-1, -1, -1))) is None
    assert cuda_backend._mixed_shape_reason(_cpu_mixed_call(ranks=(), rows=(-1, -1, -1))) is None
    # dropout / DoRA only matter on adapters that have rows in this batch
    reason = cuda_backend._call_reason(_cpu_mixed_call(dropout=[0.0, 0.1, 0.0]))
    assert "dropout" in reason and "adapter 1" in reason
    assert cuda_backend._call_reason(_cpu_mixed_call(ranks=(4, 0, 8, 2), dropout=[0, 0, 0, 0.1])) is None
    a = call.adapters[0]
    dora_a = dataclasses.replace(a, magnitude=torch.ones(8), weight_norm=torch.ones(8))
    assert "DoRA in a mixed batch" in cuda_backend._call_reason(call.replace(adapters=(dora_a,) + call.adapters[1:]))
    from fastpeft.quant.formats import quantize_weight

    packed = call.replace(base=Base.quantized(quantize_weight(call.base.weight.float(), "int8")))
    assert "quantized" in cuda_backend._call_reason(packed)


def test_mixed_shape_reasons_name_the_problem():
    assert "M <= 8" in cuda_backend._mixed_shape_reason(_cpu_mixed_call(rows=[0, 1, -1] * 3))
    assert cuda_backend._mixed_shape_reason(_cpu_mixed_call(rows=[0, 1, -1, 2, 2, 1, 0, 0])) is None
    assert "float16 or bfloat16" in cuda_backend._mixed_shape_reason(_cpu_mixed_call(dtype=torch.float32))
    # S is max r wide over all the call's adapters, with rows or not
    reason = cuda_backend._mixed_shape_reason(_cpu_mixed_call(ranks=(4, 0, 8, 129)))
    assert "r <= 128" in reason and "129" in reason
    # one A/B dtype for the adapters with rows (rank 0 included); adapter 3 has none, so its dtype does not matter
    for odd in range(3):
        ab = [torch.float32] * 3
        ab[odd] = torch.bfloat16
        reason = cuda_backend._mixed_shape_reason(_cpu_mixed_call(ab_dtypes=ab))
        assert "one lora_A/lora_B dtype" in reason, odd
    ok = _cpu_mixed_call(ranks=(4, 0, 8, 2), ab_dtypes=[torch.float32] * 3 + [torch.bfloat16])
    assert cuda_backend._mixed_shape_reason(ok) is None
    reason = cuda_backend._mixed_shape_reason(_cpu_mixed_call(dtype=torch.float16, ab_dtypes=[torch.bfloat16] * 3))
    assert "adapter 0 of the mixed batch" in reason and "share float32 or x's dtype" in reason
    call = _cpu_mixed_call()
    bad_bias = call.replace(base=Base.dense(call.base.weight, call.base.bias.float()))
    assert "bias must be in torch.bfloat16" in cuda_backend._mixed_shape_reason(bad_bias)


def test_stale_module_without_mixed_refuses_mixed_calls_only():
    call = _cpu_mixed_call()
    plain = LoraCall(call.x, call.base, call.adapters[:1])

    class Old:  # an ahead-of-time fastpeft._C built before mixed batches
        FEATURES = ("col_scale",)

    class New:
        FEATURES = ("col_scale", "mixed")

    assert "mixed" in cuda_backend._module_reason(Old(), call)
    assert cuda_backend._module_reason(Old(), plain) is None
    assert cuda_backend._module_reason(New(), call) is None
    assert "mixed" in cuda_backend._module_reason(object(), call)  # no FEATURES at all


def test_forward_passes_the_adapters_with_rows_to_the_mixed_kernel(monkeypatch):
    seen = {}

    def fake_gemv_mixed(x2d, weight, bias, As, Bs, scales, adapter_ids, row_index, s_cols, use_pdl=None, out=None,
                        s_out=None):
        seen.update(x=x2d, weight=weight, bias=bias, As=As, Bs=Bs, scales=scales, ids=adapter_ids,
                    row_index=row_index, s_cols=s_cols)
        return "Y", "S"

    def no_gemv(*args, **kwargs):
        raise AssertionError("a mixed call must not reach the single-adapter kernel")

    monkeypatch.setattr(cuda_backend, "gemv_mixed", fake_gemv_mixed)
    monkeypatch.setattr(cuda_backend, "gemv", no_gemv)
    # adapters 0 (rank 4), 2 (rank 0) and 3 (rank 8) have rows; adapter 1 (rank 16) has none
    call = _cpu_mixed_call(ranks=(4, 16, 0, 8), rows=(3, -1, 0, 2))
    assert cuda_backend.forward(call) == ("Y", "S")
    assert seen["ids"] == [0, 2, 3]
    assert [A is call.adapters[k].A for k, A in zip((0, 2, 3), seen["As"])] == [True] * 3
    assert [B is call.adapters[k].B for k, B in zip((0, 2, 3), seen["Bs"])] == [True] * 3
    assert seen["scales"] == [0.5, 2.5, 3.5] and all(type(v) is float for v in seen["scales"])
    assert seen["row_index"] is call.plan.row_index
    assert seen["s_cols"] == 16 == call.r_total  # S's width: the largest rank of the call, rows or not
    assert seen["x"] is call.x and seen["weight"] is call.base.weight and seen["bias"] is call.base.bias
    cuda_backend.forward(_cpu_mixed_call(rows=(-1, -1, -1)))
    assert seen["ids"] == [] and seen["As"] == [] and seen["s_cols"] == 8


def test_mixed_backward_is_the_torch_backends():
    """The cuda backend's backward of a mixed call is torch_backend's _mixed_backward, and matches autograd of
    the row-wise formula in float64 (adapters without rows get zero gradients)."""
    torch.manual_seed(3)
    M, K, N = 4, 12, 6
    ranks, rows = (3, 0, 5, 2), [2, -1, 0, 2]
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(N, K, dtype=torch.float64)
    As = [torch.randn(r, K, dtype=torch.float64, requires_grad=True) for r in ranks]
    Bs = [torch.randn(N, r, dtype=torch.float64, requires_grad=True) for r in ranks]
    scales = [0.5, 1.0, 1.5, 2.0]
    out = []
    for i, k in enumerate(rows):
        yi = x[i] @ w.t()
        if k >= 0:
            yi = yi + scales[k] * (x[i] @ As[k].t()) @ Bs[k].t()
        out.append(yi)
    y = torch.stack(out)
    dy = torch.randn(M, N, dtype=torch.float64)
    want = torch.autograd.grad(y, [x, *As, *Bs], dy, allow_unused=True)
    plan = RowPlan.build(torch.tensor(rows), len(ranks))
    call = LoraCall(x.detach(), Base.dense(w), tuple(Adapter(A.detach(), B.detach(), s)
                                                     for A, B, s in zip(As, Bs, scales)), plan=plan)
    _, S = torch_backend.forward(call)
    assert S.shape == (M, 5)
    n = len(ranks)
    dx, dAs, dBs = cuda_backend.backward(call, dy, S, True, [True] * n, [True] * n)
    torch.testing.assert_close(dx, want[0], rtol=1e-10, atol=1e-10)
    for k in range(n):
        for got, w_k, name in ((dAs[k], want[1 + k], "dA"), (dBs[k], want[1 + n + k], "dB")):
            w_k = torch.zeros_like(got) if w_k is None else w_k
            torch.testing.assert_close(got, w_k, rtol=1e-10, atol=1e-10, msg=f"{name}[{k}]")
    ref = torch_backend.backward(call, dy, S, True, [True] * n, [True] * n)
    assert torch.equal(dx, ref[0]) and all(torch.equal(a, b) for a, b in zip(dAs + dBs, ref[1] + ref[2]))
