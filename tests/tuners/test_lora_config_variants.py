"""LoraConfig's variant fields against HF peft 0.21.2: aLoRA (alora_invocation_tokens), QA-LoRA (use_qalora)
and the clear refusals of the others (velora, monteclora, arrow, KaSA); BD-LoRA: test_lora_bdlora.py."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.tuners.lora.variants import alora as falora
from tests._support.models import tiny_model
from tests._support.twins import peft_model_twins

peft = pytest.importorskip("peft")
from peft.tuners.lora import variants as pvariants  # noqa: E402

INV = [7, 9]


def _ids():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 60, (3, 9), generator=g)
    ids[0, 3:5] = torch.tensor(INV)
    ids[1, 1:3] = torch.tensor(INV)  # two occurrences: the last one counts
    ids[1, 6:8] = torch.tensor(INV)
    return ids  # row 2: no invocation


def _alora_twins(**extra):
    cfg = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
               init_lora_weights=False, alora_invocation_tokens=INV, **extra)
    return peft_model_twins(tiny_model("llama"), cfg)


# ------------------------------------------------------------------------------------------------------ aLoRA
def test_alora_offsets_equal_peft():
    ids = _ids()
    ids[2, 8] = 7  # a partial invocation at the very end
    configs = {"a": fastpeft.LoraConfig(alora_invocation_tokens=INV, task_type="CAUSAL_LM"),
               "b": fastpeft.LoraConfig(alora_invocation_tokens=[ids[2, 0].item()], task_type="CAUSAL_LM"),
               "plain": fastpeft.LoraConfig()}
    for names in (None, ["a", "__base__", "b"], ["plain", "a", "a"]):
        ours = falora.calculate_alora_offsets(configs, "a", ids, adapter_names=names)
        theirs = pvariants.calculate_alora_offsets(configs, "a", ids, adapter_names=names)
        assert ours == theirs
    assert falora.calculate_alora_offsets(configs, "a", ids) == [6, 3, None]


def test_alora_forward_generate_and_gradients_equal_peft():
    ours, theirs = _alora_twins()
    ids = _ids()
    ours.eval(), theirs.eval()
    with torch.no_grad():
        y = ours(input_ids=ids).logits
        assert torch.allclose(y, theirs(input_ids=ids).logits, atol=1e-6)
        with ours.disable_adapter():
            base = ours(input_ids=ids).logits
        assert torch.equal(y[2], base[2])  # no invocation: the base model
        assert torch.equal(y[0, :3], base[0, :3]) and not torch.allclose(y[0, 3:], base[0, 3:])  # from it on
        explicit = [2, None, 9]
        assert torch.allclose(ours(input_ids=ids, alora_offsets=explicit).logits,
                              theirs(input_ids=ids, alora_offsets=explicit).logits, atol=1e-6)
        # only inputs_embeds: aLoRA is off for the call (peft warns the same)
        emb = ours.get_input_embeddings()(ids)
        with pytest.warns(UserWarning, match="only inputs_embeds"):
            assert torch.equal(ours(inputs_embeds=emb).logits, base)
        # generate: offsets from the prompt; the decode steps of found invocations run the adapter
        g_ours = ours.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(g_ours, theirs.generate(input_ids=ids, max_new_tokens=4, do_sample=False))
        with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA"):
            ours.generate(input_ids=ids, max_new_tokens=2, num_beams=2)
    ours.train(), theirs.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    pt = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, pt[n].grad, rtol=1e-5, atol=1e-8), n


def test_alora_mixed_batch_equals_peft():
    ours, theirs = _alora_twins()
    plain = dict(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4, init_lora_weights=False)
    ours.add_adapter("plain", fastpeft.LoraConfig(**plain))
    theirs.add_adapter("plain", peft.LoraConfig(**plain))
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    names = ["default", "plain", "__base__"]
    with torch.no_grad():
        y = ours(input_ids=_ids(), adapter_names=names).logits
        assert torch.allclose(y, theirs(input_ids=_ids(), adapter_names=names).logits, atol=1e-6)


def test_alora_files_round_trip_both_ways(tmp_path):
    ours, theirs = _alora_twins()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ids = _ids()
    ours_loaded = fastpeft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "theirs"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModelForCausalLM.from_pretrained(tiny_model("llama"), str(tmp_path / "ours"))
    assert ours_loaded.peft_config["default"].alora_invocation_tokens == INV
    assert sorted(ours_loaded.state_dict()) == sorted(peft_loaded.state_dict())
    with torch.no_grad():
        assert torch.allclose(ours_loaded(input_ids=ids).logits, peft_loaded(input_ids=ids).logits, atol=1e-6)
        assert torch.allclose(ours_loaded(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits, atol=1e-6)


def test_alora_with_dropout_in_training_keeps_the_base_rows():
    layer_model = nn.Sequential(nn.Linear(16, 12))
    with pytest.warns(UserWarning, match="only works with task_type='CAUSAL_LM'"):  # as peft warns
        cfg = fastpeft.LoraConfig(target_modules=["0"], r=4, lora_dropout=0.5, init_lora_weights=False,
                                  alora_invocation_tokens=[1])
    model = fastpeft.get_peft_model(layer_model, cfg)
    layer = model.base_model.model[0]
    x = torch.randn(2, 5, 16, requires_grad=True)
    layer.train()
    with falora.offsets_context([2, None]):
        y = layer(x)
    base = layer.get_base_layer()(x)
    assert torch.equal(y[0, :3], base[0, :3]) and torch.equal(y[1], base[1])
    assert not torch.allclose(y[0, 3:], base[0, 3:])
    y.sum().backward()
    A = layer.lora_A["default"].weight
    assert A.grad is not None and A.grad.abs().sum() > 0 and x.grad is not None
    # no offsets at all: the adapter acts nowhere, and still gets (zero) gradients as in peft
    A.grad = None
    layer(x).sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A))


def test_alora_refusals_are_peft_s():
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        _alora_twins()[0].merge_adapter()
    bad = [dict(target_modules=["q_proj"], use_dora=True), dict(target_modules=["embed_tokens"])]
    for extra in bad:
        cfg = dict(task_type="CAUSAL_LM", alora_invocation_tokens=INV, **extra)
        with pytest.raises(ValueError, match="Invalid or unsupported variant combination"):
            fastpeft.get_peft_model(tiny_model("llama"), fastpeft.LoraConfig(**cfg))
        with pytest.raises(ValueError, match="Invalid or unsupported variant combination"):
            peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**cfg))


# ---------------------------------------------------------------------------------------------------- QA-LoRA
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 48)
        self.b = nn.Linear(48, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _qalora_twins(group_size=8, dropout=0.0):
    """fastpeft on an int4 QuantLinear model (QA-LoRA); peft on the same dequantized weights with its QA-LoRA
    variant put on its lora.Linear layers (peft runs QA-LoRA on GPTQ layers, which need a GPU library)."""
    from fastpeft.quant import quantize

    torch.manual_seed(0)
    qmodel = Net()
    quantize(qmodel, "int4", group_size=16)
    float_model = Net()
    for n in ("a", "b"):
        q, f = getattr(qmodel, n), getattr(float_model, n)
        f.weight.data = q.dequantize(torch.float32)
        f.bias.data = q.bias.data.clone()
    cfg = dict(target_modules=["a", "b"], r=4, lora_alpha=8, init_lora_weights=False, lora_dropout=dropout,
               use_qalora=True, qalora_group_size=group_size)
    ours = fastpeft.get_peft_model(qmodel, fastpeft.LoraConfig(**cfg))
    pcfg = peft.LoraConfig(**cfg)
    theirs = peft.get_peft_model(float_model, pcfg)
    for n in ("a", "b"):
        layer = getattr(theirs.base_model.model, n)
        pvariants.QALoraLinearVariant.init(layer, "default", pcfg)
        layer.lora_variant["default"] = pvariants.QALoraLinearVariant()
        nn.init.normal_(layer.lora_B["default"].weight)
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if "lora_" in k}, strict=False)
    return ours, theirs


def test_qalora_forward_and_gradients_equal_peft():
    ours, theirs = _qalora_twins()
    assert tuple(ours.base_model.model.a.lora_A["default"].weight.shape) == (4, 64 // 8)
    x = torch.randn(2, 3, 64)
    y_o, y_t = ours(x), theirs(x)
    assert torch.allclose(y_o, y_t, rtol=1e-5, atol=1e-5)
    y_o.square().sum().backward()
    y_t.square().sum().backward()
    pt = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, pt[n].grad, rtol=1e-4, atol=1e-5), n
    # merging adds s B A_expanded: the merged layer gives the adapter's output (peft cannot merge GPTQ layers)
    with torch.no_grad():
        merged = ours.merge_and_unload()(x)
    assert torch.allclose(merged, y_o.detach(), rtol=1e-5, atol=1e-5)


def test_qalora_files_round_trip_and_plain_layers_ignore_it(tmp_path):
    ours, _ = _qalora_twins(group_size=16)
    ours.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tuple(saved["base_model.model.a.lora_A.weight"].shape) == (4, 4)
    from fastpeft.quant import quantize

    torch.manual_seed(0)
    qmodel = Net()
    quantize(qmodel, "int4", group_size=16)
    loaded = fastpeft.PeftModel.from_pretrained(qmodel, str(tmp_path))
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = loaded(x)
        assert torch.allclose(y, ours.eval()(x), atol=1e-6)
        # a mixed batch builds its adapter pool from the expanded lora_A (variant.op_weights)
        mixed = loaded(x, adapter_names=["default", "__base__", "default"])
        with loaded.disable_adapter():
            base = loaded(x)
    assert torch.allclose(mixed[[0, 2]], y[[0, 2]], atol=1e-6) and torch.allclose(mixed[1], base[1], atol=1e-6)
    # nn.Linear: peft ignores use_qalora (plain LoRA, lora_A [r, in]); fastpeft too
    cfg = dict(target_modules=["a"], r=4, use_qalora=True, qalora_group_size=16)
    for lib in (fastpeft, peft):
        m = lib.get_peft_model(Net(), lib.LoraConfig(**cfg))
        assert tuple(m.base_model.model.a.lora_A["default"].weight.shape) == (4, 64)


def test_qalora_errors():
    from fastpeft.quant import quantize

    qmodel = Net()
    quantize(qmodel, "int4", group_size=16)
    with pytest.raises(ValueError, match=r"in_features` \(48\) to be.*divisible by 'qalora_group_size' \(10\)"):
        fastpeft.get_peft_model(copy.deepcopy(qmodel), fastpeft.LoraConfig(target_modules=["b"], use_qalora=True,
                                                                           qalora_group_size=10))
    with pytest.raises(NotImplementedError, match="DoRA and QA-LoRA at the same time"):
        fastpeft.get_peft_model(qmodel, fastpeft.LoraConfig(target_modules=["a"], use_qalora=True, use_dora=True))


# --------------------------------------------------------------------------------------------- refused fields
REFUSED = {
    "velora_config": {"num_groups": 2},
    "monteclora_config": {"n_samples": 2},
    "arrow_config": {"top_k": 2},
    "kasa_config": {"beta": 0.1},
}


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_refused_fields_say_what_and_why(field):
    cfg = fastpeft.LoraConfig(target_modules=["a"], **{field: REFUSED[field]})
    assert field in cfg.unsupported_fields()
    with pytest.raises(NotImplementedError) as err:
        fastpeft.get_peft_model(Net(), cfg)
    msg = str(err.value)
    assert field in msg and "Not in fastpeft:" in msg and "HF peft runs these" in msg
    assert cfg.to_dict()[field] == REFUSED[field]  # kept in the file unchanged


def test_supported_variant_fields_are_not_refused():
    assert fastpeft.LoraConfig(alora_invocation_tokens=INV, task_type="CAUSAL_LM").unsupported_fields() == []
    assert fastpeft.LoraConfig(use_qalora=True, qalora_group_size=8).unsupported_fields() == []
    assert fastpeft.LoraConfig(use_bdlora={"nblocks": 2}).unsupported_fields() == []  # tests/tuners/test_lora_bdlora.py
    assert fastpeft.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}).unsupported_fields() == []
