"""Make transformers' Trainer treat a fastpeft PeftModel as it treats a peft PeftModel.

Trainer decides how to save a checkpoint with ``isinstance(model, peft.PeftModel)`` (its
``_is_peft_model`` and ``Trainer._save``). fastpeft's PeftModel is not a subclass of peft's, so
without help Trainer writes the whole model's state dict (every base weight, in a non-peft layout,
and it crashes on tied embeddings) instead of calling ``save_pretrained``, which writes the adapter.

The names ``PeftModel``/``PeftMixedModel`` that those transformers modules imported from peft are
replaced by tuples holding peft's class and fastpeft's: ``isinstance`` accepts nested tuples, so
every check there keeps accepting peft models and now accepts fastpeft ones too. The patch is
applied when transformers' trainer module is (or later gets) imported, so importing fastpeft stays
cheap for users who never touch Trainer. Without peft installed, transformers skips these checks
altogether; then Trainer saves a state dict, so call ``model.save_pretrained`` yourself.
"""
from __future__ import annotations

import importlib.abc
import sys

# transformers module -> names it imported from peft whose isinstance checks should accept fastpeft
_TARGETS = {
    "transformers.trainer": ("PeftModel",),
    "transformers.trainer_utils": ("PeftMixedModel",),
}


def _patch(module) -> None:
    from ..peft_model import PeftModel as FastPeftModel

    for name in _TARGETS.get(module.__name__, ()):
        current = getattr(module, name, None)
        if current is None:
            continue  # peft not installed: transformers never does the check
        classes = current if isinstance(current, tuple) else (current,)
        if FastPeftModel not in classes:
            setattr(module, name, (*classes, FastPeftModel))


class _PatchingLoader(importlib.abc.Loader):
    """Runs the module with its own loader, then patches it; anything else goes to that loader."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _patch(module)

    def __getattr__(self, name):  # get_source, get_code, is_package, ... (inspect and linecache use them)
        return getattr(self._inner, name)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the target modules with the other finders and wraps their loader in _PatchingLoader."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


_finder = _PatchAfterImport()


def register() -> None:
    """Patch the target modules already imported; patch the others when they are imported."""
    for name in _TARGETS:
        if name in sys.modules:
            _patch(sys.modules[name])
    if _finder not in sys.meta_path and not all(n in sys.modules for n in _TARGETS):
        sys.meta_path.insert(0, _finder)
