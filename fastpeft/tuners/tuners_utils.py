"""Tuner-independent pieces: which modules a config targets, and the adapter bookkeeping every
adapter layer shares (active adapters, enable/disable, delete).

The matching rules reproduce peft 0.21's observable behaviour (learned by running it):
- ``target_modules`` as a string is a regex that must match the whole module name;
- as a list/set, a name matches when it equals an entry or ends with ``"." + entry``;
- ``exclude_modules`` uses the same two forms and wins over ``target_modules``;
- ``layers_to_transform`` keeps only modules whose layer index (the number after ``layers_pattern``,
  or after the last ``<name>.<index>.`` pair of the name when no pattern is given) is listed;
- ``rank_pattern`` / ``alpha_pattern`` keys are regexes matched against the end of the module name
  at a dot boundary; the first key (in dict order) that matches wins.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

# generic module helpers, defined below the tuners (fastpeft.quant uses them too); re-exported here
from fastpeft.utils.modules import get_submodules, name_matches  # noqa: F401

try:  # transformers is optional for plain nn.Module users
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except Exception:  # pragma: no cover - exercised only without transformers
    _HFConv1D = None

INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"


def is_hf_conv1d(module: nn.Module) -> bool:
    return _HFConv1D is not None and isinstance(module, _HFConv1D)


def layer_index_of(key: str, layers_pattern: Union[None, str, list[str]]) -> Optional[int]:
    """The transformer-block index of module ``key``, or None when its name holds none."""
    if layers_pattern is None or (not isinstance(layers_pattern, str) and len(layers_pattern) == 0):
        m = re.match(r".*\.[^.]*\.(\d+)\.", key)
        return int(m.group(1)) if m else None
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    for pat in patterns:
        m = re.match(rf"(?:.*\.)?{pat}\.(\d+)\.", key)
        if m:
            return int(m.group(1))
    return None


def is_excluded(config, key: str) -> bool:
    excl = getattr(config, "exclude_modules", None)
    return bool(excl) and name_matches(key, excl)


def target_matches(config, key: str) -> bool:
    """Whether ``config`` targets the module called ``key`` (target list/regex, exclusions, layers)."""
    targets = config.target_modules
    if targets is None or is_excluded(config, key) or not name_matches(key, targets):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or (isinstance(targets, str)):
        # like peft: a regex target already says which layers it wants
        return True
    if isinstance(layers, int):
        layers = [layers]
    idx = layer_index_of(key, getattr(config, "layers_pattern", None))
    return idx is not None and idx in layers


def pattern_value(patterns: Optional[dict], key: str, default):
    """Value for module ``key`` from a rank/alpha pattern dict (first matching key wins)."""
    for pat in (patterns or {}):
        if re.match(rf"(.*\.)?({pat})$", key):
            return patterns[pat]
    return default


def pattern_keys_matching(patterns: Optional[dict], keys: Iterable[str]) -> set:
    """The pattern keys of ``patterns`` that match at least one of ``keys``."""
    keys = list(keys)
    return {p for p in (patterns or {}) if any(re.match(rf"(.*\.)?({p})$", k) for k in keys)}


def output_head_names(model: nn.Module) -> set:
    """Names of the modules that produce the output logits (excluded by "all-linear")."""
    get_out = getattr(model, "get_output_embeddings", None)
    if get_out is None:
        return set()
    try:
        head = get_out()
    except Exception:  # models that declare the method but have no head raise NotImplementedError
        return set()
    if head is None:
        return set()
    return {name for name, mod in model.named_modules() if mod is head}


def all_linear_names(model: nn.Module, skip: Iterable[str] = ()) -> set:
    """Full names of every nn.Linear / transformers Conv1D except the output head and ``skip``."""
    skip = set(skip) | output_head_names(model)
    found = set()
    for name, mod in model.named_modules():
        if not name or name in skip or any(name.startswith(s + ".") for s in skip):
            continue
        # an existing adapter layer counts as its base layer (second adapter with "all-linear")
        if isinstance(mod, BaseTunerLayer):
            mod = mod.get_base_layer()
        if isinstance(mod, nn.Linear) or is_hf_conv1d(mod):
            found.add(name)
    return found


class BaseTunerLayer:
    """Adapter bookkeeping shared by adapter layers (mixed into an nn.Module subclass).

    Subclasses list the ModuleDict/ParameterDict attributes that hold per-adapter weights in
    ``adapter_layer_names`` and the plain per-adapter dicts in ``other_param_names``.
    """

    adapter_layer_names: tuple = ()
    other_param_names: tuple = ()

    def _init_tuner_state(self) -> None:
        self._active_adapter: Union[str, list[str]] = "default"
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

    def get_base_layer(self) -> nn.Module:
        # follows base_layer submodules; a dict lookup, not hasattr, which costs a raised AttributeError on the
        # innermost module at every forward
        base = self
        while True:
            inner = base.__dict__.get("_modules", {}).get("base_layer")
            if inner is None:
                return base
            base = inner

    # transformers reads .weight/.bias of some modules (tying, dtype checks): expose the base ones
    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        a = self._active_adapter
        return [a] if isinstance(a, str) else list(a)

    def _adapter_params(self, adapter_name: str):
        for attr in self.adapter_layer_names:
            d = getattr(self, attr)
            if adapter_name in d:
                item = d[adapter_name]
                if isinstance(item, nn.Parameter):
                    yield item
                else:
                    yield from item.parameters()

    def _all_adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names + self.other_param_names:
            for n in getattr(self, attr, {}):
                if n not in names:
                    names.append(n)
        return names

    def _all_available_adapter_names(self) -> list[str]:
        """Every adapter this layer holds anything of (weights or per-adapter settings), sorted (peft's name)."""
        return sorted(self._all_adapter_names())

    def _get_available_adapters(self) -> set:
        """The adapters that have weights in this layer (peft's name)."""
        names = set()
        for attr in self.adapter_layer_names:
            container = getattr(self, attr, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                names.update(container.keys())
        return names

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Make ``adapter_names`` active; only active adapters' weights require grad, and none of them with
        ``inference_mode=True`` (peft's signature and behaviour)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self._all_adapter_names():
            for p in self._adapter_params(name):
                p.requires_grad_(name in names and not inference_mode)
        self._freeze_non_trainable_peft_weights(names)
        self._active_adapter = adapter_names

    # peft's name: {adapter: (weight container names that never train)}, e.g. MiCA's lora_B (lora/inits.py)
    frozen_peft_weight_names: dict = {}

    def _freeze_non_trainable_peft_weights(self, adapter_names) -> None:
        for name in adapter_names:
            for attr in self.frozen_peft_weight_names.get(name, ()):
                container = getattr(self, attr, {})
                if name in container:
                    container[name].requires_grad_(False)

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """Turn gradients of the given adapters' weights on or off, active or not (peft's method)."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names:
            for p in self._adapter_params(name):
                p.requires_grad_(requires_grad)
        self._freeze_non_trainable_peft_weights(names)

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for name in self._all_adapter_names():
                for p in self._adapter_params(name):
                    p.requires_grad_(False)
            self._disable_adapters = True

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Cannot delete adapter {adapter_name!r} while it is merged into the base "
                             f"weights of {type(self).__name__}; unmerge first.")
        for attr in self.adapter_layer_names + self.other_param_names:
            d = getattr(self, attr)
            if adapter_name in d:
                del d[adapter_name]
        if adapter_name in self.frozen_peft_weight_names:
            self.frozen_peft_weight_names = {k: v for k, v in self.frozen_peft_weight_names.items()
                                             if k != adapter_name}
        if adapter_name in self.active_adapters:
            remaining = [a for a in self.active_adapters if a != adapter_name]
            if not remaining:
                # the first remaining name in sorted order, as peft: every layer must pick the same one
                left = self._all_available_adapter_names()
                remaining = left[:1]
                if left:
                    warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting "
                                  f"active adapter to {left[0]}.")
            self.set_adapter(remaining[0] if len(remaining) == 1 else remaining)


@contextlib.contextmanager
def requires_grad_kept(model: nn.Module, adapter_name: str):
    """Adding adapter ``adapter_name`` inside the block leaves every other parameter's requires_grad as it was
    (peft: a frozen, loaded adapter stays frozen when another one is added next to it)."""
    kept = [(p, p.requires_grad) for n, p in model.named_parameters()
            if f".{adapter_name}." not in n and not n.endswith(f".{adapter_name}")]
    yield
    for p, flag in kept:
        p.requires_grad_(flag)


def adapters_to_merge(layer: BaseTunerLayer, adapter_names: Optional[list[str]]) -> list[str]:
    """The adapters to merge now: the requested (default: active) ones not merged yet."""
    names = layer.active_adapters if adapter_names is None else list(adapter_names)
    if layer.merged:
        already = [n for n in names if n in layer.merged_adapters]
        if already:
            warnings.warn(f"Adapters {already} are already merged into {type(layer).__name__}; "
                          f"merging only the others.")
        names = [n for n in names if n not in layer.merged_adapters]
    return names
