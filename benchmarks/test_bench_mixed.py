"""Many adapters in one batch (peft's ``adapter_names=[...]``), fastpeft vs. HF peft: one LoRA linear layer
called with a batch whose rows each name their adapter, eval mode, torch.no_grad.

Four rows (fastpeft.bench.mixed): fastpeft and peft with the rows spread over many adapters (CPU: 32 rows over
8 adapters, 4 each, shuffled; K = N = 1024, fp32. CUDA: 64 rows over 64 adapters, K = N = 4096, bf16; r = 16),
and each with every row on one adapter (adapter_names of one name). The weights are the same in both
libraries. pytest-benchmark times one row after another; `fastpeft bench --mixed` times these rows and the
base layer round-robin in one process and prints the adapter work (row minus base) and its ratios, which is
the comparison to trust on a busy CPU.
"""
import pytest
import torch

from fastpeft.bench.mixed import build_case, default_layer_case

from bench_common import CUDA, DEVICE, run_pedantic

CASE = default_layer_case(DEVICE)
ROUNDS, WARMUP = (30, 5) if CUDA else (20, 3)
ROWS = ("fastpeft", "fastpeft_one", "peft", "peft_one")

_cache = {}


def _rows():
    if "rows" not in _cache:
        rows, models, names = build_case(CASE, DEVICE)
        with torch.no_grad():
            out = {n: rows.output[n]().float() for n in ROWS}
        _cache["rows"] = (rows, models, out)
    return _cache["rows"]


@pytest.mark.parametrize("impl", ROWS)
def test_mixed_layer(benchmark, impl):
    rows, _models, out = _rows()
    fn = rows.fns[impl]

    def call():
        with torch.no_grad():
            fn()

    many = CASE.adapters if not impl.endswith("_one") else 1
    benchmark.group = f"mixed layer {CASE.label()}"
    benchmark.extra_info.update(impl=impl, adapters_in_batch=many, M=CASE.M, K=CASE.K, N=CASE.N, r=CASE.r,
                                dtype=str(CASE.dtype).replace("torch.", ""), device=str(DEVICE))
    run_pedantic(benchmark, call, [], ROUNDS, WARMUP)
    # Same adapters in both libraries: a timing of a wrong result is worth nothing.
    tol = 1e-5 if CASE.dtype == torch.float32 else 2e-2
    ref = out["peft_one" if impl.endswith("_one") else "peft"]
    got = out[impl]
    assert ((got - ref).norm() / ref.norm()).item() < tol
