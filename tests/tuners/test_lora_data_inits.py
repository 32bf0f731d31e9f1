"""Data-driven inits (CorDA, LoRA-GA, EVA) through peft's entry points, against HF peft 0.21.2 run on the
same model and the same calibration data: same attached statistics, same adapters, same rewritten base
weights; and each library's preprocessing feeds the other's get_peft_model."""
from __future__ import annotations

import copy
import importlib.util
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig


def _import_peft_corda():
    """peft.tuners.lora.corda imports `dataclass` from the `attrs` package, which this venv lacks; peft only
    uses it as a plain dataclass decorator, so the import is given the stdlib one for that moment."""
    import dataclasses
    import sys
    import types

    if "attr" in sys.modules or importlib.util.find_spec("attr") is not None:
        from peft.tuners.lora import corda
        return corda
    sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
    try:
        from peft.tuners.lora import corda
    finally:
        del sys.modules["attr"]
    return corda


peft_preprocess_corda = _import_peft_corda().preprocess_corda

import fastpeft
from fastpeft.tuners.lora.config import CordaConfig
from fastpeft.tuners.lora.corda import preprocess_corda
from _support.models import tiny_inputs, tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _batches(n=4, batch=1, seq=12):
    return [tiny_inputs("llama", batch=batch, seq=seq, seed=10 + i) for i in range(n)]


def _peft_models(base_ours, base_theirs, cfg_ours, cfg_theirs, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        theirs = peft.get_peft_model(base_theirs, cfg_theirs)
        torch.manual_seed(seed)
        ours = fastpeft.get_peft_model(base_ours, cfg_ours)
    return ours, theirs


def _assert_same_state(ours, theirs, exact=True):
    so, st = ours.state_dict(), theirs.state_dict()
    assert so.keys() == st.keys()
    for k in so:
        if exact:
            assert torch.equal(so[k], st[k]), f"{k}: {(so[k] - st[k]).abs().max():.3g}"
        else:
            assert torch.allclose(so[k], st[k], rtol=1e-5, atol=1e-6), f"{k}: {(so[k] - st[k]).abs().max():.3g}"


# ---------------------------------------------------------------------------------------------- CorDA
def _corda_configs(method, **extra):
    common = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda")
    return (fastpeft.LoraConfig(corda_config=CordaConfig(corda_method=method, **extra), **common),
            peft.LoraConfig(corda_config=PeftCordaConfig(corda_method=method, **extra), **common))


def _run(model, batches):
    def go():
        with torch.no_grad():
            for b in batches:
                model(**b)
    return go


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft(method):
    base, batches = tiny_model("llama"), _batches()
    cfg_o, cfg_t = _corda_configs(method)
    b_o, b_t = copy.deepcopy(base), copy.deepcopy(base)
    preprocess_corda(b_o, cfg_o, run_model=_run(b_o, batches))
    peft_preprocess_corda(b_t, cfg_t, run_model=_run(b_t, batches))
    q_o, q_t = b_o.model.layers[1].self_attn.q_proj, b_t.model.layers[1].self_attn.q_proj
    for f in ("S_WC", "U_WC", "V_WC"):
        assert torch.equal(getattr(q_o.eigens, f), getattr(q_t.eigens, f)), f
    assert not hasattr(q_o, "covariance_matrix")  # pruned, as peft
    ours, theirs = _peft_models(b_o, b_t, cfg_o, cfg_t)
    _assert_same_state(ours, theirs)
    assert not hasattr(ours.base_model.model.model.layers[1].self_attn.q_proj.get_base_layer(), "eigens")
    inputs = tiny_inputs("llama")
    with torch.no_grad():  # W_res + s B A == W: the adapted model starts as the base model
        assert (ours.eval()(**inputs).logits - base.eval()(**inputs).logits).abs().max() < 1e-4


def test_corda_preprocessed_by_peft_initialises_in_fastpeft_and_caches_cross(tmp_path):
    base, batches = tiny_model("llama"), _batches()
    cfg_o, cfg_t = _corda_configs("ipm", cache_file=str(tmp_path / "c" / "cache.pt"),
                                  covariance_file=str(tmp_path / "c" / "cov.pt"))
    b_t = copy.deepcopy(base)
    peft_preprocess_corda(b_t, cfg_t, run_model=_run(b_t, batches))  # writes peft's cache files
    b_o = copy.deepcopy(b_t)  # peft's eigens on the modules
    b_t2 = copy.deepcopy(b_t)
    ours, theirs = _peft_models(b_o, b_t2, cfg_o, cfg_t)
    _assert_same_state(ours, theirs)
    # fastpeft reads peft's cache (no run_model needed)
    b_o2 = copy.deepcopy(base)
    preprocess_corda(b_o2, cfg_o)
    assert torch.equal(b_o2.model.layers[0].mlp.up_proj.eigens.V_WC, b_t.model.layers[0].mlp.up_proj.eigens.V_WC)
    # and peft reads a covariance file fastpeft wrote
    cfg_o3, cfg_t3 = _corda_configs("kpm", covariance_file=str(tmp_path / "d" / "cov.pt"))
    b_o3, b_t3 = copy.deepcopy(base), copy.deepcopy(base)
    preprocess_corda(b_o3, cfg_o3, run_model=_run(b_o3, batches))
    peft_preprocess_corda(b_t3, cfg_t3)
    assert torch.equal(b_o3.model.layers[0].self_attn.v_proj.eigens.U_WC,
                       b_t3.model.layers[0].self_attn.v_proj.eigens.U_WC)


def test_corda_errors():
    base = tiny_model("llama")
    cfg, _ = _corda_configs("ipm")
    with pytest.raises(ValueError, match="run_model"):
        preprocess_corda(copy.deepcopy(base), cfg)
    with pytest.raises(ValueError, match="corda_config"):
        preprocess_corda(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="preprocess_corda"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastpeft.get_peft_model(copy.deepcopy(base), cfg)


# -------------------------------------------------------------------------------------------- LoRA-GA
def _train_step(model, batches):
    def step():
        for b in batches:
            model(**b, labels=b["input_ids"]).loss.backward()
    return step


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "weight_svd"), ("A2rBr", "gd_scale"),
                                             ("random", "unit")])
def test_lora_ga_matches_peft(direction, scale):
    base, batches = tiny_model("llama"), _batches(n=2, batch=2)
    common = dict(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="lora_ga")
    cfg_o = fastpeft.LoraConfig(lora_ga_config=fastpeft.LoraGAConfig(direction=direction, scale=scale), **common)
    cfg_t = peft.LoraConfig(lora_ga_config=peft.LoraGAConfig(direction=direction, scale=scale), **common)
    b_o, b_t = copy.deepcopy(base), copy.deepcopy(base)
    fastpeft.preprocess_loraga(b_o, cfg_o, _train_step(b_o, batches))
    peft.preprocess_loraga(b_t, cfg_t, _train_step(b_t, batches))
    g_o = b_o.model.layers[0].mlp.down_proj._peft_loraga_grad
    assert torch.equal(g_o, b_t.model.layers[0].mlp.down_proj._peft_loraga_grad)
    assert all(p.grad is None for p in b_o.parameters()) and all(p.requires_grad for p in b_o.parameters())
    ours, theirs = _peft_models(b_o, b_t, cfg_o, cfg_t)
    _assert_same_state(ours, theirs)


def test_lora_ga_cache_is_shared_with_peft(tmp_path):
    base, batches = tiny_model("llama"), _batches(n=1, batch=2)
    common = dict(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga")
    cfg_o = fastpeft.LoraConfig(lora_ga_config=fastpeft.LoraGAConfig(), **common)
    cfg_t = peft.LoraConfig(lora_ga_config=peft.LoraGAConfig(), **common)
    cache = str(tmp_path / "g" / "grads.pt")
    b_o = copy.deepcopy(base)
    fastpeft.preprocess_loraga(b_o, cfg_o, _train_step(b_o, batches), cache_file=cache)
    b_t = copy.deepcopy(base)
    peft.preprocess_loraga(b_t, cfg_t, lambda: pytest.fail("the cache should be used"), cache_file=cache)
    assert torch.equal(b_t.model.layers[1].self_attn.v_proj._peft_loraga_grad,
                       b_o.model.layers[1].self_attn.v_proj._peft_loraga_grad)


def test_lora_ga_without_config_is_refused():
    with pytest.raises(ValueError, match="lora_ga_config"):
        fastpeft.preprocess_loraga(tiny_model("llama"), fastpeft.LoraConfig(target_modules=["q_proj"]), lambda: None)


# ------------------------------------------------------------------------------------------------ EVA
def _eva_pair(**eva):
    common = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva")
    return (fastpeft.LoraConfig(eva_config=fastpeft.EvaConfig(**eva), **common),
            peft.LoraConfig(eva_config=peft.EvaConfig(**eva), **common))


@pytest.mark.parametrize("eva", [dict(tau=0.9), dict(tau=0.9, rho=1.0, whiten=True, adjust_scaling_factors=False)])
def test_eva_matches_peft(eva, tmp_path):
    base = tiny_model("llama")
    loader = _batches(n=3, batch=2, seq=10)
    cfg_o, cfg_t = _eva_pair(**eva)
    ours, theirs = _peft_models(copy.deepcopy(base), copy.deepcopy(base), cfg_o, cfg_t)
    sd_o = fastpeft.get_eva_state_dict(ours, loader, show_progress_bar=False)
    sd_t = peft.get_eva_state_dict(theirs, loader, show_progress_bar=False)
    assert sd_o.keys() == sd_t.keys()
    for k in sd_o:
        assert torch.equal(sd_o[k], sd_t[k]), k
    assert len({v.shape[0] for v in sd_o.values()}) > 1 or eva.get("rho") == 1.0  # ranks were redistributed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastpeft.initialize_lora_eva_weights(ours, eva_state_dict=sd_o)
        peft.initialize_lora_eva_weights(theirs, eva_state_dict=sd_t)
    _assert_same_state(ours, theirs)
    c_o, c_t = ours.peft_config["default"], theirs.peft_config["default"]
    assert sorted(c_o.target_modules) == sorted(c_t.target_modules)
    assert c_o.rank_pattern == c_t.rank_pattern and c_o.alpha_pattern == c_t.alpha_pattern
    # the saved adapter (rank_pattern / alpha_pattern from EVA) loads in peft with the same outputs
    ours.save_pretrained(tmp_path / "eva")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "eva"))
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        assert (loaded.eval()(**inputs).logits - ours.eval()(**inputs).logits).abs().max() < 1e-5


def test_eva_from_a_dataloader_and_on_a_plain_model():
    base = tiny_model("llama")
    loader = _batches(n=3, batch=2, seq=10)
    cfg_o, cfg_t = _eva_pair(tau=0.9)
    ours, theirs = _peft_models(copy.deepcopy(base), copy.deepcopy(base), cfg_o, cfg_t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastpeft.initialize_lora_eva_weights(ours, loader, show_progress_bar=False)
        peft.initialize_lora_eva_weights(theirs, loader, show_progress_bar=False)
    _assert_same_state(ours, theirs)
    cfg_o.target_modules, cfg_t.target_modules = {"q_proj", "down_proj"}, {"q_proj", "down_proj"}  # (faster)
    plain_o = fastpeft.get_eva_state_dict(copy.deepcopy(base), loader, peft_config=cfg_o, show_progress_bar=False)
    plain_t = peft.get_eva_state_dict(copy.deepcopy(base), loader, peft_config=cfg_t, show_progress_bar=False)
    assert plain_o.keys() == plain_t.keys() and all(torch.equal(plain_o[k], plain_t[k]) for k in plain_o)


def test_incremental_pca_matches_peft():
    from peft.utils.incremental_pca import IncrementalPCA as Theirs

    from fastpeft.utils.incremental_pca import IncrementalPCA as Ours

    g = torch.Generator().manual_seed(0)
    ours, theirs = Ours(n_components=3, lowrank=True, lowrank_seed=42), Theirs(n_components=3, lowrank=True,
                                                                                 lowrank_seed=42)
    for _ in range(3):
        x = torch.randn(20, 8, generator=g)
        ours.partial_fit(x)
        theirs.partial_fit(x)
        for f in ("components_", "singular_values_", "mean_", "var_", "explained_variance_ratio_"):
            assert torch.equal(getattr(ours, f), getattr(theirs, f)), f
    full_o, full_t = Ours(n_components=4), Theirs(n_components=4)
    x = torch.randn(30, 6, generator=g)
    assert torch.equal(full_o.partial_fit(x).components_, full_t.partial_fit(x).components_)


def test_eva_errors():
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="PeftModel"):
        fastpeft.initialize_lora_eva_weights(base, _batches(1))
    with pytest.raises(ValueError, match="peft_config is required"):
        fastpeft.get_eva_state_dict(base, _batches(1))
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        fastpeft.initialize_lora_eva_weights(model, _batches(1))
    cfg_o, _ = _eva_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastpeft.get_peft_model(copy.deepcopy(base), cfg_o)
    with pytest.raises(ValueError, match="dataloader is empty"):
        fastpeft.get_eva_state_dict(model, [], show_progress_bar=False)


def test_minimal_target_modules():
    from peft.tuners.tuners_utils import _find_minimal_target_modules

    from fastpeft.tuners.lora.eva import find_minimal_target_modules

    targets = [f"model.layers.{i}.self_attn.{p}" for i in range(12) for p in ("q_proj", "v_proj")]
    targets += ["model.layers.3.mlp.up_proj"]
    others = [f"model.layers.{i}.mlp.up_proj" for i in range(12) if i != 3] + ["model.layers.3.mlp", "lm_head"]
    assert find_minimal_target_modules(targets, others) == _find_minimal_target_modules(targets, others)
