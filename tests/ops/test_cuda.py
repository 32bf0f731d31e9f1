"""fastpeft.ops on a CUDA device (run by benchmarks/device_check.sh; skipped without a GPU)."""
from __future__ import annotations

import math

import pytest
import torch

from fastpeft.ops import current_backend, lora_linear

from _support.reference import TOL, check_mask_consistency, run_and_compare

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _make(M, K, N, r, dtype, lora_dtype=None, bias=True):
    g = torch.Generator().manual_seed(M * 7 + K)
    lora_dtype = lora_dtype or dtype

    def rnd(*shape, s=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * s).to(device="cuda", dtype=dt)

    x = rnd(M, K).requires_grad_(True)
    W = rnd(N, K, s=1 / math.sqrt(K))
    b = rnd(N) if bias else None
    A = rnd(r, K, s=1 / math.sqrt(K), dt=lora_dtype).requires_grad_(True)
    B = rnd(N, r, s=1 / math.sqrt(r), dt=lora_dtype).requires_grad_(True)
    return x, W, b, A, B


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 4096, 4096, 16), (37, 257, 131, 64), (512, 1024, 1024, 128)],
                         ids=lambda s: "M{}K{}N{}r{}".format(*s))
def test_cuda_matches_float64_reference(monkeypatch, backend, dtype, shape):
    if backend == "torch":
        monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    else:
        monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    x, W, b, A, B = _make(*shape, dtype)
    # tf32 may be on for fp32 GEMMs on the GPU: allow the 16-bit tolerance there.
    tol = TOL[torch.bfloat16] if dtype == torch.float32 else TOL[dtype]
    run_and_compare(x, W, b, A, B, 0.5, 0.0, tol)
    print("backend", current_backend(x, W, b, A, B))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cuda_dropout_fwd_bwd_same_mask(monkeypatch, backend):
    if backend == "torch":
        monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    else:
        monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    check_mask_consistency("cuda")


def test_cuda_torch_backend_dropout_matches_reference(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    x, W, b, A, B = _make(45, 96, 80, 8, torch.bfloat16, torch.float32)
    run_and_compare(x, W, b, A, B, 2.0, 0.1, TOL[torch.bfloat16])


def test_cuda_fp32_adapters_bf16_input_auto():
    x, W, b, A, B = _make(64, 512, 384, 16, torch.bfloat16, torch.float32)
    run_and_compare(x, W, b, A, B, 2.0, 0.0, TOL[torch.bfloat16])


def test_cuda_compile_fullgraph():
    W = torch.randn(64, 64, device="cuda") / 8
    A = torch.randn(8, 64, device="cuda", requires_grad=True)
    B = torch.randn(64, 8, device="cuda", requires_grad=True)

    def f(x):
        return lora_linear(torch.relu(lora_linear(x, W, None, A, B, 0.5)), W, None, A, B, 0.5)

    x = torch.randn(4, 9, 64, device="cuda")
    ye = f(x)
    ye.sum().backward()
    ge = (A.grad.clone(), B.grad.clone())
    A.grad = B.grad = None
    yc = torch.compile(f, fullgraph=True)(x)
    yc.sum().backward()
    torch.testing.assert_close(yc, ye, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(A.grad, ge[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(B.grad, ge[1], rtol=1e-3, atol=1e-3)
