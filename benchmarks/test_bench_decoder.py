"""A small Llama-style decoder, training step (forward + loss + backward): fastpeft vs. HF peft vs. the
frozen base. extra_info carries tokens/s, saved-for-backward bytes and (CUDA) peak memory."""
import pytest
import torch

from fastpeft.bench.models import IMPLS, DecoderCase, build_decoder
from fastpeft.bench.timing import cuda_peak_memory, saved_bytes

from bench_common import CUDA, DEVICE, run_pedantic

if CUDA:
    CASE = DecoderCase(hidden=2048, intermediate=5504, layers=4, heads=16, kv_heads=16, vocab=32000, seq=1024,
                       batch=4, r=16, dtype=torch.bfloat16, dropout=0.1)
    ROUNDS, WARMUP = 10, 3
else:
    CASE = DecoderCase(hidden=256, intermediate=688, layers=2, heads=4, kv_heads=4, vocab=2048, seq=128, batch=2,
                       r=16, dtype=torch.float32, dropout=0.1)
    ROUNDS, WARMUP = 4, 1

_cache = {}


def _benches():
    if "b" not in _cache:
        _cache["b"] = build_decoder(CASE, DEVICE)
    return _cache["b"]


@pytest.mark.parametrize("mode", ["fwd", "step"])
@pytest.mark.parametrize("impl", IMPLS)
def test_decoder(benchmark, impl, mode):
    benches, info = _benches()
    bench = benches[impl]
    benchmark.group = f"decoder {CASE.label()} {mode}"
    extra = dict(impl=impl, mode=mode, tokens=CASE.tokens, device=str(DEVICE), **CASE.to_dict(),
                 saved_bytes=saved_bytes(bench.forward, exclude=bench.state),
                 logits_rel_diff=info["fastpeft_vs_peft_logits_rel_diff"], **bench.extra)
    if CUDA and mode == "step":
        with cuda_peak_memory(DEVICE) as mem:
            bench.step()
        extra["peak_mem_bytes"] = mem["peak_bytes"]
    benchmark.extra_info.update(extra)
    fn = bench.forward if mode == "fwd" else bench.step
    run_pedantic(benchmark, fn, bench.grad_tensors, ROUNDS, WARMUP)
    if mode == "step" and benchmark.stats is not None:
        benchmark.extra_info["tokens_per_s"] = CASE.tokens / benchmark.stats.stats.median
    tol = 1e-4 if CASE.dtype == torch.float32 else 5e-2
    assert info["fastpeft_vs_peft_logits_rel_diff"] < tol
