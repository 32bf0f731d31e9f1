"""Per-adapter LoRA variants (see base.py): which variant an adapter gets, from its layer options."""
from __future__ import annotations

from .base import LoraVariant
from .plain import PlainLora


def variant_for(**options) -> LoraVariant:
    """The variant object for a new adapter, from the options update_layer received (use_dora, ...).

    Options that select a variant fastpeft does not have are refused earlier, when the config is
    applied (LoraConfig.unsupported_fields); here they would be a programming error.
    """
    if options.get("use_dora"):
        raise NotImplementedError("DoRA (use_dora=True) is not implemented by fastpeft yet")
    return PlainLora()


__all__ = ["LoraVariant", "PlainLora", "variant_for"]
