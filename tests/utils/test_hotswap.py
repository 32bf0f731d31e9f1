"""Hot swapping (fastpeft.utils.hotswap) against peft.utils.hotswap: same tensors and outputs after a swap,
lower ranks padded, no recompilation under torch.compile, peft's refusals."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from _support.models import tiny_inputs, tiny_model
from _support.twins import max_abs_diff
from peft.utils import hotswap as peft_hotswap

import fastpeft
from fastpeft.utils import hotswap

TARGETS = ["q_proj", "v_proj"]


def _cfg(r, alpha, **kw):
    return dict(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two adapters saved by peft: rank 4 (alpha 8) and rank 8 (alpha 4), and one on other targets."""
    d = tmp_path_factory.mktemp("adapters")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cfg in (("r4", _cfg(4, 8)), ("r8", _cfg(8, 4)), ("r2", _cfg(2, 8)),
                          ("k_proj", dict(_cfg(4, 8), target_modules=["q_proj", "k_proj"]))):
            torch.manual_seed(len(name) + cfg["r"])
            peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**cfg)).save_pretrained(str(d / name))
    return d


def _pair(saved, first):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fastpeft.PeftModel.from_pretrained(tiny_model("llama"), str(saved / first)).eval()
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(saved / first)).eval()
    return ours, theirs


def _logits(model):
    with torch.no_grad():
        return model(**tiny_inputs("llama")).logits


def test_hotswap_same_rank_equals_peft_and_loading_the_adapter(saved):
    ours2, theirs2 = _pair(saved, "r4")
    for model, lib in ((ours2, hotswap), (theirs2, peft_hotswap)):
        lib.prepare_model_for_compiled_hotswap(model, target_rank=8)
        lib.hotswap_adapter(model, str(saved / "r8"), adapter_name="default")
    fresh, _ = _pair(saved, "r8")
    assert max_abs_diff(_logits(ours2), _logits(theirs2)) < 1e-5
    assert max_abs_diff(_logits(ours2), _logits(fresh)) < 1e-5
    q_o = ours2.base_model.model.model.layers[0].self_attn.q_proj
    q_t = theirs2.base_model.model.model.layers[0].self_attn.q_proj
    assert q_o.lora_A["default"].weight.shape == q_t.lora_A["default"].weight.shape == (8, 16)
    assert float(q_o.scaling["default"]) == float(q_t.scaling["default"]) == 0.5
    assert q_o.r["default"] == q_t.r["default"] == 4  # peft keeps the first adapter's r
    # a lower rank into the padded tensors: leading rows, the rest zeroed
    for model, lib in ((ours2, hotswap), (theirs2, peft_hotswap)):
        lib.hotswap_adapter(model, str(saved / "r2"), adapter_name="default")
    fresh2, _ = _pair(saved, "r2")
    assert max_abs_diff(_logits(ours2), _logits(theirs2)) < 1e-5
    assert max_abs_diff(_logits(ours2), _logits(fresh2)) < 1e-5
    assert torch.count_nonzero(q_o.lora_A["default"].weight[2:]) == 0


def test_prepare_pads_without_changing_outputs_and_refuses_a_compiled_model(saved):
    ours, _ = _pair(saved, "r4")
    before = _logits(ours)
    hotswap.prepare_model_for_compiled_hotswap(ours, target_rank=16)
    assert max_abs_diff(_logits(ours), before) < 1e-6
    q = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_B["default"].weight.shape == (16, 16) and isinstance(q.scaling["default"], torch.Tensor)
    other, _ = _pair(saved, "r4")
    with pytest.raises(ValueError, match=r"Call prepare_model_for_compiled_hotswap \*before\* compiling the model"):
        hotswap.prepare_model_for_compiled_hotswap(torch.compile(other), target_rank=8)


def test_swaps_into_a_compiled_model_do_not_recompile(saved):
    ours, _ = _pair(saved, "r4")
    hotswap.prepare_model_for_compiled_hotswap(ours, target_rank=8)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        compiled(**tiny_inputs("llama"))
        hotswap.hotswap_adapter(ours, str(saved / "r8"), adapter_name="default")
        y = compiled(**tiny_inputs("llama")).logits
        hotswap.hotswap_adapter(ours, str(saved / "r2"), adapter_name="default")
        y2 = compiled(**tiny_inputs("llama")).logits
    fresh, _ = _pair(saved, "r8")
    assert max_abs_diff(y, _logits(fresh)) < 1e-5
    fresh2, _ = _pair(saved, "r2")
    assert max_abs_diff(y2, _logits(fresh2)) < 1e-5


def test_refusals(saved):
    ours, theirs = _pair(saved, "r4")
    for model, lib in ((ours, hotswap), (theirs, peft_hotswap)):
        with pytest.raises(RuntimeError, match="Hot swapping the adapter did not succeed, unexpected keys found"):
            lib.hotswap_adapter(model, str(saved / "k_proj"), adapter_name="default")
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        hotswap.hotswap_adapter(ours, str(saved / "r8"), adapter_name="nope")
    compiled = torch.compile(ours, backend="aot_eager")
    with pytest.raises(RuntimeError, match="prepare_model_for_compiled_hotswap"):
        hotswap.hotswap_adapter(compiled, str(saved / "r8"), adapter_name="default")
