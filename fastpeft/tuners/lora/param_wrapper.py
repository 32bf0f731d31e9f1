"""LoRA on bare nn.Parameters (LoraConfig.target_parameters), with peft's layout and naming.

Some weights are not the weight of a Linear: MoE experts keep all experts in one 3-D parameter that their
forward multiplies with directly (transformers' Llama4TextExperts / GptOssExperts gate_up_proj [E, in, out],
Qwen3MoeExperts / MixtralExperts [E, out, in], via bmm or grouped_mm). ``target_parameters`` names such
parameters ("feed_forward.experts.gate_up_proj": a parameter name, or a name ending with "." + entry), and
the module that owns the parameter is wrapped by a :class:`ParamWrapper`. Several targeted parameters of one
module nest wrappers, first registered parameter innermost, so the state_dict keys are peft's, e.g.

    experts.lora_A.<adapter>.weight             (the outer wrapper: the module's 2nd targeted parameter)
    experts.base_layer.lora_A.<adapter>.weight  (the inner wrapper: its 1st)
    experts.base_layer.base_layer.gate_up_proj  (the parameter itself)

Adapter shapes (peft's, so files load both ways), for a parameter of shape [d0, d1] or [E, d1, d2]:
- 2-D: lora_A [r, d1], lora_B [d0, r]; the weight gets s * B A (as a Linear of weight [d0, d1]).
- 3-D: lora_A [E * r, in], lora_B [out, E * r] with in, out = d2, d1 (or d1, d2 when the experts module says
  ``is_transposed``, as transformers' GptOss experts do). Expert e owns A's rows e*r .. e*r + r - 1 and B's
  columns j*E + e (j < r): B's columns interleave the experts. Expert e's weight gets s * B_e A_e, or its
  transpose (B_e A_e)^T for an ``is_transposed`` module.

The forward runs the wrapped module on its parameter with the adapters added (fastpeft.ops.lora_weight: one
baddbmm for the whole expert stack, differentiable in A and B), substituted for the parameter for the length
of the call by torch.func.functional_call: the module's own code (bmm, grouped_mm, per-expert loops) is what
runs, and reads the adapted tensor as often as it likes without recomputing it.

What peft refuses, refused here with its words: lora_dropout != 0 (the adapter is a weight change, with no
input term to drop), fan_in_fan_out, lora_bias, use_dora; 1-D parameters; parameters of the top-level module;
a parameter of a module that target_modules already adapted; mixed adapter batches (adapter_names); adapters
that target different parameter sets on one model (LoraModel checks that). Not done: a parameter that is
already parametrized (torch.nn.utils.parametrize) is not matched, and fp8 parameters are refused by the op.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import nn

from ... import ops
from ..mixed_batch import current as current_mixed_batch
from ..tuners_utils import BaseTunerLayer, adapters_to_merge
from .layer import LoraLayer
from .linear import init_lora_pair

_NAME = "lora.ParamWrapper"


class ParamWrapper(nn.Module, LoraLayer):
    """LoRA on one nn.Parameter (``parameter_name``) of the wrapped module (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, r: int = 8,
                 lora_alpha: float = 8, lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 init_lora_weights: Union[bool, str] = True, use_rslora: bool = False, lora_bias: bool = False,
                 use_dora: bool = False, **kwargs) -> None:
        # peft's checks, in its order and words
        if lora_dropout:
            raise ValueError(f"{_NAME} does not work with lora_dropout != 0.")
        if fan_in_fan_out:
            raise ValueError(f"{_NAME} does not work with fan_in_fan_out.")
        if lora_bias:
            raise ValueError(f"{_NAME} does not work with lora_bias=True.")
        if use_dora:
            raise ValueError(f"{_NAME} does not work with use_dora=True.")
        super().__init__()
        self._init_lora_state(base_layer)
        self.parameter_name = parameter_name
        self.fan_in_fan_out = False
        shape = tuple(self.get_param().shape)
        if len(shape) == 3:
            self.num_experts = shape[0]
            # expert weights [E, out, in] unless the module stores them [E, in, out] (is_transposed)
            self._transposed = bool(getattr(self.get_base_layer(), "is_transposed", False))
            self.in_features, self.out_features = (shape[1], shape[2]) if self._transposed else (shape[2], shape[1])
        elif len(shape) == 2:
            self.num_experts, self._transposed = 1, False
            self.in_features, self.out_features = shape[1], shape[0]
        else:
            raise ValueError(f"{_NAME} was initialized with {len(shape)} dimensional Parameter, but only 2d and 3d "
                             f"are supported.")
        self._param_ndim = len(shape)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, init_lora_weights=init_lora_weights,
                          use_rslora=use_rslora, **kwargs)

    def get_param(self) -> torch.Tensor:
        """The targeted parameter itself (without any adapter)."""
        return getattr(self.get_base_layer(), self.parameter_name)

    def _param_path(self) -> str:
        """Dotted path of the parameter from ``self.base_layer`` (through inner wrappers of the same module)."""
        parts, m = [], self.base_layer
        while isinstance(m, BaseTunerLayer) and hasattr(m, "base_layer"):
            parts.append("base_layer")
            m = m.base_layer
        return ".".join(parts + [self.parameter_name])

    # -- what LoraLayer asks of a layer type ------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: Union[bool, str] = True, use_rslora: bool = False, lora_bias: bool = False,
                     use_dora: bool = False, **kwargs) -> None:
        if lora_dropout:
            raise ValueError(f"{_NAME} does not work with lora_dropout != 0.")
        if use_dora:
            raise ValueError(f"{_NAME} does not work with LoRA variants like DoRA.")
        if lora_bias:
            raise ValueError(f"{_NAME} does not work with lora_bias=True.")
        LoraLayer.update_layer(self, adapter_name, r, lora_alpha=lora_alpha, lora_dropout=0.0,
                               init_lora_weights=init_lora_weights, use_rslora=use_rslora, **kwargs)

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        # nn.Linear containers as in peft (keys ...lora_A.<name>.weight); one rank-r block per expert
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    def _init_adapter_weights(self, adapter_name: str, init_lora_weights) -> None:
        init_lora_pair(self.lora_A[adapter_name], self.lora_B[adapter_name], self.r[adapter_name], init_lora_weights)

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        p = self.get_param()
        dtype = p.dtype if p.dtype.is_floating_point else None
        for d in (self.lora_A, self.lora_B):
            d[adapter_name].to(device=p.device, dtype=dtype)

    def _adapter_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as lora_weight takes them: [r, in] / [out, r], or per expert [E, r, in] / [E, out, r] (views)."""
        A, B = self._adapter_weights(adapter_name)
        if self._param_ndim == 2:
            return A, B
        E = self.num_experts
        return A.reshape(E, -1, A.shape[-1]), B.reshape(B.shape[0], -1, E).permute(2, 0, 1)

    def _adapt(self, weight: torch.Tensor, adapter_name: str, sign: float = 1.0) -> torch.Tensor:
        A, B = self._factors(adapter_name)
        return ops.lora_weight(weight, A, B, sign * self.scaling[adapter_name], transpose=self._transposed)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change the adapter makes to the parameter, in the parameter's shape and dtype."""
        return self._adapt(torch.zeros_like(self.get_param()), adapter_name)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if kwargs.pop("adapter_names", None) or current_mixed_batch() is not None:
            raise ValueError(f"{_NAME} does not support mixed adapter batches yet.")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        names = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not names:
            return self.base_layer(*args, **kwargs)
        weight = self.get_param()
        for name in names:
            weight = self._adapt(weight, name)
        return torch.func.functional_call(self.base_layer, {self._param_path(): weight}, args, kwargs,
                                          tie_weights=False, strict=False)

    # -- merge / unmerge --------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        for name in adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            param = self.get_param()
            with torch.no_grad():
                new = self._adapt(param.detach(), name)
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                param.copy_(new)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        param = self.get_param()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                with torch.no_grad():
                    param.copy_(self._adapt(param.detach(), name, sign=-1.0))

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list]) -> nn.Module:
        """The wrapped module without any wrapper; nested wrappers (other parameters) are merged too."""
        if merge:
            m = self
            while isinstance(m, ParamWrapper):
                m.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                m = m.base_layer
        return self.get_base_layer()

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}"


# ------------------------------------------------------------------------------------------ injection
def _strip_wrappers(name: str) -> str:
    """The user's name of a module: ".base_layer" segments of wrappers taken out."""
    return ".".join(p for p in name.split(".") if p != "base_layer") if name else name


def _is_adapter_internal(name: str) -> bool:
    return any(p.startswith("lora_") for p in name.split("."))


def check_same_target_parameters(peft_config: dict, adapter_name: str) -> None:
    """peft's rule: every adapter with target_parameters on one model targets the same set (the nesting of the
    wrappers, hence the state_dict keys, depends on the set)."""
    mine = getattr(peft_config[adapter_name], "target_parameters", None)
    if not mine:
        return
    for other, cfg in peft_config.items():
        theirs = getattr(cfg, "target_parameters", None)
        if other != adapter_name and theirs and set(theirs) != set(mine):
            raise ValueError(f"When using multiple adapters with `target_parameters`, all adapters must target the "
                             f"same set of parameters, but got {sorted(set(mine))} for the new adapter and "
                             f"{sorted(set(theirs))} for adapter '{other}'.")


def inject_parameters(model: nn.Module, adapter_name: str, config, r_alpha, trainable: bool = True) -> list:
    """Wrap (or add ``adapter_name`` to the wrappers of) every parameter ``config.target_parameters`` names.

    r_alpha(key) -> (r, alpha) for the parameter key (rank/alpha patterns); trainable: False for an adapter
    that is not active (its new weights start frozen, as LoraModel does for modules). Returns the matched parameter
    names ("<module>.<param>", the user's module names), in peft's order: module order, then the module's
    parameter registration order (which is also the nesting order, first innermost).
    """
    targets = sorted(set(config.target_parameters))
    matched = []
    for module_name, module in list(model.named_modules()):
        if _is_adapter_internal(module_name):
            continue
        plain_name = _strip_wrappers(module_name)
        for param_name, _ in list(module.named_parameters(recurse=False)):
            key = f"{plain_name}.{param_name}"
            if key not in targets and not any(key.endswith("." + t) for t in targets):
                continue
            _wrap_parameter(model, plain_name, param_name, adapter_name, config, *r_alpha(key), trainable=trainable)
            matched.append(key)
    return matched


def _wrap_parameter(model: nn.Module, module_name: str, param_name: str, adapter_name: str, config, r: int,
                    alpha: float, trainable: bool) -> None:
    if module_name == "":
        raise ValueError(f"Targeting an nn.Parameter on the top-level module is not supported (parameter "
                         f"'{param_name}'). ")
    parent_name, _, attr = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    current = getattr(parent, attr)
    if isinstance(current, LoraLayer) and not isinstance(current, ParamWrapper):
        raise ValueError(f"Trying to wrap an `nn.Parameter` of layer '{module_name}' of type {type(current).__name__}, "
                         f"which is not a valid target. Make sure that this layer is not also targeted with "
                         f"`target_modules`. For some models, PEFT will do this automatically, try setting "
                         f"`target_modules=[]` to prevent it.")
    existing = current
    while isinstance(existing, ParamWrapper) and existing.parameter_name != param_name:
        existing = existing.base_layer
    options = dict(lora_dropout=config.lora_dropout, init_lora_weights=config.init_lora_weights,
                   use_rslora=config.use_rslora, lora_bias=getattr(config, "lora_bias", False),
                   use_dora=bool(getattr(config, "use_dora", False)),
                   use_bdlora=getattr(config, "use_bdlora", None))  # refused on parameters, as peft does
    if isinstance(existing, ParamWrapper):  # a wrapper of an earlier adapter: add this adapter to it
        if adapter_name in existing.lora_A:
            raise ValueError(f"Trying to target the same nn.Parameter twice ('{module_name}.{param_name}', adapter "
                             f"{adapter_name!r}).")
        existing.update_layer(adapter_name, r, lora_alpha=alpha, **options)
        return
    new = ParamWrapper(current, adapter_name, parameter_name=param_name, r=r, lora_alpha=alpha,
                       fan_in_fan_out=config.fan_in_fan_out, **options)
    if not trainable:
        for p in new._adapter_params(adapter_name):
            p.requires_grad_(False)
    setattr(parent, attr, new)


def raise_if_only_parameters(config) -> None:
    """Nothing matched and no target_modules were given: peft's error naming both fields."""
    if not config.target_modules:
        raise ValueError("No `target_modules` passed but also no `target_parameters` found. Please check the values "
                         "for these arguments.")


def warn_partial_match(config, matched_modules: list, matched_params: list) -> None:
    """Something matched, but one of the two kinds of targets matched nothing: peft's warnings."""
    if not (matched_modules or matched_params):
        return
    if config.target_modules and not matched_modules:
        warnings.warn(f"target_modules={config.target_modules} were set but no module was matched.", RuntimeWarning)
    elif getattr(config, "target_parameters", None) and not matched_params:
        warnings.warn(f"target_parameters={config.target_parameters} were set but no parameter was matched.",
                      RuntimeWarning)
