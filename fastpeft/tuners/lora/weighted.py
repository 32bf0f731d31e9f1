"""LoraModel.add_weighted_adapter: build a new LoRA adapter from a weighted mix of existing ones.

Behaviour follows HF peft 0.21 (checked by running peft on the same models, see
tests/tuners/test_lora_weighted.py):

* the new adapter's config is a copy of the first source adapter's config with ``r`` and
  ``lora_alpha`` both set to the new rank (so its scaling is 1), ``target_modules`` the union of the
  sources' (sets: set union; regex strings: ``"(a)|(b)"``), and empty rank/alpha patterns;
* the new adapter is injected, frozen and left inactive; an ``adapter_name`` that already exists
  makes the call a silent no-op (as in peft);
* with a single source adapter every combination type becomes ``"linear"``.

Combination types (all of peft's):

``linear``  (all ranks equal) each source contributes ``sqrt(|w * scaling|)`` to both of its
            factors, the sign going to A only; the new A / B are the weighted sums of the sources'.
``cat``     A rows are ``w * scaling * A_i`` stacked, B columns are ``B_i`` stacked; the new rank is
            the sum of the ranks, so ``B @ A`` is exactly ``sum w_i * delta_i``.
``svd``     the weighted sum of the full deltas is truncated to ``svd_rank`` (default: largest source
            rank) with a singular value decomposition: B = U * S, A = Vh; ``svd_clamp`` clamps both
            to the given quantile of their entries.
``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``
            like ``linear`` (same weights on the factors, same-rank rule), but each source tensor is
            first pruned to a ``density`` fraction: largest magnitudes (ties, magnitude_prune) or a
            random draw rescaled by 1/density (DARE, torch's global RNG, so seed it for repeatable
            results); the ties forms then keep, per entry, only the sources agreeing with the majority
            sign (``majority_sign_method``: "total" = sign of the sum, "frequency" = most common sign)
            and average them.
``<method>_svd``
            the same pruning/election applied to the full deltas, followed by the svd truncation.

Unlike peft, a missing/negative ``density`` or an unknown ``majority_sign_method`` is refused with
ValueError before the new adapter is created (peft fails half-way with TypeError/RuntimeError).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import torch

from .layer import LoraLayer

IMPLEMENTED_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                     "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
_SAME_RANK_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")


def _max_rank(config) -> int:
    """The largest rank a config can give a layer (rank_pattern values included)."""
    pattern = getattr(config, "rank_pattern", None) or {}
    return max([config.r, *pattern.values()])


def _plan(lora_model, adapters: list[str], combination_type: str,
          svd_rank: Optional[int]) -> tuple[str, int, object]:
    """Validate the request; return (effective combination type, new rank, new target_modules)."""
    configs = lora_model.peft_config
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one adapter to combine; got adapters=[]")
    for name in adapters:
        if name not in configs:
            raise ValueError(f"Adapter {name} does not exist")
    for name in adapters:
        if getattr(configs[name], "target_parameters", None):
            raise ValueError(f"add_weighted_adapter does not support targeting nn.Parameter "
                             f"(problematic adapter '{name}')")

    shared = [w for _, w in lora_model._wrappers()
              if sum(name in w.modules_to_save for name in adapters) > 1]
    if shared:
        raise ValueError(f"Cannot add weighted adapters if they target the same module with modules_to_save, "
                         f"but found {len(shared)} such instance(s).")

    if len(adapters) == 1:
        combination_type = "linear"
    ranks = [_max_rank(configs[name]) for name in adapters]
    if combination_type in _SAME_RANK_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError(f"All adapters must have the same r value when using combination_type "
                             f"{combination_type!r} (linear, ties, dare_ties, dare_linear, magnitude_prune); "
                             f"got ranks {dict(zip(adapters, ranks))}. Use 'cat' or 'svd' for mixed ranks.")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif isinstance(combination_type, str) and combination_type.endswith("svd"):
        new_rank = svd_rank or max(ranks)
    else:
        raise ValueError(f"Invalid combination_type: {combination_type}")

    targets = [configs[name].target_modules for name in adapters]
    if not targets:
        raise ValueError(f"Found no adapter matching the names in {adapters}")
    kinds = {type(t) for t in targets}
    if len(kinds) > 1:
        raise ValueError("all adapter configs should follow the same target modules type. Combining adapters "
                         "with `target_modules` type being a mix of list/set and string is not supported.")
    kind = kinds.pop()
    if kind is str:
        new_targets = "|".join(f"({t})" for t in targets)
    elif kind is set:
        new_targets = set().union(*targets)
    else:
        raise TypeError(f"Invalid type {kind} found in target_modules")
    return combination_type, new_rank, new_targets


def _factors(layer: LoraLayer, name: str):
    """(A, B) parameters of adapter ``name`` in ``layer`` (linear or embedding form), or None."""
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return None


def _weight_column(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """The weights as float32 (what python floats become), shaped to broadcast over a stack of ``like``."""
    w = torch.tensor(weights, device=like.device)
    return w.view(-1, *([1] * like.dim()))


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return (torch.stack(tensors) * _weight_column(weights, tensors[0])).sum(dim=0)


def _sparsify(t: torch.Tensor, density: float, random: bool) -> torch.Tensor:
    """Keep a ``density`` fraction of ``t``: its largest magnitudes, or a random draw rescaled by 1/density."""
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return t
    if random:  # DARE: drop at random, rescale what is left so the expectation is unchanged
        keep = torch.bernoulli(torch.full_like(t, density))
        return t * keep / density
    k = int(density * t.numel())
    flat_keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    flat_keep[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * flat_keep.view(t.shape)


def _elected_sum(stacked: torch.Tensor, weights: list[float], sign_method: str) -> torch.Tensor:
    """TIES: per entry, keep the sources agreeing with the majority sign; average their weighted values."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1, -1)
    weighted = stacked * _weight_column(weights, stacked[0])
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _merge(tensors: list[torch.Tensor], weights: list[float], method: str, density, sign_method: str):
    """Combine same-shaped task tensors: linear, ties, dare_linear, dare_ties or magnitude_prune."""
    if method == "linear":
        return _weighted_sum(tensors, weights)
    pruned = [_sparsify(t, density, random=method.startswith("dare")) for t in tensors]
    if method in ("ties", "dare_ties"):
        return _elected_sum(torch.stack(pruned), weights, sign_method)
    return _weighted_sum(pruned, weights)  # dare_linear, magnitude_prune


def _present(layer: LoraLayer, adapters, weights):
    found = [(name, w) for name, w in zip(adapters, weights) if _factors(layer, name) is not None]
    if not found:
        raise ValueError(f"None of the adapters {list(adapters)} has LoRA weights in layer "
                         f"{type(layer).__name__}; cannot combine them there.")
    return found


def _combine_factors(layer: LoraLayer, adapters, weights, method, density, sign_method):
    wa, wb, As, Bs = [], [], [], []
    for name, w in _present(layer, adapters, weights):
        A, B = _factors(layer, name)
        s = w * layer.scaling[name]
        root = math.sqrt(abs(s))
        wa.append(root if s >= 0 else -root)  # the sign on one factor only
        wb.append(root)
        As.append(A.data)
        Bs.append(B.data)
    dtype = As[0].dtype
    return (_merge(As, wa, method, density, sign_method).to(dtype),
            _merge(Bs, wb, method, density, sign_method).to(dtype))


def _combine_cat(layer: LoraLayer, adapters, weights, new_A: torch.Tensor, new_B: torch.Tensor):
    As, Bs = [], []
    for name, w in _present(layer, adapters, weights):
        A, B = _factors(layer, name)
        As.append(A.data * w * layer.scaling[name])
        Bs.append(B.data)
    A_cat, B_cat = torch.cat(As, dim=0), torch.cat(Bs, dim=1)
    # a layer that only some sources target fills the leading rows/columns; the rest stays zero
    out_A, out_B = torch.zeros_like(new_A), torch.zeros_like(new_B)
    out_A[: A_cat.shape[0], :] = A_cat
    out_B[:, : B_cat.shape[1]] = B_cat
    return out_A, out_B


def _combine_svd(layer: LoraLayer, adapters, weights, new_rank: int, clamp, full_matrices: bool, driver,
                 method: str, density, sign_method: str):
    found = _present(layer, adapters, weights)
    is_embedding = any(name in layer.lora_embedding_A for name in adapters)
    deltas = [layer.get_delta_weight(name) for name, _ in found]  # scaling included, base layout
    delta = _merge(deltas, [w for _, w in found], method, density, sign_method)
    if getattr(layer, "fan_in_fan_out", False) or is_embedding:
        delta = delta.T  # to the [out, in] = B @ A layout
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(new_rank, S.shape[0])  # a rank above min(out, in) has no more singular directions
    B = U[:, :k] @ torch.diag(S[:k])
    A = Vh[:k, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    if k < new_rank:
        # zero-pad to the configured rank so the adapter keeps the shapes its config promises (peft leaves
        # mismatched A/B factors here, an adapter that can neither run nor load)
        A = torch.cat([A, A.new_zeros(new_rank - k, A.shape[1])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], new_rank - k)], dim=1)
    return A, B


def add_weighted_adapter(lora_model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                         svd_driver: Optional[str] = None, density: Optional[float] = None,
                         majority_sign_method: str = "total") -> None:
    """Implementation of LoraModel.add_weighted_adapter (see the module docstring)."""
    if adapter_name in lora_model.peft_config:
        return  # peft returns silently too
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    combination_type, new_rank, new_targets = _plan(lora_model, adapters, combination_type, svd_rank)
    method = combination_type[: -len("_svd")] if combination_type.endswith("_svd") else combination_type
    method = "linear" if method in ("svd", "cat") else method
    if method != "linear":  # checked before anything is created (peft fails half-way for these)
        if density is None or not 0 <= density:
            raise ValueError(f"combination_type={combination_type!r} needs `density`, the fraction of values "
                             f"to keep, in [0, 1]; got density={density!r}")
        if method in ("ties", "dare_ties") and majority_sign_method not in ("total", "frequency"):
            raise ValueError(f"majority_sign_method must be 'total' or 'frequency'; got {majority_sign_method!r}")

    config = dataclasses.replace(lora_model.peft_config[adapters[0]], r=new_rank, lora_alpha=new_rank,
                                 target_modules=new_targets, alpha_pattern={}, rank_pattern={})
    lora_model.add_adapter(adapter_name, config)
    try:
        _fill(lora_model, adapter_name, adapters, weights, combination_type, method, new_rank, svd_clamp,
              svd_full_matrices, svd_driver, density, majority_sign_method)
    except Exception:
        lora_model.delete_adapter(adapter_name)  # never leave a half-built adapter behind
        raise
    _freeze(lora_model, adapter_name)


def _freeze(lora_model, adapter_name: str) -> None:
    """requires_grad=False on every weight of ``adapter_name`` (found by dict key, never by name matching)."""
    for _, layer in lora_model._lora_layers():
        for attr in layer.adapter_layer_names:
            d = getattr(layer, attr)
            if adapter_name in d:
                d[adapter_name].requires_grad_(False)  # a Parameter or a module: both have it
    for _, wrapper in lora_model._wrappers():
        if adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter_name].requires_grad_(False)


def _fill(lora_model, adapter_name, adapters, weights, combination_type, method, new_rank, clamp, full_matrices,
          driver, density, sign_method) -> None:
    with torch.no_grad():
        for _, layer in list(lora_model._lora_layers()):
            target = _factors(layer, adapter_name)
            if target is None:
                continue
            new_A, new_B = target
            if combination_type == "cat":
                A, B = _combine_cat(layer, adapters, weights, new_A.data, new_B.data)
            elif combination_type.endswith("svd"):
                A, B = _combine_svd(layer, adapters, weights, new_rank, clamp, full_matrices, driver, method,
                                    density, sign_method)
            else:  # linear, ties, dare_linear, dare_ties, magnitude_prune: on the factors
                A, B = _combine_factors(layer, adapters, weights, method, density, sign_method)
            new_A.data = A.to(new_A.dtype).contiguous()
            new_B.data = B.to(new_B.dtype).contiguous()


__all__ = ["add_weighted_adapter", "IMPLEMENTED_TYPES"]
