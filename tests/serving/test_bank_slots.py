"""Slots and pages: LRU eviction (never a slot of the batch in flight), first-fit pages and compaction with
outputs checked after every change, prefetch, state dicts, and the errors (each naming what is wrong)."""
from __future__ import annotations

import pytest
import torch
from _support.models import tiny_inputs, tiny_model

import fastpeft.serving.bank as bank_mod
from fastpeft.serving import AdapterBank, PageTable
from fastpeft.utils.save_and_load import load_peft_weights

from .conftest import ADAPTERS, TARGETS

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _bank(**kw):
    kw = dict(dict(max_slots=3, max_rank=8, page_rows=2), **kw)
    return AdapterBank(tiny_model("llama").eval(), TARGETS, **kw)


def test_page_table_first_fit_and_compaction():
    t = PageTable(10)
    for slot, (first, n) in enumerate([(0, 2), (2, 3), (5, 1), (6, 4)]):
        assert t.first_fit(n) == first
        t.assign(slot, first, n)
    assert t.free == 0 and t.first_fit(1) is None
    t.release(0)
    t.release(2)
    assert t.gaps() == [(0, 2), (5, 1)] and t.first_fit(3) is None and t.free == 3
    assert t.compact() == [(1, 2, 0), (3, 6, 3)]
    assert t.gaps() == [(7, 3)] and t.first_fit(3) == 7
    with pytest.raises(ValueError, match="overlap slot 1"):
        t.assign(5, 1, 1)


def test_lru_eviction_order_and_reloads(adapters):
    bank = _bank()
    slots = {n: bank.load(adapters[n][0], n) for n in "abc"}
    assert slots == {"a": 0, "b": 1, "c": 2} and list(bank.loaded()) == ["a", "b", "c"]
    R, S = bank.rank_rows, 3  # 24 rank rows: 3 slots of 4 pages of 2 rows (max_rank 8)
    assert R == 24
    assert bank.memory_bytes() == sum(R * (lay.in_features + lay.out_features) * 4 + S * (8 * lay.out_features + 21)
                                      for lay in bank.layers.values())
    assert bank.load(adapters["a"][0], "a") == 0  # already loaded: same slot, now the most recent
    assert list(bank.loaded()) == ["b", "c", "a"]
    with bank.batch(["c"]):
        pass  # a batch touches its adapters
    assert list(bank.loaded()) == ["b", "a", "c"]
    assert bank.load(adapters["d"][0], "d") == 1  # b evicted; d takes its slot
    assert bank.slot_of("b") is None and bank.slot_of("__base__") == -1
    assert list(bank.loaded()) == ["a", "c", "d"] and bank.stats["evictions"] == 1
    # the batch in flight pins its slots: a is least recent but in use, so c goes
    with bank.batch(["a", "__base__", "d"]):
        bank.load(adapters["b"][0], "b")
        assert set(bank.loaded()) == {"a", "d", "b"}


def _refs(adapters, base_model, inputs):
    with torch.no_grad():
        out = {n: m(**inputs).logits for n, (_, m) in adapters.items()}
        out["__base__"] = base_model(**inputs).logits
    return out


def _check(bank, model, refs, inputs, names):
    with torch.no_grad(), bank.batch(names):
        got = model(**inputs).logits
    for i, n in enumerate(names):
        torch.testing.assert_close(got[i], refs[n][i], rtol=1e-5, atol=1e-5, msg=f"sample {i} ({n})")


def test_fragmentation_forces_compaction_and_outputs_stay_right(adapters, base_model):
    """8 pages of 2 rank rows; ranks a 2, b 4, d 4, c 8 take 1, 2, 2, 4 pages."""
    bank = _bank(max_slots=4, rank_rows=16)
    model = bank.model
    inputs = tiny_inputs("llama", batch=5)
    refs = _refs(adapters, base_model, inputs)

    def step(loads=(), unloads=()):
        for n in unloads:
            bank.unload(n)
        for n in loads:
            bank.load(adapters[n][0], n)
        names = (list(bank.loaded()) + ["__base__"] * 5)[:5]
        _check(bank, model, refs, inputs, names[::-1])

    step(loads="abd")                     # a [0], b [1, 2], d [3, 4]; free [5, 8)
    assert bank.pages.runs == {0: (0, 1), 1: (1, 2), 2: (3, 2)}
    step(unloads="a", loads="c")          # 4 pages free but split [0] + [5, 8): compact, c at [4, 8)
    assert bank.stats["compactions"] == 1 and bank.stats["rows_moved"] == 8
    assert bank.pages.runs == {1: (0, 2), 2: (2, 2), 0: (4, 4)}
    step(unloads="b", loads="a")          # a into the gap b left
    step(unloads="d", loads="b")          # b after a, in the freed run
    assert bank.stats["compactions"] == 1
    step(loads="d")                       # 1 page free, d needs 2: evicts the least recently used
    assert bank.stats["evictions"] >= 1 and "d" in bank.loaded()
    assert bank.pages.used == sum(n for _, n in bank.pages.runs.values()) <= 8


def test_prefetch_then_load_only_copies(adapters, base_model, monkeypatch):
    bank = _bank()
    calls = []
    real = bank_mod.prepare
    monkeypatch.setattr(bank_mod, "prepare", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    bank.prefetch(adapters["c"][0], "c")
    bank.prefetch(adapters["b"][0], "b")
    assert calls == ["c", "b"] and bank.loaded() == {}
    bank.load(adapters["c"][0], "c")
    bank.load(None, "b")
    assert calls == ["c", "b"]
    # a state dict with its config (peft's LoraConfig object, or a dict) loads the same adapter
    sd = load_peft_weights(adapters["a"][0])
    bank.load(sd, "a_sd", config=adapters["a"][1].peft_config["default"])
    inputs = tiny_inputs("llama", batch=3)
    refs = _refs(adapters, base_model, inputs)
    refs["a_sd"] = refs["a"]
    _check(bank, bank.model, refs, inputs, ["a_sd", "c", "b"])


def _sd(adapters, name):
    return dict(load_peft_weights(adapters[name][0]))


@pytest.mark.parametrize("case", ["unknown_target", "shape_A", "shape_B", "rank", "config_rank", "no_config",
                                  "lora_bias", "embedding", "lone_A"])
def test_bad_adapters_are_refused_naming_the_key_and_shapes(adapters, case):
    bank = _bank(max_rank=4)
    cfg = dict(ADAPTERS["b"])
    sd = _sd(adapters, "b")
    match = None
    if case == "unknown_target":
        sd[Q.replace("self_attn.q_proj", "mlp.gate_proj") + ".lora_A.weight"] = torch.zeros(4, 16)
        match = (r"key 'base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight' targets module "
                 r"'model.layers.0.mlp.gate_proj', which this bank does not adapt")
    elif case == "shape_A":
        sd[Q + ".lora_A.weight"] = torch.zeros(4, 17)
        match = (rf"key '{Q}.lora_A.weight' has shape \(4, 17\); module 'model.layers.0.self_attn.q_proj' .* "
                 r"expects lora_A \[r, 16\]")
    elif case == "shape_B":
        sd[Q + ".lora_B.weight"] = torch.zeros(16, 3)
        match = rf"key '{Q}.lora_B.weight' has shape \(16, 3\); .* lora_A \(4, 16\) expects lora_B \[16, 4\]"
    elif case == "rank":
        sd, cfg = _sd(adapters, "c"), dict(ADAPTERS["c"])
        match = (r"key 'base_model\.model\.model\.layers\.\d\..*\.lora_A\.weight' \(8, \d+\) has rank 8, above the "
                 r"bank's max_rank 4")
    elif case == "config_rank":
        cfg["r"] = 2
        match = r"lora_A.weight. has shape \(4, \d+\) \(rank 4\), but its config gives module '.*' rank 2"
    elif case == "no_config":
        cfg = None
        match = "needs its LoraConfig"
    elif case == "lora_bias":
        cfg["lora_bias"] = True
        match = "lora_bias=True"
    elif case == "embedding":
        sd["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 64)
        match = r"key 'base_model.model.model.embed_tokens.lora_embedding_A' \(4, 64\) is not a lora_A / lora_B"
    elif case == "lone_A":
        del sd[Q + ".lora_B.weight"]
        match = rf"'{Q}.lora_A.weight' has no lora_B partner"
    with pytest.raises((ValueError, TypeError), match=match):
        bank.load(sd, "bad", config=cfg)
    assert bank.loaded() == {} and bank.pages.free == bank.pages.n_pages  # nothing half-loaded


def test_full_bank_with_every_slot_in_flight_is_refused(adapters):
    bank = _bank(max_slots=2)
    for n in "ab":
        bank.load(adapters[n][0], n)
    with bank.batch(["a", "b", "a"]):
        with pytest.raises(RuntimeError, match=r"bank is full \(2 slots\).*used by the batch in flight"):
            bank.load(adapters["c"][0], "c")
        with pytest.raises(RuntimeError, match="used by the batch in flight"):
            bank.unload("a")
    assert set(bank.loaded()) == {"a", "b"}
    assert bank.load(None, "c") == 0  # what the refused load read was kept: no source needed now
    # pages, not slots, run out: the only other adapter is in flight
    bank = _bank(max_slots=3, rank_rows=8)  # 4 pages; c needs all 4
    bank.load(adapters["a"][0], "a")
    with bank.batch(["a"]), pytest.raises(RuntimeError, match=r"needs 4 pages of 2 rank rows and 3 of 4 are free"):
        bank.load(adapters["c"][0], "c")


def test_bad_batches_and_banks_are_refused(adapters):
    bank = _bank()
    bank.load(adapters["a"][0], "a")
    with pytest.raises(KeyError, match="'zzz' is not loaded"):
        with bank.batch(["a", "zzz"]):
            pass
    with pytest.raises(ValueError, match="slot 2 is empty"):
        with bank.batch([0, 2]):
            pass
    with pytest.raises(ValueError, match=r"slot 7 is outside \[-1, 2\]"):
        with bank.batch(torch.tensor([7])):
            pass
    with pytest.raises(KeyError, match="'b' is not loaded"):
        bank.unload("b")
    with pytest.raises(ValueError, match="already holds an adapter bank"):
        AdapterBank(bank.model, TARGETS, max_slots=1, max_rank=4)
    with pytest.raises(ValueError, match="match no module"):
        AdapterBank(tiny_model("llama"), ["nope"], max_slots=1, max_rank=4)
    with pytest.raises(ValueError, match=r"'model.embed_tokens' \(Embedding\) cannot be adapted"):
        AdapterBank(tiny_model("llama"), ["embed_tokens"], max_slots=1, max_rank=4)
    with pytest.raises(ValueError, match="cannot hold one adapter of max_rank=8"):
        AdapterBank(tiny_model("llama"), TARGETS, max_slots=1, max_rank=8, rank_rows=4, page_rows=2)
    base = bank.uninstall()
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear
