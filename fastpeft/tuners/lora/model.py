"""LoraModel: puts LoRA layers into a model (transformers or plain nn.Module) and manages them.

PeftModel.base_model is a LoraModel and LoraModel.model is the user's model; the API mirrors peft's
LoraModel. Injection rules (target matching, per-architecture
defaults, "all-linear", exclusions, layer selection, rank/alpha patterns, modules_to_save,
fan_in_fan_out fixing) reproduce peft 0.21's observable behaviour.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import nn

from ...utils.constants import LORA_DEFAULT_TARGET_MODULES, LORA_PREFIX
from ...utils.meta_init import adapters_on_meta, creating_on_meta
from ..modules_to_save import ModulesToSaveWrapper, matches_modules_to_save
from ..mixed_batch import adapter_names_context
from ..trainable_tokens import tying as _tying, wrapper as _tokens  # trainable_token_indices hook
from ..tuners_utils import (INCLUDE_LINEAR_LAYERS_SHORTHAND, BaseTunerLayer, all_linear_names, get_submodules,
                            is_hf_conv1d, pattern_keys_matching, pattern_value, requires_grad_kept, target_matches)
from .conv1d import Conv1D
from .conv import conv_layer_for  # torch.nn.Conv1d/2d/3d (conv.py)
from .embedding import Embedding
from .layer import LoraLayer
from .inits import warn_if_mixed_with_base_changing
from .linear import Linear
from .mha import MultiheadAttention
from . import param_wrapper as _params  # target_parameters hook
from .quant_linear import QuantLinear, QuantLoraLinear  # fastpeft.quant hook (QLoRA)
from .variants import alora as _alora  # aLoRA offsets hook
from .variants.refused import refusal_message


def _variant_options(config, target_name: str = "") -> dict:
    """The config's per-adapter variant options, as update_layer takes them (DoRA and its runtime option).

    ``target_name``: the module's name in the model (BD-LoRA picks its block-diagonal factor by it)."""
    runtime = getattr(config, "runtime_config", None)
    return dict(use_dora=bool(getattr(config, "use_dora", False)),
                ephemeral_gpu_offload=bool(getattr(runtime, "ephemeral_gpu_offload", False)),
                lora_ga_config=getattr(config, "lora_ga_config", None),  # read by init_lora_weights="lora_ga"
                # LoftQ (loftq.py) and the variants aLoRA / QA-LoRA (variants/__init__.py: variant_for)
                loftq_config=getattr(config, "loftq_config", None),
                alora_invocation_tokens=getattr(config, "alora_invocation_tokens", None),
                use_qalora=bool(getattr(config, "use_qalora", False)),
                qalora_group_size=getattr(config, "qalora_group_size", 16),
                use_bdlora=getattr(config, "use_bdlora", None), target_name=target_name)


def create_lora_module(target: nn.Module, adapter_name: str, config, r: int, lora_alpha: float,
                       target_name: str = "") -> nn.Module:
    """A new LoRA layer around ``target`` (named ``target_name`` in the model); fixes a wrong fan_in_fan_out
    flag with a warning like peft."""
    kwargs = dict(r=r, lora_alpha=lora_alpha, lora_dropout=config.lora_dropout,
                  init_lora_weights=config.init_lora_weights, use_rslora=config.use_rslora,
                  lora_bias=getattr(config, "lora_bias", False), **_variant_options(config, target_name))
    # peft's dynamic dispatch: LoraConfig._register_custom_module({base class: LoRA layer class}) comes
    # first, so a user can take over a layer type fastpeft knows, or add one it does not. Like peft, the
    # class also gets the config.
    for base_cls, lora_cls in (getattr(config, "_custom_modules", None) or {}).items():
        if isinstance(target, base_cls):
            return lora_cls(target, adapter_name, config=config, **kwargs)
    if isinstance(target, nn.MultiheadAttention):
        return MultiheadAttention(target, adapter_name, **kwargs)
    if isinstance(target, nn.Embedding):
        return Embedding(target, adapter_name, **kwargs)
    conv_cls = conv_layer_for(target)  # peft's order: Embedding, Conv2d, Conv3d, Conv1d, ..., Linear
    if conv_cls is not None:
        return conv_cls(target, adapter_name, **kwargs)
    if isinstance(target, QuantLinear):  # fastpeft.quant hook: before nn.Linear, which QuantLinear subclasses
        return QuantLoraLinear(target, adapter_name, **kwargs)
    if isinstance(target, nn.Linear):
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.")
            config.fan_in_fan_out = False
        return Linear(target, adapter_name, fan_in_fan_out=False, **kwargs)
    if is_hf_conv1d(target):
        if not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                          "Setting fan_in_fan_out to True.")
            config.fan_in_fan_out = True
        return Conv1D(target, adapter_name, **kwargs)
    raise ValueError(f"Target module {type(target).__name__} is not supported by fastpeft LoRA. Supported "
                     f"base layers: torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d/Conv2d/Conv3d, "
                     f"transformers.pytorch_utils.Conv1D, "
                     f"fastpeft.quant.QuantLinear; other types can be mapped to a LoRA layer class with "
                     f"LoraConfig._register_custom_module.")


class LoraModel(nn.Module):
    prefix = LORA_PREFIX

    def __init__(self, model: nn.Module, peft_config, adapter_name: str = "default", **kwargs) -> None:
        super().__init__()
        self.model = model
        if not isinstance(peft_config, dict):
            peft_config = {adapter_name: peft_config}
        self.peft_config: dict = peft_config
        self.active_adapter: Union[str, list[str]] = adapter_name
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []  # target_parameters matches ("<module>.<param>")
        self.inject_adapter(self.model, adapter_name, low_cpu_mem_usage=kwargs.get("low_cpu_mem_usage", False))
        # transformers/peft helpers look for the configs on the wrapped model too
        self.model.peft_config = self.peft_config

    # -- basics ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        # alora_offsets=[...] (aLoRA, variants/alora.py; read before adapter_names is popped), adapter_names=[...]
        with _alora.call_context(self, args, kwargs, compute=False), \
                adapter_names_context(self, args, kwargs, self.peft_config):  # mixed batch
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # during __init__, before self.model exists
                raise
            return getattr(self.model, name)

    @property
    def active_adapters(self) -> list[str]:
        a = self.active_adapter
        return [a] if isinstance(a, str) else list(a)

    def _lora_layers(self):
        for name, mod in self.model.named_modules():
            if isinstance(mod, LoraLayer):
                yield name, mod

    def _wrappers(self):
        for name, mod in self.model.named_modules():
            if isinstance(mod, ModulesToSaveWrapper):
                yield name, mod

    def add_adapter(self, adapter_name: str, config) -> None:
        """Add (and inject) another adapter; it stays inactive until set_adapter selects it.

        Defined here so the call never falls through __getattr__ to transformers' own add_adapter.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; existing adapters: {list(self.peft_config)}")
        self.peft_config[adapter_name] = config
        try:
            with requires_grad_kept(self.model, adapter_name):
                self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]  # leave no half-registered adapter behind
            raise

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             svd_driver: Optional[str] = None, density: Optional[float] = None,
                             majority_sign_method: str = "total") -> None:
        """New inactive adapter ``adapter_name`` mixing ``adapters`` with ``weights`` (peft's API and
        results; all of peft's combination types). See fastpeft/tuners/lora/weighted.py."""
        from .weighted import add_weighted_adapter
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type=combination_type,
                             svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                             svd_driver=svd_driver, density=density, majority_sign_method=majority_sign_method)

    # -- injection ---------------------------------------------------------------------------
    def _prepare_adapter_config(self, config, model: nn.Module):
        if config.target_modules is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if isinstance(getattr(model, "config", None), dict):
                model_type = model.config.get("model_type")
            if model_type not in LORA_DEFAULT_TARGET_MODULES:
                if getattr(config, "target_parameters", None):
                    return config  # parameters only (peft allows it)
                raise ValueError(f"Please specify `target_modules` in the LoraConfig: fastpeft has no default "
                                 f"target modules for model_type={model_type!r}. Known model types: "
                                 f"{sorted(LORA_DEFAULT_TARGET_MODULES)}.")
            config.target_modules = set(LORA_DEFAULT_TARGET_MODULES[model_type])
        return config

    def _check_new_adapter_config(self, config, adapter_name: str) -> None:
        unsupported = config.unsupported_fields() if hasattr(config, "unsupported_fields") else []
        if unsupported:
            raise NotImplementedError(refusal_message(adapter_name, unsupported))  # what each is, why not here
        _params.check_same_target_parameters(self.peft_config, adapter_name)
        warn_if_mixed_with_base_changing(list(self.peft_config.values()))  # PiSSA/CorDA/OLoRA + others
        with_bias = [n for n, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
        if len(self.peft_config) > 1 and with_bias:
            raise ValueError(f"LoraModel supports only 1 adapter with bias (found bias != 'none' in "
                             f"{with_bias}). When using multiple adapters, set bias to 'none' for all adapters.")

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Create adapter ``adapter_name`` (config: self.peft_config[adapter_name]) in ``model``.

        low_cpu_mem_usage=True: the new weights go on the meta device for a load to fill (utils/meta_init.py)."""
        if kwargs.pop("low_cpu_mem_usage", False) and not creating_on_meta():
            with adapters_on_meta():
                return self.inject_adapter(model, adapter_name, **kwargs)
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config, adapter_name)
        _tying.check_weight_tying(model, config)  # peft's tied-embedding warnings (trainable_tokens/tying.py)
        config = self._prepare_adapter_config(config, model)

        # modules_to_save are trained in full: wrap them, and never put LoRA inside them
        save_names = list(getattr(config, "modules_to_save", None) or [])
        keys = [k for k, _ in model.named_modules() if k]
        save_keys = [k for k in keys if save_names and matches_modules_to_save(k, save_names)]
        # a match inside an already matched module is covered by the outer wrapper
        save_keys = [k for k in save_keys if not any(k.startswith(o + ".") for o in save_keys)]

        def in_saved(key: str) -> bool:
            return any(key == s or key.startswith(s + ".") for s in save_keys)

        def in_adapter_internals(key: str) -> bool:
            # the inner parts of existing LoRA layers / wrappers are never targets themselves
            parts = key.split(".")
            return any(p.startswith(self.prefix) or p in ("base_layer", "original_module", "modules_to_save")
                       for p in parts)

        if config.target_modules == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            skip = [k for k in keys if in_saved(k) or in_adapter_internals(k)]
            config.target_modules = all_linear_names(model, skip=skip)
        elif isinstance(config.target_modules, (list, tuple)):
            config.target_modules = set(config.target_modules)

        matched: list[str] = []
        for key in keys:
            if in_adapter_internals(key) or in_saved(key):
                continue
            if not target_matches(config, key):
                continue
            parent, target, attr = get_submodules(model, key)
            r = pattern_value(getattr(config, "rank_pattern", None), key, config.r)
            alpha = pattern_value(getattr(config, "alpha_pattern", None), key, config.lora_alpha)
            if isinstance(target, LoraLayer):
                target.update_layer(adapter_name, r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                                    init_lora_weights=config.init_lora_weights, use_rslora=config.use_rslora,
                                    lora_bias=getattr(config, "lora_bias", False),
                                    **_variant_options(config, key))
            else:
                new = create_lora_module(target, adapter_name, config, r, alpha, target_name=key)
                if adapter_name not in self.active_adapters:
                    new.requires_grad_(False)  # a second adapter does not train until it is set active
                # a module whose name matched but is shared elsewhere (tied) is replaced here only
                setattr(parent, attr, new)
            matched.append(key)

        matched_params: list[str] = []
        if getattr(config, "target_parameters", None):  # target_parameters hook (param_wrapper.py)
            matched_params = _params.inject_parameters(
                model, adapter_name, config, lambda k: (pattern_value(getattr(config, "rank_pattern", None), k, config.r),
                                                        pattern_value(getattr(config, "alpha_pattern", None), k,
                                                                      config.lora_alpha)),
                trainable=adapter_name in self.active_adapters)
        if not matched and not matched_params:
            _params.raise_if_only_parameters(config)
            self._raise_no_match(config, keys)
        _params.warn_partial_match(config, matched, matched_params)
        self.targeted_parameter_names.extend(k for k in matched_params if k not in self.targeted_parameter_names)
        self.targeted_module_names.extend(k for k in matched if k not in self.targeted_module_names)

        for pat_name in ("rank_pattern", "alpha_pattern"):
            pats = getattr(config, pat_name, None) or {}
            unused = sorted(set(pats) - pattern_keys_matching(pats, matched))
            if unused:
                warnings.warn(f"The following {pat_name} keys did not match any targeted module and were "
                              f"ignored: {unused}.", RuntimeWarning)

        for key in save_keys:
            parent, target, attr = get_submodules(model, key)
            if isinstance(target, ModulesToSaveWrapper):
                target.update(adapter_name)
            else:
                wrapper = ModulesToSaveWrapper(target, adapter_name)
                if adapter_name not in self.active_adapters:
                    wrapper.set_adapter(self.active_adapter)
                setattr(parent, attr, wrapper)

        self._mark_only_adapters_as_trainable(model)
        # trainable_token_indices: after LoRA and modules_to_save, as peft orders it
        _tokens.inject_trainable_tokens(model, adapter_name, config, activate=adapter_name in self.active_adapters)
        if getattr(config, "inference_mode", False):
            for n, p in model.named_parameters():
                if f".{adapter_name}." in n or n.endswith("." + adapter_name):
                    p.requires_grad_(False)

    def _raise_no_match(self, config, keys: list[str]) -> None:
        existing = keys[:10]
        msg = (f"Target modules {config.target_modules!r} not found in the base model "
               f"{type(self.model).__name__}. Please check the target modules and try again. "
               f"Some module names that exist: {existing}")
        if getattr(config, "exclude_modules", None):
            msg += f". Note: exclude_modules={config.exclude_modules!r}"
        if getattr(config, "layers_to_transform", None) is not None:
            msg += (f". Note: layers_to_transform={config.layers_to_transform!r}, "
                    f"layers_pattern={getattr(config, 'layers_pattern', None)!r}")
        raise ValueError(msg)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freeze everything except adapter weights, biases per ``bias``, and modules_to_save copies."""
        for n, p in model.named_parameters():
            if self.prefix not in n and ".modules_to_save." not in n and ".trainable_tokens_delta." not in n:
                p.requires_grad_(False)
        for adapter in self.active_adapters:
            bias = getattr(self.peft_config.get(adapter), "bias", "none")
            if bias == "none":
                continue
            if bias == "all":
                for n, p in model.named_parameters():
                    # the frozen original of a modules_to_save wrapper stays frozen (as in peft)
                    if "bias" in n and ".original_module." not in n:
                        p.requires_grad_(True)
            elif bias == "lora_only":
                for m in (m for m in model.modules() if isinstance(m, LoraLayer)):
                    b = getattr(m.get_base_layer(), "bias", None)
                    if b is not None:
                        b.requires_grad_(True)
            else:
                raise NotImplementedError(f"Requested bias: {bias}, is not implemented.")

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Upcast the fp16/bf16 weights of ``adapter_name`` to fp32 (what peft does by default)."""
        if not autocast_adapter_dtype:
            return
        for _, m in self._lora_layers():
            for attr in m.adapter_layer_names:
                d = getattr(m, attr)
                if adapter_name not in d:
                    continue
                if isinstance(d, nn.ParameterDict):
                    p = d[adapter_name]
                    if p.dtype in (torch.float16, torch.bfloat16):
                        d[adapter_name] = nn.Parameter(p.data.float(), requires_grad=p.requires_grad)
                else:
                    for p in d[adapter_name].parameters():
                        if p.dtype in (torch.float16, torch.bfloat16):
                            p.data = p.data.float()
        for _, w in _tokens.token_wrappers(self.model):
            w.token_adapter._cast_adapter_dtype(adapter_name)

    # -- adapter management --------------------------------------------------------------------
    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate ``adapter_name`` (one or a list); with inference_mode=True its weights stay frozen (peft)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter(s) {missing} not found; existing adapters: {list(self.peft_config)}")
        # inference_mode is passed only when set, so wrappers whose set_adapter lacks it keep working
        mode = {"inference_mode": True} if inference_mode else {}
        for _, m in self._lora_layers():
            if m.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                m.unmerge()
            m.set_adapter(adapter_name, **mode)
        for _, w in list(self._wrappers()) + list(_tokens.token_wrappers(self.model)):
            w.set_adapter(adapter_name, **mode)
        self.active_adapter = adapter_name

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """Gradients on/off for the given adapters' weights in every layer and modules_to_save copy (peft)."""
        for _, m in list(self._lora_layers()) + list(self._wrappers()):
            m.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def _set_adapter_layers(self, enabled: bool) -> None:
        for _, m in list(self._lora_layers()) + list(self._wrappers()) + list(_tokens.token_wrappers(self.model)):
            m.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        for name in self.active_adapters:
            bias = getattr(self.peft_config.get(name), "bias", "none")
            if bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not "
                              f"produce the same output as the base model would without adaption.")
        self._set_adapter_layers(False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; existing adapters: "
                             f"{list(self.peft_config)}")
        del self.peft_config[adapter_name]
        new_active = None
        for _, m in list(self._lora_layers()) + list(_tokens.token_wrappers(self.model)):
            m.delete_adapter(adapter_name)
            if new_active is None and isinstance(m, BaseTunerLayer):
                new_active = m.active_adapter
        for _, w in self._wrappers():  # a full copy follows the layers' choice of new active adapter (peft)
            w.delete_adapter(adapter_name, new_active_adapters=None if new_active is None else
                             ([new_active] if isinstance(new_active, str) else list(new_active)))
        if new_active is None:
            rest = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
            new_active = rest[0] if len(rest) == 1 else rest
        self.active_adapter = new_active or []
        for _, w in _tokens.token_wrappers(self.model):  # token wrappers follow the model's new active adapter
            if self.active_adapter:
                w.set_adapter(self.active_adapter)

    # -- merging ---------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        for _, m in list(self._lora_layers()) + list(_tokens.token_wrappers(self.model)):
            if getattr(m, "_merged_by_parent", False):
                continue  # merged by the layer that owns it (an MHA's out_proj, mha.py)
            m.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, m in list(self._lora_layers()) + list(_tokens.token_wrappers(self.model)):
            m.unmerge()

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False,
                                     safe_merge: bool = False, adapter_names: Optional[list[str]] = None):
        keys = [k for k, m in self.model.named_modules()
                if isinstance(m, (LoraLayer, ModulesToSaveWrapper, _tokens.TrainableTokensWrapper))]
        if progressbar:
            try:
                from tqdm.auto import tqdm
                keys = tqdm(keys, desc="Unloading " + ("and merging " if merge else "") + "model")
            except ImportError:  # tqdm is optional
                pass
        for key in keys:
            try:
                parent, target, attr = get_submodules(self.model, key)
            except AttributeError:  # a parent was replaced already
                continue
            if isinstance(target, LoraLayer) and hasattr(target, "unload_and_optionally_merge_module"):
                # MHA (out_proj inside), nested ParamWrappers: they unwrap (and merge) themselves
                setattr(parent, attr, target.unload_and_optionally_merge_module(merge, safe_merge, adapter_names))
            elif isinstance(target, LoraLayer):
                if merge:
                    target.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                setattr(parent, attr, target.get_base_layer())
            elif isinstance(target, ModulesToSaveWrapper):
                # the trained copy replaces the wrapper (peft does this for both unload paths)
                active = target.active_adapter
                setattr(parent, attr, target.modules_to_save[active] if active in target.modules_to_save
                        else target.original_module)
            elif isinstance(target, _tokens.TrainableTokensWrapper):
                setattr(parent, attr, target.unload_and_optionally_merge_module(merge, safe_merge, adapter_names))
        # the returned model is a plain model again: without `peft_config`, transformers and peft do not take it
        # for an adapter model (peft removes it too)
        self.model.__dict__.pop("peft_config", None)
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge the (active or given) adapters into the base weights and return the plain model."""
        return self._unload_and_optionally_merge(merge=True, progressbar=progressbar, safe_merge=safe_merge,
                                                 adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every LoRA layer without merging; returns the original model."""
        return self._unload_and_optionally_merge(merge=False)

    def get_peft_config_as_dict(self, inference: bool = False) -> dict:
        out = {}
        for name, cfg in self.peft_config.items():
            d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
            if inference:
                d["inference_mode"] = True
            out[name] = d
        return out
