"""Bad files and bad arguments fail with errors that name the problem, and leave the model untouched."""
from __future__ import annotations

import builtins
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastpeft.mapping import get_peft_model
from fastpeft.peft_model import PeftModel
from fastpeft.tuners.lora.config import LoraConfig
from fastpeft.utils.save_and_load import validate_adapter_name

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

BAD_NAMES = ["", "   ", ".", "..", "a/b", "../escape", "a\\b", "a.b", "train", None, 3]


def _lora(**kw):
    kw.setdefault("r", 4)
    return LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kw)


@pytest.fixture
def saved(tiny, tmp_path):
    """A folder holding a valid tiny OPT adapter."""
    folder = tmp_path / "adapter"
    get_peft_model(tiny.model("opt"), _lora()).save_pretrained(str(folder))
    return folder


def _untouched(model) -> bool:
    return not any("lora_" in n for n, _ in model.named_parameters()) and not hasattr(model, "peft_config")


class _Payload:
    """Unpickling this creates a file: proof that code ran during loading."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def test_bin_is_loaded_with_weights_only(tiny, saved, tmp_path):
    weights = load_file(str(saved / "adapter_model.safetensors"))
    os.remove(saved / "adapter_model.safetensors")
    marker = tmp_path / "code_ran"
    evil = dict(weights)
    evil["base_model.model.extra"] = _Payload(str(marker))
    torch.save(evil, saved / "adapter_model.bin")
    model = tiny.model("opt")
    with pytest.raises(ValueError, match="adapter_model.bin") as err:
        PeftModel.from_pretrained(model, str(saved))
    assert "weights_only" in str(err.value)
    assert not marker.exists()
    assert _untouched(model)

    # a plain tensor-only .bin loads fine
    torch.save(weights, saved / "adapter_model.bin")
    PeftModel.from_pretrained(tiny.model("opt"), str(saved))


def test_bin_with_non_tensor_values(tiny, saved):
    os.remove(saved / "adapter_model.safetensors")
    torch.save({"base_model.model.x": 3}, saved / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin"):
        PeftModel.from_pretrained(tiny.model("opt"), str(saved))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_names_the_file(tiny, saved, damage):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\xff" * 100, "empty": b""}[damage])
    model = tiny.model("opt")
    with pytest.raises(ValueError, match="adapter_model.safetensors") as err:
        PeftModel.from_pretrained(model, str(saved))
    assert str(path) in str(err.value)
    assert _untouched(model)


def test_shape_mismatch_names_key_and_shapes_and_rolls_back(tiny, saved):
    cfg_path = saved / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 8
    cfg_path.write_text(json.dumps(cfg))
    model = tiny.model("opt")
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(model, str(saved))
    msg = str(err.value)
    assert "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "expected shape [8, 16]" in msg and "found [4, 16]" in msg
    assert str(saved) in msg
    assert _untouched(model)  # the caller gets the plain model back
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_shape_mismatch_in_file_via_load_adapter(tiny, saved):
    path = saved / "adapter_model.safetensors"
    weights = load_file(str(path))
    key = "base_model.model.model.decoder.layers.1.self_attn.v_proj.lora_B.weight"
    weights[key] = torch.zeros(16, 5)
    save_file(weights, str(path))
    pm = get_peft_model(tiny.model("opt"), _lora())
    keys = set(pm.state_dict())
    with pytest.raises(ValueError, match=r"v_proj\.lora_B\.weight: expected shape \[16, 4\].*found \[16, 5\]"):
        pm.load_adapter(str(saved), adapter_name="other")
    assert list(pm.peft_config) == ["default"]  # the half-added adapter is removed again
    assert set(pm.state_dict()) == keys


def test_missing_config(tiny, saved):
    os.remove(saved / "adapter_config.json")
    model = tiny.model("opt")
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(model, str(saved))
    assert _untouched(model)


def test_invalid_json_names_the_file(tiny, saved):
    (saved / "adapter_config.json").write_text("{not json")
    model = tiny.model("opt")
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(model, str(saved))
    assert str(saved / "adapter_config.json") in str(err.value)
    assert _untouched(model)


def test_missing_weights(tiny, saved):
    os.remove(saved / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny.model("opt"), str(saved))


def test_unimplemented_adapter_type(tiny, saved):
    cfg_path = saved / "adapter_config.json"
    cfg_path.write_text(json.dumps({"peft_type": "IA3", "task_type": "CAUSAL_LM"}))
    with pytest.raises(NotImplementedError, match="IA3"):
        PeftModel.from_pretrained(tiny.model("opt"), str(saved))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_adapter_names(name, tiny, saved):
    with pytest.raises(ValueError, match="adapter_name"):
        validate_adapter_name(name)
    model = tiny.model("opt")
    with pytest.raises(ValueError, match="adapter_name"):
        get_peft_model(model, _lora(), adapter_name=name)
    with pytest.raises(ValueError, match="adapter_name"):
        PeftModel.from_pretrained(model, str(saved), adapter_name=name)
    assert _untouched(model)
    pm = get_peft_model(model, _lora())
    with pytest.raises(ValueError, match="adapter_name"):
        pm.add_adapter(name, _lora())
    with pytest.raises(ValueError, match="adapter_name"):
        pm.load_adapter(str(saved), adapter_name=name)
    assert list(pm.peft_config) == ["default"]


def test_good_adapter_names_accepted():
    for name in ("default", "my-adapter_2", "Ü"):
        assert validate_adapter_name(name) == name


def test_bad_arguments(tiny, tmp_path):
    pm = get_peft_model(tiny.model("opt"), _lora())
    with pytest.raises(ValueError, match="'nope'"):
        pm.set_adapter("nope")
    with pytest.raises(ValueError, match="'nope'"):
        pm.delete_adapter("nope")
    with pytest.raises(ValueError, match="nope"):
        pm.save_pretrained(str(tmp_path / "x"), selected_adapters=["nope"])
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        pm.save_pretrained(str(a_file))
    with pytest.raises(TypeError, match="PeftConfig"):
        get_peft_model(tiny.model("opt"), {"r": 4})
