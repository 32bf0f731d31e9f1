"""Reading one adapter for a bank: a peft-format folder, or a state dict + LoraConfig, checked against the
bank's layers and kept as CPU tensors ready to copy into the pools (:class:`PreparedAdapter`).

Accepted: LoRA adapters (any rank up to the bank's max_rank, rank_pattern / alpha_pattern, rsLoRA) and DoRA
(``use_dora``), on the linear layers the bank adapts. File keys are peft's (``base_model.model.`` + the
module path + ``.lora_A.weight`` / ``.lora_B.weight`` / ``.lora_magnitude_vector``; the prefix may be left
out). Everything else an adapter can carry needs more than a pool slot and is refused with the key named:
lora_B biases (``lora_bias``), trained biases (``bias != "none"``), embedding adapters, modules_to_save.
Dropout is ignored (a bank serves inference).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from torch import Tensor

PREFIX = "base_model.model."
_SUFFIXES = ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_magnitude_vector", "m"),
             (".lora_magnitude_vector.weight", "m"))


@dataclass
class LayerWeights:
    A: Tensor                      # [r, in], CPU, the file's dtype
    B: Tensor                      # [out, r]
    scale: float                   # alpha / r, or alpha / sqrt(r) with rsLoRA (this layer's rank / alpha pattern)
    magnitude: Optional[Tensor]    # [out] (DoRA) or None
    keys: tuple = ()               # the state dict keys it came from (for messages)

    @property
    def r(self) -> int:
        return self.A.shape[0]


@dataclass
class PreparedAdapter:
    name: str
    source: Any                    # the path (str) or state dict object it was read from
    layers: dict = field(default_factory=dict)   # bank layer name -> LayerWeights

    @property
    def max_r(self) -> int:
        return max((w.r for w in self.layers.values()), default=0)

    @property
    def dora(self) -> bool:
        return any(w.magnitude is not None for w in self.layers.values())

    def pages(self, page_rows: int) -> int:
        return max(1, -(-self.max_r // page_rows))


def _config(config, where: str):
    """A fastpeft LoraConfig from a LoraConfig (fastpeft's or peft's) or a dict."""
    from ..tuners.lora.config import LoraConfig

    if isinstance(config, LoraConfig):
        return config
    if isinstance(config, Mapping):
        return LoraConfig.from_dict(dict(config), source=where)
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        raise TypeError(f"{where}: config must be a LoraConfig or a dict; got {type(config).__name__}")
    import warnings

    d = {k: (sorted(v) if isinstance(v, set) else getattr(v, "value", v)) for k, v in to_dict().items()}
    with warnings.catch_warnings():  # a newer peft's extra fields: dropped (checked below where they matter)
        warnings.simplefilter("ignore")
        return LoraConfig.from_dict(d, source=where)


def _check_config(cfg, name: str) -> None:
    peft_type = getattr(cfg.peft_type, "value", cfg.peft_type)
    if peft_type not in (None, "LORA"):
        raise ValueError(f"adapter {name!r}: an adapter bank serves LoRA adapters; its config has peft_type "
                         f"{peft_type!r}")
    refused = list(cfg.unsupported_fields()) if hasattr(cfg, "unsupported_fields") else []
    if getattr(cfg, "lora_bias", False):
        refused.append("lora_bias=True")
    if getattr(cfg, "bias", "none") != "none":
        refused.append(f"bias={cfg.bias!r}")
    if getattr(cfg, "modules_to_save", None):
        refused.append(f"modules_to_save={cfg.modules_to_save!r}")
    if refused:
        raise ValueError(f"adapter {name!r}: its config sets {', '.join(refused)}, which an adapter bank does not "
                         f"serve (a slot holds LoRA / DoRA weights of linear layers only)")


def read_source(source, name: str, config=None) -> tuple:
    """(state dict, fastpeft LoraConfig) of a folder path or a state dict (+ config)."""
    if isinstance(source, (str, os.PathLike)):
        from ..tuners.lora.config import LoraConfig
        from ..utils.save_and_load import load_peft_weights

        path = os.fspath(source)
        cfg = _config(config, path) if config is not None else LoraConfig.from_pretrained(path)
        return load_peft_weights(path), cfg
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError(f"adapter {name!r}: loading a state dict needs its LoraConfig (config=...)")
        return dict(source), _config(config, f"the config of adapter {name!r}")
    raise TypeError(f"adapter {name!r}: expected a folder path or a state dict; got {type(source).__name__}")


def prepare(source, name: str, config, layers: Mapping, max_rank: int, pin: bool = False) -> PreparedAdapter:
    """Read and check adapter ``name`` against the bank's ``layers`` (name -> BankLayer); see the module
    docstring. Errors name the key, the shape found and the shape expected."""
    from ..tuners.tuners_utils import pattern_value

    state, cfg = read_source(source, name, config)
    _check_config(cfg, name)
    parts: dict = {}  # module -> {"A": (key, t), "B": ..., "m": ...}
    for key, t in state.items():
        mkey = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, part in _SUFFIXES:
            if mkey.endswith(suffix):
                module = mkey[:-len(suffix)]
                break
        else:
            raise ValueError(f"adapter {name!r}: key {key!r} {tuple(t.shape)} is not a lora_A / lora_B weight or a "
                             f"DoRA magnitude; an adapter bank serves LoRA / DoRA on linear layers only (no lora_B "
                             f"biases, trained biases, embedding adapters or modules_to_save)")
        if module not in layers:
            known = sorted(layers)
            shown = ", ".join(known[:6]) + (f", ... ({len(known)} in all)" if len(known) > 6 else "")
            raise ValueError(f"adapter {name!r}: key {key!r} targets module {module!r}, which this bank does not "
                             f"adapt (the bank's layers: {shown}); build the bank with that module in "
                             f"target_modules")
        parts.setdefault(module, {})[part] = (key, t)

    use_dora = bool(getattr(cfg, "use_dora", False))
    out = PreparedAdapter(name, source)
    for module, got in parts.items():
        layer = layers[module]
        K, N = layer.in_features, layer.out_features
        if "A" not in got or "B" not in got:
            have, miss = ("A", "B") if "A" in got else ("B", "A")
            key = got[have][0] if have in got else got["m"][0]
            raise ValueError(f"adapter {name!r}: {key!r} has no lora_{miss} partner for module {module!r}")
        (ka, A), (kb, B) = got["A"], got["B"]
        if A.dim() != 2 or A.shape[1] != K or A.shape[0] < 1:
            raise ValueError(f"adapter {name!r}: key {ka!r} has shape {tuple(A.shape)}; module {module!r} "
                             f"({layer.kind}, in_features={K}, out_features={N}) expects lora_A [r, {K}]")
        r = A.shape[0]
        if B.dim() != 2 or tuple(B.shape) != (N, r):
            raise ValueError(f"adapter {name!r}: key {kb!r} has shape {tuple(B.shape)}; module {module!r} "
                             f"(out_features={N}) with lora_A {tuple(A.shape)} expects lora_B [{N}, {r}]")
        if r > max_rank:
            raise ValueError(f"adapter {name!r}: key {ka!r} {tuple(A.shape)} has rank {r}, above the bank's "
                             f"max_rank {max_rank}")
        r_cfg = int(pattern_value(getattr(cfg, "rank_pattern", None), module, cfg.r))
        if r_cfg != r:
            raise ValueError(f"adapter {name!r}: key {ka!r} has shape {tuple(A.shape)} (rank {r}), but its config "
                             f"gives module {module!r} rank {r_cfg} (r / rank_pattern)")
        alpha = float(pattern_value(getattr(cfg, "alpha_pattern", None), module, cfg.lora_alpha))
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        magnitude = None
        if "m" in got:
            km, m = got["m"]
            if not use_dora:
                raise ValueError(f"adapter {name!r}: key {km!r} is a DoRA magnitude but the config has "
                                 f"use_dora=False")
            if tuple(m.shape) != (N,):
                raise ValueError(f"adapter {name!r}: key {km!r} has shape {tuple(m.shape)}; module {module!r} "
                                 f"expects a DoRA magnitude [{N}]")
            magnitude = m
        elif use_dora:
            raise ValueError(f"adapter {name!r}: the config has use_dora=True but module {module!r} has no "
                             f"'{module}.lora_magnitude_vector' key")
        tensors = [A, B] + ([magnitude] if magnitude is not None else [])
        tensors = [t.detach().to("cpu").contiguous() for t in tensors]
        if pin:
            tensors = [t.pin_memory() for t in tensors]
        out.layers[module] = LayerWeights(tensors[0], tensors[1], scale, tensors[2] if magnitude is not None else None,
                                          tuple(k for k, _ in got.values()))
    if not out.layers:
        raise ValueError(f"adapter {name!r}: no lora_A / lora_B weights found (keys: {sorted(state)[:5]})")
    return out
