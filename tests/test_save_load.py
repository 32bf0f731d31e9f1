"""Saving and loading adapter folders with fastpeft alone: layout, round trips, modes, Auto classes, atomicity."""
from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from fastpeft.auto import AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
from fastpeft.mapping import get_peft_model
from fastpeft.peft_model import PeftModel, PeftModelForCausalLM
from fastpeft.tuners.lora.config import LoraConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

TOL = 1e-5


def _lora(task_type="CAUSAL_LM", **kw):
    kw.setdefault("r", 4)
    kw.setdefault("init_lora_weights", False)
    return LoraConfig(task_type=task_type, **kw)


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def _snapshot(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def test_layout_and_keys(tiny, tmp_path):
    pm = get_peft_model(tiny.model("llama"), _lora(target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("second", _lora(r=2, target_modules=["k_proj"]))
    pm.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "second"]
    assert sorted(os.listdir(tmp_path / "second")) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == sorted(f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
                          for i in range(2) for m in ("q_proj", "v_proj") for ab in "AB")
    second = load_file(str(tmp_path / "second" / "adapter_model.safetensors"))
    assert sorted(second) == sorted(f"base_model.model.model.layers.{i}.self_attn.k_proj.lora_{ab}.weight"
                                    for i in range(2) for ab in "AB")
    assert second["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (2, 16)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["inference_mode"] is True and cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert pm.peft_config["default"].inference_mode is False  # saving does not change the live config
    readme = open(tmp_path / "README.md").read()
    assert readme.startswith("---\n") and "library_name: peft" in readme and "`second`" in readme


def test_selected_adapters_and_bin(tiny, tmp_path):
    pm = get_peft_model(tiny.model("opt"), _lora())
    pm.add_adapter("b", _lora(r=2))
    pm.save_pretrained(str(tmp_path), selected_adapters=["b"], safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "b"]
    assert sorted(os.listdir(tmp_path / "b")) == ["adapter_config.json", "adapter_model.bin"]
    sd = torch.load(tmp_path / "b" / "adapter_model.bin", weights_only=True)
    assert sd and all(".b." not in k and "lora_" in k for k in sd)


@pytest.mark.parametrize("kind,task", [("llama", "CAUSAL_LM"), ("roberta", "SEQ_CLS"), ("gpt2", "CAUSAL_LM"),
                                       ("roberta_qa", "QUESTION_ANS"), ("roberta_tok", "TOKEN_CLS")])
def test_round_trip_outputs(kind, task, tiny, tmp_path):
    inputs = tiny.inputs(kind)
    targets = ["c_attn"] if kind == "gpt2" else None
    pm = get_peft_model(tiny.model(kind), _lora(task, target_modules=targets))
    with torch.no_grad():  # make the modules_to_save head differ from the base head
        for n, p in pm.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.5)
    ref = tiny.output(pm, kind, inputs)
    pm.save_pretrained(str(tmp_path))

    loaded = PeftModel.from_pretrained(tiny.model(kind), str(tmp_path))
    assert _diff(tiny.output(loaded, kind, inputs), ref) <= TOL
    assert set(loaded.state_dict()) == set(pm.state_dict())
    assert not loaded.training
    assert not any(p.requires_grad for n, p in loaded.named_parameters())  # inference: frozen

    trainable = PeftModel.from_pretrained(tiny.model(kind), str(tmp_path), is_trainable=True)
    assert trainable.peft_config["default"].inference_mode is False
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in pm.named_parameters() if p.requires_grad}


def test_non_default_adapter_name_and_load_adapter(tiny, tmp_path):
    kind = "llama"
    inputs = tiny.inputs(kind)
    pm = get_peft_model(tiny.model(kind), _lora(target_modules=["q_proj"]), adapter_name="first")
    pm.add_adapter("second", _lora(target_modules=["v_proj", "up_proj"]))
    refs = {}
    for name in ("first", "second"):
        pm.set_adapter(name)
        refs[name] = tiny.output(pm, kind, inputs)
    pm.save_pretrained(str(tmp_path))
    # no adapter is called "default": every adapter goes to its own subfolder
    assert sorted(os.listdir(tmp_path)) == ["README.md", "first", "second"]

    loaded = PeftModel.from_pretrained(tiny.model(kind), str(tmp_path / "first"), adapter_name="first")
    loaded.load_adapter(str(tmp_path), adapter_name="second", subfolder="second")
    assert loaded.active_adapter == "first"
    assert _diff(tiny.output(loaded, kind, inputs), refs["first"]) <= TOL
    loaded.set_adapter("second")
    assert _diff(tiny.output(loaded, kind, inputs), refs["second"]) <= TOL

    # loading into an existing adapter overwrites its weights
    with torch.no_grad():
        for n, p in loaded.named_parameters():
            if ".second." in n:
                p.zero_()
    assert _diff(tiny.output(loaded, kind, inputs), refs["second"]) > 1e-4
    result = loaded.load_adapter(str(tmp_path / "second"), adapter_name="second")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert _diff(tiny.output(loaded, kind, inputs), refs["second"]) <= TOL


def test_load_adapter_trainable_flag(tiny, tmp_path):
    pm = get_peft_model(tiny.model("opt"), _lora())
    pm.save_pretrained(str(tmp_path))
    target = get_peft_model(tiny.model("opt"), _lora(r=2), adapter_name="main")
    target.load_adapter(str(tmp_path), adapter_name="frozen")
    assert target.peft_config["frozen"].inference_mode is True
    frozen = [p for n, p in target.named_parameters() if ".frozen." in n]
    assert frozen and not any(p.requires_grad for p in frozen)
    target.load_adapter(str(tmp_path), adapter_name="trainable", is_trainable=True)
    target.set_adapter("trainable")
    trainable = [p for n, p in target.named_parameters() if ".trainable." in n]
    assert trainable and all(p.requires_grad for p in trainable)


def test_base_model_name_or_path_and_auto_class(tiny, tiny_base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = tiny_base_dir("llama")
    inputs = tiny.inputs("llama")
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), _lora())
    ref = tiny.output(pm, "llama", inputs)
    pm.save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["base_model_name_or_path"] == base_dir and cfg["auto_mapping"] is None
    assert base_dir in open(tmp_path / "README.md").read()

    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path))
    assert type(model) is PeftModelForCausalLM
    assert _diff(tiny.output(model, "llama", inputs), ref) <= TOL
    out = model.generate(input_ids=inputs["input_ids"][:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)

    with pytest.raises(ValueError, match="task_type"):
        AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="task_type"):
        AutoPeftModel.from_pretrained(str(tmp_path))


def test_auto_peft_model_without_task_type_uses_auto_mapping(tiny, tiny_base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = tiny_base_dir("llama")
    inputs = tiny.inputs("llama")
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), _lora(task_type=None))
    assert type(pm) is PeftModel
    ref = tiny.output(pm, "llama", inputs)
    pm.save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                   "parent_library": "transformers.models.llama.modeling_llama"}
    model = AutoPeftModel.from_pretrained(str(tmp_path))
    assert type(model) is PeftModel
    assert _diff(tiny.output(model, "llama", inputs), ref) <= TOL


def test_auto_class_needs_base_model_path(tiny, tmp_path):
    get_peft_model(tiny.model("llama"), _lora()).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        AutoPeftModelForCausalLM.from_pretrained(str(tmp_path))


def test_user_readme_is_kept(tiny, tmp_path):
    # the user's text stays; peft's header keys are added (tests/test_api_details.py compares them with peft)
    (tmp_path / "README.md").write_text("my own card\n")
    get_peft_model(tiny.model("opt"), _lora()).save_pretrained(str(tmp_path))
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("---\n") and "library_name: peft" in text and "my own card\n" in text


def test_failed_save_keeps_old_adapter(tiny, tmp_path, monkeypatch):
    pm = get_peft_model(tiny.model("opt"), _lora())
    pm.add_adapter("b", _lora(r=2))
    pm.save_pretrained(str(tmp_path))
    before = _snapshot(tmp_path)

    with torch.no_grad():
        for p in pm.parameters():
            p.add_(1.0)
    real_save_file = safetensors.torch.save_file
    calls = []

    def half_then_fail(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second adapter: write part of a file, then die
            with open(filename, "wb") as fh:
                fh.write(b"\x00" * 17)
            raise OSError("disk full (simulated)")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        pm.save_pretrained(str(tmp_path))
    assert _snapshot(tmp_path) == before  # every old file intact, no temporary leftovers
    monkeypatch.undo()

    # a later successful save replaces the files, and switching format removes the stale weights
    pm.save_pretrained(str(tmp_path), safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.bin", "b"]
    loaded = PeftModel.from_pretrained(tiny.model("opt"), str(tmp_path))
    w = dict(loaded.named_parameters())["base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.default.weight"]
    torch.testing.assert_close(w, pm.base_model.model.model.decoder.layers[0].self_attn.q_proj.lora_A["default"].weight)


def test_save_with_tied_embedding_weights(tiny, tmp_path):
    """Tied input/output embeddings saved in full do not trip safetensors' shared-tensor check."""
    model = tiny.model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tie them
    pm = get_peft_model(model, _lora(target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path), save_embedding_layers=True)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= set(saved)
    torch.testing.assert_close(saved["base_model.model.lm_head.weight"], model.lm_head.weight.detach())


# -- wrapped models and the state_dict argument (the 2-rank engine runs are in tests/distributed) --------
class _Wrapper(torch.nn.Module):
    """Holds the model as ``module`` (DDP, DeepSpeedEngine and accelerate do the same)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_state_dict_argument_is_what_gets_saved(tiny, tmp_path):
    """save_pretrained(state_dict=...) saves that dict's tensors (as peft does), under DDP's "module."
    prefix too; the model's own tensors are not read."""
    from fastpeft.utils.save_and_load import get_peft_model_state_dict

    pm = get_peft_model(tiny.model("llama"), _lora(target_modules=["q_proj", "v_proj"]))
    own = get_peft_model_state_dict(pm)
    sd = {k: v + 1.0 if "lora_" in k else v for k, v in pm.state_dict().items()}
    for prefix in ("", "module."):
        folder = tmp_path / (prefix or "plain")
        pm.save_pretrained(str(folder), state_dict={prefix + k: v for k, v in sd.items()})
        saved = load_file(str(folder / "adapter_model.safetensors"))
        assert sorted(saved) == sorted(own)
        for k in own:
            torch.testing.assert_close(saved[k], own[k] + 1.0, rtol=0, atol=0)
    # a partial state dict saves what it has (peft: no error, the missing tensors are just absent)
    part = {k: v for k, v in sd.items() if "layers.0." in k}
    pm.save_pretrained(str(tmp_path / "part"), state_dict=part)
    saved = load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    assert saved and all("layers.0." in k for k in saved)


def test_wrappers_are_looked_through(tiny):
    from fastpeft.utils.save_and_load import canonical_key, get_peft_model_state_dict, unwrap_model

    pm = get_peft_model(tiny.model("llama"), _lora(target_modules=["q_proj"]))
    want = get_peft_model_state_dict(pm)
    compiled = torch.compile(pm)  # an OptimizedModule: "_orig_mod." in its state_dict keys; nothing compiles here
    for wrapped in (_Wrapper(pm), _Wrapper(_Wrapper(pm)), compiled, _Wrapper(compiled)):
        assert unwrap_model(wrapped) is pm
        got = get_peft_model_state_dict(wrapped)
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert get_peft_model_state_dict(pm, unwrap_compiled=True).keys() == want.keys()
    assert canonical_key("module.base_model.model.layers.0._fsdp_wrapped_module.q_proj.lora_A.default.weight") == \
        "base_model.model.layers.0.q_proj.lora_A.default.weight"
    assert canonical_key("_orig_mod.base_model.x._checkpoint_wrapped_module.y") == "base_model.x.y"


def test_is_main_process(tiny, tmp_path):
    """Only the main process writes; a non-main process given state_dict=None explicitly (accelerate's
    get_state_dict off rank 0 under ZeRO-3) returns without reading the model."""
    pm = get_peft_model(tiny.model("llama"), _lora(target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path / "no"), is_main_process=False)
    assert not (tmp_path / "no").exists()
    pm.save_pretrained(str(tmp_path / "none"), is_main_process=False, state_dict=None)
    assert not (tmp_path / "none").exists()
    pm.save_pretrained(str(tmp_path / "yes"))  # no process group: this process is the main one
    assert (tmp_path / "yes" / "adapter_model.safetensors").is_file()
