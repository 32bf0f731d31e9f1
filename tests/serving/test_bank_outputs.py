"""Bank outputs against HF peft, sample by sample: mixed ranks, rsLoRA, DoRA, rank/alpha patterns, base rows;
Conv1D and packed (QuantLinear) bases; one row index per forward; per-token slots; the fixed-size mode."""
from __future__ import annotations

import warnings

import pytest
import torch
from _support.models import tiny_inputs, tiny_model

from fastpeft import ops
from fastpeft.serving import AdapterBank

from .conftest import TARGETS, save_peft_adapter

NAMES = ["a", "__base__", "b", "c", "d", "a", "c"]


def _alone(adapters, base_model, inputs, i, name):
    one = {k: v[i:i + 1] for k, v in inputs.items()}
    model = base_model if name == "__base__" else adapters[name][1]
    return model(**one).logits


@pytest.fixture
def bank_model(adapters):
    model = tiny_model("llama").eval()
    bank = AdapterBank(model, TARGETS, max_slots=4, max_rank=8, page_rows=4)
    for name in "abcd":
        bank.load(adapters[name][0], name)
    return model, bank


def test_mixed_batch_equals_each_adapter_in_peft(adapters, base_model, bank_model):
    model, bank = bank_model
    inputs = tiny_inputs("llama", batch=len(NAMES))
    slots = [bank.slot_of(n) for n in NAMES]
    assert slots[1] == -1
    with torch.no_grad():
        with bank.batch(NAMES):
            by_name = model(**inputs).logits
        with bank.batch(slots):  # slot ids, as a server passes them
            by_slot = model(**inputs).logits
        assert torch.equal(by_name, by_slot)
        for i, name in enumerate(NAMES):
            ref = _alone(adapters, base_model, inputs, i, name)
            torch.testing.assert_close(by_name[i:i + 1], ref, rtol=1e-5, atol=1e-5, msg=f"sample {i} ({name})")
            if name != "__base__":  # the adapter matters
                assert (ref - _alone(adapters, base_model, inputs, i, "__base__")).abs().max() > 1e-3
        # outside bank.batch the model is its base
        torch.testing.assert_close(model(**inputs).logits, base_model(**inputs).logits, rtol=0, atol=0)


def test_one_row_index_per_forward_shared_by_every_layer(bank_model, monkeypatch):
    model, bank = bank_model
    seen = []
    real = ops.lora
    monkeypatch.setattr(ops, "lora", lambda x, base, adapters, *a, **k: seen.append(adapters.row_index) or
                        real(x, base, adapters, *a, **k))
    inputs = tiny_inputs("llama", batch=3, seq=5)
    with torch.no_grad(), bank.batch(["b", "__base__", "d"]):
        model(**inputs)
    assert len(seen) == 2 * len(TARGETS)
    assert len({id(r) for r in seen}) == 1  # one plan (one sort, one sync), shared by every layer
    assert isinstance(seen[0], ops.RowPlan)
    assert seen[0].row_index.tolist() == [bank.slot_of("b")] * 5 + [-1] * 5 + [bank.slot_of("d")] * 5


def test_per_token_slots_on_packed_rows(adapters, bank_model):
    """A server packing tokens of several requests gives one slot per row of every layer's input."""
    model, bank = bank_model
    layer = bank.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    names = ["a", "a", "__base__", "c", "c", "b"]
    with torch.no_grad():
        with bank.batch(names):
            got = layer(x)
        for i, n in enumerate(names):
            with bank.batch([n]):
                torch.testing.assert_close(got[i:i + 1], layer(x[i:i + 1]), rtol=1e-6, atol=1e-6)


def test_fixed_size_batch_keeps_index_tensors_and_pads_with_base(adapters, base_model, bank_model):
    model, bank = bank_model
    B = 4
    inputs = tiny_inputs("llama", batch=B)
    outs, addrs = [], []
    with torch.no_grad():
        for names in (["c", "a"], ["b", "d", "__base__"]):
            with bank.batch(names, max_batch=B) as slots:
                y = model(**inputs).logits
                rows = bank.rows.rows(B * inputs["input_ids"].shape[1], "test")
                addrs.append((slots.data_ptr(), rows.data_ptr()))
                assert slots.tolist() == [bank.slot_of(n) for n in names] + [-1] * (B - len(names))
            for i in range(B):
                name = names[i] if i < len(names) else "__base__"
                torch.testing.assert_close(y[i:i + 1], _alone(adapters, base_model, inputs, i, name),
                                           rtol=1e-5, atol=1e-5)
        assert addrs[0] == addrs[1]
        with bank.batch(["a"], max_batch=B), pytest.raises(ValueError, match="pad the batch"):
            model(**tiny_inputs("llama", batch=3))


def test_inference_mode_loads_and_fixed_batches_in_and_out_of_it(adapters, base_model):
    """A server under torch.inference_mode: loads (with a compaction) and fixed-size batches work there, and the
    persistent index tensors stay refillable by batches outside it."""
    bank = AdapterBank(tiny_model("llama").eval(), TARGETS, max_slots=3, max_rank=8, rank_rows=16, page_rows=2)
    inputs = tiny_inputs("llama", batch=2)
    with torch.inference_mode():
        for n in "abc":
            bank.load(adapters[n][0], n)
        with bank.batch(["a", "c"], max_batch=2):
            bank.model(**inputs)
        bank.unload("a")
        bank.load(adapters["d"][0], "d")  # 1 + 3 free pages, d needs 2 contiguous: compaction
    assert bank.stats["compactions"] == 1
    for mode in (torch.no_grad, torch.inference_mode):
        with bank.batch(["d", "b"], max_batch=2), mode():
            y = bank.model(**inputs).logits
        for i, n in enumerate("db"):
            torch.testing.assert_close(y[i:i + 1], _alone(adapters, base_model, inputs, i, n), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "int8"])
def test_conv1d_and_packed_bases(kind, tmp_path):
    """GPT-2's Conv1D (weight [in, out]) against peft; a QuantLinear (int8) base against fastpeft's PeftModel
    over the same packed model."""
    import fastpeft
    from fastpeft.quant import quantize

    model_kind = "gpt2" if kind == "gpt2" else "llama"
    targets = ["c_attn", "c_fc"] if kind == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    cfgs = {"x": dict(r=4, lora_alpha=8, target_modules=targets),
            "y": dict(r=2, lora_alpha=2, target_modules=targets[:1], use_dora=True)}
    refs = {n: save_peft_adapter(tmp_path / n, seed=7 + i, kind=model_kind, **c)
            for i, (n, c) in enumerate(cfgs.items())}
    model = tiny_model(model_kind).eval()
    if kind == "int8":
        quantize(model, "int8", skip_modules=["lm_head"], progressbar=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for n in cfgs:
                base = tiny_model(model_kind).eval()
                quantize(base, "int8", skip_modules=["lm_head"], progressbar=False)
                refs[n] = fastpeft.PeftModel.from_pretrained(base, str(tmp_path / n)).eval()
    bank = AdapterBank(model, targets, max_slots=2, max_rank=4, page_rows=2)
    assert {layer.kind for layer in bank.layers.values()} == {"conv1d" if kind == "gpt2" else "quant"}
    for n in cfgs:
        bank.load(str(tmp_path / n), n)
    names = ["x", "y", "__base__", "y"]
    inputs = tiny_inputs(model_kind, batch=4)
    with torch.no_grad():
        with bank.batch(names):
            got = model(**inputs).logits
        for i, n in enumerate(names):
            one = {k: v[i:i + 1] for k, v in inputs.items()}
            if n == "__base__":
                with refs["x"].disable_adapter():
                    ref = refs["x"](**one).logits
            else:
                ref = refs[n](**one).logits
            torch.testing.assert_close(got[i:i + 1], ref, rtol=1e-5, atol=1e-5, msg=f"sample {i} ({n})")


def test_a_layer_keeps_one_pool_object_and_its_cpu_tables_follow_loads(adapters, base_model, monkeypatch):
    """Between loads a decode step rebuilds nothing: each BankLayer hands the op the same AdapterPool object, so
    what the CPU kernel derived from it (its slot tables) is reused; a load into a slot writes the pool buffers,
    and the next forward uses the new adapter (checked against peft). Batches without a DoRA slot's rows run on
    the CPU kernel even though the bank's pool carries DoRA tables."""
    from fastpeft.ops import cpu_mixed

    monkeypatch.delenv(cpu_mixed.ENV_VAR, raising=False)
    built = []
    real = cpu_mixed.slot_tables
    monkeypatch.setattr(cpu_mixed, "slot_tables", lambda *a, **k: built.append(1) or real(*a, **k))
    model = tiny_model("llama").eval()
    bank = AdapterBank(model, TARGETS, max_slots=2, max_rank=8, page_rows=4)
    bank.load(adapters["a"][0], "a")
    bank.load(adapters["b"][0], "b")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    inputs = tiny_inputs("llama", batch=2)
    with torch.no_grad(), bank.batch(["a", "b"]):
        model(**inputs)
        first, n_built = layer.pool(), len(built)
        assert n_built > 0  # the kernel ran (the pool's DoRA tables are there, no DoRA slot has rows)
        model(**inputs)
        assert layer.pool() is first and len(built) == n_built  # nothing rebuilt between loads
    bank.unload("a")
    bank.load(adapters["d"][0], "d")  # into the freed slot
    with torch.no_grad(), bank.batch(["d", "b"]):
        out = model(**inputs).logits
    assert layer.pool() is first and len(built) > n_built
    for i, name in enumerate(["d", "b"]):
        torch.testing.assert_close(out[i:i + 1], _alone(adapters, base_model, inputs, i, name), rtol=1e-5, atol=1e-5)
