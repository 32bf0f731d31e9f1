"""Prompt tuning, p-tuning and prefix tuning against HF peft on tiny OPT, Llama, GPT-2, RoBERTa and T5 models.

Each test builds bit-identical twin models (tests/_support/models.py), applies the same adapter with both
libraries and compares parameter counts, the files written, and the outputs after loading one
library's files in the other.
"""
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft import PeftModel

from .prompt_helpers import KINDS, METHODS, make_config, perturb_prompt

peft = pytest.importorskip("peft")

CASES = [(k, m) for k in KINDS for m in METHODS
         # peft 0.21 refuses prefix tuning on RoBERTa (its forward declares no key/value cache); see below
         if not (k.startswith("roberta") and m.startswith("prefix"))]


def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*[Pp]osition ids.*")


def _read(folder):
    cfg = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    cfg.pop("peft_version")
    return cfg, load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.parametrize("kind,method", CASES)
def test_same_model_and_files_as_peft(tiny, tmp_path, kind, method):
    """Same seeds -> same trainable/total counts, same adapter_config.json, same prompt_embeddings."""
    _quiet()
    task = KINDS[kind]
    torch.manual_seed(11)
    ours = fastpeft.get_peft_model(tiny.model(kind), make_config(fastpeft, method, task))
    torch.manual_seed(11)
    theirs = peft.get_peft_model(tiny.model(kind), make_config(peft, method, task))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    (cfg_a, w_a), (cfg_b, w_b) = _read(tmp_path / "ours"), _read(tmp_path / "theirs")
    # peft appends the task heads to modules_to_save twice; fastpeft writes them once
    for c in (cfg_a, cfg_b):
        if c["modules_to_save"]:
            c["modules_to_save"] = sorted(set(c["modules_to_save"]))
    assert cfg_a == cfg_b
    assert set(w_a) == set(w_b)
    for key in w_a:  # same seed, same init order -> same values
        torch.testing.assert_close(w_a[key], w_b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("kind,method", CASES)
def test_round_trip_both_ways(tiny, tmp_path, kind, method):
    _quiet()
    task = KINDS[kind]
    inputs = tiny.inputs(kind)
    # peft -> fastpeft
    theirs = peft.get_peft_model(tiny.model(kind), make_config(peft, method, task))
    perturb_prompt(theirs)
    theirs.save_pretrained(str(tmp_path / "p"))
    expected = tiny.output(peft.PeftModel.from_pretrained(tiny.model(kind), str(tmp_path / "p")), kind, inputs)
    loaded = PeftModel.from_pretrained(tiny.model(kind), str(tmp_path / "p"))
    assert type(loaded).__name__ == type(theirs).__name__
    torch.testing.assert_close(tiny.output(loaded, kind, inputs), expected, rtol=0, atol=1e-5)
    # fastpeft -> peft, and the trained model itself agrees with both reloads
    ours = fastpeft.get_peft_model(tiny.model(kind), make_config(fastpeft, method, task))
    perturb_prompt(ours, seed=3)
    live = tiny.output(ours, kind, inputs)
    ours.save_pretrained(tmp_path / "f")
    again = tiny.output(PeftModel.from_pretrained(tiny.model(kind), str(tmp_path / "f")), kind, inputs)
    other = tiny.output(peft.PeftModel.from_pretrained(tiny.model(kind), str(tmp_path / "f")), kind, inputs)
    torch.testing.assert_close(again, live, rtol=0, atol=1e-5)
    torch.testing.assert_close(other, live, rtol=0, atol=1e-5)
    plain = tiny.output(tiny.model(kind), kind, inputs)
    if live.dim() == 3 and live.shape[1] != plain.shape[1]:  # logits of the virtual tokens come first
        assert live.shape[1] == plain.shape[1] + 3
        live = live[:, 3:]
    assert not torch.allclose(live, plain, atol=1e-4), "prompt had no effect"


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_train_mode_outputs_equal_peft(tiny, kind):
    """Same weights, train mode, with labels: identical logits and loss (labels padded with -100)."""
    _quiet()
    task = KINDS[kind]
    for method in ("prompt", "ptuning_lstm", "prefix_proj"):
        torch.manual_seed(5)
        ours = fastpeft.get_peft_model(tiny.model(kind), make_config(fastpeft, method, task))
        torch.manual_seed(5)
        theirs = peft.get_peft_model(tiny.model(kind), make_config(peft, method, task))
        inputs = tiny.inputs(kind)
        labels = inputs["decoder_input_ids"] if kind == "t5" else inputs["input_ids"]
        inputs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
        torch.manual_seed(0)  # same dropout masks: both consume the RNG in the same order
        a = ours(**inputs, labels=labels)
        torch.manual_seed(0)
        b = theirs(**inputs, labels=labels)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-5)


def test_prefix_refused_on_encoder_without_cache(tiny):
    model = fastpeft.get_peft_model(tiny.model("roberta"), make_config(fastpeft, "prefix", "SEQ_CLS"))
    with pytest.raises(ValueError, match="RobertaForSequenceClassification.*past_key_values|past_key_values.*Roberta"):
        model(**tiny.inputs("roberta"))


def test_gqa_prefix_fields_written_like_peft(tiny, tmp_path):
    model = fastpeft.get_peft_model(tiny.model("llama"), make_config(fastpeft, "prefix", "CAUSAL_LM"))
    cfg = model.peft_config["default"]
    # the tiny llama has 2 query heads sharing 1 key/value head of width 8
    assert (cfg.token_dim, cfg.num_attention_heads, cfg.num_layers, cfg.num_transformer_submodules) == (8, 1, 2, 1)
    assert model.prompt_encoder["default"].embedding.weight.shape == (3, 2 * 2 * 8)


@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp", "prefix"])
def test_is_trainable_refused_like_peft(tiny, tmp_path, method):
    ours = fastpeft.get_peft_model(tiny.model("opt"), make_config(fastpeft, method, "CAUSAL_LM"))
    ours.save_pretrained(tmp_path)
    with pytest.raises(ValueError):
        peft.PeftModel.from_pretrained(tiny.model("opt"), str(tmp_path), is_trainable=True)
    base = tiny.model("opt")
    with pytest.raises(ValueError, match="is_trainable=True"):
        PeftModel.from_pretrained(base, str(tmp_path), is_trainable=True)
    assert not hasattr(base, "peft_config")
    with pytest.raises(ValueError, match="is_trainable=True"):
        ours.load_adapter(str(tmp_path), "second", is_trainable=True)
    assert list(ours.peft_config) == ["default"]
    frozen = PeftModel.from_pretrained(tiny.model("opt"), str(tmp_path))
    assert not frozen.training and frozen.peft_config["default"].inference_mode


def test_saved_token_dim_mismatch_is_clear(tiny, tmp_path):
    model = fastpeft.get_peft_model(tiny.model("opt"), make_config(fastpeft, "prompt", "CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["token_dim"] = 32
    path.write_text(json.dumps(data))
    base = tiny.model("opt")
    with pytest.raises(ValueError, match="token_dim=32.*width 16"):
        PeftModel.from_pretrained(base, str(tmp_path))
    assert not hasattr(base, "peft_config")
    prefix = fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, token_dim=32)
    with pytest.raises(ValueError, match="token_dim=32.*token_dim=16"):
        fastpeft.get_peft_model(tiny.model("opt"), prefix)


def test_missing_num_virtual_tokens_is_clear(tiny):
    with pytest.raises(ValueError, match="num_virtual_tokens.*None"):
        fastpeft.get_peft_model(tiny.model("opt"), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM"))


def test_model_dependent_fields_filled_in_place(tiny):
    cfg = fastpeft.PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)
    model = fastpeft.get_peft_model(tiny.model("t5"), cfg)
    assert model.peft_config["default"] is cfg
    assert (cfg.token_dim, cfg.num_layers, cfg.num_attention_heads, cfg.num_transformer_submodules,
            cfg.encoder_hidden_size) == (16, 2, 2, 2, 16)
    assert model.get_prompt_embedding_to_save("default").shape == (8, 16)


@pytest.mark.parametrize("kind,task,method", [
    ("roberta_qa", "QUESTION_ANS", "prompt"), ("roberta_qa", "QUESTION_ANS", "ptuning_mlp"),
    ("bert", "FEATURE_EXTRACTION", "prompt"), ("bert", "FEATURE_EXTRACTION", "ptuning_lstm"),
    ("bert", "FEATURE_EXTRACTION", "prefix"),
    ("llama_seqcls", "SEQ_CLS", "prompt"), ("llama_seqcls", "SEQ_CLS", "ptuning_mlp")])
def test_other_tasks_load_peft_adapters(tiny, tmp_path, kind, task, method):
    _quiet()
    theirs = peft.get_peft_model(tiny.model(kind), make_config(peft, method, task))
    perturb_prompt(theirs)
    theirs.save_pretrained(str(tmp_path))
    inputs = dict(tiny.inputs(kind))
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])  # prefixed with zeros for the prompt
    expected = tiny.output(peft.PeftModel.from_pretrained(tiny.model(kind), str(tmp_path)), kind, inputs)
    loaded = PeftModel.from_pretrained(tiny.model(kind), str(tmp_path))
    torch.testing.assert_close(tiny.output(loaded, kind, inputs), expected, rtol=0, atol=1e-5)


def test_prefix_on_sequence_classifier_with_cache_argument(tiny, tmp_path):
    """LlamaForSequenceClassification declares the cache as ``cache`` (transformers 5): fastpeft passes the
    prefix there (peft 0.21 looks for ``past_key_values`` and refuses); the adapter round-trips in fastpeft."""
    _quiet()
    model = fastpeft.get_peft_model(tiny.model("llama_seqcls"), make_config(fastpeft, "prefix", "SEQ_CLS"))
    perturb_prompt(model)
    inputs = tiny.inputs("llama_seqcls")
    live = tiny.output(model, "llama_seqcls", inputs)
    with model.disable_adapter():
        plain = tiny.output(model, "llama_seqcls", inputs)
    assert not torch.allclose(live, plain, atol=1e-4)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tiny.model("llama_seqcls"), str(tmp_path))
    torch.testing.assert_close(tiny.output(again, "llama_seqcls", inputs), live, rtol=0, atol=1e-5)
