"""Imports point down: the low layers (fastpeft.ops, fastpeft.kernels, fastpeft.quant) never load the
model code above them or transformers, ``import fastpeft`` is cheap yet every public name is
reachable, every module imports on its own, and the repository's kernels/ folder does not shadow
Hugging Face's `kernels` package.

Each check runs in a fresh interpreter (what a module imports is only visible in a clean sys.modules);
several checks share one interpreter to keep the file fast.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import fastpeft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prelude of every script: json output, and the loaded modules under some package prefixes.
_PRELUDE = '''
import json, sys
def loaded(*packages):
    return sorted(m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in packages))
'''


def _run(script: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(script)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _run_json(script: str, cwd: str = REPO):
    return json.loads(_run(script, cwd).stdout.strip().splitlines()[-1])


def test_low_layers_import_nothing_above_them():
    out = _run_json('''
        ABOVE = ("transformers", "fastpeft.tuners", "fastpeft.peft_model")
        out = {}
        import fastpeft.kernels
        out["fastpeft.kernels"] = loaded(*ABOVE)
        import fastpeft.quant.formats  # the leaf fastpeft.ops uses: must not pull the rest of fastpeft.quant
        out["fastpeft.quant.formats"] = loaded(*ABOVE, "fastpeft.quant.linear", "fastpeft.quant.quantize",
                                               "fastpeft.quant.importers")
        import fastpeft.ops
        out["fastpeft.ops"] = loaded(*ABOVE)
        # the submodule quantize.py is imported directly here, before anything asked for the function quantize
        import fastpeft.quant.quantize, fastpeft.quant.importers, fastpeft.quant.linear
        out["fastpeft.quant"] = loaded("fastpeft.tuners")
        from fastpeft.quant import quantize
        out["quantize"] = [type(quantize).__name__, type(fastpeft.quant.quantize).__name__]
        print(json.dumps(out))
    ''')
    assert out.pop("quantize") == ["function", "function"]
    assert out == {name: [] for name in out}


def test_package_root_is_cheap_and_complete():
    out = _run_json('''
        import fastpeft
        out = {"after import fastpeft": loaded("transformers", "fastpeft.tuners", "fastpeft.peft_model")}
        from fastpeft import get_peft_model, LoraConfig
        out["get_peft_model"] = get_peft_model.__module__
        out["LoraConfig"] = fastpeft.LoraConfig is LoraConfig
        out["unreachable"] = [n for n in fastpeft.__all__ if getattr(fastpeft, n, None) is None]
        star = {}
        exec("from fastpeft import *", star)
        out["not in star"] = sorted(set(fastpeft.__all__) - set(star))
        out["not in dir"] = sorted(set(fastpeft.__all__) - set(dir(fastpeft)))
        try:
            fastpeft.no_such_name
            out["no_such_name"] = "found"
        except AttributeError:
            out["no_such_name"] = "AttributeError"
        # the import hook was registered by `import fastpeft` and patches transformers.trainer when it loads
        # (with or without peft: see fastpeft/integrations/ecosystem.py)
        import transformers.trainer
        out["trainer patched"] = issubclass(fastpeft.PeftModel, transformers.trainer.PeftModel)
        print(json.dumps(out))
    ''')
    assert out.pop("trainer patched") is True
    assert out == {"after import fastpeft": [], "get_peft_model": "fastpeft.mapping", "LoraConfig": True,
                   "unreachable": [], "not in star": [], "not in dir": [], "no_such_name": "AttributeError"}


def _fastpeft_modules() -> list[str]:
    """Every module of the package, fastpeft.kernels included (it is installed from the top-level
    kernels/ folder, so walking fastpeft.__path__ does not find it in an editable install)."""
    import fastpeft.kernels

    names = {"fastpeft", "fastpeft.kernels"}
    for info in pkgutil.walk_packages(fastpeft.__path__, "fastpeft."):
        names.add(info.name)
    if importlib.util.find_spec("triton") is not None:  # the kernel files import triton at module level
        names.update(info.name for info in pkgutil.walk_packages(fastpeft.kernels.__path__, "fastpeft.kernels."))
    # fastpeft.bench imports nothing optional at module level (peft and transformers only inside
    # functions), so nothing is skipped here
    return sorted(names)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="uses os.fork for one clean interpreter state per module")
def test_every_module_imports_on_its_own():
    """An import cycle can hide when the modules of the cycle happen to be imported in a lucky order;
    importing each module first, in a clean interpreter, finds it. One interpreter with torch and
    transformers preloaded forks a child per module, which is as clean for fastpeft and much faster."""
    modules = _fastpeft_modules()
    assert "fastpeft.quant.formats" in modules and "fastpeft.tuners.lora.model" in modules
    out = _run_json(f'''
        import importlib, os, traceback
        import torch, transformers.pytorch_utils  # third-party: preloaded, shared by every child
        assert not loaded("fastpeft")
        failed = {{}}
        for name in {modules!r}:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                try:
                    importlib.import_module(name)
                    code = 0
                except BaseException:
                    os.write(write, traceback.format_exc().encode())
                    code = 1
                os._exit(code)
            os.close(write)
            with os.fdopen(read) as fh:
                error = fh.read()
            _, status = os.waitpid(pid, 0)
            if status != 0:
                failed[name] = error or f"exit status {{status}}"
        print(json.dumps(failed))
    ''')
    assert out == {}, "\n".join(f"{name}:\n{tb}" for name, tb in out.items())


def test_kernels_folder_does_not_shadow_hf_kernels(tmp_path):
    """Run from the repository root, where kernels/ is on sys.path as a top-level package."""
    ours = os.path.join(REPO, "kernels")
    # the real Hugging Face package may be installed or not: either way `kernels` must not be our folder
    out = _run_json('''
        import kernels
        out = {"file": getattr(kernels, "__file__", None)}
        try:
            import kernels.lora_fwd
            out["kernels.lora_fwd"] = kernels.lora_fwd.__file__
        except ImportError:
            out["kernels.lora_fwd"] = None
        # transformers imports what find_spec("kernels") found, and must not crash on it
        from transformers.utils.import_utils import is_kernels_available
        out["is_kernels_available"] = is_kernels_available()
        print(json.dumps(out))
    ''')
    assert out["file"] is None or not out["file"].startswith(ours), out
    assert out["kernels.lora_fwd"] is None, out

    # a regular package `kernels` later on the path (here right after the root, so ahead of any
    # installed one) is found instead of our folder
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("def get_kernel(repo, version=None):\n    return 'fake ' + repo\n")
    out = _run_json(f'''
        sys.path.insert(1, {str(tmp_path)!r})
        from kernels import get_kernel
        import kernels
        print(json.dumps([kernels.__file__, get_kernel("x"), sys.modules["kernels"] is kernels]))
    ''')
    assert out == [str(fake / "__init__.py"), "fake x", True]

    # fastpeft's own kernels stay importable under their installed name
    assert _run_json('''
        import fastpeft.kernels
        print(json.dumps(fastpeft.kernels.__name__))
    ''') == "fastpeft.kernels"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_bitsandbytes_from_repo_root_does_not_find_our_kernels():
    # bitsandbytes' CPU backend does `from kernels import get_kernel` (on CPUs with AVX512-BF16) and
    # logs the error; it must never be about our folder.
    proc = _run("import bitsandbytes")
    assert os.path.join(REPO, "kernels") not in proc.stdout + proc.stderr
