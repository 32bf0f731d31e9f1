"""save_pretrained(..., path_initial_model_for_weight_conversion=...): a PiSSA / OLoRA adapter (trained
on the residual base) saved as a plain rank-2r LoRA of the ORIGINAL base, loadable by HF peft and by
fastpeft, with the same tensors peft writes for the same model."""
from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from _support.models import tiny_inputs, tiny_model

CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])


def _trained(lib, base, **cfg):
    """get_peft_model with the given init, then a deterministic stand-in for training (noise on A, B)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**cfg))
    return model


def _perturb(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _out(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_fastpeft_converted_adapter_loads_in_peft_on_the_original_base(init, tmp_path):
    base = tiny_model("llama")
    inputs = tiny_inputs("llama")
    ours = _trained(fastpeft, base, init_lora_weights=init, **CFG)
    ours.save_pretrained(tmp_path / "init")
    _perturb(ours)
    y_trained = _out(ours, inputs)
    ours.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert list(ours.peft_config) == ["default"]  # the temporary initial adapter is gone again

    saved = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["init_lora_weights"] is True
    assert json.loads((tmp_path / "init" / "adapter_config.json").read_text())["init_lora_weights"] is True

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "conv"))
        ours_loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "conv"))
    assert (_out(loaded, inputs) - y_trained).abs().max() < 1e-5
    assert (_out(ours_loaded, inputs) - y_trained).abs().max() < 1e-5
    assert (y_trained - _out(base, inputs)).abs().max() > 1e-3  # the "training" did change the model

    # peft converting the same model writes the same file
    theirs = _trained(peft, base, init_lora_weights=init, **CFG)
    theirs.save_pretrained(tmp_path / "pinit")
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "pconv", path_initial_model_for_weight_conversion=str(tmp_path / "pinit"))
    a = load_file(tmp_path / "conv" / "adapter_model.safetensors")
    b = load_file(tmp_path / "pconv" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    theirs_cfg = json.loads((tmp_path / "pconv" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert saved[key] == theirs_cfg[key], key
    assert sorted(saved["target_modules"]) == sorted(theirs_cfg["target_modules"])  # a set: peft's order varies


def test_peft_converted_adapter_loads_in_fastpeft(tmp_path):
    base = tiny_model("llama")
    inputs = tiny_inputs("llama")
    theirs = _trained(peft, base, init_lora_weights="pissa", use_rslora=True, **CFG)
    theirs.save_pretrained(tmp_path / "init")
    _perturb(theirs)
    y = _out(theirs, inputs)
    theirs.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "conv"))
    assert (_out(ours, inputs) - y).abs().max() < 1e-5


def test_patterns_are_doubled_and_rslora_keeps_the_scale(tmp_path):
    base = tiny_model("llama")
    inputs = tiny_inputs("llama")
    ours = _trained(fastpeft, base, init_lora_weights="pissa", rank_pattern={"up_proj": 2},
                    alpha_pattern={"v_proj": 4}, **CFG)
    ours.save_pretrained(tmp_path / "init")
    _perturb(ours)
    y = _out(ours, inputs)
    ours.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    saved = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {"up_proj": 4} and saved["alpha_pattern"] == {"v_proj": 8}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "conv"))
    assert (_out(loaded, inputs) - y).abs().max() < 1e-5


def test_rslora_with_patterns_is_refused(tmp_path):
    ours = _trained(fastpeft, tiny_model("llama"), init_lora_weights="pissa", use_rslora=True,
                    rank_pattern={"up_proj": 2}, **CFG)
    ours.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="use_rslora"):
        ours.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert not (tmp_path / "conv" / "adapter_model.safetensors").exists()


def test_other_inits_warn(tmp_path):
    ours = _trained(fastpeft, tiny_model("llama"), init_lora_weights="gaussian", **CFG)
    ours.save_pretrained(tmp_path / "init")
    with pytest.warns(UserWarning, match="only works for converting"):
        ours.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))


def test_subtract_initial_adapter_names_missing_keys():
    from fastpeft.tuners.lora.weight_conversion import subtract_initial_adapter

    A, B = torch.ones(2, 3), torch.ones(4, 2)
    out = subtract_initial_adapter({"x.lora_A.weight": A, "x.lora_B.weight": B, "x.bias": torch.ones(1)},
                                   {"x.lora_A.weight": 2 * A, "x.lora_B.weight": 3 * B}, "init")
    assert out.keys() == {"x.lora_A.weight", "x.lora_B.weight"}
    assert out["x.lora_A.weight"].shape == (4, 3) and out["x.lora_B.weight"].shape == (4, 4)
    assert torch.equal(out["x.lora_B.weight"][:, 2:], -3 * B)
    with pytest.raises(KeyError, match="y.lora_A.weight"):
        subtract_initial_adapter({"y.lora_A.weight": A}, {}, "init")
