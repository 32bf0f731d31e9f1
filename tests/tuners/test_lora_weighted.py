"""add_weighted_adapter against HF peft on tiny Llama (Linear + Embedding) and GPT-2 (Conv1D + Embedding).

Both libraries get twin models with the same two random adapters (init_lora_weights=False, different
targets and ranks), run add_weighted_adapter with the same arguments, and are compared: the new
config, the new lora_A/lora_B tensors (linear, cat), the merged deltas (svd), outputs, errors.
"""
import os
import warnings

import peft
import pytest
import torch

import fastpeft
from fastpeft.tuners.lora import LoraLayer
from _support.models import ids_for, run, tiny_model
from _support.twins import copy_weights, peft_model_twins

TARGETS = {  # (adapter "default", adapter "two"): overlapping, not equal; embeddings in both models
    "llama": (["q_proj", "v_proj", "embed_tokens"], ["q_proj", "k_proj", "embed_tokens", "down_proj"]),
    "gpt2": (["c_attn", "c_proj", "wte"], ["c_attn", "c_fc"]),
}
TOL = 1e-5


def _pair(arch, r2=4, t1=None, t2=None, **extra):
    """(fastpeft PeftModel, peft PeftModel) on twin models, holding identical adapters 'default' and 'two'."""
    base = tiny_model(arch)
    t1 = t1 if t1 is not None else TARGETS[arch][0]
    t2 = t2 if t2 is not None else TARGETS[arch][1]
    c1 = dict(target_modules=t1, r=4, lora_alpha=8, init_lora_weights=False, **extra)
    c2 = dict(target_modules=t2, r=r2, lora_alpha=6, init_lora_weights=False, **extra)
    ours, theirs = peft_model_twins(base, c1, extra=[("two", c2)])
    return ours.eval(), theirs.eval()


def _both(ours, theirs, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.add_weighted_adapter(*args, **kwargs)
        theirs.add_weighted_adapter(*args, **kwargs)


def _adapter_state(model, name):
    return {k: v for k, v in model.state_dict().items() if k.endswith(f".{name}.weight") or k.endswith(f".{name}")}


def _layers_with(model, name):
    return {n: m for n, m in model.named_modules()
            if isinstance(getattr(m, "r", None), dict) and name in m.r and hasattr(m, "get_delta_weight")}


def _check_config(ours, theirs, name="mix"):
    co, ct = ours.peft_config[name], theirs.peft_config[name]
    assert (co.r, co.lora_alpha) == (ct.r, ct.lora_alpha)
    assert co.target_modules == ct.target_modules
    assert co.rank_pattern == {} and co.alpha_pattern == {}
    assert ours.active_adapters == theirs.active_adapters == ["default"]  # created inactive
    params = [p for n, p in ours.named_parameters() if f".{name}." in n or n.endswith(f".{name}")]
    assert params and not any(p.requires_grad for p in params)


def _check_outputs(ours, theirs, arch, name="mix"):
    ids = ids_for(ours)
    ours.set_adapter(name)
    theirs.set_adapter(name)
    with torch.no_grad():
        assert (run(ours, ids) - run(theirs, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("combination_type", ["linear", "cat"])
def test_linear_and_cat_tensors_equal_peft(arch, combination_type):
    ours, theirs = _pair(arch, r2=4 if combination_type == "linear" else 3)
    _both(ours, theirs, ["default", "two"], [0.7, -1.3], "mix", combination_type=combination_type)
    _check_config(ours, theirs)
    assert ours.peft_config["mix"].r == (4 if combination_type == "linear" else 7)
    so, st = _adapter_state(ours, "mix"), _adapter_state(theirs, "mix")
    assert so and list(so) == list(st)
    assert any("lora_embedding_A" in k for k in so)
    for k in so:
        assert so[k].shape == st[k].shape, k
        assert torch.allclose(so[k], st[k], atol=1e-6, rtol=0), k
    _check_outputs(ours, theirs, arch)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kwargs", [dict(), dict(svd_rank=2), dict(svd_rank=5, svd_clamp=0.9),
                                    dict(svd_full_matrices=False)], ids=["default", "rank2", "clamp", "reduced"])
def test_svd_deltas_equal_peft(arch, kwargs):
    ours, theirs = _pair(arch, r2=3)
    _both(ours, theirs, ["default", "two"], [1.5, 0.4], "mix", combination_type="svd", **kwargs)
    _check_config(ours, theirs)
    lo, lt = _layers_with(ours, "mix"), _layers_with(theirs, "mix")
    assert lo and list(lo) == list(lt)
    for n in lo:
        do, dt = lo[n].get_delta_weight("mix"), lt[n].get_delta_weight("mix")
        assert do.shape == dt.shape == lo[n].get_base_layer().weight.shape, n
        assert torch.allclose(do, dt, atol=1e-5, rtol=1e-4), n
    _check_outputs(ours, theirs, arch)


def test_cat_and_full_rank_svd_are_exact_weighted_sums():
    ours, _ = _pair("llama", r2=3)
    w = [0.5, -2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.add_weighted_adapter(["default", "two"], w, "cat", combination_type="cat")
        ours.add_weighted_adapter(["default", "two"], w, "svd", combination_type="svd", svd_rank=16)
    for n, m in _layers_with(ours, "cat").items():
        want = sum(wi * m.get_delta_weight(a) for a, wi in zip(["default", "two"], w) if a in m.r)
        assert torch.allclose(m.get_delta_weight("cat"), want, atol=1e-6), n
        assert torch.allclose(m.get_delta_weight("svd"), want, atol=1e-5), n


def test_single_adapter_becomes_linear_and_existing_name_is_a_no_op():
    ours, theirs = _pair("llama", r2=3)
    _both(ours, theirs, ["two"], [2.0], "mix", combination_type="svd")  # -> linear, rank kept
    _check_config(ours, theirs)
    so, st = _adapter_state(ours, "mix"), _adapter_state(theirs, "mix")
    assert list(so) == list(st) and all(torch.equal(so[k], st[k]) for k in so)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.add_weighted_adapter(["default"], [5.0], "two", combination_type="cat")  # silently nothing
    after = ours.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)


def _errors(ours, theirs, *args, **kwargs):
    caught = []
    for m in (ours, theirs):
        with pytest.raises(Exception) as info:
            m.add_weighted_adapter(*args, **kwargs)
        caught.append(info.value)
    assert "mix" not in ours.peft_config
    assert not any("mix" in k for k in ours.state_dict())
    return caught


@pytest.mark.parametrize("case", ["unknown", "linear_ranks", "bad_type", "mixed_target_types"])
def test_invalid_inputs_raise_like_peft(case):
    if case == "mixed_target_types":
        ours, theirs = _pair("llama", t2=".*k_proj")
        args = (["default", "two"], [1.0, 1.0], "mix", "cat")
    else:
        ours, theirs = _pair("llama", r2=3)
        args = {"unknown": (["default", "nope"], [1.0, 1.0], "mix", "cat"),
                "linear_ranks": (["default", "two"], [1.0, 1.0], "mix", "linear"),
                "bad_type": (["default", "two"], [1.0, 1.0], "mix", "foo")}[case]
    e_ours, e_theirs = _errors(ours, theirs, *args)
    assert type(e_ours) is type(e_theirs) is ValueError
    key = {"unknown": "nope", "linear_ranks": "same r", "bad_type": "foo", "mixed_target_types": "target modules"}
    assert key[case] in str(e_ours) and key[case] in str(e_theirs)


def test_regex_targets_are_joined_like_peft():
    ours, theirs = _pair("llama", t1=".*q_proj", t2=".*(k_proj|embed_tokens)", r2=3)
    _both(ours, theirs, ["default", "two"], [1.0, 1.0], "mix", combination_type="cat")
    _check_config(ours, theirs)
    assert ours.peft_config["mix"].target_modules == "(.*q_proj)|(.*(k_proj|embed_tokens))"
    _check_outputs(ours, theirs, "llama")


def test_modules_to_save_conflict_and_empty_list():
    ours, theirs = _pair("llama", modules_to_save=["lm_head"])
    e_ours, e_theirs = _errors(ours, theirs, ["default", "two"], [1.0, 1.0], "mix", "cat")
    assert type(e_ours) is type(e_theirs)
    assert "modules_to_save" in str(e_ours) and "modules_to_save" in str(e_theirs)
    with pytest.raises(ValueError):
        ours.add_weighted_adapter([], [], "mix")


PRUNING = ["ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
           "magnitude_prune_svd"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("combination_type", PRUNING)
def test_pruning_types_equal_peft(arch, combination_type):
    svd = combination_type.endswith("svd")
    ours, theirs = _pair(arch, r2=3 if svd else 4)
    method = "frequency" if "ties" in combination_type and arch == "gpt2" else "total"
    for m in (ours, theirs):
        torch.manual_seed(123)  # DARE draws its masks from the global RNG
        m.add_weighted_adapter(["default", "two"], [0.7, -1.3], "mix", combination_type=combination_type,
                               density=0.5, majority_sign_method=method)
    _check_config(ours, theirs)
    so, st = _adapter_state(ours, "mix"), _adapter_state(theirs, "mix")
    assert so and list(so) == list(st)
    for k in so:
        assert torch.allclose(so[k], st[k], atol=1e-6, rtol=0) if not svd else so[k].shape == st[k].shape, k
    for n, lay in _layers_with(ours, "mix").items():
        dt = _layers_with(theirs, "mix")[n].get_delta_weight("mix")
        assert torch.allclose(lay.get_delta_weight("mix"), dt, atol=1e-5, rtol=1e-4), n
    _check_outputs(ours, theirs, arch)


def test_pruning_does_prune_and_dare_follows_the_seed():
    ours, _ = _pair("llama")
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        torch.manual_seed(seed)
        ours.add_weighted_adapter(["default", "two"], [1.0, 1.0], name, "dare_linear", density=0.3)
    ours.add_weighted_adapter(["default", "two"], [1.0, 1.0], "mp", "magnitude_prune", density=0.25)
    q = ours.base_model.model.model.layers[0].self_attn.q_proj
    A = {n: q.lora_A[n].weight for n in ("a", "b", "c")}
    assert torch.equal(A["a"], A["b"]) and not torch.equal(A["a"], A["c"])
    # each source keeps 25% of its entries, so the sum of two has at most half non-zero
    assert (q.lora_A["mp"].weight != 0).float().mean().item() <= 0.5 + 1e-6
    with pytest.warns(UserWarning, match="no pruning"):  # density >= 1 keeps everything
        ours.add_weighted_adapter(["default", "two"], [1.0, 1.0], "full", "magnitude_prune", density=1.0)
    ours.add_weighted_adapter(["default", "two"], [1.0, 1.0], "lin", "linear")
    assert torch.equal(q.lora_A["full"].weight, q.lora_A["lin"].weight)


@pytest.mark.parametrize("kwargs", [dict(combination_type="ties"), dict(combination_type="dare_linear", density=-0.1),
                                    dict(combination_type="ties_svd", density=0.5, majority_sign_method="mode")])
def test_bad_pruning_arguments_are_refused_before_anything_is_created(kwargs):
    ours, _ = _pair("llama")
    with pytest.raises(ValueError, match="density|majority_sign_method"):
        ours.add_weighted_adapter(["default", "two"], [1.0, 1.0], "mix", **kwargs)
    assert "mix" not in ours.peft_config and not any("mix" in k for k in ours.state_dict())


def test_is_a_lora_model_method_and_new_adapter_is_usable():
    ours, _ = _pair("llama", r2=3)
    assert "add_weighted_adapter" in type(ours.base_model).__dict__
    ours.add_weighted_adapter(["default", "two"], [1.0, 1.0], "mix", combination_type="cat")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLayer) and layer.scaling["mix"] == 1.0
    ours.set_adapter("mix")
    assert layer.lora_A["mix"].weight.requires_grad  # trainable once active, like any adapter
    ids = ids_for(ours)
    with torch.no_grad():
        y = run(ours, ids)
        ours.merge_adapter()
        assert (run(ours, ids) - y).abs().max().item() <= TOL
        ours.unmerge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Adapter mix was active which is now deleted"
        ours.delete_adapter("mix")
    assert "mix" not in ours.peft_config and not any(".mix" in k for k in ours.state_dict())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_and_load_both_ways(arch, tmp_path):
    ours, theirs = _pair(arch, r2=3)
    _both(ours, theirs, ["default", "two"], [0.8, 1.2], "mix", combination_type="cat")
    ours.save_pretrained(str(tmp_path / "ours"), selected_adapters=["mix"])
    theirs.save_pretrained(str(tmp_path / "theirs"), selected_adapters=["mix"])
    d_ours, d_theirs = tmp_path / "ours" / "mix", tmp_path / "theirs" / "mix"
    assert sorted(os.listdir(d_ours)) == sorted(os.listdir(d_theirs))
    ids = ids_for(ours)
    ours.set_adapter("mix")
    with torch.no_grad():
        want = run(ours, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_by_peft = peft.PeftModel.from_pretrained(tiny_model(arch), str(d_ours)).eval()
        loaded_by_us = fastpeft.PeftModel.from_pretrained(tiny_model(arch), str(d_theirs)).eval()
    assert loaded_by_us.peft_config["default"].r == 7
    with torch.no_grad():
        assert (run(loaded_by_peft, ids) - want).abs().max().item() <= TOL
        assert (run(loaded_by_us, ids) - want).abs().max().item() <= TOL


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_rank_pattern_and_rslora_sources_equal_peft(combination_type):
    ours, theirs = _pair("llama", r2=3, use_rslora=True,
                         rank_pattern={"v_proj": 2, "layers.1.q_proj": 6})  # rank_pattern on both adapters
    _both(ours, theirs, ["default", "two"], [1.0, 0.5], "mix", combination_type=combination_type)
    _check_config(ours, theirs)
    assert ours.peft_config["mix"].r == (12 if combination_type == "cat" else 6)  # from the largest ranks
    so, st = _adapter_state(ours, "mix"), _adapter_state(theirs, "mix")
    assert list(so) == list(st) and all(torch.allclose(so[k], st[k], atol=1e-6) for k in so)
    _check_outputs(ours, theirs, "llama")


def test_svd_rank_above_the_layer_dims_is_zero_padded():
    # peft leaves A/B of mismatched shapes there (unusable); fastpeft pads to the configured rank
    ours, _ = _pair("llama", r2=3)
    w = [1.0, -0.5]
    ours.add_weighted_adapter(["default", "two"], w, "mix", combination_type="svd", svd_rank=20)
    layers = _layers_with(ours, "mix")
    assert layers
    ref = tiny_model("llama").eval()  # _pair's base: the model with every weight moved by the weighted delta
    for n, m in layers.items():
        want = sum(wi * m.get_delta_weight(a) for a, wi in zip(["default", "two"], w) if a in m.r)
        A = m.lora_A["mix"].weight if "mix" in m.lora_A else m.lora_embedding_A["mix"]
        assert A.shape[0] == 20, n
        assert torch.allclose(m.get_delta_weight("mix"), want, atol=1e-5), n
        with torch.no_grad():
            ref.get_submodule(n.removeprefix("base_model.model.")).weight.add_(want)
    # the padded adapter's forward is that model's (not only its delta weights)
    ids = ids_for(ours)
    ours.set_adapter("mix")
    with torch.no_grad():
        assert (run(ours, ids) - run(ref, ids)).abs().max().item() <= TOL


def test_new_adapter_frozen_even_with_a_name_found_in_every_parameter_path():
    ours, _ = _pair("llama", r2=3, t1=["q_proj", "embed_tokens"])
    ours.add_weighted_adapter(["default", "two"], [1.0, 1.0], "model", combination_type="cat")
    grads = {n: p.requires_grad for n, p in ours.named_parameters() if "lora_" in n}
    default = [g for n, g in grads.items() if n.endswith(".default.weight") or n.endswith(".default")]
    new = [g for n, g in grads.items() if n.endswith(".model.weight") or n.endswith(".model")]
    assert default and all(default)
    assert len(new) > len(default) and not any(new)  # the new adapter (on both sources' layers) is frozen


def test_modules_to_save_of_one_source_is_copied_like_peft():
    base = tiny_model("llama")
    # rebuild with modules_to_save on "default" only
    c1 = dict(target_modules=["q_proj"], modules_to_save=["lm_head"], r=2, init_lora_weights=False)
    c2 = dict(target_modules=["k_proj"], r=2, init_lora_weights=False)
    ours, theirs = peft_model_twins(base, c1, extra=[("two", c2)], same_weights=False)
    with torch.no_grad():
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)  # "trained"
    copy_weights(theirs, ours)
    _both(ours.eval(), theirs.eval(), ["default", "two"], [1.0, 1.0], "mix", combination_type="cat")
    so, st = ours.state_dict(), theirs.state_dict()
    assert list(so) == list(st) and all(torch.equal(so[k], st[k]) for k in so)
    assert not ours.base_model.model.lm_head.modules_to_save["mix"].weight.requires_grad
    _check_outputs(ours, theirs, "llama")
