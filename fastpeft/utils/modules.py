"""Generic helpers for naming and finding submodules of an nn.Module.

They live here, below both fastpeft.tuners and fastpeft.quant, so that quantizing a model does not
import the adapter code: fastpeft.quant must load without fastpeft.tuners (see tests/test_imports.py).
"""
from __future__ import annotations

import re
from typing import Iterable, Union

from torch import nn

__all__ = ["get_submodules", "name_matches"]


def name_matches(key: str, names: Union[str, Iterable[str]]) -> bool:
    """peft's module-name rule: a str is a full-match regex; a list matches a name equal to an entry
    or ending in "." + entry."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == n or key.endswith("." + n) for n in names)


def get_submodules(model: nn.Module, key: str):
    """(parent, module, attribute name in parent) for the module called ``key``."""
    parent_name, _, attr = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, getattr(parent, attr), attr
