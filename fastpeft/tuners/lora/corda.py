"""CorDA preprocessing (peft's ``preprocess_corda``): a calibration run builds, per targeted linear
layer, the input covariance C and the SVD of W C; the U, S, V it keeps are attached to the layer as
``eigens`` (peft's attribute names), and ``get_peft_model(..., init_lora_weights="corda")`` then
builds the adapters from them (inits.py ``_corda``).

Results equal peft 0.21.2's on the same model and calibration data (same hooks, same damping loop,
same SVD). The attributes are interchangeable: a model preprocessed by peft initialises in fastpeft
and the other way round. Cache files (``corda_config.cache_file`` / ``covariance_file``) use peft's
keys ("<module>.eigens.S_WC", ... / "<module>"), so a cache written by one is read by the other.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..tuners_utils import is_hf_conv1d, pattern_value, target_matches
from .init_configs import CordaConfig, read_sub_config

__all__ = ["CordaEigens", "collect_eigens", "collect_eigens_for_layer", "preprocess_corda", "target_modules"]


@dataclass
class CordaEigens:
    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def target_modules(model: nn.Module, config) -> Iterable[tuple[str, nn.Module]]:
    """(name, module) of every nn.Linear / transformers Conv1D that ``config`` targets."""
    for name, module in model.named_modules():
        if name and target_matches(config, name) and (isinstance(module, nn.Linear) or is_hf_conv1d(module)):
            yield name, module


def _device(model: nn.Module) -> str:
    model = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    return next(iter(model.parameters())).device.type


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config, run_model: Optional[Callable[[], None]] = None,
                     hooked_model: Optional[nn.Module] = None) -> None:
    """Attach ``eigens`` (S_WC [r], U_WC [out, r], V_WC [in, r]) to every targeted linear layer of ``model``.

    run_model: runs the calibration data through the model (may be None only when a covariance or
    cache file already exists). hooked_model: a different model to record the inputs from (rare)."""
    cfg = read_sub_config(lora_config.corda_config, CordaConfig, "corda_config")
    if cfg is None:
        raise ValueError("preprocess_corda needs `lora_config.corda_config` (a CordaConfig); set "
                         "init_lora_weights='corda' (which fills in the default) or pass corda_config=CordaConfig()")
    cache_file, covariance_file = cfg.cache_file, cfg.covariance_file
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        cache = torch.load(cache_file, map_location=_device(model))
        for name, module in target_modules(model, lora_config):
            try:
                module.eigens = CordaEigens(S_WC=cache[f"{name}.eigens.S_WC"], U_WC=cache[f"{name}.eigens.U_WC"],
                                            V_WC=cache[f"{name}.eigens.V_WC"])
            except KeyError as e:
                raise KeyError(f"CorDA cache file {cache_file!r} has no entry {e.args[0]!r}; it was built for "
                               f"another model or target_modules") from None
        return
    if cfg.corda_method is None:
        raise ValueError("corda_method is required when cache_file is not provided.")
    for name, module in target_modules(model, lora_config):
        module.corda_method = cfg.corda_method
        module.rank = pattern_value(lora_config.rank_pattern, name, lora_config.r)
    _calibrate(model, lora_config, cfg, run_model, hooked_model, covariance_file)
    collect_eigens(model, lora_config, cfg.verbose)
    _crop(model, lora_config)
    if cfg.prune_temporary_fields:
        for _, module in target_modules(model, lora_config):
            for attr in ("sample_count", "covariance_matrix", "corda_method", "rank"):
                if hasattr(module, attr):
                    delattr(module, attr)
    if cache_file is not None:
        cache: dict[str, Any] = {}
        for name, module in target_modules(model, lora_config):
            cache[f"{name}.eigens.S_WC"] = module.eigens.S_WC
            cache[f"{name}.eigens.U_WC"] = module.eigens.U_WC
            cache[f"{name}.eigens.V_WC"] = module.eigens.V_WC
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        torch.save(cache, cache_file)


@torch.no_grad()
def _calibrate(model, lora_config, cfg: CordaConfig, run_model, hooked_model, covariance_file) -> None:
    """module.covariance_matrix = mean over forward calls of X^T X, X = input / max(input) (per call)."""
    if covariance_file is not None and os.path.exists(covariance_file) and os.path.getsize(covariance_file) > 0:
        saved = torch.load(covariance_file, map_location=_device(model))
        for name, module in target_modules(model, lora_config):
            module.covariance_matrix = saved[name]
        return
    if run_model is None:
        raise ValueError("run_model must be specified when covariance file and cache file aren't built.")
    hooked = model if hooked_model is None else hooked_model
    hooked.eval()

    def hook(module, args, output):
        x = args[0].detach().squeeze(0).data  # (tokens, in) for a batch of one sample
        if not cfg.use_float16_for_covariance:
            x = x.float()
        x = x / torch.max(x).abs()
        if torch.isnan(x).any() or torch.isinf(x).any():
            raise ValueError("Invalid value found in input, please check your input data.")
        cov = x.t().matmul(x)
        if torch.isnan(cov).any() or torch.isinf(cov).any():
            raise ValueError("CorDA: invalid value (NaN/inf) in an input covariance")
        module.sample_count += 1
        module.covariance_matrix += cov

    handles = []
    for _, module in target_modules(hooked, lora_config):
        module.sample_count = 0
        module.covariance_matrix = 0
        handles.append(module.register_forward_hook(hook))
    try:
        run_model()
    finally:
        for h in handles:
            h.remove()
    if hooked is not model:
        targets = dict(target_modules(model, lora_config))
        for name, module in target_modules(hooked, lora_config):
            if name in targets:  # modules used only at inference in the hooked model are skipped
                targets[name].sample_count = module.sample_count
                targets[name].covariance_matrix = module.covariance_matrix
    for name, module in target_modules(model, lora_config):
        if not getattr(module, "sample_count", 0):
            raise ValueError(f"CorDA: module {name!r} saw no input during run_model(); run the calibration data "
                             f"through every targeted layer")
        module.covariance_matrix /= module.sample_count
    if covariance_file is not None:
        os.makedirs(os.path.dirname(covariance_file), exist_ok=True)
        torch.save({name: m.covariance_matrix for name, m in target_modules(model, lora_config)}, covariance_file)


@torch.no_grad()
def collect_eigens(model: nn.Module, config, verbose: bool) -> None:
    layers = list(target_modules(model, config))
    if verbose:
        from tqdm import tqdm

        layers = tqdm(layers, desc="Collecting eigens")
    for _, module in layers:
        module.eigens = collect_eigens_for_layer(module, config)


@torch.no_grad()
def collect_eigens_for_layer(linear: nn.Module, config=None) -> CordaEigens:
    """SVD of W (C + damp * mean(diag C) I) with the smallest damping (0.01, doubled) whose inverse is
    accurate (||C' C'^-1 - I|| < 0.05); V is multiplied by that inverse."""
    w = linear.weight.data.float()
    if is_hf_conv1d(linear):
        w = w.T  # stored [in, out]
    out_dim, in_dim = w.shape
    cov = getattr(linear, "covariance_matrix", None)
    if cov is None:
        raise ValueError("Covariance matrix not found in linear module; call `preprocess_corda` (it builds it).")
    cov = cov.float()
    eye = torch.eye(cov.size(0)).to(cov.device)
    damp = 0.01
    while True:
        fixed = cov + torch.diag(torch.ones(cov.size(0)).to(cov.device) * torch.mean(torch.diag(cov)) * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    V = (Vh @ inv).transpose(0, 1)
    k = min(in_dim, out_dim)
    if U.shape != (out_dim, k) or S.shape != (k,) or V.shape != (in_dim, k):
        raise ValueError(f"CorDA: unexpected SVD shapes U {tuple(U.shape)}, S {tuple(S.shape)}, V {tuple(V.shape)} "
                         f"for a weight of shape ({out_dim}, {in_dim})")
    return CordaEigens(S_WC=S, U_WC=U.cpu(), V_WC=V.cpu())  # the large factors wait on the CPU until cropped


@torch.no_grad()
def _crop(model: nn.Module, config) -> None:
    """Keep the first ('ipm') or last ('kpm') `rank` components (copies, so a saved cache stays small)."""
    dev = _device(model)
    for name, module in target_modules(model, config):
        e, r = module.eigens, module.rank
        if module.corda_method == "ipm":
            sl = slice(None, r)
        elif module.corda_method == "kpm":
            sl = slice(-r, None)
        else:
            raise ValueError(f"Invalid corda_method found: {module.corda_method}, it should be 'ipm' or 'kpm'.")
        e.S_WC = e.S_WC[sl].clone()
        e.U_WC = e.U_WC[:, sl].clone().to(dev)
        e.V_WC = e.V_WC[:, sl].clone().to(dev)
        out_dim, in_dim = (module.weight.shape[1], module.weight.shape[0]) if is_hf_conv1d(module) \
            else tuple(module.weight.shape)
        if e.S_WC.shape[0] != r or tuple(e.U_WC.shape) != (out_dim, r) or tuple(e.V_WC.shape) != (in_dim, r):
            raise ValueError(f"CorDA eigens of {name!r} do not fit rank {r}: S {tuple(e.S_WC.shape)}, U "
                             f"{tuple(e.U_WC.shape)}, V {tuple(e.V_WC.shape)} (is r larger than min(in, out)?)")
