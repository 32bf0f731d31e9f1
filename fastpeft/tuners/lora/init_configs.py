"""Settings of the data-driven LoRA initialisations (EVA, CorDA, LoRA-GA): plain dataclasses.

Field names and defaults are peft 0.21.2's (they are the keys of the nested dicts in
adapter_config.json). LoraConfig keeps a nested value as given (a dict read from JSON, one of these
objects, or peft's own class), so the init code reads it through ``read_sub_config``, which fills
peft's defaults for missing keys and refuses keys the class does not know.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

__all__ = ["CordaConfig", "EvaConfig", "LoraGAConfig", "read_sub_config"]


@dataclass
class EvaConfig:
    """EVA (Explained Variance Adaptation): lora_A from the top right-singular vectors of each layer's inputs."""

    rho: float = field(default=2.0, metadata={"help": "A layer may get up to round(r * rho) components (>= 1.0)."})
    tau: float = field(default=0.99, metadata={"help": "Cosine similarity between two steps' components at which a "
                                                        "layer counts as converged."})
    use_label_mask: bool = field(default=True, metadata={"help": "Leave out positions whose label equals "
                                                                 "label_mask_value."})
    label_mask_value: int = field(default=-100, metadata={"help": "The ignored label value (with use_label_mask)."})
    whiten: bool = field(default=False, metadata={"help": "Divide each component by sqrt(its singular value)."})
    adjust_scaling_factors: bool = field(default=True, metadata={"help": "Scale alpha with the redistributed rank so "
                                                                         "every layer keeps alpha / r."})

    def __post_init__(self):
        if self.rho < 1.0:
            raise ValueError(f"`rho` must be >= 1.0, got {self.rho}")
        if self.tau < 0.0 or self.tau > 1.0:
            raise ValueError(f"`tau` must be between 0.0 and 1.0, got {self.tau}")


@dataclass
class CordaConfig:
    """CorDA (context-oriented decomposition): adapters from the SVD of W @ C, C = input covariance."""

    cache_file: Optional[str] = field(default=None, metadata={"help": "torch.save file of the cropped U, S, V per "
                                                                      "layer; reused when it exists."})
    covariance_file: Optional[str] = field(default=None, metadata={"help": "torch.save file of the per-layer "
                                                                           "covariance; reused when it exists."})
    corda_method: Literal["ipm", "kpm"] = field(default="ipm", metadata={"help": "'ipm': the largest components; "
                                                                                 "'kpm': the smallest."})
    verbose: bool = field(default=False, metadata={"help": "Progress bar while decomposing."})
    use_float16_for_covariance: bool = field(default=False, metadata={"help": "Accumulate covariance in the "
                                                                              "inputs' dtype instead of fp32."})
    prune_temporary_fields: bool = field(default=True, metadata={"help": "Delete the covariance and helper "
                                                                         "attributes from the modules afterwards."})


@dataclass
class LoraGAConfig:
    """LoRA-GA (gradient approximation): adapters from the SVD of an estimated full fine-tuning gradient."""

    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = field(
        default="ArB2r", metadata={"help": "Which singular vectors go to A and which to B."})
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = field(
        default="stable", metadata={"help": "How the initial adapters are scaled."})
    stable_gamma: int = field(default=16, metadata={"help": "gamma of the 'stable' scale."})


def read_sub_config(value: Any, cls: type, owner: str) -> Any:
    """``value`` (None, a dict, an instance of ``cls`` or any object with the same fields) as a ``cls``.

    ``owner`` names the LoraConfig field in errors."""
    if value is None or isinstance(value, cls):
        return value
    names = {f.name for f in dataclasses.fields(cls)}
    if isinstance(value, dict):
        data = dict(value)
    elif dataclasses.is_dataclass(value):
        data = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    else:
        data = {n: getattr(value, n) for n in names if hasattr(value, n)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TypeError(f"`{owner}` has keys {unknown} that {cls.__name__} does not know; expected some of "
                        f"{sorted(names)}")
    return cls(**data)
