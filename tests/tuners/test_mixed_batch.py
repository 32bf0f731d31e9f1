"""Many adapters in one batch through peft's API (adapter_names=[...]): outputs, generate and refusals
against HF peft; layers an adapter does not target, packed bases, one plan per forward."""
from __future__ import annotations

import warnings

import pytest
import torch
from _support.models import tiny_inputs, tiny_model
from _support.twins import max_abs_diff, peft_model_twins

import fastpeft
from fastpeft import ops
from fastpeft.quant import quantize
from fastpeft.tuners import mixed_batch as mixed_batch_module

NAMES = ["default", "__base__", "other", "default"]


def _alone(model, call, inputs: dict, i: int, name: str):
    """``call(model, inputs)`` for sample i alone, with adapter ``name`` set (the adapters disabled for
    "__base__"); the model's active adapter is "default" again afterwards."""
    one = {k: v[i:i + 1] for k, v in inputs.items()}
    try:
        if name == "__base__":
            with model.disable_adapter():
                return call(model, one)
        model.set_adapter(name)
        return call(model, one)
    finally:
        model.set_adapter("default")


def _logits(model, inputs):
    return model(**inputs).logits


def _twins(kind, targets, extra_targets=None, **cfg):
    base = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **cfg)
    other = dict(base, r=2, target_modules=extra_targets or targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = peft_model_twins(tiny_model(kind), base, extra=[("other", other)])
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("kind,targets,cfg,peft_runs", [
    ("llama", ["q_proj", "v_proj", "down_proj", "embed_tokens"], {}, True),
    ("gpt2", ["c_attn", "c_fc", "wte"], {}, True),  # Conv1D (fan_in_fan_out) and an embedding
    ("opt", ["q_proj", "v_proj"], {"lora_bias": True}, True),
    # OPT's fc1 sees the hidden states flattened to [batch * seq, ...]: peft refuses ("Length of
    # `adapter_names` should be the same as the number of inputs, but got 4 and 28"); fastpeft expands the
    # per-sample plan to the rows
    ("opt", ["q_proj", "fc1"], {}, False),
    ("llama_seqcls", ["q_proj", "v_proj"], {"modules_to_save": ["score"]}, True),
])
def test_mixed_batch_equals_peft(kind, targets, cfg, peft_runs):
    ours, theirs = _twins(kind, targets, **cfg)
    with torch.no_grad():
        if cfg.get("modules_to_save"):  # make the copies differ from the original head
            for model in (ours, theirs):
                for n, p in model.named_parameters():
                    if "modules_to_save" in n:
                        p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p) * (2.0 if ".other." in n else 1.0))
        inputs = tiny_inputs(kind, batch=4)
        y_o = ours(**inputs, adapter_names=NAMES).logits
        if peft_runs:
            assert max_abs_diff(y_o, theirs(**inputs, adapter_names=NAMES).logits) < 1e-5
        else:
            with pytest.raises(ValueError, match="Length of `adapter_names`"):
                theirs(**inputs, adapter_names=NAMES)
        # and each sample equals the model run with that adapter alone
        for i, name in enumerate(NAMES):
            assert max_abs_diff(y_o[i:i + 1], _alone(ours, _logits, inputs, i, name)) < 1e-5, (i, name)


def test_generate_with_adapter_names_equals_peft_and_beams_keep_each_samples_adapter():
    ours, theirs = _twins("llama", ["q_proj", "v_proj", "o_proj", "up_proj"])
    inputs = tiny_inputs("llama", batch=4, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out_o = ours.generate(**inputs, adapter_names=NAMES, **kw)
    out_t = theirs.generate(**inputs, adapter_names=NAMES, **kw)
    assert torch.equal(out_o, out_t)
    beams = ours.generate(**inputs, adapter_names=NAMES, num_beams=2, **kw)
    for i, name in enumerate(NAMES):
        alone = _alone(ours, lambda m, one: m.generate(**one, num_beams=2, **kw), inputs, i, name)
        assert torch.equal(beams[i:i + 1], alone), (i, name)


def test_an_adapter_a_layer_does_not_have_leaves_that_layers_rows_to_the_base():
    ours, _ = _twins("llama", ["q_proj", "v_proj"], extra_targets=["v_proj"])
    inputs = tiny_inputs("llama", batch=2)
    with torch.no_grad():
        mixed = ours(**inputs, adapter_names=["other", "default"]).logits
        ours.set_adapter("other")
        alone = ours(**{k: v[:1] for k, v in inputs.items()}).logits
    assert max_abs_diff(mixed[:1], alone) < 1e-5


def test_layer_level_adapter_names_equals_peft():
    ours, theirs = _twins("llama", ["q_proj"])
    layer_o = ours.base_model.model.model.layers[0].self_attn.q_proj
    layer_t = theirs.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 3, 16)
    with torch.no_grad():
        assert max_abs_diff(layer_o(x, adapter_names=NAMES), layer_t(x, adapter_names=NAMES)) < 1e-6


def test_packed_base_mixed_batch_equals_each_adapter_alone():
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    quantize(model, "nf4", blocksize=64, skip_modules=["lm_head"], progressbar=False)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    pm = fastpeft.get_peft_model(model, fastpeft.LoraConfig(**cfg)).eval()
    pm.add_adapter("other", fastpeft.LoraConfig(**dict(cfg, r=2)))
    inputs = tiny_inputs("llama", batch=4)
    with torch.no_grad():
        mixed = pm(**inputs, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            assert max_abs_diff(mixed[i:i + 1], _alone(pm, _logits, inputs, i, name)) < 1e-4, (i, name)


def test_every_row_on_one_adapter_runs_the_plain_call_and_equals_peft(monkeypatch):
    """adapter_names naming one adapter for every row (lora_bias too, and a layer the adapter does not target):
    each layer makes the plain one-adapter op call, no row plan or pool, and the logits are the adapter's
    alone, bit for bit, and peft's."""
    ours, theirs = _twins("opt", ["q_proj", "v_proj"], extra_targets=["v_proj"], lora_bias=True)
    inputs = tiny_inputs("opt", batch=3)
    calls = []
    real = ops.lora
    monkeypatch.setattr(ops, "lora", lambda x, base, adapters=(), *a, **k: calls.append(adapters) or
                        real(x, base, adapters, *a, **k))
    with torch.no_grad():
        for name in ("default", "other"):
            calls.clear()
            y = ours(**inputs, adapter_names=[name] * 3).logits
            assert calls and all(not isinstance(c, ops.AdapterSet) for c in calls)  # no row plan, no pool
            ours.set_adapter(name)
            assert torch.equal(y, ours(**inputs).logits)
            ours.set_adapter("default")
            assert max_abs_diff(y, theirs(**inputs, adapter_names=[name] * 3).logits) < 1e-5


def test_one_plan_per_forward(monkeypatch):
    ours, _ = _twins("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"])
    built = []
    real = ops.RowPlan.build
    monkeypatch.setattr(ops.RowPlan, "build", staticmethod(lambda *a, **k: built.append(1) or real(*a, **k)))
    monkeypatch.setattr(mixed_batch_module, "_LAST", None)
    with torch.no_grad():
        ours(**tiny_inputs("llama", batch=4), adapter_names=NAMES)
        assert built == [1]  # one sort and one sync, shared by 9 adapted layers
        ours(**tiny_inputs("llama", batch=4), adapter_names=list(NAMES))
        assert built == [1]  # a decode loop's next step with the same names reuses the plan
        ours(**tiny_inputs("llama", batch=4), adapter_names=NAMES[::-1])
        assert built == [1, 1]  # other names: a new plan


@pytest.mark.parametrize("case", ["unknown", "length", "training", "merged", "dora", "string"])
def test_refusals_are_peft_s(case):
    results = []
    for lib in ("ours", "theirs"):
        cfg = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=case == "dora")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft_model_twins(tiny_model("llama"), cfg, extra=[("other", cfg)])[0 if lib == "ours" else 1]
        model.eval()
        names = list(NAMES)
        if case == "unknown":
            names[1] = "nope"
        elif case == "length":
            names = names[:3]
        elif case == "training":
            model.train()
        elif case == "merged":
            model.merge_adapter()
        elif case == "string":
            names = "default"
        with pytest.raises(ValueError) as info:
            model(**tiny_inputs("llama", batch=4), adapter_names=names)
        results.append(str(info.value))
    assert results[0] == results[1]


@pytest.mark.parametrize("change", ["copy_", "data_swap", "new_parameter", "optimizer_step", "scaling"])
def test_the_layers_adapter_pool_follows_weight_changes_between_decode_steps(change):
    """A layer keeps its mixed batch's adapter pool (copies of the adapters' weights) from one forward to the next
    with the same names; any change to the weights a layer can observe rebuilds it: an in-place write (version
    counter), a `.data =` swap (new storage), a new Parameter, an optimizer step, a new scale. The mixed output then
    equals the changed adapter's own output."""
    ours, _ = _twins("llama", ["q_proj"])
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 3, 16)
    with torch.no_grad():
        before = layer(x, adapter_names=NAMES)
    A = layer.lora_A["other"].weight
    if change == "copy_":
        with torch.no_grad():
            A.copy_(A * 2)
    elif change == "data_swap":
        A.data = A.data * 2
    elif change == "new_parameter":
        layer.lora_A["other"].weight = torch.nn.Parameter(A.detach() * 2)
    elif change == "optimizer_step":
        A.grad = torch.ones_like(A)
        torch.optim.SGD([A], lr=0.5).step()
    else:
        layer.scaling["other"] *= 3
    with torch.no_grad():
        after = layer(x, adapter_names=NAMES)
        layer.set_adapter("other")
        alone = layer(x[2:3])
        layer.set_adapter("default")
    assert not torch.equal(after[2], before[2])
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert max_abs_diff(after[2:3], alone) < 1e-6 * (1 + float(alone.abs().max()))
