"""fp8 (e4m3fn) base weights: the format (blocks, per channel, per tensor), QuantLinear, quantize(), LoRA
and QLoRA over it on the torch backend (float64 reference), adapter save/load both ways with HF peft, and
the importer for transformers' FP8 checkpoints (built offline; transformers itself, which dequantizes FP8
checkpoints on a machine without GPU, is the oracle for the weights)."""
import json

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import LoraConfig, get_peft_model
from fastpeft.ops import lora_quant_linear
from fastpeft.quant import QuantLinear, formats, from_fp8, import_fp8, load_fp8_checkpoint
from _support.models import tiny_model

F8 = torch.float8_e4m3fn
# (fp8_block_size, scale shape for a [300, 200] weight)
BLOCKS = [(128, (3, 2)), (None, (300, 1)), ("tensor", (1, 1)), ((64, 32), (5, 7)), (16, (19, 13))]


def _w(N=300, K=200, seed=0):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("block,scale_shape", BLOCKS)
def test_quantize_layout_and_error(block, scale_shape):
    w = _w()
    qw = formats.quantize_weight(w, "fp8", fp8_block_size=block)
    assert qw.qdata.dtype == F8 and qw.qdata.shape == (300, 200)
    assert qw.scales.dtype == torch.float32 and tuple(qw.scales.shape) == scale_shape
    shapes = formats.expected_shapes("fp8", 300, 200, qw.blocksize, blocksize2=qw.blocksize2)
    assert {k: tuple(v[0]) for k, v in shapes.items()} == {"qdata": (300, 200), "scales": scale_shape}
    assert formats.packed_nbytes(qw) == 300 * 200 + 4 * scale_shape[0] * scale_shape[1]
    d = formats.dequantize(qw)
    # e4m3 keeps 3 mantissa bits: every element within half an ulp (2^-4 relative) of its block's grid
    bn, bk = qw.blocksize2, qw.blocksize
    s = qw.scales.repeat_interleave(bn, 0)[:300].repeat_interleave(bk, 1)[:, :200]
    assert ((d - w).abs() <= w.abs() * 2 ** -4 + s * 2 ** -9 + 1e-12).all()
    # each block's largest magnitude maps to 448 exactly (absmax / 448 scaling)
    assert (qw.qdata.float().abs().amax() == formats.FP8_MAX)
    # dequantize is float(code) * scale of the element's block, in fp32, then one cast
    ref = qw.qdata.float() * s
    assert torch.equal(d, ref) and torch.equal(formats.dequantize(qw, torch.bfloat16), ref.bfloat16())
    # the uint8 bits of the codes dequantize the same
    assert torch.equal(formats.dequantize(qw._replace(qdata=qw.qdata.view(torch.uint8))), d)


def test_quantize_zero_block_and_refusals():
    w = _w(130, 140)
    w[:128, :128] = 0  # an all-zero block: scale 1, codes 0
    qw = formats.quantize_weight(w, "fp8")
    assert qw.scales[0, 0] == 1.0 and torch.equal(formats.dequantize(qw)[:128, :128], torch.zeros(128, 128))
    with pytest.raises(ValueError, match="NaN or inf"):
        formats.quantize_weight(torch.full((4, 4), float("inf")), "fp8")
    with pytest.raises(ValueError, match="fp8 block_size must be positive"):
        formats.quantize_weight(w, "fp8", fp8_block_size=(0, 128))
    with pytest.raises(ValueError, match="fp8 block_size must be None"):
        formats.quantize_weight(w, "fp8", fp8_block_size="rows")
    with pytest.raises(ValueError, match="fp8 block_size"):
        fastpeft.quantize(nn.Sequential(nn.Linear(8, 8)), "fp8", fp8_block_size=-1, progressbar=False)


def test_quantlinear_state_dict_dtype_moves():
    lin = nn.Linear(200, 300).to(torch.bfloat16)
    q = QuantLinear.from_linear(lin, "fp8", fp8_block_size=(64, 32))
    assert "block_size=[64, 32]" in repr(q)
    sd = q.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == {
        "weight": (F8, (300, 200)), "scales": (torch.float32, (5, 7)), "bias": (torch.bfloat16, (300,))}
    fresh = QuantLinear(200, 300, fmt="fp8", fp8_block_size=(64, 32), compute_dtype=torch.bfloat16)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 200, dtype=torch.bfloat16)
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)
    # .to(float32) changes the compute dtype and bias, never the codes or scales
    fresh.float()
    assert fresh.weight.dtype == F8 and fresh.scales.dtype == torch.float32 and fresh.compute_dtype == torch.float32
    # a 16-bit "weight" in place of the fp8 codes is a different checkpoint, not something to cast
    bad = dict(sd, weight=sd["weight"].to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="dtype mismatch for weight"):
        fresh.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="size mismatch for scales"):
        QuantLinear(200, 300, fmt="fp8", fp8_block_size=128).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"packed field 'scales' has shape \(3, 2\), expected \(5, 7\)"):
        fresh.set_quantized(formats.quantize_weight(_w(), "fp8")._replace(blocksize=32, blocksize2=64))


@pytest.mark.parametrize("block", [128, None, (16, 32)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_lora_op_forward_and_grads_vs_float64(block, dtype):
    N, K = 48, 80
    qw = formats.quantize_weight(_w(N, K), "fp8", fp8_block_size=block)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, K, generator=g).to(dtype).requires_grad_()
    adt = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 adapters next to 16-bit x (peft's)
    A = (torch.randn(4, K, generator=g) * 0.1).to(adt).requires_grad_()
    B = (torch.randn(N, 4, generator=g) * 0.1).to(adt).requires_grad_()
    bias = torch.randn(N, generator=g).to(dtype)
    y = lora_quant_linear(x, qw, bias, A, B, 0.5, training=True)
    assert y.dtype == dtype
    # float64 reference on the weight dequantized in x's dtype (what the op multiplies by)
    W = formats.dequantize(qw, dtype).double()
    x2, A2, B2 = (t.detach().double().requires_grad_() for t in (x, A, B))
    ref = x2 @ W.t() + bias.double() + 0.5 * (x2 @ A2.t()) @ B2.t()
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), ref, **tol)
    dy = torch.randn(y.shape, generator=g)
    (y * dy.to(dtype)).sum().backward()
    (ref * dy.to(dtype).double()).sum().backward()
    for name, got, want in (("x", x.grad, x2.grad), ("A", A.grad, A2.grad), ("B", B.grad, B2.grad)):
        assert got is not None, name
        gtol = tol if dtype == torch.float64 else dict(rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(got.double(), want, **gtol, msg=name)
    assert not qw.qdata.requires_grad and qw.scales.grad is None


@pytest.mark.parametrize("block", [(16, 32), None])
def test_merge_and_unload_over_fp8(block):
    """merge_and_unload: a 16-bit nn.Linear with deq(W) + s B A, or (requantize=True) an fp8 QuantLinear with
    the base's own scale blocks."""
    import warnings

    from fastpeft.quant import merge_and_unload

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    fastpeft.quantize(m, "fp8", skip_modules=None, fp8_block_size=block, progressbar=False)
    layout = (m[0].block_n, m[0].blocksize)
    W = m[0].dequantize(torch.float32)
    pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    lora = pm.base_model.model[0]
    delta = 2.0 * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = pm(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = merge_and_unload(pm, requantize=True)
    assert any("Re-quantized the merged weight [48, 64] to fp8" in str(w.message) for w in caught)
    q = out[0]
    assert isinstance(q, QuantLinear) and q.fmt == "fp8" and (q.block_n, q.blocksize) == layout
    merged = (W + delta).detach()
    torch.testing.assert_close(q.dequantize(torch.float32), merged, rtol=2 ** -4, atol=merged.abs().max() * 2 ** -8)
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref, rtol=0.05, atol=0.05)


def _tiny_llama(seed=0):
    return tiny_model("llama", seed, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=False)


@pytest.mark.parametrize("block", [32, None])
def test_qlora_training_tiny_llama_fp8(block):
    model = _tiny_llama()
    rep = fastpeft.quantize(model, "fp8", fp8_block_size=block, progressbar=False)
    assert rep.fmt == "fp8" and rep.bytes_per_param_after < 1.2
    packed_before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05))
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, QuantLinear) and q.base_layer.fmt == "fp8"
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    pm.train()
    losses = []
    for _ in range(12):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    for k, v in pm.base_model.model.state_dict().items():  # fp8 codes and scales untouched by training
        if "base_layer" in k:
            assert v.dtype == packed_before[k.replace(".base_layer", "")].dtype
            assert torch.equal(v.view(torch.uint8) if v.dtype == F8 else v,
                               packed_before[k.replace(".base_layer", "")].view(torch.uint8) if v.dtype == F8
                               else packed_before[k.replace(".base_layer", "")]), k


def _dequantized_twin():
    """A plain model whose linear layers hold the fp8 layers' dequantized weights (what peft runs over)."""
    model, twin = _tiny_llama(seed=1), _tiny_llama(seed=1)
    fastpeft.quantize(model, "fp8", progressbar=False)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            twin.get_submodule(name).weight.data.copy_(mod.dequantize(torch.float32))
    return twin


def test_adapter_save_load_both_ways_with_peft(tmp_path):
    import peft

    from fastpeft import PeftModel
    model = _tiny_llama(seed=1)
    fastpeft.quantize(model, "fp8", progressbar=False)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    pm = get_peft_model(model, LoraConfig(**cfg))
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    pm.eval()
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    pm.save_pretrained(str(tmp_path / "ours"))
    # fastpeft -> fastpeft over a freshly quantized base
    fresh = _tiny_llama(seed=1)
    fastpeft.quantize(fresh, "fp8", progressbar=False)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref)
    # fastpeft -> peft over the dequantized weights: same keys, same outputs
    theirs = peft.PeftModel.from_pretrained(_dequantized_twin(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    # peft -> fastpeft: an adapter saved by peft over the dequantized base loads onto the fp8 base
    tp = peft.get_peft_model(_dequantized_twin(), peft.LoraConfig(**cfg)).eval()
    tp.save_pretrained(str(tmp_path / "theirs"))
    base = _tiny_llama(seed=1)
    fastpeft.quantize(base, "fp8", progressbar=False)
    ours = PeftModel.from_pretrained(base, str(tmp_path / "theirs")).eval()
    theirs_sd = {k for k in tp.state_dict() if "lora_" in k}
    assert theirs_sd == {k for k in ours.state_dict() if "lora_" in k}
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, tp(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# -- importer: transformers' FineGrainedFP8 checkpoints ---------------------------------------------
def _fp8_checkpoint(path, block, seed=3):
    """A tiny Llama saved as transformers saves a FineGrainedFP8 model: fp8 weight + weight_scale_inv for
    each decoder linear layer (lm_head kept 16-bit, as modules_to_not_convert), and the config's
    quantization_config. Returns the float model it came from."""
    from safetensors.torch import save_file

    model = _tiny_llama(seed=seed).to(torch.bfloat16)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name != "lm_head":
            qw = formats.quantize_weight(mod.weight.data, "fp8", fp8_block_size=block)
            sd[name + ".weight"] = qw.qdata
            sd[name + ".weight_scale_inv"] = qw.scales
    if model.config.tie_word_embeddings:  # tied: transformers does not save the head
        sd.pop("lm_head.weight", None)
    model.config.save_pretrained(str(path))
    cfg = json.load(open(path / "config.json"))
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block),
                                  "modules_to_not_convert": ["lm_head"]}
    json.dump(cfg, open(path / "config.json", "w"))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return model


@pytest.mark.parametrize("block", [(32, 32), (16, 64)])
def test_load_fp8_checkpoint_matches_transformers(tmp_path, block):
    import transformers as T

    _fp8_checkpoint(tmp_path, block)
    # transformers on a machine without GPU loads the checkpoint dequantized to bf16: the oracle
    T.logging.set_verbosity_error()
    theirs = T.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    cfg = T.AutoConfig.from_pretrained(str(tmp_path))
    cfg.quantization_config = None
    ours = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="quant_method 'fp8'"):  # a non-FP8 config is refused, naming it
        load_fp8_checkpoint(ours, str(tmp_path), quantization_config={"quant_method": "gptq"})
    # a compressed-tensors config goes to load_ctensors_checkpoint (tests/quant/test_quant_ctensors.py), which
    # finds no config group in this one; import_fp8 (FP8Linear's weight_scale_inv) refuses it, naming the loader
    with pytest.raises(ValueError, match="quantization_config has no config_groups"):
        load_fp8_checkpoint(ours, str(tmp_path), quantization_config={"quant_method": "compressed-tensors"})
    ours.config.quantization_config = {"quant_method": "compressed-tensors"}
    with pytest.raises(ValueError, match="load_ctensors_checkpoint"):
        import_fp8(ours)
    ours.config.quantization_config = None
    names = load_fp8_checkpoint(ours, str(tmp_path))
    assert len(names) == 2 * 7 and "lm_head" not in names
    q = ours.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.fmt == "fp8" and (q.block_n, q.blocksize) == block
    assert q.compute_dtype == torch.bfloat16
    for name in names:
        torch.testing.assert_close(ours.get_submodule(name).dequantize(torch.bfloat16),
                                   theirs.get_submodule(name).weight.data, rtol=0, atol=0)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits.float(), theirs(input_ids=ids).logits.float(),
                                   rtol=2e-2, atol=2e-2)
    # LoRA on the imported model trains (gradients reach A and B through the fp8 layers)
    pm = get_peft_model(ours, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    pm(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_from_fp8_scale_layouts_and_errors():
    w = _w(40, 72)
    for block, scale_of in ((None, lambda s: s.reshape(40)), (None, lambda s: s.reshape(40, 1))):
        qw = formats.quantize_weight(w, "fp8", fp8_block_size=None)
        q = from_fp8(qw.qdata, scale_of(qw.scales), block_size=block)
        assert (q.block_n, q.blocksize) == (1, 72) and q.compute_dtype == torch.bfloat16
        assert torch.equal(q.dequantize(torch.float32), formats.dequantize(qw))
    qt = formats.quantize_weight(w, "fp8", fp8_block_size="tensor")
    q = from_fp8(qt.qdata.view(torch.uint8), qt.scales.reshape(()), block_size=None)  # uint8 bits, 0-dim scale
    assert (q.block_n, q.blocksize) == (40, 72) and torch.equal(q.dequantize(torch.float32), formats.dequantize(qt))
    qb = formats.quantize_weight(w, "fp8", fp8_block_size=32)
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \(2, 3\), expected \(3, 5\)"):
        from_fp8(qb.qdata, qb.scales, block_size=(16, 16))
    with pytest.raises(ValueError, match="must be float8_e4m3fn"):
        from_fp8(w.bfloat16(), qb.scales, block_size=32)
    with pytest.raises(ValueError, match="per tensor"):
        from_fp8(qb.qdata, qb.scales, block_size=None)


def test_import_fp8_swaps_fp8linear_like_modules():
    """import_fp8 on a model transformers loaded on a GPU: FP8Linear modules (fp8 weight + weight_scale_inv)."""
    class FP8Like(nn.Module):
        def __init__(self, qw, bias):
            super().__init__()
            self.weight = nn.Parameter(qw.qdata, requires_grad=False)
            self.weight_scale_inv = nn.Parameter(qw.scales, requires_grad=False)
            self.bias = nn.Parameter(bias, requires_grad=False)

    qw = formats.quantize_weight(_w(24, 40), "fp8", fp8_block_size=16)
    model = nn.Sequential(FP8Like(qw, torch.zeros(24, dtype=torch.bfloat16)), nn.Linear(24, 4))
    with pytest.raises(ValueError, match="no config.quantization_config"):
        import_fp8(model)
    assert import_fp8(model, block_size=(16, 16)) == ["0"]
    assert isinstance(model[0], QuantLinear) and torch.equal(model[0].dequantize(torch.float32),
                                                              formats.dequantize(qw))
    assert isinstance(model[1], nn.Linear) and not isinstance(model[1], QuantLinear)
