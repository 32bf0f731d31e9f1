"""One LoRA linear layer: fastpeft vs. HF peft vs. the frozen base layer (x requires grad)."""
import pytest
import torch

from fastpeft.bench.models import IMPLS, LayerCase, build_layer
from fastpeft.bench.timing import saved_bytes

from bench_common import CUDA, DEVICE, run_pedantic

if CUDA:
    SHAPES = [(m, 4096, 4096) for m in (1, 16, 512, 4096)]
    RANKS = (16, 64)
    DTYPE = torch.bfloat16
    ROUNDS, WARMUP = 30, 5
else:
    SHAPES = [(16, 512, 512), (512, 1024, 1024)]
    RANKS = (16,)
    DTYPE = torch.float32
    ROUNDS, WARMUP = 8, 2
DROPOUT = 0.1

_cache = {}


def _benches(M, K, N, r):
    # Keep only the latest case alive: the three rows of one case share its inputs, and the headline
    # shapes would otherwise pile up on the GPU.
    key = (M, K, N, r)
    if key not in _cache:
        _cache.clear()
        if CUDA:
            torch.cuda.empty_cache()
        _cache[key] = build_layer(LayerCase(M, K, N, r, DTYPE, DROPOUT), DEVICE)
    return _cache[key]


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_lora_layer(benchmark, impl, mode, M, K, N, r):
    benches, info = _benches(M, K, N, r)
    bench = benches[impl]
    case = LayerCase(M, K, N, r, DTYPE, DROPOUT)
    benchmark.group = f"layer {case.label()} {mode}"
    benchmark.extra_info.update(impl=impl, mode=mode, M=M, K=K, N=N, r=r, dropout=DROPOUT,
                                dtype=str(DTYPE).replace("torch.", ""), device=str(DEVICE),
                                saved_bytes=saved_bytes(bench.forward, exclude=bench.state),
                                fastpeft_backend=info.get("fastpeft_backend"),
                                fastpeft_vs_peft_rel_diff=info["fastpeft_vs_peft_rel_diff"])
    fn = bench.forward if mode == "fwd" else bench.step
    run_pedantic(benchmark, fn, bench.grad_tensors, ROUNDS, WARMUP)
    # Both adapters hold the same weights: a timing of a wrong result is worth nothing.
    tol = 1e-5 if DTYPE == torch.float32 else 2e-2
    assert info["fastpeft_vs_peft_rel_diff"] < tol
