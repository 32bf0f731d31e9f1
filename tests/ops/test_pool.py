"""AdapterPool (fastpeft/ops/pool.py): what backends keep with a pool is freed with it."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from _support.models import tiny_inputs, tiny_model

import fastpeft
from fastpeft import ops
from fastpeft.ops import cpu_mixed
from fastpeft.ops import pool as pool_module


def _pool(dora: bool = False):
    g = torch.Generator().manual_seed(3)
    ranks = [3, 4]
    mag = dict(magnitude=torch.rand(2, 10, generator=g) + 0.5, weight_norm=torch.rand(2, 10, generator=g) + 0.5,
               dora=torch.tensor([False, True])) if dora else {}
    return ops.AdapterPool(torch.randn(7, 12, generator=g), torch.randn(10, 7, generator=g), torch.tensor([0, 3]),
                           torch.tensor(ranks), torch.tensor([0.5, 2.0]), 4, **mag)


@pytest.mark.parametrize("path", ["kernel", "grouped", "general", "dora"])
def test_a_pool_and_what_was_kept_with_it_are_freed_with_it(monkeypatch, path):
    """The shared store is keyed weakly by the pool's A; an entry that held A (or a view of A, whose _base is A)
    would keep itself alive, and every pool a layer or a bank ever built would stay in memory."""
    if path == "grouped":
        monkeypatch.setenv(cpu_mixed.ENV_VAR, "0")
    if path == "kernel" and cpu_mixed.unavailable() is not None:
        pytest.skip(f"the CPU kernel is unavailable here: {cpu_mixed.unavailable()}")
    gc.collect()
    before = len(pool_module._SHARED)
    pool = _pool(dora=path == "dora")
    idx = torch.tensor([0, 1, -1, 1, 0, 1])
    plan = ops.RowPlan.build(idx, 2)
    x, W = torch.randn(6, 12), torch.randn(10, 12)
    with torch.no_grad():
        for _ in range(2):
            y = ops.lora(x, ops.Base.dense(W), ops.AdapterSet(row_index=idx if path == "general" else plan, pool=pool))
    assert torch.isfinite(y).all() and len(pool_module._SHARED) == before + 1
    alive = weakref.ref(pool.A)
    del pool, y
    gc.collect()
    assert alive() is None and len(pool_module._SHARED) == before


def test_mixed_batches_with_changing_names_do_not_accumulate_pools():
    """A layer keeps one pool per set of names; switching names drops the old pool, and with it everything the
    op kept for it (a server whose batches mix other adapters at every step)."""
    model = tiny_model("llama")
    cfg = fastpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = fastpeft.get_peft_model(model, cfg, adapter_name="a")
    for name in ("b", "c"):
        peft_model.add_adapter(name, cfg)
    peft_model.eval()
    inputs = tiny_inputs("llama", batch=3)
    layers = sum(1 for m in peft_model.modules() if hasattr(m, "_mixed_pool"))
    gc.collect()
    before = len(pool_module._SHARED)
    sets = [["a", "b", "c"], ["b", "c", "a"], ["a", "a", "b"], ["c", "__base__", "b"], ["b", "a", "c"]]
    with torch.no_grad():
        for names in sets * 2:
            peft_model(**inputs, adapter_names=names)
            gc.collect()
            assert len(pool_module._SHARED) - before <= layers
