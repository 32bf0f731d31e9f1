"""LoRA linear over a quantized base weight (QLoRA): fastpeft vs. the 16-bit base + LoRA vs. bitsandbytes + peft.

Rows per (format, M): `fastpeft` (fastpeft.ops.lora_quant_linear: W dequantized in registers inside
the fused GEMM on CUDA; dequantize + matmul on the CPU torch backend), `base16` (the same layer with an
unquantized 16-bit W: F.linear + the LoRA branch, what peft computes without quantization) and, where
bitsandbytes' CUDA kernels import, `bnb_peft` (peft LoRA on a bitsandbytes Linear4bit nf4 /
Linear8bitLt int8 layer; bitsandbytes has no int4-with-zeros format, so int4 has no such row).
On CUDA: decode M in {1, 4, 16} and prefill M = 4096 (forward, and forward + backward for the
QLoRA training step), K = N = 4096, r = 16, bf16. Without a GPU a tiny fp32 set.
"""
import pytest
import torch
import torch.nn.functional as F

from bench_common import CUDA, DEVICE, run_pedantic

from fastpeft.ops import lora_quant_linear
from fastpeft.quant.formats import dequantize, quantize_weight

FORMATS = ("nf4", "int4", "int8")
if CUDA:
    SHAPES = [(m, 4096, 4096) for m in (1, 4, 16, 4096)]
    R, DTYPE = 16, torch.bfloat16
    ROUNDS, WARMUP = 30, 5
else:
    SHAPES = [(1, 256, 256), (16, 256, 256)]
    R, DTYPE = 16, torch.float32
    ROUNDS, WARMUP = 5, 1
IMPLS = ("fastpeft", "base16", "bnb_peft")
SCALE = 2.0


def _bnb_reason():
    if not CUDA:
        return "bitsandbytes + peft rows need CUDA"
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except Exception as e:  # missing or without CUDA kernels
        return f"bitsandbytes/peft not importable: {type(e).__name__}: {e}"
    return None


class _One(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _bnb_peft(fmt, w, a, b):
    """peft LoRA (same A, B, scale) on a bitsandbytes layer holding w; None when bnb has no such format."""
    import bitsandbytes as bnb
    import peft

    n, k = w.shape
    if fmt == "nf4":
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=DTYPE, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w.to(DTYPE).cpu(), requires_grad=False, quant_type="nf4")
    elif fmt == "int8":
        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(w.to(DTYPE).cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        return None
    model = _One(layer).to(DEVICE)  # moving to CUDA quantizes
    cfg = peft.LoraConfig(r=a.shape[0], lora_alpha=SCALE * a.shape[0], target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        mod = model.base_model.model.proj
        mod.lora_A["default"].weight.copy_(a)
        mod.lora_B["default"].weight.copy_(b)
    return model


_cache = {}


def _case(fmt, M, K, N):
    key = (fmt, M, K, N)
    if key not in _cache:
        _cache.clear()
        if CUDA:
            torch.cuda.empty_cache()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(N, K, generator=g) * 0.02
        qw = quantize_weight(w.to(DEVICE), fmt, blocksize=64, group_size=128)
        w16 = dequantize(qw, DTYPE)  # the 16-bit base is the dequantized weight: same function, comparable
        a = (torch.randn(R, K, generator=g) * 0.02).to(DEVICE).requires_grad_()
        b = (torch.randn(N, R, generator=g) * 0.02).to(DEVICE).requires_grad_()
        xs = [(torch.randn(M, K, generator=g)).to(DEVICE, DTYPE).requires_grad_() for _ in range(4)]
        _cache[key] = dict(qw=qw, w16=w16, a=a, b=b, xs=xs, bnb=None)
    return _cache[key]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_lora_layer(benchmark, fmt, impl, mode, M, K, N):
    if mode == "fwd_bwd" and M < 4096 and CUDA:
        pytest.skip("forward + backward is timed at the prefill / training shape only")
    c = _case(fmt, M, K, N)
    qw, w16, a, b, xs = c["qw"], c["w16"], c["a"], c["b"], c["xs"]
    if impl == "fastpeft":
        def fwd(x):
            return lora_quant_linear(x, qw, None, a, b, SCALE)
    elif impl == "base16":
        def fwd(x):
            return F.linear(x, w16) + SCALE * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
    else:
        reason = _bnb_reason()
        if reason:
            pytest.skip(reason)
        if c["bnb"] is None:
            c["bnb"] = _bnb_peft(fmt, dequantize(qw, torch.float32), a.detach(), b.detach())
        if c["bnb"] is None:
            pytest.skip(f"bitsandbytes has no {fmt} layer")
        model = c["bnb"]

        def fwd(x):
            return model(x)

    # a timing of a wrong result is worth nothing: check against float64 dequantize-then-matmul
    x0 = xs[0].detach()
    ref = x0.double() @ dequantize(qw, torch.float64).T + SCALE * (x0.double() @ a.detach().double().T) @ \
        b.detach().double().T
    got = fwd(x0).detach().double()
    err = ((got - ref).norm() / ref.norm()).item()
    # bnb int8 (LLM.int8 re-quantizes activations) is an approximation of the same layer, not an equal
    tol = 1e-5 if DTYPE == torch.float32 else (0.1 if impl == "bnb_peft" and fmt == "int8" else 3e-2)
    assert err < tol, f"{impl} {fmt}: relative error {err:.3g} vs float64 reference"

    counter = [0]
    grads = [a, b, *xs]

    def forward():
        counter[0] += 1
        with torch.no_grad():
            return fwd(xs[counter[0] % len(xs)])

    def step():
        counter[0] += 1
        x = xs[counter[0] % len(xs)]
        fwd(x).float().sum().backward()

    benchmark.group = f"quant {fmt} M={M} K={K} N={N} r={R} {mode}"
    benchmark.extra_info.update(impl=impl, fmt=fmt, mode=mode, M=M, K=K, N=N, r=R, rel_err=err,
                                dtype=str(DTYPE).replace("torch.", ""), device=str(DEVICE))
    run_pedantic(benchmark, forward if mode == "fwd" else step, grads, ROUNDS, WARMUP)
