"""ModulesToSaveWrapper: trains a full copy of a module (e.g. a classification head) per adapter.

Layout equals peft's so state_dict keys match: ``<name>.original_module.*`` holds the frozen
original, ``<name>.modules_to_save.<adapter>.*`` the trainable copies.
"""
from __future__ import annotations

import copy
import warnings
from typing import Iterable, Optional, Union

from torch import nn

from .mixed_batch import layer_mixed_batch, run_by_adapter


def matches_modules_to_save(key: str, names: Iterable[str]) -> bool:
    # peft compares with a plain string suffix (no dot boundary: "b" also matches "emb");
    # kept identical so both libraries wrap the same modules for the same config.
    return any(key.endswith(n) for n in names)


class ModulesToSaveWrapper(nn.Module):
    def __init__(self, module_to_save: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter: Union[str, list[str]] = adapter_name
        self._disable_adapters = False
        self.update(adapter_name)
        self.original_module.requires_grad_(False)

    # -- adapter bookkeeping -------------------------------------------------------------
    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        a = self._active_adapter
        return [a] if isinstance(a, str) else list(a)

    @property
    def active_adapter(self) -> str:
        # a full copy cannot be summed like LoRA deltas: the first active adapter that has one wins
        for a in self.active_adapters:
            if a in self.modules_to_save:
                return a
        return self.active_adapters[0] if self.active_adapters else None

    def update(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for ``adapter_name``."""
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.modules_to_save[adapter_name].requires_grad_(adapter_name in self.active_adapters)

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        # as peft: the copies active so far are frozen and the new ones follow inference_mode; other copies keep
        # their requires_grad (set_requires_grad may have made an inactive copy trainable on purpose)
        for name in self.active_adapters:
            if name in self.modules_to_save:
                self.modules_to_save[name].requires_grad_(False)
        for name in names:
            if name in self.modules_to_save:
                self.modules_to_save[name].requires_grad_(not inference_mode)
        self._active_adapter = adapter_names

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names & set(self.modules_to_save.keys()):
            self.modules_to_save[name].requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        for name, mod in self.modules_to_save.items():
            mod.requires_grad_(enabled and name in self.active_adapters)

    def delete_adapter(self, adapter_name: str, new_active_adapters: Optional[list[str]] = None) -> None:
        """Drop ``adapter_name``'s copy. ``new_active_adapters``: the model's active adapters after the deletion
        (LoraModel passes its layers' choice, as peft does): this wrapper follows them, and with none of them
        holding a copy here it is inactive (forward uses the original). None: pick from the copies left."""
        if adapter_name not in self.modules_to_save:
            return
        del self.modules_to_save[adapter_name]
        if new_active_adapters is not None:
            held = [a for a in new_active_adapters if a in self.modules_to_save]
            if not held:
                self._active_adapter = list(new_active_adapters)  # no copy of theirs: the original is used
            elif held[0] != self.active_adapter:
                self.set_adapter(held[0])  # (an unchanged active copy keeps its requires_grad, as in peft)
            return
        if adapter_name in self.active_adapters:
            remaining = [a for a in self.active_adapters if a != adapter_name]
            if not remaining and len(self.modules_to_save):
                remaining = [next(iter(self.modules_to_save.keys()))]
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active "
                              f"adapter to {remaining[0]}.")
            self.set_adapter(remaining[0] if len(remaining) == 1 else remaining)

    def get_module(self) -> nn.Module:
        """The module forward uses right now (the active copy, or the original)."""
        name = self.active_adapter
        if self._disable_adapters or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, *args, **kwargs):
        batch = layer_mixed_batch(self, kwargs)
        if batch is None or self._disable_adapters or not args:
            return self.get_module()(*args, **kwargs)
        return self._mixed_forward(batch, *args, **kwargs)

    def _mixed_forward(self, batch, x, *args, **kwargs):
        """Each sample through its adapter's copy ("__base__" and adapters without a copy: the original
        module), as peft does: the first input is split by sample, other arguments are passed as they are."""
        def run(name, rows):
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            return module(rows, *args, **kwargs)

        return run_by_adapter(batch, x, f"the input of {type(self.original_module).__name__}", run)

    # transformers touches attributes of heads/embeddings directly (weight for tying, num_embeddings,
    # out_features, ...): answer from the module that forward would use.
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "original_module" not in modules:
                raise
            return getattr(self.get_module(), name)
