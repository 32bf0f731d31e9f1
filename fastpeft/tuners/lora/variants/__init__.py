"""Per-adapter LoRA variants (see base.py): which variant an adapter gets, from its layer options."""
from __future__ import annotations

from .base import LoraVariant
from .dora import Dora
from .plain import PlainLora


def variant_for(**options) -> LoraVariant:
    """The variant object for a new adapter, from the options update_layer received (use_dora, ...).

    Options that select a variant fastpeft does not have are refused earlier, when the config is
    applied (LoraConfig.unsupported_fields); here they would be a programming error.
    """
    if options.get("use_dora"):
        return Dora()
    return PlainLora()


__all__ = ["Dora", "LoraVariant", "PlainLora", "variant_for"]
