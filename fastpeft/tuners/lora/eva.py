"""EVA (Explained Variance Adaptation): lora_A from the top right-singular vectors of each layer's
inputs, ranks redistributed across layers by explained variance. peft 0.21.2's entry points and results:

- ``get_eva_state_dict(model, dataloader, peft_config=None, ...)``: {module name: components [rank, in]}.
  Layers that see identical inputs (e.g. q/k/v) share one decomposition (found by hashing the first
  batch's inputs). Each layer runs a streaming PCA (utils/incremental_pca.py) over batches, cycling
  the dataloader, until the components it needs have converged (cosine similarity with the previous
  step >= tau); the rank budget (sum of the layers' r) then goes to the components with the largest
  explained-variance ratio, at most round(r * rho) per layer.
- ``initialize_lora_eva_weights(peft_model, dataloader=None, eva_state_dict=None, ...)``: loads those
  into a model made with ``init_lora_weights="eva"``: adapters are resized to their new rank (alpha
  scaled with it when ``adjust_scaling_factors``), rank-0 layers are unwrapped, and the config's
  target_modules / rank_pattern / alpha_pattern are rewritten to describe the result (so the saved
  adapter loads in peft and fastpeft).

Module names are those of the model passed in (a PeftModel's start with "base_model.model."), as in peft.
"""
from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from contextlib import nullcontext
from copy import copy, deepcopy
from itertools import cycle
from typing import Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from ...utils.incremental_pca import IncrementalPCA
from ..tuners_utils import get_submodules, is_hf_conv1d, pattern_value, target_matches
from .init_configs import EvaConfig, read_sub_config

__all__ = ["find_minimal_target_modules", "forward_fn_dict", "get_eva_state_dict", "initialize_lora_eva_weights",
           "prepare_layer_inputs_fn_language_modeling", "prepare_model_inputs_fn_language_modeling"]

# above this many target modules the rewritten target_modules is condensed to suffixes (peft's threshold)
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20


def _unsupported_layer_types() -> tuple:
    """LoRA layer types EVA leaves at the default init (peft: Embedding, MultiheadAttention, conv)."""
    from .conv import Conv1d, Conv2d, Conv3d
    from .embedding import Embedding
    from .mha import MultiheadAttention

    return (Embedding, MultiheadAttention, Conv1d, Conv2d, Conv3d)


# --------------------------------------------------------------------------------- input preparation
def _first_tensor(layer_input, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, torch.Tensor):
        return layer_input
    if isinstance(layer_input, (tuple, list)):
        return layer_input[0]
    raise TypeError(f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer {layer_name}, "
                    "please provide a custom prepare_layer_inputs_fn")


def _default_layer_inputs(layer_input, model_input, layer_name) -> torch.Tensor:
    x = _first_tensor(layer_input, layer_name)
    return x.view(-1, x.size(-1)) if x.ndim > 2 else x


def prepare_model_inputs_fn_language_modeling(model_input, peft_config) -> torch.Tensor:
    """Indices (batch, position) of the tokens to use: attention mask, and labels != label_mask_value."""
    if not isinstance(model_input, dict):
        raise TypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = read_sub_config(peft_config.eva_config, EvaConfig, "eva_config") or EvaConfig()
    if eva.use_label_mask and "labels" in model_input:
        mask = torch.logical_and(mask, model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> torch.Tensor:
    """The layer's input rows at the token indices ``prepare_model_inputs_fn_language_modeling`` chose."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def forward_fn_dict(model, inputs):
    return model(**inputs)


def _to_device(inputs, device):
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    warnings.warn(f"input of type {type(inputs)} could not be moved to the correct device")
    return inputs


def _model_device(model: nn.Module) -> Optional[torch.device]:
    devices = list({p.device for p in model.parameters() if p.device.type != "meta"})
    if len(devices) > 1:
        warnings.warn(f"Could not determine device, model has multiple devices: {devices}")
        return None
    return devices[0]


# ----------------------------------------------------------------------------------------- hooks
class _Hook:
    def __init__(self, name: str, prepare_layer_inputs_fn: Optional[Callable] = None):
        self.name = name
        self.prepare_fn = prepare_layer_inputs_fn or _default_layer_inputs
        self.model_input = None

    def rows(self, layer_input) -> torch.Tensor:
        with torch.no_grad():
            return self.prepare_fn(layer_input, self.model_input, self.name)


class _HashHook(_Hook):
    """Records a hash of the first inputs, to find layers that see identical inputs."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.hashes: list = []

    def __call__(self, module, args, output):
        self.hashes.append(hash(tuple(self.rows(args).detach().cpu().reshape(-1).tolist())))


class _SVDHook(_Hook):
    """One streaming-PCA step per forward; ``converged[i]``: component i moved less than tau."""

    def __init__(self, n_components: int, tau: float, **kw):
        super().__init__(**kw)
        self.n_components = n_components
        self.tau = tau
        self.pca = IncrementalPCA(n_components=n_components, copy=True, lowrank=True, lowrank_seed=42)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    def __call__(self, module, args, output):
        with torch.no_grad():
            previous = self.pca.components_.clone() if hasattr(self.pca, "components_") else None
            states = self.rows(args)
            if states.size(0) < self.n_components:
                print(f"skipping SVD for {self.name} because there are less than {self.n_components} examples")
                return
            self.pca.partial_fit(states.to(torch.float32))
            if previous is None:
                return
            current = self.pca.components_
            if current.ndim == 1:
                current, previous = current.reshape(1, -1), previous.reshape(1, -1)
            self.converged = torch.nn.functional.cosine_similarity(current, previous) >= self.tau


def _rank_distribution(hooks, layer_hook_map, equal_inputs_map, budget, max_components) -> dict:
    """Give the budget to the largest explained-variance ratios over all layers (each layer's first
    max_components); a layer sharing another's inputs swaps its count with that one's if larger."""
    ratios = {k: h.pca.explained_variance_ratio_[: max_components[k]] for k, (h, _) in hooks.items()}
    owners, values = zip(*[(layer, v) for layer, src in layer_hook_map.items() for v in ratios[src]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(owners[i] for i in order[:budget])
    counts = {k: counts.get(k, 0) for k in layer_hook_map}
    for layer, src in equal_inputs_map.items():
        if counts[src] < counts[layer]:
            counts[src], counts[layer] = counts[layer], counts[src]
    return counts


def _eva_state_dict(model, dataloader, peft_config, is_target, forward_fn, prepare_model_inputs_fn,
                    prepare_layer_inputs_fn, show_progress_bar) -> dict:
    if len(dataloader) == 0:
        raise ValueError("dataloader is empty")
    eva = read_sub_config(peft_config.eva_config, EvaConfig, "eva_config") or EvaConfig()
    rho = eva.rho
    if rho > 1000:  # an effectively unbounded rho: cap it at what any layer could use
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // peft_config.r)
    training = model.training
    device = _model_device(model)
    model.eval()

    def model_inputs(batch):
        return prepare_model_inputs_fn(batch, peft_config) if prepare_model_inputs_fn is not None \
            else deepcopy(batch)

    inputs = next(iter(dataloader))
    if device is not None:
        inputs = _to_device(inputs, device)
    hook_inputs = model_inputs(inputs)
    per_layer_fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    hooks, max_components, budget = {}, {}, 0
    for name, module in model.named_modules():
        if not is_target(name, module):
            continue
        fn = per_layer_fns.pop(name, None) if per_layer_fns is not None else prepare_layer_inputs_fn
        hook = _HashHook(name=name, prepare_layer_inputs_fn=fn)
        hook.model_input = hook_inputs
        hooks[name] = (hook, module.register_forward_hook(hook))
        rank = pattern_value(peft_config.rank_pattern, name, peft_config.r)
        max_components[name] = round(rank * rho)
        budget += rank
    if per_layer_fns:
        for _, handle in hooks.values():
            handle.remove()
        raise ValueError("prepare_layer_inputs_fn is a mapping but the following module names were not found in "
                         f"the model: {per_layer_fns.keys()}")

    try:
        forward_fn(model, inputs)
    finally:
        for _, handle in hooks.values():
            handle.remove()
    # layers with identical inputs: the first (in module order) gets the decomposition, the others share it
    by_hash = defaultdict(list)
    for name, (hook, _) in hooks.items():
        by_hash[hook.hashes[0]].append(name)
    groups = [names for names in by_hash.values() if len(names) > 1]
    equal_inputs_map = {other: names[0] for names in groups for other in names[1:]}
    for names in groups:
        top = max(max_components[n] for n in names)
        for n in names:
            max_components[n] = top

    svd_hooks = {}
    for name, (hook, _) in hooks.items():
        if name in equal_inputs_map:
            continue
        h = _SVDHook(n_components=max_components[name], tau=eva.tau, name=name,
                     prepare_layer_inputs_fn=hook.prepare_fn)
        svd_hooks[name] = (h, model.get_submodule(name).register_forward_hook(h))
    hooks = svd_hooks
    layer_hook_map = {**{n: n for n in hooks}, **equal_inputs_map}

    batches = cycle(dataloader)
    bar = None
    if show_progress_bar:
        from tqdm import tqdm

        bar = tqdm(batches, position=0, leave=False)
        batches = bar
    converged_layers = {k: False for k in hooks}
    rank_dist = max_components.copy()
    try:
        for inputs in batches:
            if device is not None:
                inputs = _to_device(inputs, device)
            hook_inputs = model_inputs(inputs)
            for name in list(hooks):
                hook, handle = hooks[name]
                done = bool(torch.all(hook.converged[: rank_dist[name]]))
                if not converged_layers[name] and done and handle:
                    handle.remove()  # converged now: no more steps for this layer
                    hooks[name] = (hook, None)
                    converged_layers[name] = True
                    continue
                if converged_layers[name] and not done:  # the rank it needs grew past its converged part
                    handle = model.get_submodule(name).register_forward_hook(hook)
                    converged_layers[name] = False
                hook.model_input = hook_inputs
                hooks[name] = (hook, handle)
            if bar is not None:
                states = list(converged_layers.values()) + [converged_layers[v] for v in equal_inputs_map.values()]
                bar.set_description(f"{sum(states)}/{len(states)} layers have converged")
            if all(converged_layers.values()):
                break
            forward_fn(model, inputs)
            if not all(hasattr(h.pca, "components_") for h, _ in hooks.values()):
                continue  # some layer skipped its step (fewer rows than components)
            rank_dist = _rank_distribution(hooks, layer_hook_map, equal_inputs_map, budget, max_components)
    finally:
        for _, handle in hooks.values():
            if handle is not None:
                handle.remove()
        if bar is not None:
            bar.close()

    out = {}
    for name, rank in rank_dist.items():
        hook = hooks[layer_hook_map[name]][0]
        if not torch.all(hook.converged[:rank]):
            raise ValueError(f"EVA: layer {name} has not converged but was assigned rank {rank}")
        u = hook.pca.components_[:rank]
        if eva.whiten:
            u /= hook.pca.singular_values_[:rank].sqrt().reshape(-1, 1)
        out[name] = u
    model.train(training)
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable, peft_config=None,
                       forward_fn: Optional[Callable] = forward_fn_dict,
                       prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
                       prepare_layer_inputs_fn: Union[Callable, dict, None] = prepare_layer_inputs_fn_language_modeling,
                       adapter_name: str = "default", gather_distributed_inputs: bool = True,
                       show_progress_bar: bool = True) -> dict:
    """{module name: EVA components [rank, in_features]} for ``model`` (a PeftModel, or a plain model with
    ``peft_config``). See the module docstring; argument meanings are peft's.

    gather_distributed_inputs: kept for peft's signature; inputs are not gathered across ranks (with
    torch.distributed initialised, each rank computes from its own batches: refused below)."""
    import torch.distributed as dist

    if gather_distributed_inputs and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise NotImplementedError("EVA with torch.distributed (gathering layer inputs across ranks) is not "
                                  "implemented in fastpeft; run get_eva_state_dict in one process, or pass "
                                  "gather_distributed_inputs=False to use each rank's own batches")
    is_peft_model = hasattr(model, "peft_config")
    if is_peft_model and peft_config is None:
        peft_config = model.peft_config[adapter_name]
    elif peft_config is None:
        raise ValueError("peft_config is required if model is not a PeftModel")
    if is_peft_model:
        unsupported = _unsupported_layer_types()
        ctx = model.disable_adapter()

        def is_target(name, module):
            return hasattr(module, "base_layer") and not isinstance(module, unsupported)
    else:
        ctx = nullcontext()

        def is_target(name, module):
            hit = peft_config.target_modules is None or (bool(name) and target_matches(peft_config, name))
            return (isinstance(module, nn.Linear) or is_hf_conv1d(module)) and hit
    with ctx:
        return _eva_state_dict(model, dataloader, peft_config, is_target, forward_fn, prepare_model_inputs_fn,
                               prepare_layer_inputs_fn, show_progress_bar)


def find_minimal_target_modules(targets, others) -> set:
    """The fewest name suffixes that match every target and no other module (peft's condensed
    target_modules; same choice: targets in order of their suffix lists, shortest suffix first)."""
    targets, others = set(targets), set(others)
    if not targets or "" in targets:
        raise ValueError("target_modules should be a non-empty list or set of non-empty strings.")
    if not targets.isdisjoint(others):
        raise ValueError(f"target and other module names overlap: {sorted(targets & others)[:5]}")

    def suffixes(name):
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]

    taken_by_others = {s for name in others for s in suffixes(name)}
    chosen: set = set()
    for name, options in sorted(((n, suffixes(n)) for n in targets), key=lambda t: t[1]):
        if any(name.endswith("." + c) for c in chosen):
            continue
        for s in options:
            if s not in chosen and s not in taken_by_others:
                chosen.add(s)
                break
    return chosen


def _load_eva_state_dict(model, eva_state_dict: dict, adapter_name: str) -> None:
    from .layer import LoraLayer
    from .model import _variant_options

    config = copy(model.peft_config[adapter_name])
    eva = read_sub_config(config.eva_config, EvaConfig, "eva_config") or EvaConfig()
    eva_state_dict = dict(eva_state_dict)
    missing, targets, others = [], [], []
    rank_pattern, alpha_pattern = {}, {}
    for name, module in list(model.named_modules()):
        short = name.replace("base_model.model.", "")
        if not isinstance(module, LoraLayer):
            others.append(short)
            continue
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        options = dict(lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                       lora_bias=getattr(config, "lora_bias", False), **_variant_options(config))
        if name in eva_state_dict:
            w = eva_state_dict.pop(name)
            new_rank = w.size(0)
            if new_rank == 0:  # no component chosen: the layer is unwrapped
                parent, _, attr = get_submodules(model, name)
                setattr(parent, attr, module.get_base_layer())
                continue
            if new_rank != r and eva.adjust_scaling_factors:
                alpha *= new_rank / r
            if new_rank != r or module.lora_A[adapter_name].weight.device.type == "meta":
                module.update_layer(adapter_name, new_rank, lora_alpha=alpha, init_lora_weights="eva", **options)
            module.lora_A[adapter_name].weight.copy_(w)
            targets.append(short)
        else:
            module.update_layer(adapter_name, r, lora_alpha=alpha, init_lora_weights=True, **options)
            missing.append(short)
            new_rank = r
        if new_rank != config.r:
            rank_pattern[short] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[short] = alpha
    targets = targets + missing
    if len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        targets = find_minimal_target_modules(targets, others)
    model.peft_config[adapter_name].target_modules = targets
    model.peft_config[adapter_name].rank_pattern = rank_pattern
    model.peft_config[adapter_name].alpha_pattern = alpha_pattern
    if missing:
        warnings.warn("the following layers were initialized with init_lora_weights=True because they were not "
                      f"found in the eva state_dict: {missing}\ncurrently the following lora modules are not "
                      f"supported by EVA: {_unsupported_layer_types()}")


@torch.no_grad()
def initialize_lora_eva_weights(model: nn.Module, dataloader: Optional[Iterable] = None,
                                eva_state_dict: Optional[dict] = None,
                                forward_fn: Optional[Callable] = forward_fn_dict,
                                prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
                                prepare_layer_inputs_fn: Union[Callable, dict, None] =
                                prepare_layer_inputs_fn_language_modeling,
                                adapter_name: str = "default", gather_distributed_inputs: bool = True,
                                show_progress_bar: bool = True) -> nn.Module:
    """Set the EVA adapters of ``model`` (a PeftModel made with init_lora_weights="eva"); computes the
    components with get_eva_state_dict unless ``eva_state_dict`` is given."""
    if not hasattr(model, "peft_config"):
        raise ValueError("model must be a PeftModel")
    if len(model.active_adapters) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(model=model, dataloader=dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
                                            adapter_name=adapter_name,
                                            gather_distributed_inputs=gather_distributed_inputs,
                                            show_progress_bar=show_progress_bar)
    _load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model
