"""peft API details, each checked by running fastpeft and peft side by side on twin models:
public names and tables, set_adapter(inference_mode=), load_adapter trainability, what delete_adapter leaves,
the disable flag, layer reprs, unload results, save_embedding_layers, the model card, low_cpu_mem_usage,
ignore_mismatched_sizes, get_base_model_state_dict, PeftWarning and get_peft_model(mixed=True)."""
from __future__ import annotations

import copy
import importlib
import os
import warnings

import peft
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import fastpeft
from _support.models import tiny_inputs, tiny_model
from _support.twins import max_abs_diff, peft_model_twins

CFG = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"], init_lora_weights=False)
OTHER = dict(target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"], init_lora_weights=False)


def _grads(model) -> dict:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _out(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def twins():
    return peft_model_twins(tiny_model("llama"), CFG, extra=[("other", OTHER)])


# -- public names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("module,names", [
    ("", ["get_layer_status", "get_model_status", "get_base_model_state_dict", "PeftWarning", "get_peft_config",
          "PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "MODEL_TYPE_TO_PEFT_MODEL_MAPPING"]),
    (".mapping", ["get_peft_config", "PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING",
                  "PEFT_TYPE_TO_PREFIX_MAPPING"]),
    (".peft_model", ["get_layer_status", "get_model_status", "TunerLayerStatus", "TunerModelStatus",
                     "PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING"]),
    (".utils", ["PeftWarning", "get_base_model_state_dict", "get_peft_model_state_dict", "set_peft_model_state_dict"]),
    (".utils.save_and_load", ["get_base_model_state_dict", "EMBEDDING_LAYER_NAMES"]),
    (".utils.warning", ["PeftWarning"]),
])
def test_names_live_where_peft_has_them(module, names):
    ours, theirs = importlib.import_module("fastpeft" + module), importlib.import_module("peft" + module)
    for name in names:
        assert hasattr(theirs, name), f"peft{module} has no {name} (the test's list is wrong)"
        assert hasattr(ours, name), f"fastpeft{module} lacks {name}"
    assert issubclass(fastpeft.PeftWarning, UserWarning)


def test_type_tables_hold_the_implemented_types_as_peft_does():
    from fastpeft import mapping as ours
    from peft import mapping as theirs

    implemented = {"LORA", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}
    for table in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING"):
        a, b = getattr(ours, table), getattr(theirs, table)
        assert {k.value for k in a} == implemented, table
        for key, value in a.items():
            assert (value if isinstance(value, str) else value.__name__) == \
                (b[key.value] if isinstance(b[key.value], str) else b[key.value].__name__), (table, key)
    # the same dict object everywhere (a registration shows up under every path)
    assert fastpeft.PEFT_TYPE_TO_CONFIG_MAPPING is ours.PEFT_TYPE_TO_CONFIG_MAPPING
    assert importlib.import_module("fastpeft.config").PEFT_TYPE_TO_CONFIG_MAPPING is ours.PEFT_TYPE_TO_CONFIG_MAPPING
    assert fastpeft.peft_model.PEFT_TYPE_TO_TUNER_MAPPING is ours.PEFT_TYPE_TO_TUNER_MAPPING
    assert set(fastpeft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING) == set(peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING)


def test_mixed_model_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="mixed=True"):
        fastpeft.get_peft_model(tiny_model("llama"), fastpeft.LoraConfig(target_modules=["q_proj"]), mixed=True)
    assert not hasattr(fastpeft, "PeftMixedModel")


# -- trainability --------------------------------------------------------------------------------------
def test_set_adapter_inference_mode_and_load_adapter_trainability(twins, tmp_path):
    ours, theirs = twins
    assert _grads(ours) == _grads(theirs)
    for args in [("other",), ("other", True), ("default", True), ("default",)]:
        ours.set_adapter(*args)
        theirs.set_adapter(*args)
        assert _grads(ours) == _grads(theirs), args
    # the LoraModel method has the same signature
    ours.base_model.set_adapter("other", inference_mode=True)
    theirs.base_model.set_adapter("other", inference_mode=True)
    assert _grads(ours) == _grads(theirs)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".other." in n)
    ours.set_adapter("default")
    theirs.set_adapter("default")

    theirs.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, trainable in (("frozen", False), ("trainable", True)):
            ours.load_adapter(str(tmp_path), name, is_trainable=trainable)
            theirs.load_adapter(str(tmp_path), name, is_trainable=trainable)
            assert _grads(ours) == _grads(theirs), name
    # other adapters' modules_to_save copies are untouched by a frozen load
    assert ours.base_model.model.lm_head.modules_to_save["default"].weight.requires_grad
    assert not ours.base_model.model.lm_head.modules_to_save["frozen"].weight.requires_grad
    assert ours.base_model.model.lm_head.modules_to_save["trainable"].weight.requires_grad


# -- deleting adapters -------------------------------------------------------------------------------
def _keyed_by(model, name: str) -> list:
    """Every (module, attribute) holding a dict / ModuleDict / ParameterDict with key ``name``."""
    found = []
    for module_name, module in model.named_modules():
        for attr, value in list(vars(module).items()) + list(module._modules.items()):
            if isinstance(value, (dict, torch.nn.ModuleDict, torch.nn.ParameterDict)) and name in value:
                found.append((module_name, attr))
    return found


def test_delete_adapter_removes_every_trace_and_picks_the_new_active_as_peft():
    cfg_z = dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"], lora_dropout=0.1)
    cfg_a = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], use_dora=True)
    ours, theirs = peft_model_twins(tiny_model("llama"), dict(target_modules=["q_proj"]),
                                    extra=[("zeta", cfg_z), ("alpha", cfg_a)])
    ids = tiny_inputs("llama")
    with torch.no_grad():  # a mixed batch fills the layers' caches with every adapter named in it
        ours.eval()(**ids, adapter_names=["zeta", "default"])
    # fastpeft keeps at least what peft keeps per adapter (plus a plain LoRA "variant" entry peft has only for DoRA)
    assert {a for _, a in _keyed_by(theirs, "zeta")} <= {a for _, a in _keyed_by(ours, "zeta")}
    assert any(getattr(m, "_mixed_pool_cache", None) for m in ours.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (ours, theirs):
            m.set_adapter("zeta")
            m.delete_adapter("zeta")
            m.delete_adapter("default")
    assert _keyed_by(ours, "zeta") == _keyed_by(theirs, "zeta") == []
    assert not any(getattr(m, "_mixed_pool_cache", None) for m in ours.modules())
    # the first remaining adapter in sorted order becomes active in every layer (peft's rule)
    assert [m.active_adapters for m in ours.modules() if hasattr(m, "lora_A")] == \
        [m.active_adapters for m in theirs.modules() if hasattr(m, "lora_A")]
    assert _grads(ours) == _grads(theirs)
    # the embedding layer held only "zeta": it has no adapter left, and the model's new active set is empty (the
    # first layer's choice, as in peft), so the lm_head wrapper is inactive in both
    from dataclasses import asdict

    assert [asdict(x) for x in ours.get_layer_status()] == [asdict(x) for x in theirs.get_layer_status()]
    assert ours.base_model.model.lm_head.get_module() is ours.base_model.model.lm_head.original_module


def test_delete_inactive_adapter_keeps_a_frozen_wrapper_frozen(tmp_path):
    base = tiny_model("llama")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=["q_proj"],
                                                                           modules_to_save=["lm_head"]))
    pm.save_pretrained(str(tmp_path))
    loaded = {}
    for lib in (fastpeft, peft):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = lib.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
            m.add_adapter("b", lib.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
            m.delete_adapter("b")
        loaded[lib.__name__] = _grads(m)
    assert loaded["fastpeft"] == loaded["peft"] and not any(loaded["fastpeft"].values())


# -- disable flag, available names, reprs ----------------------------------------------------------
def test_disable_flag_and_available_names(twins):
    ours, theirs = twins
    lo = ours.base_model.model.model.layers[0].self_attn.q_proj
    lt = theirs.base_model.model.model.layers[0].self_attn.q_proj
    with ours.disable_adapter(), theirs.disable_adapter():
        assert lo.disable_adapters is lt.disable_adapters is True
        assert ours.base_model.model.lm_head.disable_adapters is True
    assert lo.disable_adapters is lt.disable_adapters is False
    for name in ("q_proj", "v_proj", "k_proj"):
        a = getattr(ours.base_model.model.model.layers[1].self_attn, name)
        b = getattr(theirs.base_model.model.model.layers[1].self_attn, name)
        assert a._all_available_adapter_names() == b._all_available_adapter_names()
        assert a._get_available_adapters() == b._get_available_adapters()


@pytest.mark.parametrize("kind,cfg", [
    ("llama", dict(target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"])),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"])),  # Conv1D: peft's lora.Linear
    ("llama", dict(target_modules=["q_proj", "embed_tokens"], use_dora=True)),
    ("llama_seqcls", dict(target_modules=["q_proj"], lora_dropout=0.1, task_type="SEQ_CLS")),
])
def test_model_repr_equals_peft(kind, cfg):
    ours, theirs = peft_model_twins(tiny_model(kind), cfg, extra=[("b", dict(cfg, target_modules=["q_proj"]))]
                                    if kind == "llama" else ())
    assert str(ours) == str(theirs)


def test_unload_results_have_no_peft_config(twins):
    ours, theirs = twins
    inputs = tiny_inputs("llama")
    merged = [m.merge_and_unload() for m in (ours, theirs)]
    assert not hasattr(merged[0], "peft_config") and not hasattr(merged[1], "peft_config")
    assert max_abs_diff(_out(merged[0], inputs), _out(merged[1], inputs)) < 1e-5
    ours, theirs = peft_model_twins(tiny_model("llama"), CFG)
    for m in (ours.unload(), theirs.unload(), peft_model_twins(tiny_model("llama"), CFG)[0].base_model.unload()):
        assert not hasattr(m, "peft_config")


# -- save_embedding_layers ----------------------------------------------------------------------------
def _saved_full_keys(pm, folder, save_embedding_layers):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.save_pretrained(folder, save_embedding_layers=save_embedding_layers)
    keys = sorted(k for k in load_file(os.path.join(folder, "adapter_model.safetensors")) if "lora_" not in k)
    texts = sorted(str(w.message) for w in caught if "save_embedding_layers" in str(w.message))
    return keys, texts


@pytest.mark.parametrize("targets,save,resize", [
    (["q_proj", "embed_tokens"], "auto", False),
    (["q_proj", "embed_tokens"], False, False),
    (["q_proj"], True, False),
    (["q_proj"], "auto", False),
    (["q_proj"], "auto", True),  # resized vocabulary: both tables in full
    (["q_proj", "lm_head"], "auto", True),
    (r".*(q_proj|embed_tokens)", "auto", False),
    ("all-linear", "auto", False),
])
def test_save_embedding_layers_picks_peft_layers(tmp_path, tiny_base_dir, targets, save, resize):
    base_dir = tiny_base_dir("llama")
    got = {}
    for lib in (fastpeft, peft):
        model = tiny_model("llama")
        if resize:
            model.config._name_or_path = base_dir
            model.resize_token_embeddings(72)
        pm = lib.get_peft_model(model, lib.LoraConfig(target_modules=targets))
        pm.peft_config["default"].base_model_name_or_path = base_dir if resize else None
        got[lib.__name__] = _saved_full_keys(pm, str(tmp_path / lib.__name__), save)
    assert got["fastpeft"] == got["peft"]


# -- model card -----------------------------------------------------------------------------------------
def _card(folder):
    return ModelCard.load(os.path.join(folder, "README.md"))


def test_model_card_metadata_as_peft(tmp_path):
    base = tiny_model("llama")
    base.config._name_or_path = base.name_or_path = "org/base-model"
    ours, theirs = peft_model_twins(base, dict(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    ours.save_pretrained(str(tmp_path / "a"))
    theirs.save_pretrained(str(tmp_path / "b"))
    a, b = _card(tmp_path / "a").data.to_dict(), _card(tmp_path / "b").data.to_dict()
    assert a == b and a["base_model"] == "org/base-model" and a["library_name"] == "peft"
    # fastpeft's card loads back into peft's and is updated by a peft save without errors
    theirs.save_pretrained(str(tmp_path / "a"))
    assert _card(tmp_path / "a").data.to_dict()["library_name"] == "peft"


def test_model_card_unknown_base_model_is_left_out(tmp_path):
    ours, theirs = peft_model_twins(tiny_model("llama"), dict(target_modules=["q_proj"]))
    ours.save_pretrained(str(tmp_path / "a"))
    theirs.save_pretrained(str(tmp_path / "b"))
    a, b = _card(tmp_path / "a").data.to_dict(), _card(tmp_path / "b").data.to_dict()
    assert b["base_model"] == "" and "base_model" not in a  # peft writes an empty base_model; fastpeft none
    assert a["tags"] == [t for t in b["tags"] if t != "base_model:adapter:"]
    assert {k: v for k, v in a.items() if k != "tags"} == {k: v for k, v in b.items() if k not in ("tags", "base_model")}


@pytest.mark.parametrize("existing", ["---\nlicense: mit\ntags:\n- mytag\n---\n\n# My model\n\nHello.\n",
                                      "# No header\n\nHello.\n"])
def test_existing_card_is_updated_as_peft_updates_it(tmp_path, existing):
    base = tiny_model("llama")
    base.config._name_or_path = base.name_or_path = "org/base-model"
    ours, theirs = peft_model_twins(base, dict(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    for name, pm in (("a", ours), ("b", theirs)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "README.md").write_text(existing)
        pm.save_pretrained(str(tmp_path / name))
    a, b = _card(tmp_path / "a"), _card(tmp_path / "b")
    da, db = a.data.to_dict(), b.data.to_dict()
    assert {k: v for k, v in da.items() if k != "tags"} == {k: v for k, v in db.items() if k != "tags"}
    assert set(db["tags"]) <= set(da["tags"])  # peft drops the user's tags; fastpeft keeps them
    assert ("mytag" in da["tags"]) == ("mytag" in existing)
    body = existing.split("---\n")[-1].strip() if existing.startswith("---") else existing.strip()
    assert body in a.text and "### Framework versions" in a.text
    # saving again does not repeat the framework line
    ours.save_pretrained(str(tmp_path / "a"))
    assert _card(tmp_path / "a").text.count("- fastpeft ") == 1


# -- low_cpu_mem_usage ------------------------------------------------------------------------------------
def _count_inits(monkeypatch) -> list:
    from fastpeft.tuners.lora import embedding, linear

    calls = []
    for cls in (linear.Linear, embedding.Embedding):
        original = cls._init_adapter_weights

        def counted(self, *args, _original=original, **kwargs):
            calls.append(type(self).__name__)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, "_init_adapter_weights", counted)
    return calls


def _adapter_tensors(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("use_dora", [False, True])
def test_low_cpu_mem_usage_creates_on_meta_and_loads_identically(tmp_path, monkeypatch, use_dora):
    base = tiny_model("llama")
    cfg = dict(target_modules=["q_proj", "v_proj"] + ([] if use_dora else ["embed_tokens"]),
               modules_to_save=["lm_head"], init_lora_weights=False, use_dora=use_dora)
    inputs = tiny_inputs("llama")
    trained = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    trained.save_pretrained(str(tmp_path))
    calls = _count_inits(monkeypatch)

    fresh = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg), low_cpu_mem_usage=True)
    assert all(p.is_meta for p in _adapter_tensors(fresh).values()) and calls == []
    assert not fresh.base_model.model.lm_head.modules_to_save["default"].weight.is_meta  # a copy, as in peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), low_cpu_mem_usage=True)
        assert calls == []  # nothing was initialised: the load filled every adapter tensor
        normal = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), low_cpu_mem_usage=True)
        fast.load_adapter(str(tmp_path), "again", low_cpu_mem_usage=True)
        theirs.load_adapter(str(tmp_path), "again", low_cpu_mem_usage=True)
    a, b = _adapter_tensors(fast), _adapter_tensors(normal)
    assert not any(p.is_meta for p in a.values())
    assert {n: (p.dtype, p.device, p.requires_grad) for n, p in _adapter_tensors(fast).items()} == \
        {n: (p.dtype, p.device, p.requires_grad) for n, p in _adapter_tensors(theirs).items()}
    assert all(torch.equal(a[n], b[n]) for n in b)
    assert torch.equal(_out(fast, inputs), _out(normal, inputs))
    assert max_abs_diff(_out(fast, inputs), _out(theirs, inputs)) < 1e-5
    fast.set_adapter("again")
    theirs.set_adapter("again")
    assert max_abs_diff(_out(fast, inputs), _out(theirs, inputs)) < 1e-5


def test_low_cpu_mem_usage_in_add_adapter_and_inject(monkeypatch):
    calls = _count_inits(monkeypatch)
    cfg = dict(target_modules=["q_proj"])
    pm = fastpeft.get_peft_model(tiny_model("llama"), fastpeft.LoraConfig(**cfg))
    calls.clear()
    pm.add_adapter("b", fastpeft.LoraConfig(**cfg), low_cpu_mem_usage=True)
    assert calls == [] and all(p.is_meta for n, p in pm.named_parameters() if ".b." in n)
    assert not any(p.is_meta for n, p in pm.named_parameters() if ".default." in n)
    model = fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(**cfg), tiny_model("llama"), low_cpu_mem_usage=True)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), tiny_model("llama"), low_cpu_mem_usage=True)
    assert calls == []
    assert {n: (p.is_meta, p.requires_grad) for n, p in model.named_parameters()} == \
        {n: (p.is_meta, p.requires_grad) for n, p in theirs.named_parameters()}


# -- ignore_mismatched_sizes ---------------------------------------------------------------------------
def test_ignore_mismatched_sizes_as_peft(tmp_path):
    import json

    base = tiny_model("llama")
    inputs = tiny_inputs("llama")
    trained = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                        init_lora_weights=False))
    trained.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["rank_pattern"] = {"q_proj": 8}  # the file holds rank 4 for q_proj: a mismatch
    path.write_text(json.dumps(cfg))
    errors = {}
    for lib in (fastpeft, peft):
        with pytest.raises(RuntimeError) as exc:
            lib.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
        errors[lib.__name__] = str(exc.value)
    assert "q_proj.lora_A" in errors["fastpeft"] and "[4, 16]" in errors["fastpeft"]
    outs, texts = {}, {}
    for lib in (fastpeft, peft):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(0)
            m = lib.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), ignore_mismatched_sizes=True)
        texts[lib.__name__] = [str(w.message).split(":")[0] for w in caught
                               if "`ignore_mismatched_sizes=True`" in str(w.message)]
        assert m.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (8, 16)
        assert torch.equal(m.base_model.model.model.layers[0].self_attn.v_proj.lora_A["default"].weight,
                           trained.base_model.model.model.layers[0].self_attn.v_proj.lora_A["default"].weight)
        outs[lib.__name__] = _out(m, inputs)  # q_proj keeps its zero-B init in both: no effect
    assert texts["fastpeft"] == texts["peft"] and len(texts["fastpeft"]) == 1
    assert max_abs_diff(outs["fastpeft"], outs["peft"]) < 1e-5


# -- base model state dict, PeftWarning -------------------------------------------------------------------
@pytest.mark.parametrize("kind,cfg", [
    ("llama", dict(target_modules=["q_proj", "embed_tokens", "lm_head"], modules_to_save=["norm"])),
    ("llama_seqcls", dict(target_modules=["q_proj"], task_type="SEQ_CLS", use_dora=True)),
    ("gpt2", dict(target_modules=["c_attn"])),
])
def test_get_base_model_state_dict_as_peft(kind, cfg):
    base = tiny_model(kind)
    ours, theirs = peft_model_twins(base, cfg)
    a, b = fastpeft.get_base_model_state_dict(ours), peft.get_base_model_state_dict(theirs)
    assert list(a) == list(b) and set(a) == set(base.state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)
    tiny_model(kind, seed=3).load_state_dict(a, strict=True)


def test_lora_bias_without_base_bias_warns_peft_warning():
    texts = {}
    for lib in (fastpeft, peft):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lib.get_peft_model(model, lib.LoraConfig(target_modules=["0"], lora_bias=True))
        hits = [w for w in caught if issubclass(w.category, lib.PeftWarning)]
        assert len(hits) == 1
        texts[lib.__name__] = str(hits[0].message)
    assert texts["fastpeft"] == texts["peft"]
