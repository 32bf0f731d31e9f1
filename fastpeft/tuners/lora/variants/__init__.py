"""Per-adapter LoRA variants (see base.py): which variant an adapter gets, from its layer options."""
from __future__ import annotations

from .alora import ALora
from .base import LoraVariant
from .bdlora import BdLora, bdlora_variant
from .dora import Dora
from .plain import PlainLora
from .qalora import QALora, uses_qalora

# The LoraConfig fields update_layer passes on to variant_for (LoraModel gives them to every layer).
VARIANT_OPTION_KEYS = ("alora_invocation_tokens", "use_qalora", "qalora_group_size", "use_bdlora", "target_name")


def variant_options(options: dict) -> dict:
    """The variant-selecting entries of update_layer's extra options."""
    return {k: options[k] for k in VARIANT_OPTION_KEYS if k in options}


def _is_linear_family(layer) -> bool:
    # lora.Linear and its subclasses (Conv1D, QuantLoraLinear): the layers peft gives aLoRA
    from ..linear import Linear

    return isinstance(layer, Linear) and not getattr(layer, "_kernel_dim", None)


def variant_for(layer=None, **options) -> LoraVariant:
    """The variant object for a new adapter of ``layer``, from the options update_layer received.

    Options that select a variant fastpeft does not have are refused earlier, when the config is
    applied (LoraConfig.unsupported_fields). Combinations peft refuses are refused here with its words.
    """
    use_dora = bool(options.get("use_dora"))
    if options.get("use_bdlora"):  # BD-LoRA (bdlora.py): chosen per module name; None where peft ignores it
        variant = bdlora_variant(layer, options)
        if variant is not None:
            return variant
    if options.get("alora_invocation_tokens") is not None:
        keys = ("alora_invocation_tokens", "use_dora") if use_dora else ("alora_invocation_tokens",)
        if use_dora or (layer is not None and not _is_linear_family(layer)):
            where = "" if layer is None else f" (on {type(layer).__name__})"
            raise ValueError(f"Invalid or unsupported variant combination: {keys}{where}")
        return ALora()
    if options.get("use_qalora") and layer is not None and uses_qalora(layer):
        if use_dora:
            raise NotImplementedError(f"DoRA and QA-LoRA at the same time is not supported for "
                                      f"{type(layer).__name__} (yet).")
        return QALora(int(options.get("qalora_group_size", 16)))
    if use_dora:
        return Dora()
    return PlainLora()


__all__ = ["ALora", "BdLora", "Dora", "LoraVariant", "PlainLora", "QALora", "VARIANT_OPTION_KEYS", "variant_for",
           "variant_options"]
