"""compressed-tensors checkpoints into fastpeft QuantLinear layers (fastpeft/quant/ctensors_import.py).

The checkpoints are built offline with the compressed_tensors package itself: apply_quantization_config on a
tiny Llama / OPT with random weights, weight scales from the package's calculate_qparams over each layer's
min/max (no calibration data: weight-only statistics), then its ModelCompressor compresses the model and
writes the config. The oracle is the loader users run such checkpoints from on a CPU: transformers'
``from_pretrained(path, quantization_config=CompressedTensorsConfig(dequantize=True))``, which decompresses
every layer with compressed_tensors' own compressors into a dense model.
"""
import json

import pytest
import torch
from torch import nn

from fastpeft import LoraConfig, get_peft_model
from fastpeft.quant import QuantLinear, from_ctensors, load_ctensors_checkpoint, load_fp8_checkpoint
from _support.models import tiny_model

def _ct():
    import compressed_tensors  # noqa: F401  (a hard dependency of these tests: setup.py "test" extra)
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config, preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams
    return dict(ModelCompressor=ModelCompressor, QuantizationArgs=QuantizationArgs,
                QuantizationConfig=QuantizationConfig, QuantizationScheme=QuantizationScheme,
                apply=apply_quantization_config, preset=preset_name_to_scheme, qparams=calculate_qparams)


def _model(kind, dtype=torch.float32, seed=3):
    # widths not multiple of 128 (partial fp8 blocks), all multiple of 32 (compressed-tensors' int groups)
    if kind == "llama":
        m = tiny_model("llama", seed, hidden_size=192, intermediate_size=320, num_attention_heads=4,
                       num_key_value_heads=2, attention_bias=False)
    else:  # OPT: biases on every linear layer, lm_head tied to the embeddings
        m = tiny_model("opt", seed, hidden_size=96, ffn_dim=160, word_embed_proj_dim=96)
    return m.to(dtype)


def _minmax(w, args):
    """Per-scale min and max of w for the weight strategy (what an observer would record)."""
    N, K = w.shape
    st = args.strategy
    if st == "tensor":
        return w.amin(), w.amax()
    if st == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if st == "group":
        g = w.unflatten(1, (K // args.group_size, args.group_size))
        return g.amin(2), g.amax(2)
    bn, bk = args.block_structure
    b = nn.functional.pad(w, (0, -K % bk, 0, -N % bn)).unflatten(0, (-1, bn)).unflatten(2, (-1, bk))
    return b.amin((1, 3)), b.amax((1, 3))


def _int(bits, strategy, symmetric=True, group_size=None):
    return _ct()["QuantizationArgs"](num_bits=bits, type="int", strategy=strategy, symmetric=symmetric,
                                     group_size=group_size, dynamic=False)


def _scheme(spec, targets):
    c = _ct()
    if isinstance(spec, str):  # a preset of the package (FP8_DYNAMIC, FP8_BLOCK, W8A8, ...)
        return c["preset"](spec, targets)
    return c["QuantizationScheme"](targets=targets, weights=spec)


def _build(path, groups, ignore=("lm_head",), kind="llama", dtype=torch.float32):
    """A compressed-tensors checkpoint in ``path``; returns its config's quantization_config."""
    c = _ct()
    model = _model(kind, dtype)
    config = c["QuantizationConfig"](config_groups={f"group_{i}": _scheme(spec, targets)
                                                    for i, (spec, targets) in enumerate(groups)},
                                     ignore=list(ignore))
    c["apply"](model, config, show_progress=False)
    with torch.no_grad():
        for _, mod in model.named_modules():
            scheme = getattr(mod, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            scale, zp = c["qparams"](*_minmax(mod.weight.float(), scheme.weights), scheme.weights)
            mod.weight_scale.copy_(scale.reshape(mod.weight_scale.shape))
            if hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.copy_(zp.reshape(mod.weight_zero_point.shape))
            if hasattr(mod, "input_scale"):  # static activation scale (FP8 preset): stored, not used by us
                mod.input_scale.fill_(0.05)
    compressor = c["ModelCompressor"].from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(str(path))
    compressor.update_config(str(path))
    return json.load(open(path / "config.json"))["quantization_config"]


def _theirs(path):
    import transformers as T

    T.logging.set_verbosity_error()
    with pytest.warns(UserWarning, match="quantization_config"):  # transformers notes the override: expected
        return T.AutoModelForCausalLM.from_pretrained(
            str(path), quantization_config=T.CompressedTensorsConfig(dequantize=True)).eval()


def _fresh(path):
    """The model built from the checkpoint's config, float weights (what the importer fills)."""
    import transformers as T

    cfg = T.AutoConfig.from_pretrained(str(path))
    cfg.quantization_config = None
    return T.AutoModelForCausalLM.from_config(cfg, dtype=cfg.dtype).eval()


IDS = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def _spec(s):
    """A preset name of the package as is; our int4 names as QuantizationArgs (group 32: divides every width)."""
    if s == "int4_sym":
        return _int(4, "group", True, 32)
    if s == "int4_asym":
        return _int(4, "group", False, 32)
    if s == "int4_channel_asym":
        return _int(4, "channel", False)
    return s


# (id, groups [(scheme, targets)], model kind, dtype, q_proj's layout: (fmt, block_n, block_k) / (fmt, group))
CASES = [
    ("fp8_channel", [("FP8_DYNAMIC", ["Linear"])], "llama", torch.bfloat16, ("fp8", 1, 192)),
    ("fp8_tensor_static_act", [("FP8", ["Linear"])], "llama", torch.float32, ("fp8", 192, 192)),
    ("fp8_block", [("FP8_BLOCK", ["Linear"])], "llama", torch.float32, ("fp8", 128, 128)),
    ("int4_sym", [("int4_sym", ["Linear"])], "llama", torch.float32, ("int4", 32)),
    ("int4_asym_opt", [("int4_asym", ["Linear"])], "opt", torch.float32, ("int4", 32)),
    ("int4_channel_asym_opt", [("int4_channel_asym", ["Linear"])], "opt", torch.float32, ("int4", 96)),
    ("int8_opt", [("W8A8", ["Linear"])], "opt", torch.float32, ("int8",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_import_matches_compressed_tensors_decompression(tmp_path, case):
    _, groups, kind, dtype, layout = case
    qc = _build(tmp_path, [(_spec(s), t) for s, t in groups], kind=kind, dtype=dtype)
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    theirs = _theirs(tmp_path)
    ours = _fresh(tmp_path)
    names = load_ctensors_checkpoint(ours, str(tmp_path))
    linears = [n for n, m in theirs.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert sorted(names) == sorted(linears) and len(names) == 2 * (7 if kind == "llama" else 6)
    first = ours.get_submodule(names[0])
    assert isinstance(first, QuantLinear) and first.fmt == layout[0] and first.compute_dtype == dtype
    q = ours.get_submodule("model.layers.0.self_attn.q_proj" if kind == "llama" else
                           "model.decoder.layers.0.self_attn.q_proj")
    if layout[0] == "fp8":
        assert (q.block_n, q.blocksize) == layout[1:]
    elif layout[0] == "int4":
        assert q.blocksize == layout[1] and q.zeros.dtype == torch.uint8
        if "asym" not in case[0]:
            assert bool((q.zeros == 8).all())  # symmetric: zero 8 under the unsigned stored code
    assert not isinstance(ours.lm_head, QuantLinear)  # ignored: left dense
    # weights: compressed_tensors' decompression, bit for bit
    for n in names:
        got = ours.get_submodule(n).dequantize(dtype)
        assert torch.equal(got, theirs.get_submodule(n).weight.data), n
    with torch.no_grad():
        a, b = ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(a, b, **tol)
    assert torch.isfinite(a).all()


def _mixed(path):
    """fp8 (q, k), int8 (v, o), int4 (every other Linear: regex targets outrank the class target), with
    one MLP layer and the head ignored."""
    return _build(path, [("FP8_DYNAMIC", [r"re:.*self_attn\.(q|k)_proj$"]),
                         ("W8A8", [r"re:.*self_attn\.(v|o)_proj$"]),
                         (_int(4, "group", False, 32), ["Linear"])],
                  ignore=("lm_head", r"re:.*layers\.1\.mlp\.down_proj$"))


def _package_decompressed(path):
    """A dense model holding compressed_tensors' own decompression of each layer, with the scheme the package
    itself assigns to it (apply_quantization_config on a scratch model). transformers' dequantize=True loader
    cannot be the oracle here: it decompresses every layer with one config group's scheme, so it fails on
    mixed-precision checkpoints."""
    from compressed_tensors.compressors import BaseCompressor

    c = _ct()
    sd, cfg = _sd_and_cfg(path)
    scratch = _fresh(path)
    c["apply"](scratch, c["QuantizationConfig"].model_validate(cfg["quantization_config"]), show_progress=False)
    schemes = {n: m.quantization_scheme for n, m in scratch.named_modules() if hasattr(m, "quantization_scheme")}
    dense = _fresh(path)
    for name, scheme in schemes.items():
        local = {k[len(name) + 1:]: sd.pop(k) for k in [k for k in sd if k.rpartition(".")[0] == name]}
        w = BaseCompressor.get_value_from_registry(scheme.format).decompress(local, scheme)["weight"]
        dense.get_submodule(name).weight.data.copy_(w)
        for k in local:  # bias back; activation scales dropped
            if k == "bias":
                sd[f"{name}.bias"] = local[k]
    missing, unexpected = dense.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.rpartition(".")[0] in schemes or k == "lm_head.weight" for k in missing)
    return dense.eval(), sorted(schemes)


def test_mixed_precision_ignore_and_lora_training(tmp_path):
    qc = _mixed(tmp_path)
    assert qc["format"] == "mixed-precision"
    theirs, quantized = _package_decompressed(tmp_path)
    ours = _fresh(tmp_path)
    names = load_ctensors_checkpoint(ours, str(tmp_path))
    layer = ours.model.layers[0]
    fmts = {n: layer.get_submodule(n).fmt for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    assert fmts == {"self_attn.q_proj": "fp8", "self_attn.k_proj": "fp8", "self_attn.v_proj": "int8",
                    "self_attn.o_proj": "int8", "mlp.up_proj": "int4", "mlp.down_proj": "int4"}
    dense = ours.model.layers[1].mlp.down_proj
    assert type(dense) is nn.Linear and "model.layers.1.mlp.down_proj" not in names and len(names) == 13
    assert sorted(names) == quantized  # the package's own target / ignore matching picks the same layers
    for n in names:
        assert torch.equal(ours.get_submodule(n).dequantize(torch.float32), theirs.get_submodule(n).weight), n
    assert torch.equal(dense.weight, theirs.model.layers[1].mlp.down_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    # LoRA over every imported layer: one step changes only the adapters
    pm = get_peft_model(ours, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer, QuantLinear)
    before = {k: v.detach().clone() for k, v in pm.state_dict().items()}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    pm.train()
    loss = pm(input_ids=IDS, labels=IDS).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = {k for k, v in pm.state_dict().items()
               if not torch.equal(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
                                  before[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else before[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed - {k for k in changed if ".lora_" in k})
    assert any("q_proj.lora_A" in k for k in changed) and any("up_proj.lora_A" in k for k in changed)
    assert any("v_proj.lora_A" in k for k in changed)


def test_from_ctensors_odd_shapes_vs_package_compressor():
    """One layer straight through the package's compressor: N and K not multiples of 8 (partial int32 words
    along K, zero points packed along N), every supported strategy, against the package's decompress."""
    from compressed_tensors.compressors import BaseCompressor

    c = _ct()
    g = torch.Generator().manual_seed(0)
    N, K = 13, 36
    w = torch.randn(N, K, generator=g) * 0.1
    F = c["QuantizationArgs"]
    cases = [("pack-quantized", _int(4, "channel", False)), ("pack-quantized", _int(4, "channel", True)),
             ("pack-quantized", _int(4, "group", False, 12)), ("pack-quantized", _int(4, "tensor", True)),
             ("naive-quantized", _int(8, "channel")), ("int-quantized", _int(8, "tensor")),
             ("float-quantized", F(num_bits=8, type="float", strategy="group", group_size=12, symmetric=True)),
             ("float-quantized", F(num_bits=8, type="float", strategy="block", block_structure=[8, 16],
                                   symmetric=True))]
    for fmt, args in cases:
        scale, zp = c["qparams"](*_minmax(w, args), args)
        sd = {"weight": w, "weight_scale": scale, "weight_zero_point": zp}
        scheme = c["QuantizationScheme"](targets=["Linear"], weights=args, format=fmt)
        comp = BaseCompressor.get_value_from_registry(fmt)
        packed = comp.compress(sd, scheme)
        want = comp.decompress(packed, scheme)["weight"]
        q = from_ctensors(dict(packed), args.model_dump(), fmt, (N, K))
        assert torch.equal(q.dequantize(torch.float32), want.float()), (fmt, args.strategy)


def _sd_and_cfg(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors")), json.load(open(path / "config.json"))


def _rewrite(path, sd=None, qc=None):
    from safetensors.torch import save_file

    if sd is not None:
        save_file(sd, str(path / "model.safetensors"))
    if qc is not None:
        cfg = json.load(open(path / "config.json"))
        cfg["quantization_config"] = qc
        json.dump(cfg, open(path / "config.json", "w"))


def test_bad_checkpoints_name_key_format_and_file(tmp_path):
    _build(tmp_path, [("FP8_DYNAMIC", ["Linear"])])
    sd, cfg = _sd_and_cfg(tmp_path)
    qc = cfg["quantization_config"]
    f = str(tmp_path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj"
    # missing scale
    _rewrite(tmp_path, {k: v for k, v in sd.items() if k != key + ".weight_scale"})
    with pytest.raises(ValueError, match=rf"'{key}\.weight_scale' \(in {f}\) is missing"):
        load_ctensors_checkpoint(_fresh(tmp_path), str(tmp_path))
    # scale of the wrong shape
    _rewrite(tmp_path, dict(sd, **{key + ".weight_scale": sd[key + ".weight_scale"][:100]}))
    with pytest.raises(ValueError, match=rf"{key} \[float-quantized\]: '{key}\.weight_scale' \(in {f}\) has shape "
                                         r"\(100, 1\), expected \(192, 1\) for strategy 'channel'"):
        load_ctensors_checkpoint(_fresh(tmp_path), str(tmp_path))
    # weight that is not fp8
    _rewrite(tmp_path, dict(sd, **{key + ".weight": sd[key + ".weight"].float()}))
    with pytest.raises(ValueError, match=rf"'{key}\.weight' \(in {f}\) has dtype torch.float32; expected float8"):
        load_ctensors_checkpoint(_fresh(tmp_path), str(tmp_path))
    _rewrite(tmp_path, sd)
    # unknown format: names the layer, the format and the file
    bad = json.loads(json.dumps(qc))
    bad["format"] = bad["config_groups"]["group_0"]["format"] = "nvfp4-pack-quantized"
    _rewrite(tmp_path, qc=bad)
    with pytest.raises(ValueError, match=r"\[nvfp4-pack-quantized\]: '.*\.weight' \(in .*model\.safetensors\) uses "
                                         r"format 'nvfp4-pack-quantized'"):
        load_ctensors_checkpoint(_fresh(tmp_path), str(tmp_path))
    # a scale on a layer the config ignores
    bad = dict(qc, ignore=["lm_head", key])
    _rewrite(tmp_path, qc=bad)
    with pytest.raises(ValueError, match=rf"'{key}\.weight_scale' \(in {f}\) is a quantized tensor, but "
                                         "quantization_config does not quantize"):
        load_ctensors_checkpoint(_fresh(tmp_path), str(tmp_path))
    # dynamic weights, act order, sparsity, transforms, KV cache, not compressed: refused by name
    for change, msg in [(("weights", "dynamic", True), "quantized dynamically"),
                        (("weights", "actorder", "group"), "actorder 'group'"),
                        ((None, "sparsity_config", {"format": "sparse-24-bitmask"}), "sparsity_config is set"),
                        ((None, "transform_config", {"config_groups": {"u": {}}}), "transform_config is set"),
                        ((None, "kv_cache_scheme", {"num_bits": 8, "type": "float"}), "kv_cache_scheme is set"),
                        ((None, "quantization_status", "frozen"), "quantization_status is 'frozen'")]:
        bad = json.loads(json.dumps(qc))
        where, field, value = change
        (bad["config_groups"]["group_0"][where] if where else bad)[field] = value
        _rewrite(tmp_path, qc=bad)
        with pytest.raises(ValueError, match=msg):
            load_ctensors_checkpoint(_fresh(tmp_path), str(tmp_path))
    # not compressed-tensors at all; a state dict without its config
    with pytest.raises(ValueError, match="not 'compressed-tensors'"):
        load_ctensors_checkpoint(_fresh(tmp_path), str(tmp_path), quantization_config={"quant_method": "fp8"})
    with pytest.raises(ValueError, match="needs quantization_config"):
        load_ctensors_checkpoint(_fresh(tmp_path), sd)


def test_int4_zero_point_and_shape_errors(tmp_path):
    _build(tmp_path, [(_int(4, "group", False, 32), ["Linear"])], kind="opt")
    sd, _ = _sd_and_cfg(tmp_path)
    key = "model.decoder.layers.0.fc1"
    f = str(tmp_path / "model.safetensors")
    _rewrite(tmp_path, {k: v for k, v in sd.items() if k != key + ".weight_zero_point"})
    with pytest.raises(ValueError, match=rf"'{key}\.weight_zero_point' \(in {f}\) is missing"):
        load_ctensors_checkpoint(_fresh(tmp_path), str(tmp_path))
    _rewrite(tmp_path, dict(sd, **{key + ".weight_shape": torch.tensor([160, 64])}))
    with pytest.raises(ValueError, match=rf"'{key}\.weight_shape' \(in {f}\) is \[160, 64\]; the model's layer is "
                                         r"\[160, 96\]"):
        load_ctensors_checkpoint(_fresh(tmp_path), str(tmp_path))
    _rewrite(tmp_path, dict(sd, **{key + ".weight_packed": sd[key + ".weight_packed"][:, :5].contiguous()}))
    with pytest.raises(ValueError, match=rf"'{key}\.weight_packed' \(in {f}\) is torch.int32 \(160, 5\); expected "
                                         r"int32 \(160, 12\)"):
        load_ctensors_checkpoint(_fresh(tmp_path), str(tmp_path))


def test_load_fp8_checkpoint_hands_compressed_tensors_over(tmp_path):
    """load_fp8_checkpoint (transformers' FP8 importer) passes compressed-tensors checkpoints on."""
    _build(tmp_path, [("FP8_BLOCK", ["Linear"])])
    ours = _fresh(tmp_path)
    names = load_fp8_checkpoint(ours, str(tmp_path))
    assert len(names) == 14 and ours.model.layers[0].mlp.up_proj.fmt == "fp8"
    ref = _fresh(tmp_path)
    load_ctensors_checkpoint(ref, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, ref(input_ids=IDS).logits, rtol=0, atol=0)
