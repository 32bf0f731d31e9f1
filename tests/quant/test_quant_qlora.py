"""QLoRA: the quantized LoRA op (forward, grads, no grads to packed weights, backend hook), LoRA over
QuantLinear through get_peft_model (keys, trainable params, training on a tiny Llama), and merging."""
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import LoraConfig, get_peft_model
from fastpeft.ops import dispatch, lora_linear, lora_quant_linear, torch_backend
from fastpeft.quant import QuantLinear, formats, merge_and_unload
from fastpeft.tuners.lora.quant_linear import QuantLoraLinear
from _support.models import tiny_model

FORMATS = [("nf4", dict(blocksize=64)), ("nf4", dict(blocksize=64, double_quant=True)), ("int8", {}),
           ("int4", dict(group_size=32)), ("int4", dict(group_size=48))]  # 48 does not divide K=80


def _qw(fmt, kw, N=24, K=80, seed=0):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.1
    return formats.quantize_weight(w, fmt, **kw)


@pytest.mark.parametrize("fmt,kw", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_matches_dequantized_reference(fmt, kw, dtype):
    qw = _qw(fmt, kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 80, generator=g, dtype=dtype, requires_grad=True)
    A = (torch.randn(4, 80, generator=g, dtype=dtype) * 0.1).requires_grad_()
    B = (torch.randn(24, 4, generator=g, dtype=dtype) * 0.1).requires_grad_()
    bias = torch.randn(24, generator=g, dtype=dtype)
    y = lora_quant_linear(x, qw, bias, A, B, 0.5, training=True)
    W = formats.dequantize(qw, dtype)
    x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x, A, B))
    ref = x2 @ W.t() + bias + 0.5 * (x2 @ A2.t()) @ B2.t()
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (ref * dy).sum().backward()
    for got, want in ((x.grad, x2.grad), (A.grad, A2.grad), (B.grad, B2.grad)):
        torch.testing.assert_close(got, want)
    for t in (qw.qdata, qw.scales):
        assert not t.requires_grad and t.grad is None


def test_op_gives_no_gradient_to_packed_fields_even_if_asked():
    qw = _qw("int4", dict(group_size=32))
    scales = qw.scales.clone().requires_grad_()  # a float field that (wrongly) requires grad
    x = torch.randn(3, 80, requires_grad=True)
    A, B = torch.randn(4, 80, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    lora_quant_linear(x, qw._replace(scales=scales), None, A, B, 1.0).sum().backward()
    assert scales.grad is None and x.grad is not None and A.grad is not None


def test_op_dropout_matches_16bit_op_with_same_seed():
    qw = _qw("nf4", {})
    W = formats.dequantize(qw)
    x = torch.randn(6, 80)
    A, B = torch.randn(4, 80, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    torch.manual_seed(5)
    y = lora_quant_linear(x, qw, None, A, B, 2.0, dropout_p=0.3, training=True)
    y.sum().backward()
    gA, gB = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    torch.manual_seed(5)
    ref = lora_linear(x, W, None, A, B, 2.0, dropout_p=0.3, training=True)
    ref.sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gA, A.grad)
    torch.testing.assert_close(gB, B.grad)


def test_op_bad_input():
    qw = _qw("int8", {})
    x = torch.randn(3, 80)
    with pytest.raises(ValueError, match=r"quantized weight is \[N=24, K=80\] but lora_A is \(4, 64\)"):
        lora_quant_linear(x, qw, None, torch.zeros(4, 64), torch.zeros(24, 4), 1.0)
    with pytest.raises(ValueError, match=r"x's last dim must be K=80; got x \(3, 81\)"):
        lora_quant_linear(torch.randn(3, 81), qw, None, torch.zeros(4, 80), torch.zeros(24, 4), 1.0)
    with pytest.raises(ValueError, match=r"unknown quantization format 'int2'"):
        lora_quant_linear(x, qw._replace(fmt="int2"), None, torch.zeros(4, 80), torch.zeros(24, 4), 1.0)


class _Recorder:
    """A backend that records calls and delegates to the torch reference (tests the plug-in hook)."""

    def __init__(self):
        self.calls = []

    def supports(self, call):
        return None

    def forward(self, call):
        q = call.base.packed
        self.calls.append(("fwd", q.fmt, tuple(q.qdata.shape)))
        return torch_backend.forward(call)

    def backward(self, call, dY, S, needs_dx, needs_dA, needs_dB):
        self.calls.append(("bwd", needs_dx, needs_dA, needs_dB))
        return torch_backend.backward(call, dY, S, needs_dx, needs_dA, needs_dB)


def test_backend_hook_and_forced_backend(monkeypatch):
    qw = _qw("int4", dict(group_size=32))
    x = torch.randn(3, 80, requires_grad=True)
    A, B = torch.randn(4, 80, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    rec = _Recorder()
    dispatch.register_backend("triton", rec)
    try:
        monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        lora_quant_linear(x, qw, None, A, B, 1.0).sum().backward()
        assert rec.calls == [("fwd", "int4", (24, 40)), ("bwd", True, [True], [True])]
    finally:
        dispatch.register_backend("triton", None)
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"FASTPEFT_BACKEND=cuda forces the cuda backend, which cannot run this "
                                           r"lora call \(int4 weight \[24, 80\]"):
        lora_quant_linear(x, qw, None, A, B, 1.0)


def test_op_compiles_without_graph_breaks():
    qw = _qw("nf4", dict(double_quant=True))
    A, B = torch.randn(4, 80, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    f = torch.compile(lambda x: lora_quant_linear(x, qw, None, A, B, 1.0, training=True), fullgraph=True,
                      backend="aot_eager")
    x = torch.randn(3, 80)
    torch.testing.assert_close(f(x), lora_quant_linear(x, qw, None, A, B, 1.0))
    f(x).sum().backward()
    assert A.grad is not None
    # a plain QuantLinear (rank-0 adapter, only x needs grad) compiles too
    q = QuantLinear.from_linear(nn.Linear(80, 24), "int4", group_size=32)
    xg = torch.randn(3, 80, requires_grad=True)
    torch.compile(q, fullgraph=True, backend="aot_eager")(xg).sum().backward()
    torch.testing.assert_close(xg.grad, q.dequantize().sum(0).expand(3, 80))


def _tiny_llama(seed=0):
    # hidden 64: whole quantization blocks / groups in every projection
    return tiny_model("llama", seed, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=False)


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_qlora_training_tiny_llama(fmt):
    model = _tiny_llama()
    fastpeft.quantize(model, fmt, double_quant=True, group_size=32, progressbar=False)
    packed_before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05))
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLoraLinear) and isinstance(q.base_layer, QuantLinear)
    keys = [k for k in pm.state_dict() if ".layers.0.self_attn.q_proj." in k]
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight" in keys
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # q,k,v,o,gate,up,down in 2 layers
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    emb = pm.get_input_embeddings().weight
    pm.train()
    losses = []
    for _ in range(12):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        assert emb.grad is None  # frozen: gradients reach only A and B
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    for k, v in pm.base_model.model.state_dict().items():  # packed buffers untouched by training
        if "base_layer" in k:
            assert torch.equal(v, packed_before[k.replace(".base_layer", "")]), k


def test_qlora_dx_flows_through_quantized_weight():
    # gradient w.r.t. an input below a LoRA-wrapped QuantLinear must include dY W (W dequantized)
    torch.manual_seed(0)
    base = QuantLinear.from_linear(nn.Linear(32, 16), "nf4")
    layer = QuantLoraLinear(base, "default", r=4, lora_alpha=4)  # B = 0: only the base path contributes
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, base.dequantize().sum(0).expand(3, 32))


def _merge_fixture(fmt="nf4"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    fastpeft.quantize(model, fmt, skip_modules=None, progressbar=False)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))
    return pm


@pytest.mark.parametrize("fmt", ["nf4", "int8", "int4"])
def test_merge_and_unload_gives_16bit_merged_base(fmt):
    pm = _merge_fixture(fmt)
    x = torch.randn(5, 64)
    pm.eval()
    with torch.no_grad():
        ref = pm(x)
        layer = pm.base_model.model[0]
        want = layer.base_layer.dequantize(torch.float32) + layer.get_delta_weight("default")
    merged = pm.merge_and_unload()
    assert type(merged[0]) is nn.Linear and merged[0].weight.dtype == torch.float32
    torch.testing.assert_close(merged[0].weight, want)
    torch.testing.assert_close(merged(x), ref, rtol=1e-5, atol=1e-5)


def test_merge_requantize_warns_with_error():
    pm = _merge_fixture("int4")
    x = torch.randn(5, 64)
    pm.eval()
    with torch.no_grad():
        ref = pm(x)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        merged = merge_and_unload(pm, requantize=True)
    msgs = [str(w.message) for w in rec if "Re-quantized" in str(w.message)]
    assert len(msgs) == 2 and "max abs error" in msgs[0]
    assert isinstance(merged[0], QuantLinear) and merged[0].fmt == "int4"
    err = float(msgs[0].rsplit(" ", 1)[1])
    assert 0 < err < 0.1
    torch.testing.assert_close(merged(x), ref, rtol=0.1, atol=0.1)


def test_merge_unmerge_exact_and_never_stale():
    pm = _merge_fixture("nf4")
    layer = pm.base_model.model[0]
    packed = layer.base_layer
    x = torch.randn(5, 64)
    pm.eval()
    with torch.no_grad():
        before = pm(x)
        pm.merge_adapter()
        assert type(layer.base_layer) is nn.Linear and layer.merged
        torch.testing.assert_close(pm(x), before, rtol=1e-5, atol=1e-5)
        pm.unmerge_adapter()
        assert layer.base_layer is packed and torch.equal(pm(x), before)
        # new packed weights arrive (e.g. load_state_dict); a later merge must use them, not an old copy
        new = QuantLinear.from_linear(nn.Linear(64, 32), "nf4")
        packed.load_state_dict(new.state_dict())
        pm.merge_adapter()
        torch.testing.assert_close(layer.base_layer.weight,
                                   new.dequantize(torch.float32) + layer.get_delta_weight("default"))
        # disabling adapters unmerges back to the packed base (on the next forward, as for 16-bit layers)
        with pm.disable_adapter():
            torch.testing.assert_close(pm.base_model.model[0](x), new(x))
            assert layer.base_layer is packed and not layer.merged


def test_adapter_save_load_on_quantized_base(tmp_path):
    from fastpeft import PeftModel
    model = _tiny_llama(seed=1)
    fastpeft.quantize(model, "nf4", progressbar=False)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    pm.eval()
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    pm.save_pretrained(str(tmp_path))
    fresh = _tiny_llama(seed=1)
    fastpeft.quantize(fresh, "nf4", progressbar=False)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path))
    loaded.eval()
    assert isinstance(loaded.base_model.model.model.layers[0].self_attn.q_proj, QuantLoraLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref)


def test_two_active_adapters_on_quantized_base():
    pm = _merge_fixture("int8")
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"], init_lora_weights=False))
    pm.base_model.set_adapter(["default", "other"])
    layer = pm.base_model.model[0]
    x = torch.randn(4, 64)
    pm.eval()
    with torch.no_grad():
        W = layer.base_layer.dequantize(torch.float32)
        ref = x @ (W + layer.get_delta_weight("default") + layer.get_delta_weight("other")).t() + layer.base_layer.bias
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
