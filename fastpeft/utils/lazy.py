"""PEP 562 lazy exports, shared by the packages that must stay cheap to import (fastpeft, fastpeft.quant)."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict):
    """(__getattr__, __dir__) for ``package`` whose public names live in submodules: ``exports`` maps a
    name to the submodule (relative to the package) defining it, imported on the name's first use."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        vars(importlib.import_module(package))[name] = value  # later lookups skip __getattr__
        return value

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(exports))

    return __getattr__, __dir__
