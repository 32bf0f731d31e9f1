"""adapter_config.json files that are not configs of the class asked for, loaded by fastpeft and by peft.

peft refuses a file whose keys the class does not know when it has no ``peft_type`` to say which class it
belongs to (TypeError, "... missing required keys: {'peft_type'}."), and loads files with unknown keys but a
peft_type with a warning that starts "Unexpected keyword arguments [...] for class X, these are ignored."
fastpeft must refuse and warn alike (same exception type, same text; fastpeft appends the file name).
"""
from __future__ import annotations

import json
import re
import warnings

import peft
import pytest
import torch

import fastpeft

CLASSES = ["PeftConfig", "LoraConfig", "PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig"]


def _folder(tmp_path, content: dict, name: str = "cfg"):
    path = tmp_path / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(content))
    return str(path)


def _error(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the exception itself is what is compared
            return exc
    raise AssertionError("expected an error, none was raised")


def _without_file(message: str) -> str:
    return re.sub(r" \(file: [^)]*\)$", "", message)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("content", [{"foo": "bar"}, {"r": 4, "target_modules": ["q"], "foo": 1}])
def test_untyped_json_with_unknown_keys_is_refused_as_peft_refuses(tmp_path, cls, content):
    folder = _folder(tmp_path, content)
    ours = _error(lambda: getattr(fastpeft, cls).from_pretrained(folder))
    theirs = _error(lambda: getattr(peft, cls).from_pretrained(folder))
    assert type(ours) is type(theirs) is TypeError
    assert _without_file(str(ours)) == str(theirs)
    assert "'peft_type'" in str(ours) and folder in str(ours)  # names the missing key and the file


def test_lora_config_without_peft_type(tmp_path):
    # peft: the generic class cannot tell what the keys are (refused); LoraConfig knows them all (loads)
    folder = _folder(tmp_path, {"r": 4, "target_modules": ["q"], "lora_alpha": 8})
    ours, theirs = _error(lambda: fastpeft.PeftConfig.from_pretrained(folder)), \
        _error(lambda: peft.PeftConfig.from_pretrained(folder))
    assert type(ours) is type(theirs) is TypeError and _without_file(str(ours)) == str(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = fastpeft.LoraConfig.from_pretrained(folder), peft.LoraConfig.from_pretrained(folder)
    assert (a.r, a.lora_alpha, set(a.target_modules)) == (b.r, b.lora_alpha, set(b.target_modules)) == (4, 8, {"q"})


def test_empty_json_through_the_generic_class_is_refused(tmp_path):
    # deliberate difference: peft returns an untyped bare PeftConfig for {}, which no model can use
    folder = _folder(tmp_path, {})
    exc = _error(lambda: fastpeft.PeftConfig.from_pretrained(folder))
    assert isinstance(exc, TypeError) and "'peft_type'" in str(exc)
    assert type(fastpeft.LoraConfig.from_pretrained(folder)) is fastpeft.LoraConfig  # as peft


def test_unknown_keys_warn_with_peft_text(tmp_path):
    folder = _folder(tmp_path, {"peft_type": "LORA", "r": 4, "target_modules": ["q"], "foo": 1, "bar": 2})
    for loader in (lambda lib: lib.LoraConfig.from_pretrained(folder), lambda lib: lib.PeftConfig.from_pretrained(folder),
                   lambda lib: lib.PeftConfig.from_peft_type(peft_type="LORA", r=4, foo=1, bar=2)):
        got = {}
        for lib in (fastpeft, peft):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cfg = loader(lib)
            texts = [str(w.message) for w in caught if "Unexpected keyword arguments" in str(w.message)]
            assert len(texts) == 1, [str(w.message) for w in caught]
            assert type(cfg).__name__ == "LoraConfig" and cfg.r == 4
            got[lib.__name__] = texts[0].split(". ")[0]
        assert got["fastpeft"] == got["peft"] == \
            "Unexpected keyword arguments ['bar', 'foo'] for class LoraConfig, these are ignored"


def test_a_filter_on_peft_text_silences_fastpeft(tmp_path):
    folder = _folder(tmp_path, {"peft_type": "LORA", "foo": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message="Unexpected keyword arguments")
        fastpeft.LoraConfig.from_pretrained(folder)
    assert not caught


def test_from_dict_and_from_peft_type_refuse_untyped_unknown_keys():
    for lib in (fastpeft, peft):
        exc = _error(lambda: lib.PeftConfig.from_peft_type(r=2))
        assert isinstance(exc, TypeError) and "'peft_type'" in str(exc)
    exc = _error(lambda: fastpeft.LoraConfig.from_dict({"foo": "bar"}))
    assert isinstance(exc, TypeError) and str(exc) == \
        "The LoraConfig config that is trying to be loaded is missing required keys: {'peft_type'}."


def test_model_loading_refuses_an_untyped_folder(tmp_path):
    folder = _folder(tmp_path, {"foo": "bar"})
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    exc = _error(lambda: fastpeft.PeftModel.from_pretrained(model, folder))
    assert isinstance(exc, TypeError) and "'peft_type'" in str(exc)
    assert _error(lambda: peft.PeftModel.from_pretrained(model, folder)) is not None  # peft: KeyError('peft_type')
    assert not any(hasattr(m, "lora_A") for m in model.modules())  # the model was not touched


def test_get_peft_config_as_peft():
    d = {"peft_type": "LORA", "r": 3, "target_modules": ["q"]}
    ours, theirs = fastpeft.get_peft_config(dict(d)), peft.get_peft_config(dict(d))
    assert type(ours).__name__ == type(theirs).__name__ == "LoraConfig" and ours.r == theirs.r == 3
    with pytest.raises(TypeError, match="peft_type"):
        fastpeft.get_peft_config({"r": 3})
