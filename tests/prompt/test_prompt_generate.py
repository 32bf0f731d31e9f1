"""Generation with virtual tokens, training, adapter management and initialisation of prompt adapters."""
import warnings

import pytest
import torch

import fastpeft
from fastpeft import PeftModel

from .prompt_helpers import KINDS, make_config, perturb_prompt, save_word_tokenizer

GEN_CASES = [(k, m) for k in ("opt", "llama", "gpt2", "t5") for m in ("prompt", "ptuning_lstm", "prefix")]


def _greedy_by_forward(model, inputs, steps, seq2seq):
    """Reference decoding: rerun the full forward (virtual tokens included) for every new token."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        if seq2seq:
            start = model.get_base_model().config.decoder_start_token_id
            dec = torch.full((ids.shape[0], 1), start, dtype=torch.long)
            for _ in range(steps):
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
                dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], 1)
            return dec
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        return ids


@pytest.mark.parametrize("kind,method", GEN_CASES)
def test_generate_follows_the_forward(tiny, kind, method):
    warnings.filterwarnings("ignore", category=FutureWarning)
    model = fastpeft.get_peft_model(tiny.model(kind), make_config(fastpeft, method, KINDS[kind]))
    perturb_prompt(model)
    model.eval()
    inputs = {k: v for k, v in tiny.inputs(kind).items() if k != "decoder_input_ids"}
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = _greedy_by_forward(model, inputs, 4, kind == "t5")
    assert torch.equal(out, expected)
    if kind != "t5":
        assert torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])  # prompt ids come first
    with model.disable_adapter():
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(plain, tiny.model(kind).eval().generate(**inputs, max_new_tokens=4, do_sample=False))
    # dict output keeps the same sequences
    res = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(res.sequences, out)


def test_generate_positional_input_ids(tiny):
    model = fastpeft.get_peft_model(tiny.model("gpt2"), make_config(fastpeft, "prompt", "CAUSAL_LM")).eval()
    ids = tiny.inputs("gpt2")["input_ids"]
    assert torch.equal(model.generate(ids, max_new_tokens=2, do_sample=False),
                       model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                                      do_sample=False))


@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp", "prefix_proj"])
def test_training_moves_only_the_prompt(tiny, method):
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(tiny.model("llama"), make_config(fastpeft, method, "CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = tiny.inputs("llama")
    losses = []
    for _ in range(3):
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("prompt_encoder.default.") for n in changed)


def test_causal_labels_padded_with_minus_100(tiny):
    model = fastpeft.get_peft_model(tiny.model("opt"), make_config(fastpeft, "prompt", "CAUSAL_LM")).eval()
    inputs = tiny.inputs("opt")
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] + 3
    # no loss on the virtual tokens; the last virtual token predicts the first real one
    logits = out.logits[:, 2:-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs["input_ids"].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    tok = fastpeft.get_peft_model(tiny.model("roberta_tok"), make_config(fastpeft, "prompt", "TOKEN_CLS"))
    labels = torch.zeros_like(inputs["input_ids"])
    assert tok(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels).loss.isfinite()


def test_attention_mask_covers_virtual_tokens(tiny):
    model = fastpeft.get_peft_model(tiny.model("llama"), make_config(fastpeft, "prompt", "CAUSAL_LM")).eval()
    inputs = tiny.inputs("llama")
    masked = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    masked["attention_mask"][:, :2] = 0  # left padding: the virtual tokens still attend, the pads do not
    with torch.no_grad():
        a = model(**masked).logits[:, -1]
        b = model(**inputs).logits[:, -1]
    assert not torch.allclose(a, b)


def test_adapters_add_switch_delete_disable(tiny, tmp_path):
    model = fastpeft.get_peft_model(tiny.model("roberta"), make_config(fastpeft, "prompt", "SEQ_CLS"))
    model.add_adapter("other", make_config(fastpeft, "ptuning_mlp", "SEQ_CLS", nvt=2))
    assert model.active_adapter == "default" and set(model.peft_config) == {"default", "other"}
    inputs = tiny.inputs("roberta")
    perturb_prompt(model)
    a = tiny.output(model, "roberta", inputs)
    model.set_adapter("other")
    assert model.active_adapters == ["other"]
    b = tiny.output(model, "roberta", inputs)
    assert not torch.allclose(a, b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".modules_to_save.other." in n for n in trainable)
    assert not any(".modules_to_save.default." in n for n in trainable)
    with model.disable_adapter():
        plain = tiny.output(model, "roberta", inputs)
    torch.testing.assert_close(plain, tiny.output(tiny.model("roberta"), "roberta", inputs))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny.model("roberta"), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "other"), "other")
    loaded.set_adapter("other")
    torch.testing.assert_close(tiny.output(loaded, "roberta", inputs), b, rtol=0, atol=1e-5)
    model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="no weights to merge"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="LORA"):
        model.add_adapter("lora", fastpeft.LoraConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="get_peft_model"):
        fastpeft.inject_adapter_in_model(make_config(fastpeft, "prompt", "SEQ_CLS"), tiny.model("roberta"))


def test_print_trainable_parameters_matches_peft(tiny, capsys):
    peft = pytest.importorskip("peft")
    for method in ("prompt", "ptuning_lstm", "prefix_proj"):
        model = fastpeft.get_peft_model(tiny.model("t5"), make_config(fastpeft, method, "SEQ_2_SEQ_LM"))
        model.print_trainable_parameters()
        ours = capsys.readouterr().out
        peft.get_peft_model(tiny.model("t5"), make_config(peft, method, "SEQ_2_SEQ_LM")).print_trainable_parameters()
        assert ours == capsys.readouterr().out


@pytest.mark.parametrize("wrap,nvt,ids", [(False, 5, [9, 13, 16, 9, 13]),  # w5 w9 w12, repeated to 5
                                           (True, 3, [2, 9, 13]),  # <s> w5 w9 (</s> cut off)
                                           (True, 7, [2, 9, 13, 16, 3, 2, 9])])
def test_text_init_like_peft(tiny, tmp_path, wrap, nvt, ids):
    peft = pytest.importorskip("peft")
    folder = save_word_tokenizer(str(tmp_path / "tok"), wrap=wrap)
    kw = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="w5 w9 w12", tokenizer_name_or_path=folder)
    ours = fastpeft.get_peft_model(tiny.model("opt"), make_config(fastpeft, "prompt", "CAUSAL_LM", nvt=nvt, **kw))
    theirs = peft.get_peft_model(tiny.model("opt"), make_config(peft, "prompt", "CAUSAL_LM", nvt=nvt, **kw))
    table = ours.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(table, theirs.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    words = ours.word_embeddings.weight
    torch.testing.assert_close(table, words[ids], rtol=0, atol=0)
    assert table.requires_grad and not words.requires_grad


def test_sample_vocab_init(tiny):
    sample = fastpeft.get_peft_model(tiny.model("opt"),
                                     make_config(fastpeft, "prompt", "CAUSAL_LM", prompt_tuning_init="SAMPLE_VOCAB"))
    rows = sample.prompt_encoder["default"].embedding.weight
    for row in rows:
        assert (sample.word_embeddings.weight == row).all(dim=1).any()


def test_prefix_zero_init(tiny):
    model = fastpeft.get_peft_model(tiny.model("gpt2"), make_config(fastpeft, "prefix", "CAUSAL_LM",
                                                                    init_weights="zero"))
    assert model.prompt_encoder["default"].embedding.weight.abs().sum() == 0
    proj = fastpeft.get_peft_model(tiny.model("gpt2"), make_config(fastpeft, "prefix_proj", "CAUSAL_LM",
                                                                   init_weights="zero"))
    assert proj.get_prompt_embedding_to_save("default").abs().sum() == 0
    assert proj.prompt_encoder["default"].embedding.weight.abs().sum() > 0


def test_auto_peft_model_loads_prompt_adapter(tiny, tiny_base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = tiny_base_dir("llama")
    model = fastpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                    make_config(fastpeft, "ptuning_mlp", "CAUSAL_LM"))
    perturb_prompt(model)
    inputs = tiny.inputs("llama")
    expected = tiny.output(model, "llama", inputs)
    model.save_pretrained(tmp_path)
    loaded = fastpeft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path))
    assert isinstance(loaded, fastpeft.PeftModelForCausalLM)
    assert loaded.peft_config["default"].base_model_name_or_path == base_dir
    torch.testing.assert_close(tiny.output(loaded, "llama", inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generate_max_length_is_the_returned_length(tiny, method):
    warnings.filterwarnings("ignore", category=FutureWarning)
    model = fastpeft.get_peft_model(tiny.model("llama"), make_config(fastpeft, method, "CAUSAL_LM")).eval()
    inputs = tiny.inputs("llama")  # 7 tokens
    out = model.generate(**inputs, max_length=10, do_sample=False)
    assert out.shape == (2, 10)
    assert torch.equal(out, model.generate(**inputs, max_new_tokens=3, do_sample=False))


def test_gradient_checkpointing(tiny):
    base = tiny.model("llama")
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="PREFIX_TUNING.*gradient checkpointing"):
        fastpeft.get_peft_model(base, make_config(fastpeft, "prefix", "CAUSAL_LM"))
    assert all(p.requires_grad for p in base.parameters())  # the refused model is left as it was
    model = fastpeft.get_peft_model(base, make_config(fastpeft, "prompt", "CAUSAL_LM")).train()
    inputs = tiny.inputs("llama")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
