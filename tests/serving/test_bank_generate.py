"""generate and a manual KV-cache decode loop with adapters loaded and evicted mid-stream: every sample's
tokens equal that adapter's own greedy generation (its peft model, the sample alone)."""
from __future__ import annotations

import inspect

import torch
from _support.models import tiny_inputs, tiny_model

from fastpeft.serving import AdapterBank

from .conftest import TARGETS

STEPS = 6
EOS = 2  # the tiny Llama's eos: suppressed (min_new_tokens) so every generation has STEPS tokens


def _gen_kw(**extra):
    return dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0, **extra)


def _own(adapters, base_model, inputs, i, name, **extra):
    """Sample i's greedy continuation by its own model (the peft model of ``name``, or the base)."""
    one = {k: v[i:i + 1] for k, v in inputs.items()}
    model = base_model if name == "__base__" else adapters[name][1]
    with torch.no_grad():
        return model.generate(**one, **_gen_kw(**extra))[:, one["input_ids"].shape[1]:]


def test_generate_between_loads_and_evictions(adapters, base_model):
    model = tiny_model("llama").eval()
    bank = AdapterBank(model, TARGETS, max_slots=3, max_rank=8, page_rows=2)
    for n in "abc":
        bank.load(adapters[n][0], n)
    inputs = tiny_inputs("llama", batch=4, seq=5)
    seq = inputs["input_ids"].shape[1]
    rounds = [(["a", "__base__", "b", "c"], {}),
              (["d", "c", "d", "__base__"], {"num_beams": 2}),   # d evicts a (least recently used)
              (["a", "b", "c", "a"], {})]                        # a comes back, evicting d
    for k, (names, extra) in enumerate(rounds):
        for n in names:
            if n != "__base__":
                bank.load(adapters[n][0], n)
        with torch.no_grad(), bank.batch(names):
            out = model.generate(**inputs, **_gen_kw(**extra))[:, seq:]
        for i, n in enumerate(names):
            assert torch.equal(out[i:i + 1], _own(adapters, base_model, inputs, i, n, **extra)), (k, i, n)
    assert bank.stats["evictions"] >= 2
    assert "d" not in bank.loaded()


def test_manual_decode_loop_with_kv_cache_and_loads_between_steps(adapters, base_model):
    """A server's loop: prefill, then one token per step with the KV cache; between steps other requests'
    adapters are loaded (evicting one the batch does not use, compacting the pools) and unloaded."""
    model = tiny_model("llama").eval()
    # 8 pages of 2 rows: a (1 page), d (2) and b (2) leave 3; c needs 4
    bank = AdapterBank(model, TARGETS, max_slots=3, max_rank=8, rank_rows=16, page_rows=2)
    for n in "adb":
        bank.load(adapters[n][0], n)
    names = ["b", "__base__", "a", "b"]
    inputs = tiny_inputs("llama", batch=len(names), seq=5)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # transformers 5 names the KV cache `cache` (`past_key_values` before)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens = []
    with torch.no_grad(), bank.batch(names):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        for step in range(STEPS):
            logits = out.logits[:, -1].clone()
            logits[:, EOS] = float("-inf")
            tok = logits.argmax(-1, keepdim=True)
            tokens.append(tok)
            if step == 1:
                bank.unload("d")             # frees 2 pages after a's page: a gap in the middle
                bank.load(adapters["c"][0], "c")  # needs 4: only after compaction (moves b's rows)
            if step == 3:
                bank.load(adapters["d"][0], "d")  # bank full: evicts c (the only one not in flight)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            past = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            out = model(input_ids=tok, attention_mask=mask, use_cache=True, **{cache_kw: past})
    got = torch.cat(tokens, 1)
    assert bank.stats["compactions"] == 1 and bank.stats["evictions"] == 1
    assert list(bank.loaded()) == ["b", "a", "d"]  # least recently used first; c went, d came back
    for i, n in enumerate(names):
        assert torch.equal(got[i:i + 1], _own(adapters, base_model, inputs, i, n)), (i, n)
