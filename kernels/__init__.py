"""Triton kernels of fastpeft, installed as `fastpeft.kernels`.

Kernels know nothing of models: each file holds one op's Triton kernels and launcher.
Layers never import this package; they go through `fastpeft.ops`.
"""
if __name__ == "kernels":
    # This folder sits in the repository root, so Python started there (``python -m pytest``, a script
    # in the root) finds it as the top-level package ``kernels``, ahead of Hugging Face's `kernels`
    # package that bitsandbytes and transformers import (``from kernels import get_kernel``). Step
    # aside: hand over to the ``kernels`` the rest of the import path holds, or, when there is none,
    # to an empty namespace package, which is what a folder without __init__.py would give.
    # (Raising ImportError here instead would break transformers: is_kernels_available() imports what
    # find_spec found and takes a namespace package, one without __file__, for "not installed".)
    # The folder keeps this __init__.py because setup.py installs it as fastpeft.kernels, and
    # setuptools' editable install cannot import a namespace package mapped to another name.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _hand_over():
        root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
        spec = None
        for finder in sys.meta_path:
            if finder is importlib.machinery.PathFinder:
                spec = finder.find_spec(__name__, path)
            elif hasattr(finder, "find_spec"):
                spec = finder.find_spec(__name__, None)
            if spec is not None and spec.origin != __file__:  # not this file again, under another path entry
                break
            spec = None
        if spec is None:
            spec = importlib.machinery.ModuleSpec(__name__, None, is_package=True)  # empty namespace package
        module = importlib.util.module_from_spec(spec)
        # The import system returns whatever sys.modules holds under the name once this file has run.
        sys.modules[__name__] = module
        try:
            if spec.loader is not None:
                spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[__name__]
            raise

    _hand_over()
