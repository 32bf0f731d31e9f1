"""LoraConfig: the same fields, defaults and construction-time checks as peft 0.21.2's LoraConfig.

Field names and defaults must match peft exactly, since they are the keys of adapter_config.json.
Nested configs of methods fastpeft does not implement (LoftQ, EVA, CorDA, ...) are kept as given
(dicts or objects) and written back unchanged, so a file passes through fastpeft losslessly;
`unsupported_fields()` lists which of them are switched on so LoraModel can refuse them clearly.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from fastpeft.config import PeftConfig, register_peft_config
from fastpeft.utils.peft_types import PeftType

from .init_configs import CordaConfig, EvaConfig, LoraGAConfig  # noqa: F401  (peft's import path)
from .loftq import LoftQConfig  # noqa: F401  (peft's import path: peft.tuners.lora.config.LoftQConfig)
from .variants.bdlora import BdLoraConfig, as_bdlora_config  # peft.tuners.lora.config.BdLoraConfig

__all__ = ["LoraConfig", "LoraRuntimeConfig", "SUPPORTED_INIT_LORA_WEIGHTS", "UNSUPPORTED_LORA_FIELDS"]


@dataclass
class LoraRuntimeConfig:
    """Options that only matter while the program runs; never saved to adapter_config.json."""

    ephemeral_gpu_offload: bool = field(
        default=False,
        metadata={"help": "Move CPU-offloaded weights to the GPU only for the duration of a computation."},
    )


# Values of init_lora_weights fastpeft implements: True = peft's default (A Kaiming-uniform, B zero),
# False = random B too (for tests), "gaussian" = A normal with std 1/r; the weight- and data-driven ones
# (tuners/lora/inits.py). "pissa_niter_<n>" (any n) is accepted through its "pissa" prefix.
SUPPORTED_INIT_LORA_WEIGHTS = (True, False, "gaussian", "pissa", "olora", "corda", "lora_ga", "eva", "orthogonal",
                               "mica", "loftq")  # loftq: tuners/lora/loftq.py

# Fields whose non-default value turns on a feature fastpeft does not implement yet.
UNSUPPORTED_LORA_FIELDS = (
    "megatron_config",
    "velora_config",
    "monteclora_config",
    "layer_replication",
    "arrow_config",
    "kasa_config",
)
# loftq_config: tuners/lora/loftq.py; alora_invocation_tokens, use_qalora, use_bdlora: tuners/lora/variants (why the
# variants above are refused: variants/refused.py)
# trainable_token_indices and ensure_weight_tying: fastpeft/tuners/trainable_tokens (ensure_weight_tying's
# modules_to_save / LoRA-target tying is refused there, by name)

# Nested sub-configs: None, a dict (as read from JSON) or a config object (e.g. one of peft's).
_SUBCONFIG_FIELDS = (
    "monteclora_config",
    "velora_config",
    "kasa_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "arrow_config",
    "use_bdlora",
)


def _is_config_object(value: Any) -> bool:
    return isinstance(value, dict) or (dataclasses.is_dataclass(value) and not isinstance(value, type)) or callable(
        getattr(value, "to_dict", None)
    )


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter (peft 0.21.2 compatible; see the module docstring)."""

    r: int = field(default=8, metadata={"help": "Rank of the update B @ A, i.e. the inner dimension of A and B."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Modules to adapt: a list of names (a module matches if its full name equals one or ends "
            "with '.' + one), a regex string matched against the full name, 'all-linear' for every linear "
            "layer except the output head, or None for the architecture's default choice."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules never to adapt, in the same list-or-regex form as target_modules."},
    )
    lora_alpha: int = field(
        default=8, metadata={"help": "Numerator of the update scale: alpha / r (alpha / sqrt(r) with rsLoRA)."}
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout probability applied to the input of the LoRA branch only."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True when the base layer stores its weight as [in, out] (e.g. GPT-2's Conv1D)."},
    )
    bias: Literal["none", "all", "lora_only"] = field(
        default="none",
        metadata={
            "help": "Which biases train: 'none'; 'all' (every bias in the model); 'lora_only' (biases of adapted "
            "layers). Note that with 'all'/'lora_only' disabling the adapter no longer restores the base model."
        },
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules (besides the adapters) trained in full and saved with the adapter, e.g. a new head."},
    )
    init_lora_weights: Union[bool, str] = field(
        default=True,
        metadata={
            "help": "How A and B start: True (A Kaiming-uniform, B zero: the adapter starts as a no-op), False "
            "(both random: for tests), 'gaussian', or a data/weight-driven scheme ('eva', 'olora', 'pissa', "
            "'pissa_niter_<n>', 'corda', 'loftq', 'orthogonal', 'mica')."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Only adapt the layers with these indices (an int or a list) in the layer stack."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Name(s) of the module list holding the layer stack (e.g. 'layers', 'h'), used to find "
            "layer indices for layers_to_transform."
        },
    )
    rank_pattern: Optional[dict] = field(
        default_factory=dict,
        metadata={"help": "Per-module rank overrides: {module name or regex: rank}."},
    )
    alpha_pattern: Optional[dict] = field(
        default_factory=dict,
        metadata={"help": "Per-module alpha overrides: {module name or regex: alpha}."},
    )
    megatron_config: Optional[dict] = field(
        default=None,
        metadata={"help": "Megatron TransformerConfig arguments for adapting Megatron parallel linear layers."},
    )
    megatron_core: Optional[str] = field(
        default="megatron.core", metadata={"help": "Import name of the Megatron core package to use."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={
            "help": "Token ids whose embedding rows train in full (a list for the input embedding, or "
            "{embedding module name: ids})."
        },
    )
    loftq_config: Union[dict, Any] = field(
        default_factory=dict,
        metadata={"help": "LoftQ quantisation-aware initialisation settings; used only with init_lora_weights='loftq'."},
    )
    eva_config: Optional[Any] = field(
        default=None, metadata={"help": "EVA (activation-SVD) initialisation settings, for init_lora_weights='eva'."}
    )
    corda_config: Optional[Any] = field(
        default=None, metadata={"help": "CorDA (context-oriented decomposition) settings, for init_lora_weights='corda'."}
    )
    lora_ga_config: Optional[Any] = field(
        default=None, metadata={"help": "LoRA-GA (gradient-aligned) initialisation settings."}
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA: split the adapted weight into a trained magnitude vector and a LoRA-updated direction."},
    )
    velora_config: Optional[Any] = field(
        default=None, metadata={"help": "VeLoRA (compressed activation memory) settings."}
    )
    alora_invocation_tokens: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Activated LoRA: the token sequence after which the adapter switches on (causal LMs)."},
    )
    use_qalora: bool = field(
        default=False, metadata={"help": "QA-LoRA: group-pool the input so the adapter merges into a quantised layer."}
    )
    qalora_group_size: int = field(
        default=16, metadata={"help": "Pooling group size along the input features for QA-LoRA."}
    )
    monteclora_config: Optional[Any] = field(
        default=None, metadata={"help": "MonteCLoRA (Monte Carlo sampled LoRA) settings."}
    )
    layer_replication: Optional[list[tuple[int, int]]] = field(
        default=None,
        metadata={
            "help": "Grow the layer stack by repeating base layers: [start, end) ranges stacked in order, each "
            "copy sharing base weights but getting its own adapter."
        },
    )
    runtime_config: LoraRuntimeConfig = field(
        default_factory=LoraRuntimeConfig, metadata={"help": "Run-time-only options; not saved."}
    )
    lora_bias: bool = field(
        default=False, metadata={"help": "Give lora_B a trainable bias (useful for extracted adapters)."}
    )
    target_parameters: Optional[list[str]] = field(
        default=None,
        metadata={"help": "nn.Parameter names to adapt directly (e.g. MoE expert weights that are not Linear modules)."},
    )
    use_bdlora: Optional[Any] = field(
        default=None, metadata={"help": "Block-diagonal LoRA settings (for tensor-parallel serving)."}
    )
    arrow_config: Optional[Any] = field(
        default=None, metadata={"help": "Arrow settings: routing between a library of LoRA experts."}
    )
    kasa_config: Optional[Any] = field(
        default=None, metadata={"help": "KaSA (knowledge-aware singular-value adaptation) settings."}
    )
    ensure_weight_tying: bool = field(
        default=False,
        metadata={"help": "Keep tied input/output embeddings tied when one of them is in modules_to_save."},
    )

    _runtime_only_fields = ("runtime_config",)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.LORA
        # Lists become sets (as in peft): membership tests, and order carries no meaning. A regex
        # string (or a tuple, which peft leaves alone) is kept as is.
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.ensure_weight_tying:
            # filled in by the model code when it finds tied modules
            self.modules_to_tie = None
            self.target_modules_to_tie = None
        if isinstance(self.runtime_config, dict):
            self.runtime_config = LoraRuntimeConfig(**self.runtime_config)

        for name in _SUBCONFIG_FIELDS:
            value = getattr(self, name)
            if value is not None and not _is_config_object(value):
                raise TypeError(f"`{name}` must be a config object, a dict, or None; got {type(value).__name__}: {value!r}")
        self.use_bdlora = as_bdlora_config(self.use_bdlora)  # a dict from JSON -> BdLoraConfig, as peft does

        if isinstance(self.target_parameters, str):
            raise TypeError("`target_parameters` must be a list of parameter names or None, not a string.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "`layers_to_transform` cannot be combined with a regex string `target_modules`; put the layer "
                "indices into the regex or pass target_modules as a list."
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError(
                "`layers_pattern` cannot be combined with a regex string `target_modules`; pass target_modules "
                "as a list."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` is set but `layers_to_transform` is not; set both or neither.")
        if self.use_dora and self.megatron_config:
            raise ValueError("`use_dora=True` cannot be used with `megatron_config`.")

        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ValueError("`init_lora_weights='loftq'` needs a non-empty `loftq_config`.")
            if not isinstance(self.loftq_config, dict):
                # stored as a plain dict so it serialises like every other loaded value
                self.loftq_config = dict(vars(self.loftq_config))
        elif self.loftq_config:
            self.loftq_config = {}
            warnings.warn("`loftq_config` is ignored (and cleared) because `init_lora_weights` is not 'loftq'.")
        elif self.init_lora_weights == "eva" and self.eva_config is None:
            warnings.warn("`init_lora_weights` is 'eva' but `eva_config` is not specified. Using default EVA config.")
            self.eva_config = EvaConfig()
        elif self.init_lora_weights != "eva" and self.eva_config is not None:
            warnings.warn("`eva_config` is ignored because `init_lora_weights` is not 'eva'.")
        elif self.init_lora_weights == "corda" and self.corda_config is None:
            warnings.warn("`init_lora_weights` is 'corda' but `corda_config` is not specified. Using default CorDA "
                          "config.")
            self.corda_config = CordaConfig()
        elif self.init_lora_weights != "corda" and self.corda_config is not None:
            warnings.warn("`corda_config` is ignored because `init_lora_weights` is not 'corda'.")

        if self.lora_bias:
            if self.init_lora_weights not in (True, False):
                raise ValueError(
                    f"`lora_bias=True` needs init_lora_weights True or False, got {self.init_lora_weights!r}."
                )
            if self.use_dora:
                raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")

        if self.alora_invocation_tokens is not None and self.task_type != "CAUSAL_LM":
            warnings.warn("`alora_invocation_tokens` (activated LoRA) only works with task_type='CAUSAL_LM'.")

        converts_base_weights = (
            isinstance(self.init_lora_weights, str) and self.init_lora_weights.startswith("pissa")
        ) or self.init_lora_weights in ("olora", "corda", "lora_ga")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and converts_base_weights:
            warnings.warn(
                "With use_rslora and rank_pattern/alpha_pattern, an adapter initialised by "
                f"{self.init_lora_weights!r} cannot later be converted back to a plain LoRA against the "
                "original base weights."
            )
        # custom layer mapping registered by the user (see _register_custom_module)
        self._custom_modules = None

    def _register_custom_module(self, mapping: dict) -> None:
        """Register {base module class: LoRA layer class} for layer types fastpeft does not know."""
        if self._custom_modules is None:
            self._custom_modules = {}
        self._custom_modules.update(mapping)

    def unsupported_fields(self) -> list[str]:
        """Names of fields set to a value that turns on a feature fastpeft does not implement.

        LoraModel raises NotImplementedError naming these when the config is applied to a model.
        """
        defaults = {}
        for f in dataclasses.fields(self):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
        found = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "init_lora_weights":
                # `in` would accept 1/0 for True/False; compare by type to be exact
                # peft dispatches "pissa*" / "corda*" by prefix and "olora" / "mica" case-insensitively
                key = value.lower() if isinstance(value, str) and value.lower() in ("olora", "mica") else value
                if isinstance(value, str) and value.startswith(("pissa", "corda")):
                    key = value[:5]
                if not any(key is v or (isinstance(v, str) and key == v) for v in SUPPORTED_INIT_LORA_WEIGHTS):
                    found.append(f.name)
            elif f.name in UNSUPPORTED_LORA_FIELDS and value != defaults[f.name]:
                found.append(f.name)
        return found


register_peft_config(PeftType.LORA, LoraConfig)
