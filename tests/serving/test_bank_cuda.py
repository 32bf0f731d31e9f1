"""The bank in bf16 on a device: pools in the model's dtype, pinned prefetch and asynchronous copies on CUDA,
eviction and compaction on the device, fixed-size batches; every row against fastpeft's PeftModel with that
adapter alone (relative error of the logits, bf16). The CPU run of the same check is in the default suite;
the CUDA run is marked ``cuda`` (benchmarks/device_check.sh runs it)."""
from __future__ import annotations

import warnings

import pytest
import torch
from _support.models import tiny_inputs, tiny_model

from fastpeft.serving import AdapterBank

from .conftest import TARGETS


def _rel(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def _check_bf16_bank(adapters, device):
    import fastpeft

    def base():
        return tiny_model("llama").to(device=device, dtype=torch.bfloat16).eval()

    model = base()
    bank = AdapterBank(model, TARGETS, max_slots=3, max_rank=8, rank_rows=16, page_rows=2)
    layer = bank.layers["model.layers.0.self_attn.q_proj"]
    assert layer.pool_A.dtype == torch.bfloat16 and layer.pool_A.device.type == device
    bank.prefetch(adapters["c"][0], "c")
    if device == "cuda":
        assert all(w.A.is_pinned() and w.B.is_pinned() for w in bank._prefetched["c"].layers.values())
    for n in "ab":
        bank.load(adapters[n][0], n)
    bank.load(None, "c")
    inputs = {k: v.to(device) for k, v in tiny_inputs("llama", batch=4).items()}
    refs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in "abcd":
            refs[n] = fastpeft.PeftModel.from_pretrained(base(), adapters[n][0]).eval()
    refs["__base__"] = base()

    def check(names):
        with torch.no_grad(), bank.batch(names, max_batch=4):
            got = model(**inputs).logits
        with torch.no_grad():
            for i, n in enumerate(names + ["__base__"] * (4 - len(names))):
                one = {k: v[i:i + 1] for k, v in inputs.items()}
                # the bank's pools are bf16 (the model's dtype), the PeftModel's adapters fp32: measured ~1e-2
                assert _rel(got[i:i + 1], refs[n](**one).logits) < 3e-2, (names, i, n)

    check(["a", "__base__", "b", "c"])
    bank.unload("a")
    bank.load(adapters["d"][0], "d")  # 1 + 3 pages free, d needs 2 contiguous: compaction on the device
    assert bank.stats["compactions"] == 1
    check(["d", "c", "b"])


def test_bf16_bank_on_cpu(adapters):
    _check_bf16_bank(adapters, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_bank_on_cuda(adapters):
    _check_bf16_bank(adapters, "cuda")
