"""LoRA on torch.nn.MultiheadAttention (fastpeft/tuners/lora/mha.py) against HF peft 0.21.2 and a reference.

The reference is a plain nn.MultiheadAttention whose in_proj_weight / out_proj.weight are W + s B A built by
hand in float64 (autograd gives the reference grads of A and B). peft agrees with fastpeft while the out_proj
adapter's lora_B is zero (peft's init); with a trained out_proj peft adds that delta twice (see mha.py), which
one test pins down exactly.
"""
from __future__ import annotations

import copy
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastpeft
from fastpeft.tuners.lora.mha import MultiheadAttention as LoraMHA

from _support.twins import max_abs_diff, peft_model_twins

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
E, H = 16, 4


class Net(nn.Module):
    """Self-attention then a Linear head; ``kw`` goes to nn.MultiheadAttention."""

    def __init__(self, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(E, H, **kw)
        self.head = nn.Linear(E, 8)

    def forward(self, x, **mha_kwargs):
        return self.head(self.mha(x, x, x, **mha_kwargs)[0])


def _x(batch_first: bool, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 5, E) if batch_first else (5, 2, E), generator=g)


def _twins(base: nn.Module, extra=(), **cfg):
    """(fastpeft PeftModel, peft PeftModel) with identical weights (peft's copied into fastpeft, strict)."""
    cfg = dict(dict(target_modules=["mha"], r=4, lora_alpha=8), **cfg)
    return peft_model_twins(base, cfg, extra)


def _perturb(model: nn.Module, seed: int, out_proj_B: bool) -> None:
    """Make every LoRA tensor non-zero (in_proj B too), except out_proj's lora_B unless ``out_proj_B``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n and (out_proj_B or not ("out_proj" in n and "lora_B" in n)):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _adapter(layer: nn.Module, name: str):
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


def _reference(model, x: torch.Tensor, names, **mha_kwargs):
    """(output, {A/B param name: grad}) of the model's math rebuilt on a plain float64 MHA: W + sum_i s_i B_i A_i."""
    lora = model.base_model.model.mha
    assert isinstance(lora, LoraMHA)
    mha = copy.deepcopy(lora.get_base_layer()).double()
    mha.out_proj = mha.out_proj.get_base_layer()
    head = copy.deepcopy(model.base_model.model.head).double()
    leaves = {}
    w_in, w_out = mha.in_proj_weight.detach(), mha.out_proj.weight.detach()
    for name in names:
        for layer, tag in ((lora, "in"), (lora.get_base_layer().out_proj, "out")):
            A, B, s = _adapter(layer, name)
            A, B = (t.detach().double().requires_grad_(True) for t in (A, B))
            leaves[(tag, name)] = (A, B)
            if tag == "in":
                w_in = w_in + s * B @ A
            else:
                w_out = w_out + s * B @ A
    y = torch.func.functional_call(mha, {"in_proj_weight": w_in, "out_proj.weight": w_out},
                                   (x.double(), x.double(), x.double()), mha_kwargs)[0]
    return head(y), leaves


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------- layout
def test_keys_shapes_and_trainable_match_peft():
    ours, theirs = _twins(Net())
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours.state_dict()["base_model.model.mha.lora_B.default.weight"].shape == (3 * E, 4)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == \
           sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    lora = ours.base_model.model.mha
    # nn.MultiheadAttention's attributes read through the wrapper (code around an MHA uses them)
    assert (lora.embed_dim, lora.num_heads, lora.batch_first, lora.head_dim) == (E, H, False, E // H)
    assert lora.in_proj_weight is lora.get_base_layer().in_proj_weight
    assert type(lora.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


# ------------------------------------------------------------------------------------- vs peft
@pytest.mark.parametrize("kw", [dict(), dict(batch_first=True), dict(bias=False), dict(add_bias_kv=True),
                                dict(add_zero_attn=True, batch_first=True)], ids=str)
def test_outputs_and_grads_match_peft_and_reference(kw):
    """peft's init (out_proj lora_B = 0), in_proj adapter trained: outputs and every LoRA grad equal peft's and
    the float64 reference, in train mode (grads) and eval mode without grad (torch's fused MHA path)."""
    ours, theirs = _twins(Net(**kw), init_lora_weights=True)
    _perturb(theirs, 1, out_proj_B=False)
    ours.load_state_dict(theirs.state_dict())
    x = _x(kw.get("batch_first", False))
    y_ours, y_theirs = ours(x), theirs(x)
    assert max_abs_diff(y_ours, y_theirs) < 1e-5
    y_ref, leaves = _reference(ours, x, ["default"])
    assert max_abs_diff(y_ours, y_ref) < 1e-5
    assert max_abs_diff(y_ours, Net(**kw)(x)) > 1e-3  # the adapter acts
    dy = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(5))
    y_ours.backward(dy)
    y_theirs.backward(dy)
    y_ref.backward(dy.double())
    g_ours, g_theirs = _grads(ours), _grads(theirs)
    assert sorted(g_ours) == sorted(g_theirs) and len(g_ours) == 4
    for k in g_ours:
        assert max_abs_diff(g_ours[k], g_theirs[k]) < 1e-4, k
    pre = "base_model.model.mha."
    for (tag, name), (A, B) in leaves.items():
        at = pre + ("base_layer.out_proj." if tag == "out" else "")
        assert max_abs_diff(g_ours[f"{at}lora_A.{name}.weight"], A.grad) < 1e-4
        assert max_abs_diff(g_ours[f"{at}lora_B.{name}.weight"], B.grad) < 1e-4
    with torch.no_grad():  # eval + no_grad: nn.MultiheadAttention may take its fused native path
        assert max_abs_diff(ours.eval()(x), theirs.eval()(x)) < 1e-5


def test_need_weights_and_masks_match_peft():
    ours, theirs = _twins(Net(batch_first=True))
    _perturb(theirs, 2, out_proj_B=False)
    ours.load_state_dict(theirs.state_dict())
    x = _x(True)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    kw = dict(key_padding_mask=pad, attn_mask=causal, need_weights=True, average_attn_weights=False)
    (o1, w1), (o2, w2) = (m.base_model.model.mha(x, x, x, **kw) for m in (ours, theirs))
    assert w1.shape == (2, H, 5, 5)
    assert max_abs_diff(o1, o2) < 1e-5 and max_abs_diff(w1, w2) < 1e-6


def test_trained_out_proj_reference_and_peft_double_delta():
    """With a non-zero out_proj adapter fastpeft is W_out + s B_o A_o (the reference); peft 0.21.2 applies
    k = 2 times that delta (huggingface/peft PR #3774). k is measured from peft's own merge, and peft with
    out_proj's lora_B divided by k gives fastpeft's output exactly."""
    ours, theirs = _twins(Net())
    _perturb(theirs, 3, out_proj_B=True)
    ours.load_state_dict(theirs.state_dict())
    x = _x(False)
    y_ours = ours(x)
    y_ref, _ = _reference(ours, x, ["default"])
    assert max_abs_diff(y_ours, y_ref) < 1e-5

    out_proj = theirs.base_model.model.mha.base_layer.out_proj
    w0 = out_proj.base_layer.weight.detach().clone()
    delta = out_proj.get_delta_weight("default").detach()
    theirs.merge_adapter()
    k = ((out_proj.base_layer.weight.detach() - w0) * delta).sum() / delta.square().sum()
    theirs.unmerge_adapter()
    k = round(k.item(), 4)
    assert k in (1.0, 2.0), k
    with torch.no_grad():
        out_proj.lora_B["default"].weight.div_(k)
    assert max_abs_diff(theirs(x), y_ours) < 1e-5


# -------------------------------------------------------------------------------- merge / unload
def test_merge_unmerge_and_merge_and_unload():
    ours, theirs = _twins(Net())
    _perturb(theirs, 4, out_proj_B=False)
    ours.load_state_dict(theirs.state_dict())
    x = _x(False)
    base_sd = {k: v.clone() for k, v in ours.base_model.model.mha.get_base_layer().state_dict().items()
               if "lora" not in k}
    with torch.no_grad():
        y = ours(x)
        ours.merge_adapter()
        lora = ours.base_model.model.mha
        assert lora.merged and lora.get_base_layer().out_proj.merged
        assert max_abs_diff(ours(x), y) < 1e-5
        ours.unmerge_adapter()
        for k, v in lora.get_base_layer().state_dict().items():
            if k in base_sd:
                assert max_abs_diff(v, base_sd[k]) < 1e-6, k
        assert max_abs_diff(ours(x), y) < 1e-6
        merged_ours = copy.deepcopy(ours).merge_and_unload()
        merged_theirs = copy.deepcopy(theirs).merge_and_unload()
    assert type(merged_ours.mha) is nn.MultiheadAttention
    assert type(merged_ours.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert sorted(merged_ours.state_dict()) == sorted(merged_theirs.state_dict())
    for k, v in merged_ours.state_dict().items():
        assert max_abs_diff(v, merged_theirs.state_dict()[k]) < 1e-5, k
    with torch.no_grad():
        assert max_abs_diff(merged_ours(x), y) < 1e-5
    unloaded = copy.deepcopy(ours).unload()  # (merged and unmerged above: equal up to rounding)
    assert type(unloaded.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with torch.no_grad():
        assert max_abs_diff(unloaded(x), Net()(x)) < 1e-6


def test_safe_merge_refuses_nan():
    ours, _ = _twins(Net())
    with torch.no_grad():
        ours.base_model.model.mha.lora_B["default"].weight[0, 0] = float("nan")
    w = ours.base_model.model.mha.in_proj_weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default"):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(ours.base_model.model.mha.in_proj_weight, w)


def test_disable_adapter_gives_base_output():
    ours, _ = _twins(Net(), init_lora_weights=False)
    x = _x(False)
    with torch.no_grad(), ours.disable_adapter():
        assert max_abs_diff(ours(x), Net()(x)) == 0.0


# ---------------------------------------------------------------------------------- several adapters
def test_two_adapters_sum_and_switch():
    ours, theirs = _twins(Net(), extra=[("two", dict(target_modules=["mha"], r=2, lora_alpha=4))])
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    _perturb(ours, 6, out_proj_B=True)
    x = _x(False)
    ours.base_model.set_adapter(["default", "two"])
    y_ref, _ = _reference(ours, x, ["default", "two"])
    assert max_abs_diff(ours(x), y_ref) < 1e-5
    ours.base_model.set_adapter("two")
    y_two, _ = _reference(ours, x, ["two"])
    assert max_abs_diff(ours(x), y_two) < 1e-5
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable and all(".two." in n for n in trainable)
    ours.delete_adapter("two")
    assert not any(".two." in k for k in ours.state_dict())


# ------------------------------------------------------------------------------------- save / load
def _files(folder: str) -> dict:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_save_load_both_ways(tmp_path):
    ours, theirs = _twins(Net())
    _perturb(theirs, 7, out_proj_B=False)
    ours.load_state_dict(theirs.state_dict())
    x = _x(False)
    with torch.no_grad():
        y = ours.eval()(x)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    f_ours, f_theirs = _files(tmp_path / "ours"), _files(tmp_path / "theirs")
    assert sorted(f_ours) == sorted(f_theirs)
    assert "base_model.model.mha.base_layer.out_proj.lora_A.weight" in f_ours
    for k in f_ours:
        assert torch.equal(f_ours[k], f_theirs[k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_from_peft = fastpeft.PeftModel.from_pretrained(Net(), tmp_path / "theirs")
        peft_from_ours = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")
    with torch.no_grad():
        assert max_abs_diff(ours_from_peft.eval()(x), y) < 1e-6
        assert max_abs_diff(peft_from_ours.eval()(x), y) < 1e-5


# ------------------------------------------------------------------------------------------ refusals
def _peft_error(base, **cfg):
    try:
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    except Exception as e:  # noqa: BLE001 - the error peft raises is what is compared
        return type(e), str(e)
    raise AssertionError("peft accepted the config")


@pytest.mark.parametrize("base,cfg", [
    (Net(kdim=8, vdim=8), dict(target_modules=["mha"])),
    (Net(), dict(target_modules=["mha"], use_dora=True)),
], ids=["kdim_vdim", "dora"])
def test_refusals_with_peft_errors(base, cfg):
    etype, msg = _peft_error(base, **cfg)
    with pytest.raises(etype) as info:
        fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    assert str(info.value) == msg


def test_dora_refused_for_a_second_adapter():
    ours, _ = _twins(Net())
    with pytest.raises(ValueError, match="does not support DoRA"):
        ours.add_adapter("d", fastpeft.LoraConfig(target_modules=["mha"], use_dora=True))


def test_lora_bias_refused():
    with pytest.raises(ValueError, match="lora_bias=True is not supported on nn.MultiheadAttention"):
        fastpeft.get_peft_model(Net(), fastpeft.LoraConfig(target_modules=["mha"], lora_bias=True))


def test_dropout_warns_and_does_nothing():
    with pytest.warns(UserWarning, match="has no effect on nn.MultiheadAttention"):
        ours = fastpeft.get_peft_model(Net(), fastpeft.LoraConfig(target_modules=["mha"], lora_dropout=0.5,
                                                                   init_lora_weights=False))
    x = _x(False)
    ours.train()
    assert max_abs_diff(ours(x), ours(x)) == 0.0  # no random mask anywhere on this path


def test_mixed_adapter_batch_refused_like_peft():
    ours, theirs = _twins(Net(batch_first=True))
    x = _x(True)
    names = ["default", "__base__"]
    with pytest.raises(TypeError) as peft_err:
        theirs.eval()(x, adapter_names=names)
    with pytest.raises(TypeError) as ours_err:
        ours.eval()(x, adapter_names=names)
    assert str(ours_err.value) == str(peft_err.value) == "lora.MultiheadAttention does not support mixed adapter batches."
