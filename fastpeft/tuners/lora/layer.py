"""LoraLayer: the state every LoRA-wrapped module shares, with peft's attribute names.

The attribute names (base_layer, lora_A, lora_B, lora_embedding_A/B, lora_dropout, r, lora_alpha,
scaling, merged_adapters) are part of the file format: they become the state_dict keys, so they
must equal peft's. Subclasses (linear.py, conv1d.py, embedding.py, quant_linear.py) create the adapter
weights, say how they are laid out (``_adapter_weights``, ``_to_weight_layout``) and run forward; what
each adapter computes, in forward and when merged, is its variant's (``lora_variant[name]``, see
variants/base.py). All math goes through fastpeft.ops.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional, Union

import torch
from torch import nn

from ... import ops
from ...utils.meta_init import creating_on_meta
from ...utils.warning import PeftWarning
from ..mixed_batch import layer_mixed_batch
from ..tuners_utils import BaseTunerLayer, adapters_to_merge
from .variants import LoraVariant, variant_for, variant_options
from .loftq import loftq_layer_init
from .inits import freeze_adapter_weight, init_adapter


class LoraLayer(BaseTunerLayer):
    _is_embedding = False  # an nn.Embedding base (its DoRA magnitude is peft's DoraEmbeddingLayer)

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "lora_bias", "use_rslora", "use_dora",
                         "lora_variant")

    # peft's reprs read "lora.Linear(...)": every LoRA layer class prints with that prefix, under the class name
    # peft uses for it (``_peft_layer_name`` where fastpeft's class name differs, e.g. Conv1D -> "Linear").
    # nn.Module comes first in the layer classes' MRO, so the repr is installed on each subclass.
    _peft_layer_name: Optional[str] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "__repr__" not in cls.__dict__:
            cls.__repr__ = LoraLayer._lora_repr

    def _lora_repr(self) -> str:
        text = nn.Module.__repr__(self)
        own = type(self).__name__
        return "lora." + (self._peft_layer_name or own) + text[len(own):]

    def _init_lora_state(self, base_layer: nn.Module) -> None:
        self._init_tuner_state()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.lora_embedding_A = nn.ParameterDict({})
        self.lora_embedding_B = nn.ParameterDict({})
        self.lora_bias: dict[str, bool] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters' magnitudes (variants/dora.py)
        self.lora_variant: dict[str, LoraVariant] = {}  # per adapter: what it computes (variants/)

    # -- hooks for subclasses --------------------------------------------------------------
    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        raise NotImplementedError

    def _init_adapter_weights(self, adapter_name: str, init_lora_weights) -> None:
        raise NotImplementedError

    def _adapter_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of ``adapter_name``: the tensors the variants compute with."""
        raise NotImplementedError

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """A [out, in] delta in the base weight's own layout (e.g. transposed for Conv1D)."""
        raise NotImplementedError

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change ``adapter_name`` makes to the base weight, in the base weight's layout."""
        return self._to_weight_layout(self.lora_variant[adapter_name].delta_weight(self, adapter_name))

    # -- adapter management ----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: Union[bool, str] = True, use_rslora: bool = False,
                     lora_bias: bool = False, use_dora: bool = False, ephemeral_gpu_offload: bool = False,
                     **unused) -> None:
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r!r} "
                             f"(adapter {adapter_name!r} on {type(self.get_base_layer()).__name__})")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.lora_bias[adapter_name] = bool(lora_bias)
        self.use_rslora[adapter_name] = bool(use_rslora)
        if use_dora and lora_bias:
            raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        self.use_dora[adapter_name] = bool(use_dora)
        self.lora_variant[adapter_name] = self._variant_for(use_dora=use_dora, layer=self, **variant_options(unused))
        if lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type "
                          f"{type(self.get_base_layer()).__name__} has no bias. This means that merging LoRA weights "
                          f"won't be possible.", PeftWarning)
        # low_cpu_mem_usage (utils/meta_init.py): weights a load will overwrite get no storage and no init
        on_meta = creating_on_meta()
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            self._create_adapter_weights(adapter_name, r, bool(lora_bias))
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        if not on_meta and init_lora_weights == "loftq":  # LoftQ: loftq.py (base weight <- its quantization)
            loftq_layer_init(self, adapter_name, unused.get("loftq_config"))
        elif not on_meta:  # weight-derived inits (PiSSA, OLoRA, CorDA, ...) live in inits.py
            init_adapter(self, adapter_name, init_lora_weights, dict(unused, use_dora=use_dora))
        elif init_lora_weights == "mica":  # loaded later, but B stays frozen as in peft
            freeze_adapter_weight(self, adapter_name, "lora_embedding_B" if self._is_embedding else "lora_B")
        self._move_adapter_to_base(adapter_name)
        self.lora_variant[adapter_name].init_adapter(self, adapter_name)  # e.g. QA-LoRA's pooled lora_A
        if use_dora and on_meta:
            self.lora_variant[adapter_name].init_magnitude_on_meta(self, adapter_name)
        elif use_dora:  # m = ||W + s B A|| for the adapter as initialised (peft's init)
            self.lora_variant[adapter_name].init_magnitude(self, adapter_name, ephemeral_gpu_offload)
        # new adapters are trainable only when active (peft behaves the same way)
        self.set_adapter(self.active_adapters)

    def _variant_for(self, **options) -> LoraVariant:
        """The variant object of a new adapter (layer types with their own variants override it: conv.py)."""
        return variant_for(**options)

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        """Put the adapter on the base weight's device, and in its dtype when that is a float type.

        (PeftModel later upcasts 16-bit adapters to fp32 when autocast_adapter_dtype is on.)
        """
        base = self.get_base_layer()
        w = getattr(base, "weight", None)
        if w is None:
            return
        # fp8 codes (an fp8 QuantLinear's weight) are storage, not a compute dtype: adapters stay as created
        # (fp32), which is where peft's autocast_adapter_dtype puts adapters it had cast to fp8
        dtype = w.dtype if w.dtype.is_floating_point and w.dtype.itemsize > 1 else None
        device = torch.device("meta") if creating_on_meta() else w.device  # meta weights stay without storage
        for attr in self.adapter_layer_names:
            d = getattr(self, attr)
            if adapter_name not in d:
                continue
            if isinstance(d, nn.ParameterDict):
                p = d[adapter_name]
                d[adapter_name] = nn.Parameter(p.data.to(device=device, dtype=dtype or p.dtype),
                                               requires_grad=p.requires_grad)
            else:
                d[adapter_name].to(device=device, dtype=dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        # the mixed-batch pool keeps references to every batch adapter's weights: drop it with the adapter
        object.__setattr__(self, "_mixed_pool_cache", None)

    def _has_adapter(self, adapter_name: str) -> bool:
        # plain dict lookups first (a mixed batch asks for every adapter on every forward)
        return adapter_name in self._modules["lora_A"]._modules or adapter_name in self.lora_embedding_A

    def _dropout_p(self, adapter_name: str) -> float:
        mod = self._modules["lora_dropout"]._modules[adapter_name]  # (self.lora_dropout[name], in dict lookups)
        return float(mod.p) if isinstance(mod, nn.Dropout) else 0.0

    def _unmerged_active(self) -> list[str]:
        return [a for a in self.active_adapters if self._has_adapter(a)]

    # -- merge / unmerge -------------------------------------------------------------------
    def _lora_bias_delta(self, adapter_name: str) -> Optional[torch.Tensor]:
        if not self.lora_bias.get(adapter_name) or adapter_name not in self.lora_B:
            return None
        return self.lora_B[adapter_name].bias * self.scaling[adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the adapters' deltas into the base weight (and bias, for lora_bias adapters).

        safe_merge: compute on a copy and refuse (ValueError) if the result holds NaN/inf.
        """
        names = adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in names:
            if not self._has_adapter(name):
                continue
            with torch.no_grad():
                new_w = self.lora_variant[name].merged_weight(self, name, base.weight.data)
                bias_delta = self._lora_bias_delta(name)
                if bias_delta is not None and base.bias is None:
                    raise ValueError(f"Cannot merge adapter {name!r}: it has a LoRA bias (lora_bias=True) "
                                     f"but the base layer {type(base).__name__} has no bias to merge into.")
                new_b = base.bias.data + bias_delta.to(base.bias.dtype) if bias_delta is not None else None
                if safe_merge and (not torch.isfinite(new_w).all()
                                   or (new_b is not None and not torch.isfinite(new_b).all())):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to "
                                     f"be broken")
                # Unsafe merges write in place, as before (a weight tied elsewhere sees the merge too);
                # safe merges swap in the checked copy.
                if safe_merge:
                    base.weight.data = new_w
                    if new_b is not None:
                        base.bias.data = new_b
                else:
                    base.weight.data.copy_(new_w)
                    if new_b is not None:
                        base.bias.data.copy_(new_b)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter again, last merged first."""
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if not self._has_adapter(name):
                continue
            with torch.no_grad():
                base.weight.data.copy_(self.lora_variant[name].unmerged_weight(self, name, base.weight.data))
                bias_delta = self._lora_bias_delta(name)
                if bias_delta is not None:
                    base.bias.data -= bias_delta.to(base.bias.dtype)

    def _forward_route(self, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple:
        """Common start of forward: (output, None) when the answer needs none of the layer's own adapter
        math (a mixed batch, adapter_names: its _mixed_forward; adapters disabled or merged: the base layer),
        else (None, the adapters to apply, in order)."""
        batch = layer_mixed_batch(self, kwargs, x)  # takes adapter_names out of kwargs
        if args or kwargs:
            # the fused op has no place for them; dropping them silently would change results
            raise TypeError(f"{type(self).__name__}.forward takes only the input tensor; got extra positional "
                            f"args {len(args)} and keyword args {sorted(kwargs or {})}")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x), None
        if batch is not None:
            return self._mixed_forward(x, batch), None
        if self.merged:
            return self.base_layer(x), None
        names = self._unmerged_active()
        return (self.base_layer(x), None) if not names else (None, names)

    # -- mixed batches (tuners/mixed_batch.py) ------------------------------------------------------
    def _mixed_pool(self, names: tuple, in_features: int, out_features: int) -> ops.AdapterPool:
        """The batch's adapters of this layer as one AdapterPool (A_cat [sum r, in], B_cat [out, sum r]; a
        rank-0 slot where this layer does not have an adapter: its rows get the base output, as in peft).

        Kept on the layer for the next forward with the same names and unchanged weights (decode steps):
        a mixed-batch layer then costs one op call whatever the number of adapters."""
        # the key: each adapter's A and B (identity, in-place version, storage: `.data =` and `.to()` swap it)
        # and scale, so a changed weight rebuilds the pool and an unchanged decode step costs these lookups.
        # It reads the stored tensors, not op_weights: a variant's expanded copy (QA-LoRA, BD-LoRA) is new on
        # every call, and a freed copy's id and address can come back (version 0) for changed weights.
        # A write through `.data` (p.data.mul_(2)) goes around the version counter and is NOT seen: write to the
        # parameter itself under torch.no_grad() (optimizers, load_state_dict and hotswap_adapter all do).
        # (the layer's lora_A / lora_B submodules' parameter dicts read directly: the same Parameter objects as
        # _adapter_weights gives, at a fraction of nn.Module.__getattr__'s cost, paid per adapter per decode step)
        key = [names]
        mods_A, mods_B, scaling = self._modules["lora_A"]._modules, self._modules["lora_B"]._modules, self.scaling
        for n in names:
            mod_A = mods_A.get(n)
            if mod_A is not None:
                A, B = mod_A._parameters["weight"], mods_B[n]._parameters["weight"]
                key += (id(A), A._version, A.data_ptr(), id(B), B._version, B.data_ptr(), scaling[n])
            else:
                key.append(None)
        cached = self.__dict__.get("_mixed_pool_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        # (QA-LoRA's A expanded to [r, in], BD-LoRA's block-diagonal factor to its dense form)
        weights = [self.lora_variant[n].op_weights(self, n) if self._has_adapter(n) else None for n in names]
        like = next((w[0] for w in weights if w is not None), None)
        dev = self.get_base_layer().weight.device if like is None else like.device
        dt = torch.float32 if like is None else like.dtype
        As = [w[0].detach() if w is not None else torch.empty(0, in_features, device=dev, dtype=dt) for w in weights]
        Bs = [w[1].detach() if w is not None else torch.empty(out_features, 0, device=dev, dtype=dt) for w in weights]
        ranks = [a.shape[0] for a in As]
        starts = [sum(ranks[:j]) for j in range(len(ranks))]
        pool = ops.AdapterPool(torch.cat(As).to(dt), torch.cat(Bs, dim=1).to(dt),
                               torch.tensor(starts, device=dev), torch.tensor(ranks, device=dev),
                               torch.tensor([float(self.scaling[n]) if w is not None else 0.0
                                             for w, n in zip(weights, names)], device=dev),
                               max(ranks, default=0))
        object.__setattr__(self, "_mixed_pool_cache", (key, pool))
        return pool
