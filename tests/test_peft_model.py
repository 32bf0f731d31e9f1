"""PeftModel behaviour: task classes, adapter management, enable/disable, merging, gradients, generate."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastpeft.mapping import get_peft_model, inject_adapter_in_model
from fastpeft.peft_model import (PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction,
                                 PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM,
                                 PeftModelForSequenceClassification, PeftModelForTokenClassification)
from fastpeft.tuners.lora.config import LoraConfig
from fastpeft.tuners.lora.model import LoraModel

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

TOL = 1e-5


def _lora(task_type="CAUSAL_LM", **kw):
    kw.setdefault("r", 4)
    kw.setdefault("init_lora_weights", False)  # random A and B: the adapter changes the output
    return LoraConfig(task_type=task_type, **kw)


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind,task,cls,heads", [
    ("llama", "CAUSAL_LM", PeftModelForCausalLM, None),
    ("t5", "SEQ_2_SEQ_LM", PeftModelForSeq2SeqLM, None),
    ("roberta", "SEQ_CLS", PeftModelForSequenceClassification, ["classifier", "score"]),
    ("llama_seqcls", "SEQ_CLS", PeftModelForSequenceClassification, ["classifier", "score"]),
    ("roberta_tok", "TOKEN_CLS", PeftModelForTokenClassification, ["classifier", "score"]),
    ("roberta_qa", "QUESTION_ANS", PeftModelForQuestionAnswering, ["qa_outputs"]),
    ("bert", "FEATURE_EXTRACTION", PeftModelForFeatureExtraction, None),
    ("bert", None, PeftModel, None),
])
def test_task_class_heads_and_forward(kind, task, cls, heads, tiny):
    base = tiny.model(kind)
    inputs = tiny.inputs(kind)
    base_out = tiny.output(base, kind, inputs)
    pm = get_peft_model(base, _lora(task))
    assert type(pm) is cls
    assert isinstance(pm.base_model, LoraModel)
    assert pm.get_base_model() is base
    assert pm.peft_config["default"].modules_to_save == heads
    if heads:
        head = next(n for n in ("classifier", "score", "qa_outputs") if hasattr(base, n))
        wrapper = getattr(base, head)
        assert "default" in wrapper.modules_to_save  # the head trains as a full copy
        assert pm.modules_to_save == set(heads)
        assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    pm.eval()
    out = tiny.output(pm, kind, inputs)
    assert out.shape == base_out.shape
    assert _diff(out, base_out) > 1e-4


def test_user_modules_to_save_keep_theirs_and_get_heads(tiny):
    pm = get_peft_model(tiny.model("roberta"), _lora("SEQ_CLS", modules_to_save=["pooler"]))
    assert pm.peft_config["default"].modules_to_save == ["pooler", "classifier", "score"]
    pm.add_adapter("b", _lora("SEQ_CLS"))  # the heads are added for every adapter of a task model
    assert pm.peft_config["b"].modules_to_save == ["classifier", "score"]


def test_base_model_name_or_path_filled(tiny, tiny_base_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_base_dir("llama")
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(path), _lora())
    assert pm.peft_config["default"].base_model_name_or_path == path
    assert get_peft_model(tiny.model("llama"), _lora()).peft_config["default"].base_model_name_or_path is None


def test_getattr_falls_through_to_model(tiny):
    base = tiny.model("llama")
    pm = get_peft_model(base, _lora())
    assert pm.config is base.config  # PeftModel -> LoraModel -> user model
    assert pm.get_input_embeddings() is base.get_input_embeddings()
    assert pm.targeted_module_names  # a LoraModel attribute
    ids = torch.tensor([[5, 6, 7]])
    pm.eval()
    torch.testing.assert_close(pm(ids).logits, pm(input_ids=ids).logits)  # positional input_ids work
    with pytest.raises(AttributeError):
        pm.no_such_attribute_anywhere


def test_adapter_management(tiny):
    kind = "llama"
    inputs = tiny.inputs(kind)
    pm = get_peft_model(tiny.model(kind), _lora(target_modules=["q_proj", "v_proj"]))
    pm.eval()
    out_default = tiny.output(pm, kind, inputs)
    pm.add_adapter("other", _lora(r=2, target_modules=["k_proj", "down_proj"]))
    assert list(pm.peft_config) == ["default", "other"]
    assert pm.active_adapter == "default" and pm.active_adapters == ["default"]
    assert _diff(tiny.output(pm, kind, inputs), out_default) == 0  # adding does not activate

    pm.set_adapter("other")
    assert pm.active_adapter == "other"
    out_other = tiny.output(pm, kind, inputs)
    assert _diff(out_other, out_default) > 1e-4
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)

    pm.set_adapter("default")
    assert _diff(tiny.output(pm, kind, inputs), out_default) <= TOL
    pm.delete_adapter("other")
    assert list(pm.peft_config) == ["default"]
    assert not any(".other." in n for n, _ in pm.named_parameters())
    assert _diff(tiny.output(pm, kind, inputs), out_default) <= TOL

    with pytest.raises(ValueError, match="already exists"):
        pm.add_adapter("default", _lora())


def test_failed_add_adapter_rolls_back(tiny):
    pm = get_peft_model(tiny.model("llama"), _lora())
    keys = set(pm.state_dict())
    with pytest.raises(ValueError, match="not found"):
        pm.add_adapter("bad", _lora(target_modules=["no_such_layer"]))
    assert list(pm.peft_config) == ["default"]
    assert set(pm.state_dict()) == keys


def test_disable_adapter_restores_base_and_state(tiny):
    kind = "opt"
    inputs = tiny.inputs(kind)
    base_out = tiny.output(tiny.model(kind), kind, inputs)
    pm = get_peft_model(tiny.model(kind), _lora())
    pm.eval()
    adapted = tiny.output(pm, kind, inputs)
    grads = {n: p.requires_grad for n, p in pm.named_parameters()}
    with pm.disable_adapter():
        assert _diff(tiny.output(pm, kind, inputs), base_out) <= TOL
    assert _diff(tiny.output(pm, kind, inputs), adapted) <= TOL
    assert {n: p.requires_grad for n, p in pm.named_parameters()} == grads
    with pytest.raises(RuntimeError):
        with pm.disable_adapter():
            raise RuntimeError("boom")
    assert _diff(tiny.output(pm, kind, inputs), adapted) <= TOL


@pytest.mark.parametrize("kind", ["opt", "gpt2", "roberta"])
def test_merge_unmerge_merge_and_unload(kind, tiny):
    inputs = tiny.inputs(kind)
    task = "SEQ_CLS" if kind == "roberta" else "CAUSAL_LM"
    targets = ["c_attn", "c_proj"] if kind == "gpt2" else None
    pm = get_peft_model(tiny.model(kind), _lora(task, target_modules=targets))
    pm.eval()
    adapted = tiny.output(pm, kind, inputs)
    pm.merge_adapter()
    assert _diff(tiny.output(pm, kind, inputs), adapted) <= TOL
    pm.unmerge_adapter()
    assert _diff(tiny.output(pm, kind, inputs), adapted) <= TOL
    with pm.disable_adapter():
        base_out = tiny.output(pm, kind, inputs)
    merged = pm.merge_and_unload()
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    assert _diff(tiny.output(merged, kind, inputs), adapted) <= TOL
    assert _diff(base_out, adapted) > 1e-4


def test_unload_returns_base_model(tiny):
    kind = "llama"
    inputs = tiny.inputs(kind)
    base_out = tiny.output(tiny.model(kind), kind, inputs)
    pm = get_peft_model(tiny.model(kind), _lora())
    plain = pm.unload()
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    assert _diff(tiny.output(plain, kind, inputs), base_out) <= TOL


@pytest.mark.parametrize("kind,bias", [("llama", "none"), ("opt", "lora_only"), ("roberta", "none")])
def test_gradients_reach_only_adapter_weights(kind, bias, tiny):
    task = "SEQ_CLS" if kind == "roberta" else "CAUSAL_LM"
    pm = get_peft_model(tiny.model(kind), _lora(task, bias=bias))
    pm.train()
    inputs = tiny.inputs(kind)
    labels = torch.tensor([0, 2]) if kind == "roberta" else inputs["input_ids"]
    loss = pm(**inputs, labels=labels).loss
    loss.backward()
    for name, p in pm.named_parameters():
        adapter_weight = "lora_" in name or ".modules_to_save.default." in name
        lora_bias = bias == "lora_only" and name.endswith("base_layer.bias")
        if adapter_weight or lora_bias:
            assert p.requires_grad, name
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad, name
            assert p.grad is None, name


def test_generate(tiny):
    kind = "llama"
    pm = get_peft_model(tiny.model(kind), _lora(target_modules=["q_proj", "v_proj", "down_proj"]))
    pm.eval()
    ids = tiny.inputs(kind, batch=1, seq=5)["input_ids"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = pm.generate(input_ids=ids, **kw)
    assert out.shape == (1, 11)
    assert torch.equal(out[:, :5], ids)
    # the adapter takes part: the generated tokens are those of the merged model
    merged = pm.merge_and_unload()
    assert torch.equal(merged.generate(input_ids=ids, **kw), out)


def test_generate_seq2seq(tiny):
    pm = get_peft_model(tiny.model("t5"), _lora("SEQ_2_SEQ_LM"))
    pm.eval()
    out = pm.generate(input_ids=tiny.inputs("t5")["input_ids"], max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= 5


def test_nb_trainable_parameters_counts(tiny):
    base = tiny.model("llama")
    total = sum(p.numel() for p in base.parameters())
    pm = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    # q_proj is 16 -> 16 in both layers: A [4,16] + B [16,4] per layer
    assert pm.get_nb_trainable_parameters() == (2 * (4 * 16 + 16 * 4), total + 2 * (4 * 16 + 16 * 4))


def test_autocast_adapter_dtype(tiny):
    base = tiny.model("llama").to(torch.bfloat16)
    pm = get_peft_model(base, _lora())
    lora_params = [p for n, p in pm.named_parameters() if "lora_" in n]
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params)
    pm2 = get_peft_model(tiny.model("llama").to(torch.bfloat16), _lora(), autocast_adapter_dtype=False)
    lora_params2 = [p for n, p in pm2.named_parameters() if "lora_" in n]
    assert lora_params2 and all(p.dtype == torch.bfloat16 for p in lora_params2)
    pm.eval()
    out = pm(**tiny.inputs("llama")).logits  # bf16 activations with fp32 adapters run
    assert torch.isfinite(out.float()).all()


def test_plain_module_and_inject_adapter_in_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(torch.relu(self.lin(x)))

    torch.manual_seed(0)
    pm = get_peft_model(Net(), LoraConfig(r=2, target_modules=["lin"], modules_to_save=["head"]))
    assert type(pm) is PeftModel
    x = torch.randn(3, 8)
    assert pm(x).shape == (3, 2)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["lin"]), Net())
    assert "lin.lora_A.default.weight" in model.state_dict()


def test_not_implemented_paths_are_clear(tiny):
    with pytest.raises(NotImplementedError, match="mixed"):
        get_peft_model(tiny.model("llama"), _lora(), mixed=True)
    pm = get_peft_model(tiny.model("llama"), _lora())  # adapter_names works (tests/tuners/test_mixed_batch.py);
    with pytest.raises(ValueError, match="training mode"):  # in training mode it is refused as in peft
        pm.train()(**tiny.inputs("llama"), adapter_names=["default", "default"])


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    """Activation checkpointing recomputes LoRA layers (dropout included) and must not change the gradients."""
    inputs = tiny.inputs("llama")
    grads = []
    for checkpointing in (False, True):
        base = tiny.model("llama")
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        pm = get_peft_model(base, _lora(lora_dropout=0.2))
        pm.train()
        torch.manual_seed(123)  # same dropout masks in both runs
        pm(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
