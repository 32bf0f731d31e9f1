"""Loading into a warm bank changes the pools' contents, never their shapes: a torch.compile'd model keeps its
graphs (error_on_recompile), through an eviction and a compaction, and still computes the new adapters."""
from __future__ import annotations

import torch
from _support.models import tiny_inputs, tiny_model

from fastpeft.serving import AdapterBank

from .conftest import TARGETS


def test_loading_into_a_warm_bank_does_not_recompile(adapters):
    from torch._dynamo.backends.registry import lookup_backend

    model = tiny_model("llama").eval()
    bank = AdapterBank(model, TARGETS, max_slots=3, max_rank=8, rank_rows=16, page_rows=2)  # 8 pages
    for n in "abc":  # 1 + 2 + 4 pages
        bank.load(adapters[n][0], n)
    graphs = []
    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):  # aot_eager, noting which ops each graph holds
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    inputs = tiny_inputs("llama", batch=4)
    try:
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            with bank.batch(["a", "b", "__base__", "c"]):
                y1 = compiled(**inputs).logits
                torch.testing.assert_close(y1, model(**inputs).logits, rtol=0, atol=0)
            n_graphs = len(graphs)
            assert any("fastpeft.lora_fwd" in t for g in graphs for t in g), graphs  # the bank's op is traced
            bank.load(adapters["d"][0], "d")  # evicts a (LRU), then compacts to fit d's 2 pages
            assert bank.stats["evictions"] == 1 and bank.stats["compactions"] == 1
            with bank.batch(["d", "c", "b", "__base__"]):
                y2 = compiled(**inputs).logits
                torch.testing.assert_close(y2, model(**inputs).logits, rtol=0, atol=0)
            assert len(graphs) == n_graphs
            assert (y2[0] - y1[0]).abs().max() > 1e-3  # slot 0 now holds d
    finally:
        torch._dynamo.reset()
