"""LoraConfig.trainable_token_indices: a TrainableTokensWrapper around each chosen embedding.

Layout equals peft's so state_dict keys and files match: ``<name>.token_adapter`` is a
TrainableTokensLayer around the original module (``<name>.token_adapter.base_layer.weight``,
``<name>.token_adapter.trainable_tokens_delta.<adapter>``); the file stores the rows as
``<name>.token_adapter.trainable_tokens_delta`` (fastpeft's save/load finds the layer's slot like a
LoRA layer's). A head tied to the input embedding gets a wrapper whose layer is tied to the
embedding's (nothing of its own is saved).

The rules of :func:`inject_trainable_tokens` are peft 0.21.2's, learned by running it: a list of ids
applies to the model's input embedding; a dict maps module names (plain suffix match, as peft) to
ids; a name also in ``modules_to_save`` is refused; on a model with tied embeddings the tied head
follows the input embedding (its own entry with the same ids is folded into the tie, different ids
train it separately unless ``ensure_weight_tying`` makes that an error). Like peft, a wrapper has at
most one active adapter with rows.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..mixed_batch import layer_mixed_batch, run_by_adapter
from ..modules_to_save import ModulesToSaveWrapper
from ..tuners_utils import BaseTunerLayer, get_submodules
from .layer import TrainableTokensLayer
from .tying import input_embeddings, input_embeddings_name, tied_module_names, weights_tied

__all__ = ["TrainableTokensWrapper", "inject_trainable_tokens", "token_wrappers", "uses_trainable_tokens"]


def uses_trainable_tokens(config) -> bool:
    """Whether an adapter config trains token rows (LoRA's trainable_token_indices or a TRAINABLE_TOKENS config)."""
    kind = getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None))
    return kind == "TRAINABLE_TOKENS" or getattr(config, "trainable_token_indices", None) is not None


class TrainableTokensWrapper(nn.Module):
    _is_trainable_tokens_wrapper = True  # duck-typing marker for code that must not import this package

    def __init__(self, module: nn.Module, adapter_name: str, token_indices: Sequence[int],
                 tied_adapter: Optional[TrainableTokensLayer] = None, init_weights: bool = True) -> None:
        super().__init__()
        if isinstance(module, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList, BaseTunerLayer)):
            raise TypeError(f"trainable_token_indices cannot be applied to modules of type {type(module)}")
        if isinstance(module, (ModulesToSaveWrapper, TrainableTokensWrapper)):
            raise NotImplementedError(
                f"trainable_token_indices on a module that is also in modules_to_save ({type(module).__name__}) "
                f"is not implemented in fastpeft (peft nests the wrappers); train the embedding either fully "
                f"(modules_to_save) or by rows (trainable_token_indices), not both.")
        self.token_adapter = TrainableTokensLayer(module, adapter_name, tied_adapter=tied_adapter)
        self._adapters: list[str] = []
        self._active_adapter: Union[str, list[str]] = [adapter_name]
        self._disable_adapters = False
        self.update(adapter_name, token_indices=token_indices, tied_adapter=tied_adapter, init_weights=init_weights)

    @property
    def original_module(self) -> nn.Module:
        inner = self._modules["token_adapter"]
        return inner.base_layer if isinstance(inner, TrainableTokensLayer) else inner

    @property
    def tied(self) -> bool:
        return self.token_adapter.tied_adapter is not None

    # -- adapter bookkeeping (peft's AuxiliaryTrainingWrapper semantics) -----------------------------
    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        a = self._active_adapter
        return [a] if isinstance(a, str) else list(a)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter

    def update(self, adapter_name: str, token_indices: Sequence[int] = (), tied_adapter=None,
               init_weights: bool = True) -> None:
        if adapter_name in self._adapters:
            return
        if (tied_adapter is not None) != self.tied:
            state = "tied to the input embedding" if self.tied else "trained on its own"
            raise NotImplementedError(
                f"Adapter {adapter_name!r} wants trainable tokens on a module whose trainable tokens are {state} "
                f"for other adapters; mixing tied and untied token rows on one module is not implemented "
                f"(use the same ids for tied layers in every adapter, or untie the model's embeddings).")
        self.token_adapter.update_layer(adapter_name, token_indices, init_weights=init_weights)
        self._adapters.append(adapter_name)
        self.token_adapter.set_adapter(self.active_adapters)  # the new adapter trains only once active

    def _adapter_to_set(self, adapter_names: Union[str, list[str]]) -> Optional[str]:
        # peft's check_set_adapter: of several names, at most one may have rows in this module
        if isinstance(adapter_names, str):
            return adapter_names if adapter_names in self._adapters else None
        if not adapter_names:
            raise ValueError("Please specify at least one adapter to set")
        here = [n for n in adapter_names if n in self._adapters]
        if len(here) > 1:
            raise ValueError(f"Only one adapter can be set at a time for {type(self).__name__} around "
                             f"{type(self.original_module).__name__}, got {len(here)}: {here}")
        return here[0] if here else None

    def set_adapter(self, adapter_names: Union[str, list[str]]) -> None:
        name = self._adapter_to_set(adapter_names)
        if name is None:
            self.deactivate()
            return
        self._active_adapter = [name]
        self.token_adapter.set_adapter(name)

    def deactivate(self) -> None:
        """No active adapter here (the model's active adapter has no rows in this module)."""
        self._active_adapter = []
        self.token_adapter.set_adapter([])

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        self.token_adapter.enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter's rows; if it was active, none is until the model sets its new active adapter."""
        if adapter_name not in self._adapters:
            return
        if adapter_name in self.token_adapter.merged_adapters:
            raise ValueError(f"Cannot delete adapter {adapter_name!r} while its token rows are merged into "
                             f"{type(self.original_module).__name__}; unmerge first.")
        self._adapters.remove(adapter_name)
        if self.tied:
            # the shared dicts belong to the embedding's layer, which deletes the rows
            self.token_adapter._index_cache.pop(adapter_name, None)
        else:
            self.token_adapter.delete_adapter(adapter_name)
        if adapter_name in self.active_adapters:
            self.deactivate()

    # -- merging ----------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self.token_adapter.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        if self.token_adapter.merged:
            self.token_adapter.unmerge()

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool = False,
                                           adapter_names: Optional[list[str]] = None) -> nn.Module:
        """The wrapped module, with the rows merged into it when ``merge``."""
        if merge:
            self.token_adapter.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.original_module

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        batch = layer_mixed_batch(self, kwargs)
        if batch is None or self._disable_adapters:
            return self.token_adapter(x, *args, **kwargs)
        return self._mixed_forward(batch, x, *args, **kwargs)

    def _mixed_forward(self, batch, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each sample with its adapter's rows ("__base__" and adapters without rows here: the original
        module), one call per adapter on its samples, as peft's wrapper does."""
        def run(name, rows):
            return self.token_adapter.forward_adapters(rows, [name] if name is not None else [], *args, **kwargs)

        return run_by_adapter(batch, x, f"the input of {type(self.original_module).__name__}", run)

    # transformers reads attributes of embeddings/heads directly: `weight` is the table as forward uses it
    # (peft's answer), everything else comes from the wrapped module
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "token_adapter" not in modules:
                raise
            if name == "weight" and not self._disable_adapters:
                return self.token_adapter.get_merged_weights(self.active_adapters)
            return getattr(self.original_module, name)


def token_wrappers(model: nn.Module):
    """(name, TrainableTokensWrapper) for every wrapper in ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, TrainableTokensWrapper):
            yield name, mod


def _inside_adapter(key: str) -> bool:
    parts = key.split(".")
    return any(p in ("token_adapter", "original_module", "modules_to_save", "base_layer") for p in parts)


def _wrap(model: nn.Module, adapter_name: str, names: Sequence[str], token_indices: Sequence[int], activate: bool,
          tied_adapter: Optional[TrainableTokensLayer] = None) -> None:
    """Wrap (or add ``adapter_name`` to) every module whose name ends with one of ``names`` (peft's plain
    suffix match); error when none does."""
    found = False
    for key, _ in list(model.named_modules(remove_duplicate=False)):
        if not key or _inside_adapter(key) or not any(key.endswith(n) for n in names):
            continue
        parent, target, attr = get_submodules(model, key)
        if isinstance(target, TrainableTokensWrapper):
            target.update(adapter_name, token_indices=token_indices, tied_adapter=tied_adapter)
        else:
            wrapper = TrainableTokensWrapper(target, adapter_name, token_indices, tied_adapter=tied_adapter)
            if not activate:
                wrapper.deactivate()  # peft's add_adapter / load_adapter do not activate the new adapter
            setattr(parent, attr, wrapper)
        found = True
    if not found:
        raise ValueError(f"Target modules {set(names)} not found in the base model. Please check the target "
                         f"modules and try again.")


def inject_trainable_tokens(model: nn.Module, adapter_name: str, config, activate: bool) -> None:
    """Apply ``config.trainable_token_indices`` of adapter ``adapter_name`` to ``model`` (after its LoRA layers
    and modules_to_save wrappers exist, as peft orders it)."""
    spec = getattr(config, "trainable_token_indices", None)
    if spec is None:
        return
    if isinstance(spec, dict):
        targets = {str(k): list(v) for k, v in spec.items()}
    else:
        targets = {input_embeddings_name(model, "embed_tokens"): list(spec)}
    modules_to_save = getattr(config, "modules_to_save", None)
    if modules_to_save is not None:
        for name in targets:
            if name in modules_to_save:
                raise ValueError(f"The embedding layer is already marked to be trained fully, either specify "
                                 f'`modules_to_save=[..., "{name}", ...]` or `trainable_tokens={{\'{name}\': x}}` '
                                 f"but not both.")
    tied_model = weights_tied(model)
    ensure = bool(getattr(config, "ensure_weight_tying", False))
    mismatch = False
    skip: set = set()
    if len(targets) > 1 and tied_model:
        tied_names = set(tied_module_names(model))
        emb_name = input_embeddings_name(model) or ""
        tied_keys = [t for t in targets if emb_name.endswith(t)
                     or any(m.endswith(t) or t in m.split(".") for m in tied_names)]
        if len(tied_keys) >= 2:
            first = targets[tied_keys[0]]
            mismatch = not all(targets[k] == first for k in tied_keys[1:])
            if mismatch and ensure:
                info = ", ".join(f"{k}: {targets[k]}" for k in tied_keys)
                raise ValueError(f"Cannot ensure weight tying when different token indices are specified for tied "
                                 f"layers. Conflicting layers: {info}. Please use the same indices for all tied "
                                 f"layers or set ensure_weight_tying=False.")
            if not mismatch:
                skip = set(tied_keys) & tied_names  # the tie below covers them
    for name, ids in targets.items():
        if name not in skip:
            _wrap(model, adapter_name, [name], ids, activate)
    if not tied_model and ensure:
        warnings.warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
                      "Weight tying will not be applied for trainable_token_indices.")
    emb = input_embeddings(model)
    if (tied_model and isinstance(emb, TrainableTokensWrapper) and (ensure or not mismatch)
            and adapter_name in emb.token_adapter.token_indices):
        tied = tied_module_names(model)
        if tied:
            _check_not_lora(model, tied)
            _wrap(model, adapter_name, tied, emb.token_adapter.token_indices[adapter_name], activate,
                  tied_adapter=emb.token_adapter)


def _check_not_lora(model: nn.Module, names: Sequence[str]) -> None:
    # peft nests the tied head's token wrapper inside a LoRA layer on that head; fastpeft's LoRA layers compute
    # from their base weight directly, which would skip the trained rows
    for key, mod in model.named_modules():
        if key in names and isinstance(mod, BaseTunerLayer) and not isinstance(mod, TrainableTokensLayer):
            raise NotImplementedError(
                f"LoRA on {key!r}, whose weight is tied to the input embedding that trainable_token_indices "
                f"trains, is not implemented in fastpeft; leave {key!r} out of target_modules (its rows follow "
                f"the embedding's) or untie the embeddings (tie_word_embeddings=False).")
