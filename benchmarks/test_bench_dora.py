"""DoRA vs. LoRA, fastpeft vs. HF peft: forward+backward of one linear layer (x requires grad), at dropout 0
and 0.1. The four rows of a case share A and B (DoRA's magnitude on top; fastpeft.bench.models.DORA_IMPLS),
so DoRA's cost is the difference to the same library's LoRA row of the same group.

pytest-benchmark times one row after another; `fastpeft bench --dora` times the same rows round-robin in
one process and prints the DoRA/LoRA ratios and the extra costs, which is the comparison to trust on a
busy CPU. CUDA: the issue's shape, M = K = N = 4096, r = 16, bf16. CPU: M = K = N = 2048, r = 16, fp32
(the `fastpeft bench --dora` default).
"""
import pytest
import torch

from fastpeft.bench.dora import CPU_SHAPES, CUDA_SHAPES
from fastpeft.bench.models import DORA_IMPLS, LayerCase, build_layer
from fastpeft.bench.timing import saved_bytes

from bench_common import CUDA, DEVICE, run_pedantic

if CUDA:
    SHAPES, DTYPE = CUDA_SHAPES, torch.bfloat16
    ROUNDS, WARMUP = 30, 5
else:
    SHAPES, DTYPE = CPU_SHAPES, torch.float32
    ROUNDS, WARMUP = 8, 2
RANK = 16
DROPOUTS = (0.0, 0.1)
VARIANTS = tuple(n for n in DORA_IMPLS if n != "base")  # fastpeft, fastpeft_dora, peft, peft_dora

_cache = {}


def _benches(M, K, N, dropout):
    # One case alive at a time: its four models and inputs (at 4096^2 a copy of W per row on the GPU).
    key = (M, K, N, dropout)
    if key not in _cache:
        _cache.clear()
        if CUDA:
            torch.cuda.empty_cache()
        _cache[key] = build_layer(LayerCase(M, K, N, RANK, DTYPE, dropout), DEVICE, dora=True)
    return _cache[key]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("dropout", DROPOUTS)
@pytest.mark.parametrize("impl", VARIANTS)
def test_dora_layer(benchmark, impl, dropout, M, K, N):
    benches, info = _benches(M, K, N, dropout)
    bench = benches[impl]
    case = LayerCase(M, K, N, RANK, DTYPE, dropout)
    benchmark.group = f"dora layer {case.label()} dropout={dropout} fwd_bwd"
    benchmark.extra_info.update(impl=impl, dora=impl.endswith("_dora"), mode="fwd_bwd", M=M, K=K, N=N, r=RANK,
                                dropout=dropout, dtype=str(DTYPE).replace("torch.", ""), device=str(DEVICE),
                                saved_bytes=saved_bytes(bench.forward, exclude=bench.state),
                                fastpeft_backend=info.get("fastpeft_backend"),
                                fastpeft_dora_vs_peft_dora_rel_diff=info["fastpeft_dora_vs_peft_dora_rel_diff"])
    run_pedantic(benchmark, bench.step, bench.grad_tensors, ROUNDS, WARMUP)
    # Same weights in both libraries' rows: a timing of a wrong result is worth nothing.
    tol = 1e-5 if DTYPE == torch.float32 else 2e-2
    assert info["fastpeft_vs_peft_rel_diff"] < tol
    assert info["fastpeft_dora_vs_peft_dora_rel_diff"] < tol
