"""Weight-derived inits on quantized base layers (quant_inits.py) against HF peft 0.21.2 on bitsandbytes layers.

The bnb models are built from the same float weights and quantized by bitsandbytes on CPU; fastpeft's nf4 models
are imported from them (import_bnb: the same codes), fastpeft's int8 ones take bnb's LLM.int8 codes and row scales.
"""
import copy
import json
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.quant import QuantLinear, formats, import_bnb, packed_as_parameters, quantize

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

R, ALPHA = 4, 8


class Net(nn.Module):
    def __init__(self, linear=nn.Linear):
        super().__init__()
        self.a = linear(128, 64)
        self.b = linear(64, 192)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _float_net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _bnb4(float_net, double_quant=False, dtype=torch.float32, blocksize=64):
    """A bnb nf4 twin of ``float_net`` (weights quantized from ``dtype``: the quant state's dtype)."""
    q = Net(lambda i, o: bnb.nn.Linear4bit(i, o, compute_dtype=dtype, quant_type="nf4",
                                           compress_statistics=double_quant))
    for name in ("a", "b"):
        src, dst = getattr(float_net, name), getattr(q, name)
        dst.weight = bnb.nn.Params4bit(src.weight.detach().to(dtype), quant_type="nf4", module=dst,
                                       compress_statistics=double_quant, blocksize=blocksize)
        dst.bias = nn.Parameter(src.bias.detach().to(dtype), requires_grad=False)
    q = q.to("cpu")  # bnb quantizes on the move
    q.is_loaded_in_4bit = True  # what transformers sets: peft then wraps with its bnb Linear4bit
    return q


def _nf4_pair(double_quant=False, dtype=torch.float32, blocksize=64, seed=0):
    theirs = _bnb4(_float_net(seed), double_quant, dtype, blocksize)
    ours = copy.deepcopy(theirs)
    assert import_bnb(ours) == ["a", "b"]
    return theirs, ours


def _bnb8(float_net):
    q = Net(lambda i, o: bnb.nn.Linear8bitLt(i, o, has_fp16_weights=False))
    q.load_state_dict(float_net.state_dict())
    q = q.to("cpu")
    q.is_loaded_in_8bit = True
    return q


def _int8_from_bnb(layer) -> QuantLinear:
    w = layer.weight
    qw = formats.QuantizedWeight("int8", layer.out_features, layer.in_features, w.data.clone(),
                                 w.SCB.float() / 127.0, blocksize=layer.in_features)
    return QuantLinear.from_quantized(qw, layer.bias.detach().float())


def _cfg(init, **kw):
    return dict(target_modules=["a", "b"], r=R, lora_alpha=ALPHA, init_lora_weights=init, **kw)


def _wrap(theirs, ours, init, **kw):
    torch.manual_seed(7)
    t = peft.get_peft_model(theirs, peft.LoraConfig(**_cfg(init, **kw)))
    torch.manual_seed(7)
    o = fastpeft.get_peft_model(ours, fastpeft.LoraConfig(**_cfg(init, **kw)))
    return t, o


def _layers(t, o, name):
    return getattr(t.base_model.model, name), getattr(o.base_model.model, name)


def _bnb4_dequant(layer):
    w = layer.get_base_layer().weight
    return BF.dequantize_4bit(w.data, w.quant_state).float()


# ------------------------------------------------------------------------------------------------- OLoRA, nf4
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("init", ["olora", "OLoRA"])
def test_olora_on_nf4_is_peft_on_bnb_4bit_bit_for_bit(double_quant, init):
    theirs, ours = _nf4_pair(double_quant)
    W0 = {n: getattr(ours, n).dequantize(torch.float32) for n in "ab"}
    t, o = _wrap(theirs, ours, init)
    for n in "ab":
        tl, ol = _layers(t, o, n)
        A, B = ol.lora_A["default"].weight, ol.lora_B["default"].weight
        assert torch.equal(A, tl.lora_A["default"].weight) and torch.equal(B, tl.lora_B["default"].weight)
        base = ol.get_base_layer()
        assert isinstance(base, QuantLinear) and base.double_quant == double_quant and base.blocksize == 64
        bw = tl.get_base_layer().weight
        assert torch.equal(base.weight, bw.data.view(-1))  # the re-quantized codes are bnb's
        assert torch.equal(base.dequantize(torch.float32), _bnb4_dequant(tl))
        # independent check of what peft does: QR of the dequantized weight, residual W - s B A quantized again
        Q, Rm = torch.linalg.qr(W0[n])
        assert torch.equal(A, Rm[:R]) and torch.equal(B, Q[:, :R])
        res = formats.quantize_weight(W0[n] - (ALPHA / R) * B @ A, "nf4", double_quant=double_quant)
        assert torch.equal(base.dequantize(torch.float32), formats.dequantize(res))
    x = torch.randn(6, 128)
    assert torch.equal(o(x), t(x))
    # gradients of the trainable adapters agree
    o(x).square().sum().backward()
    t(x).square().sum().backward()
    for n in "ab":
        tl, ol = _layers(t, o, n)
        for part in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(ol, part)["default"].weight.grad,
                                       getattr(tl, part)["default"].weight.grad, rtol=1e-5, atol=1e-6)
    # OLoRA with its residual is close to the quantized model it started from (only the re-quantization moved)
    with o.disable_adapter():
        assert not torch.equal(o(x), _nf4_pair(double_quant)[1](x))


def test_olora_bf16_quant_state_residual_is_peft():
    # 4-bit dequantizes in the quant state's dtype (bf16 here) before the fp32 QR, as peft. peft then also
    # rounds lora_A / lora_B through the layer's compute dtype when it moves them next to the base (a general
    # QuantLoraLinear difference, not the init's: see the report), so those are compared to bf16 precision.
    theirs, ours = _nf4_pair(dtype=torch.bfloat16)
    assert ours.a.compute_dtype == torch.bfloat16
    W0 = ours.a.dequantize().float()
    t, o = _wrap(theirs, ours, "olora")
    for n in "ab":
        tl, ol = _layers(t, o, n)
        assert torch.equal(ol.get_base_layer().dequantize(torch.float32), _bnb4_dequant(tl))
        for part in ("lora_A", "lora_B"):
            ours_w, theirs_w = getattr(ol, part)["default"].weight, getattr(tl, part)["default"].weight
            assert torch.equal(ours_w.to(torch.bfloat16).float(), theirs_w)
    Q, Rm = torch.linalg.qr(W0)
    assert torch.equal(o.base_model.model.a.lora_A["default"].weight, Rm[:R])


def test_olora_keeps_the_layers_block_size():
    # peft re-quantizes with Params4bit's default block size 64 whatever the layer had; fastpeft keeps the layer's
    theirs, ours = _nf4_pair(double_quant=True, blocksize=128)
    assert ours.a.blocksize == 128
    W0 = ours.a.dequantize(torch.float32)
    t, o = _wrap(theirs, ours, "olora")
    tl, ol = _layers(t, o, "a")
    assert tl.get_base_layer().weight.quant_state.blocksize == 64  # peft's (documented) behaviour
    base = ol.get_base_layer()
    assert base.blocksize == 128 and base.double_quant and tuple(base.scales.shape) == (64 * 128 // 128,)
    A, B = ol.lora_A["default"].weight, ol.lora_B["default"].weight
    assert torch.equal(A, tl.lora_A["default"].weight) and torch.equal(B, tl.lora_B["default"].weight)
    res = formats.quantize_weight(W0 - (ALPHA / R) * B @ A, "nf4", blocksize=128, double_quant=True)
    assert torch.equal(base.dequantize(torch.float32), formats.dequantize(res))
    # both residuals are the same float residual quantized at different block sizes
    step = (W0 - (ALPHA / R) * B @ A).abs().max()
    assert (base.dequantize(torch.float32) - _bnb4_dequant(tl)).abs().max() < 0.3 * step


# ------------------------------------------------------------------------------------------------ OLoRA, int8
def test_olora_on_int8_matches_peft_on_bnb_8bit():
    fnet = _float_net(1)
    theirs = _bnb8(fnet)
    ours = copy.deepcopy(fnet)
    ours.a, ours.b = _int8_from_bnb(theirs.a), _int8_from_bnb(theirs.b)
    W0 = {n: getattr(ours, n).dequantize(torch.float32) for n in "ab"}
    t, o = _wrap(theirs, ours, "olora")
    for n in "ab":
        tl, ol = _layers(t, o, n)
        A, B = ol.lora_A["default"].weight, ol.lora_B["default"].weight
        # fastpeft's int8 dequantizes q * (SCB / 127), bnb q * SCB * (1 / 127): equal to an ulp or so
        torch.testing.assert_close(A, tl.lora_A["default"].weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(B, tl.lora_B["default"].weight, rtol=1e-5, atol=1e-5)
        base = ol.get_base_layer()
        assert base.fmt == "int8" and base.weight.dtype == torch.int8
        res = W0[n] - (ALPHA / R) * B @ A
        assert torch.equal(base.dequantize(torch.float32), formats.dequantize(formats.quantize_weight(res, "int8")))
        bw = tl.get_base_layer().weight  # peft's new Int8Params (LLM.int8 of the fp16-cast residual)
        theirs_res = bw.data.float() * bw.SCB.float()[:, None] / 127.0
        # one code apart at most (bnb rounds the fp16 cast of the residual), and mostly the same codes
        diff = (base.dequantize(torch.float32) - theirs_res).abs() / base.scales.float()[:, None]
        assert diff.max() < 1.1 and (diff > 0.5).float().mean() < 0.02
    x = torch.randn(6, 128)
    torch.testing.assert_close(o(x), t(x), rtol=0, atol=0.05)
    with o.disable_adapter():
        base_only = o(x)
    assert (o(x) - base_only).abs().max() > 0.1  # the adapters carry the top of the weight


# ----------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("init,exc,msg", [
    ("pissa", TypeError, "Please initialize PiSSA under float32, float16, or bfloat16"),
    ("pissa_niter_2", TypeError, "Please initialize PiSSA under float32, float16, or bfloat16"),
    ("corda", TypeError, "Please initialize CorDA under float32, float16, or bfloat16"),
    ("mica", TypeError, "Please initialize MiCA under float32, float16, or bfloat16"),
    ("MICA", TypeError, "Please initialize MiCA under float32, float16, or bfloat16"),
    ("orthogonal", RuntimeError, "Only Tensors of floating point and complex dtype can require gradients"),
])
def test_inits_peft_refuses_on_bnb_are_refused(init, exc, msg):
    theirs, ours = _nf4_pair()
    with pytest.raises(exc, match=msg):
        peft.get_peft_model(theirs, peft.LoraConfig(**_cfg(init)))
    with pytest.raises(exc, match=msg):
        fastpeft.get_peft_model(ours, fastpeft.LoraConfig(**_cfg(init)))
    for fmt in ("int8", "int4"):
        model = _float_net()
        quantize(model, fmt, group_size=64)
        with pytest.raises(exc, match=msg) as info:
            fastpeft.get_peft_model(model, fastpeft.LoraConfig(**_cfg(init)))
        assert f"{fmt} QuantLinear [64, 128]" in str(info.value)


def test_lora_ga_with_a_gradient_is_refused_and_without_is_the_default_init():
    theirs, ours = _nf4_pair()
    for model in (theirs, ours):
        for n in "ab":
            layer = getattr(model, n)
            layer._peft_loraga_grad = torch.ones(layer.out_features, layer.in_features)
    with pytest.raises(RuntimeError, match="must be floating point"):
        peft.get_peft_model(theirs, peft.LoraConfig(**_cfg("lora_ga", lora_ga_config=peft.LoraGAConfig())))
    with pytest.raises(RuntimeError, match="lora_ga.*nf4 QuantLinear.*float model"):
        fastpeft.get_peft_model(ours, fastpeft.LoraConfig(**_cfg("lora_ga", lora_ga_config=fastpeft.LoraGAConfig())))
    # an adapter being loaded (no gradient): peft's default init, same draws
    theirs, ours = _nf4_pair()
    packed = ours.a.weight.clone()
    t, o = _wrap(theirs, ours, "lora_ga", lora_ga_config=None)
    for n in "ab":
        tl, ol = _layers(t, o, n)
        assert torch.equal(ol.lora_A["default"].weight, tl.lora_A["default"].weight)
        assert not ol.lora_B["default"].weight.any()
    assert torch.equal(o.base_model.model.a.get_base_layer().weight, packed)


def test_olora_on_int4_and_on_a_merged_layer_is_refused():
    model = _float_net()
    quantize(model, "int4", group_size=64)
    with pytest.raises(TypeError, match="olora.*int4 QuantLinear \\[64, 128\\].*GPTQ / AWQ"):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(**_cfg("olora")))
    _, ours = _nf4_pair()
    o = fastpeft.get_peft_model(ours, fastpeft.LoraConfig(target_modules=["a"], r=R))
    o.base_model.model.a.merge()
    with pytest.raises(ValueError, match="not a QuantLinear \\(it is merged\\); unmerge"):
        o.add_adapter("o", fastpeft.LoraConfig(**_cfg("olora")))


# --------------------------------------------------------------------------------------------------- EVA
def test_eva_on_nf4_is_peft_on_bnb_4bit():
    theirs, ours = _nf4_pair()
    # layer "a" only: its inputs are the data themselves
    torch.manual_seed(3)
    t = peft.get_peft_model(theirs, peft.LoraConfig(target_modules=["a"], r=R, init_lora_weights="eva",
                                                    eva_config=peft.EvaConfig(rho=1.0)))
    torch.manual_seed(3)
    o = fastpeft.get_peft_model(ours, fastpeft.LoraConfig(target_modules=["a"], r=R, init_lora_weights="eva",
                                                          eva_config=fastpeft.EvaConfig(rho=1.0)))
    assert not o.base_model.model.a.lora_B["default"].weight.any()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 128, generator=g) for _ in range(4)]
    kw = dict(forward_fn=lambda model, inputs: model(inputs), prepare_model_inputs_fn=None,
              prepare_layer_inputs_fn=None, show_progress_bar=False)
    peft.initialize_lora_eva_weights(t, dataloader=data, **kw)
    fastpeft.initialize_lora_eva_weights(o, dataloader=data, **kw)
    tl, ol = _layers(t, o, "a")
    assert torch.equal(ol.lora_A["default"].weight, tl.lora_A["default"].weight)
    assert isinstance(ol.get_base_layer(), QuantLinear)


# ------------------------------------------------------------------------------------------------ DoRA
def test_olora_with_dora_on_nf4_is_peft():
    theirs, ours = _nf4_pair()
    t, o = _wrap(theirs, ours, "olora", use_dora=True)
    for n in "ab":
        tl, ol = _layers(t, o, n)
        # the magnitude is ||W_res + s B A|| over the re-quantized residual
        torch.testing.assert_close(ol.lora_magnitude_vector["default"].weight,
                                   tl.lora_magnitude_vector["default"].weight, rtol=1e-6, atol=1e-6)
    x = torch.randn(5, 128)
    torch.testing.assert_close(o(x), t(x), rtol=1e-6, atol=1e-6)


def test_olora_keeps_packed_codes_a_parameter():
    _, ours = _nf4_pair()
    assert packed_as_parameters(ours) == 2
    o = fastpeft.get_peft_model(ours, fastpeft.LoraConfig(**_cfg("olora")))
    base = o.base_model.model.a.get_base_layer()
    assert isinstance(base.weight, nn.Parameter) and not base.weight.requires_grad
    assert "weight" not in base._buffers and base.weight.dtype == torch.uint8


# ---------------------------------------------------------------------------------- save, load, conversion
def _train_like(model, seed):
    """The same deterministic change to every adapter tensor (stands in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=g))


def test_qolora_adapters_round_trip_and_convert_like_peft(tmp_path):
    from safetensors.torch import load_file

    theirs, ours = _nf4_pair()
    t, o = _wrap(theirs, ours, "olora")
    t.save_pretrained(str(tmp_path / "t_init"))
    o.save_pretrained(str(tmp_path / "o_init"))
    _train_like(t, 5)
    _train_like(o, 5)
    x = torch.randn(4, 128)
    assert torch.equal(o(x), t(x))
    t.save_pretrained(str(tmp_path / "t"))
    o.save_pretrained(str(tmp_path / "o"))
    t.save_pretrained(str(tmp_path / "t_conv"), path_initial_model_for_weight_conversion=str(tmp_path / "t_init"))
    o.save_pretrained(str(tmp_path / "o_conv"), path_initial_model_for_weight_conversion=str(tmp_path / "o_init"))

    for a, b in (("t", "o"), ("t_conv", "o_conv")):
        ft, fo = load_file(str(tmp_path / a / "adapter_model.safetensors")), \
            load_file(str(tmp_path / b / "adapter_model.safetensors"))
        assert ft.keys() == fo.keys() and all(torch.equal(ft[k], fo[k]) for k in ft)
        ct = json.loads((tmp_path / a / "adapter_config.json").read_text())
        co = json.loads((tmp_path / b / "adapter_config.json").read_text())
        for key in ("r", "lora_alpha", "init_lora_weights", "target_modules"):
            assert sorted(co[key]) == sorted(ct[key]) if key == "target_modules" else co[key] == ct[key], key
    conv = json.loads((tmp_path / "o_conv" / "adapter_config.json").read_text())
    assert conv["init_lora_weights"] is True and conv["r"] == 2 * R

    # an OLoRA adapter loads onto the original quantized model (the init runs again, then the weights load):
    # fastpeft's file in peft and peft's file in fastpeft give the trained model's output
    ref = o(x)
    fresh_t, fresh_o = _nf4_pair()
    # (bitsandbytes' CPU Linear4bit repacks its weight for another kernel at the first forward in eval mode, whose
    # results differ in the last digits: peft's models are run in train mode, as the ones they are compared with)
    loaded_t = peft.PeftModel.from_pretrained(fresh_t, str(tmp_path / "o")).train()
    loaded_o = fastpeft.PeftModel.from_pretrained(fresh_o, str(tmp_path / "t"))
    assert torch.equal(loaded_t(x), ref) and torch.equal(loaded_o(x), ref)
    # the converted adapter is a plain LoRA of the original quantized model, the same in both libraries
    fresh_t, fresh_o = _nf4_pair()
    conv_t = peft.PeftModel.from_pretrained(fresh_t, str(tmp_path / "o_conv")).train()
    conv_o = fastpeft.PeftModel.from_pretrained(fresh_o, str(tmp_path / "t_conv"))
    assert torch.equal(conv_o(x), conv_t(x))
    assert torch.equal(conv_o.base_model.model.a.get_base_layer().weight, _nf4_pair()[1].a.weight)  # untouched
    # [A; A0] and [B, -B0]: the trained adapter minus the one OLoRA started from
    init = load_file(str(tmp_path / "o_init" / "adapter_model.safetensors"))
    layer = conv_o.base_model.model.a
    key = "base_model.model.a.lora_{}.weight"
    assert torch.equal(layer.lora_A["default"].weight,
                       torch.cat([o.base_model.model.a.lora_A["default"].weight, init[key.format("A")]]))
    assert torch.equal(layer.lora_B["default"].weight,
                       torch.cat([o.base_model.model.a.lora_B["default"].weight, -init[key.format("B")]], dim=1))
