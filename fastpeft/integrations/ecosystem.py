"""Make transformers' Trainer, accelerate and TRL treat fastpeft models as they treat peft models.

Those libraries recognise a LoRA model by asking peft: ``isinstance(model, peft.PeftModel)`` (through
transformers' ``_is_peft_model`` and accelerate's ``is_peft_model``), ``isinstance(config,
peft.PeftConfig)``, ``is_peft_available()``. fastpeft's classes are not peft's, and peft need not be
installed, so without help a fastpeft model is trained as a plain model: Trainer checkpoints hold the
whole model, TRL skips ``enable_input_require_grads``, patches the fused LM head onto the wrapper (and
crashes: ``'CausalLMOutputWithPast' object has no attribute 'last_hidden_state'``), refuses a fastpeft
``peft_config``, and DPO loads a second copy of the model as reference.

Mechanism: each module in ``_TARGETS`` holds, at module level, the names it uses for those checks (it
imported them from peft, accelerate or transformers.utils). Once such a module has run, fastpeft
replaces those module-level names by fastpeft-aware equivalents; every use inside the module then sees
them, and nothing else changes (peft, and the libraries' functions themselves, are left alone):

- ``predicate`` (``is_peft_model``, ``_is_peft_model``): true for fastpeft models too, else the original.
- ``accept`` (``PeftModel``, ``PeftConfig``, ``BaseTunerLayer``, ...): a stand-in class whose
  ``isinstance``/``issubclass`` also accept fastpeft's class; every other use (attributes, calls,
  ``X | None`` annotations) goes to peft's class.
- ``dispatch`` (``get_peft_model``): a fastpeft config goes to ``fastpeft.get_peft_model``.
- ``available`` (``is_peft_available``): true, since fastpeft provides the API these modules use.
- ``peft_only`` (``PrefixTuningConfig``, ``LoraConfig`` in TRL's trainers): guards a workaround for a
  bug of some peft version, which fastpeft objects must not take. Left alone when peft is installed.
- ``build`` (``LoraConfig`` in trl.trainer.utils, which builds one in ``get_peft_config``): left alone
  when peft is installed; without peft it builds fastpeft's.
- ``original`` (``is_peft_model`` in accelerate.utils.fsdp_utils): the module keeps accelerate's own
  predicate, because what it does for a peft model calls peft's functions (peft's
  ``get_peft_model_state_dict`` returns an empty dict for a fastpeft model).
- ``peft_helper`` (``update_fsdp_plugin_peft`` in transformers.trainer, which imports peft): for a
  fastpeft model it only runs when peft is importable, so FSDP without peft behaves as before.

Without peft, the modules skipped their ``from peft import ...``: those names are filled in
(stand-ins that accept only fastpeft's classes; ``peft_only`` ones that match nothing).

A module is patched when it is imported (a meta-path finder wraps its loader: the module's own loader
runs it, then the names are replaced) or at ``register()`` if it already was, so ``import fastpeft``
stays cheap (stdlib only) and the import order does not matter. The stand-ins find fastpeft's classes
in sys.modules when asked (no fastpeft instance exists before its module is loaded), so patching never
imports fastpeft's model code in the middle of another library's import.

When a library changes: a name that should be there and is not gives a FastPeftIntegrationWarning
naming the library, its version, the module and the name (the one version tested is in
``TESTED_VERSIONS``). Without peft, a module that reads a peft name this table does not fill in gets the
same warning before that name can raise NameError. tests/integrations/test_ecosystem.py checks the
table against the installed versions (every name exists; every use of a patched name is one its
replacement supports).
"""
from __future__ import annotations

import ast
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["FastPeftIntegrationWarning", "TESTED_VERSIONS", "register", "report", "peft_names_read"]


class FastPeftIntegrationWarning(UserWarning):
    """A library fastpeft plugs into no longer looks as fastpeft expects (a patched name is missing)."""


# the versions the table below was checked against (tests/integrations/test_ecosystem.py)
TESTED_VERSIONS = {"transformers": "5.24.0", "accelerate": "1.15.0", "trl": "1.16.0"}

PREDICATE = "predicate"  # f(model) -> bool, as transformers' _is_peft_model
PREDICATE_UNWRAPPING = "predicate_unwrapping"  # same, looking through DDP/DeepSpeed wrappers (accelerate's)
ACCEPT = "accept"
DISPATCH = "dispatch"
AVAILABLE = "available"
PEFT_ONLY = "peft_only"
BUILD = "build"
ORIGINAL = "original"
PEFT_HELPER = "peft_helper"

# peft's name -> (module, name) of fastpeft's counterpart
_FASTPEFT_CLASSES = {
    "PeftModel": ("fastpeft.peft_model", "PeftModel"),
    "PeftMixedModel": ("fastpeft.peft_model", "PeftModel"),
    "PeftConfig": ("fastpeft.config", "PeftConfig"),
    "BaseTunerLayer": ("fastpeft.tuners.tuners_utils", "BaseTunerLayer"),
    "PromptLearningConfig": ("fastpeft.tuners.prompt.config", "PromptLearningConfig"),
    "LoraConfig": ("fastpeft.tuners.lora.config", "LoraConfig"),
}

# the names TRL's trainers use to take their PEFT path
_TRL_TRAINER = {
    "is_peft_model": PREDICATE_UNWRAPPING,
    "is_peft_available": AVAILABLE,
    "PeftConfig": ACCEPT,
    "BaseTunerLayer": ACCEPT,
    "get_peft_model": DISPATCH,
    "PrefixTuningConfig": PEFT_ONLY,  # "prefix tuning with a device map needs peft>=0.18"
}
_TRL_ADAPTER_COPY = {"LoraConfig": PEFT_ONLY}  # "peft 0.17-0.19 cannot add a reference adapter with target_parameters"

# module -> {module-level name: role}
_TARGETS: dict[str, dict[str, str]] = {
    "transformers.trainer_utils": {"_is_peft_model": PREDICATE},
    # Trainer: which model is a PEFT model (adapter checkpoints, signature columns, best-model reload) and
    # what _save may call save_pretrained on
    "transformers.trainer": {"_is_peft_model": PREDICATE, "is_peft_available": AVAILABLE, "PeftModel": ACCEPT,
                             "update_fsdp_plugin_peft": PEFT_HELPER},
    "accelerate.utils.modeling": {"is_peft_model": PREDICATE_UNWRAPPING},
    "accelerate.utils": {"is_peft_model": PREDICATE_UNWRAPPING},
    # adapter-only FSDP state dicts through peft's functions: not for fastpeft models (full state dict, as before)
    "accelerate.utils.fsdp_utils": {"is_peft_model": ORIGINAL},
    # use_adapter (DPO/KTO reference through disable_adapter) and get_peft_config
    "trl.trainer.utils": {"is_peft_available": AVAILABLE, "LoraConfig": BUILD},
    "trl.trainer.base_trainer": {"is_peft_model": PREDICATE_UNWRAPPING},
    "trl.trainer.sft_trainer": dict(_TRL_TRAINER),
    "trl.trainer.reward_trainer": {n: r for n, r in _TRL_TRAINER.items() if n != "BaseTunerLayer"},
    "trl.trainer.dpo_trainer": {**_TRL_TRAINER, **_TRL_ADAPTER_COPY},
    "trl.trainer.kto_trainer": {**_TRL_TRAINER, **_TRL_ADAPTER_COPY},
    "trl.trainer.grpo_trainer": {**_TRL_TRAINER, **_TRL_ADAPTER_COPY},
    "trl.trainer.rloo_trainer": {**_TRL_TRAINER, **_TRL_ADAPTER_COPY},
    "trl.trainer.distillation_trainer": {**_TRL_TRAINER, "PromptLearningConfig": ACCEPT},
}

# what happened to each target name: {module: {name: "patched" | "filled in" | "kept" | "kept original" | "missing"}}
_STATUS: dict[str, dict[str, str]] = {}


def report() -> dict:
    """What fastpeft did to each target module imported so far: name -> patched / filled in / kept / missing."""
    return {module: dict(names) for module, names in _STATUS.items()}


# -------------------------------------------------------------------------------------------------
# fastpeft's classes, found without importing anything
# -------------------------------------------------------------------------------------------------
def _fastpeft_class(peft_name: str, load: bool = False):
    module_name, attr = _FASTPEFT_CLASSES[peft_name]
    module = importlib.import_module(module_name) if load else sys.modules.get(module_name)
    return getattr(module, attr, None) if module is not None else None


def _is_fastpeft_model(model) -> bool:
    cls = _fastpeft_class("PeftModel")
    return cls is not None and isinstance(model, cls)


# -------------------------------------------------------------------------------------------------
# replacements
# -------------------------------------------------------------------------------------------------
class _StandInMeta(type):
    """Metaclass of the stand-ins for peft's classes: isinstance/issubclass also accept fastpeft's class
    (or, for a peft-only name, only peft's); everything else is peft's class (fastpeft's for ``build``)."""

    def _classes(cls) -> tuple:
        found = [cls._peft_class] if cls._peft_class is not None else []
        if cls._fastpeft_name is not None:
            fast = _fastpeft_class(cls._fastpeft_name)
            if fast is not None:
                found.append(fast)
        return tuple(found)

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, cls._classes())

    def __subclasscheck__(cls, sub) -> bool:
        return issubclass(sub, cls._classes())

    def _target(cls):
        if cls._peft_class is not None:
            return cls._peft_class
        if cls._build:
            return _fastpeft_class(cls._fastpeft_name, load=True)
        raise ImportError(f"`{cls.__name__}` is peft's class and peft is not installed: in {cls._where} fastpeft "
                          f"stands in for it in isinstance checks only")

    def __call__(cls, *args, **kwargs):
        return cls._target()(*args, **kwargs)

    def __getattr__(cls, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return getattr(cls._target(), attr)

    def __repr__(cls) -> str:
        accepted = ", ".join(map(repr, cls._classes())) or "nothing"
        return f"<fastpeft stand-in for {cls.__name__} in {cls._where}: {accepted}>"


def _stand_in(name: str, where: str, peft_class, role: str) -> type:
    accepts = "peft's class only" if role == PEFT_ONLY else "peft's and fastpeft's classes"
    return _StandInMeta(name, (), {
        "_peft_class": peft_class, "_fastpeft_name": None if role == PEFT_ONLY else name,
        "_build": role == BUILD, "_where": where, "_fastpeft_patch": True, "__module__": __name__,
        "__doc__": f"{name} as {where} sees it (fastpeft stand-in): isinstance accepts {accepts}",
    })


def _mark(wrapper, original):
    wrapper.__wrapped__ = original
    wrapper._fastpeft_patch = True
    if original is not None:
        wrapper.__name__ = original.__name__
        wrapper.__qualname__ = getattr(original, "__qualname__", original.__name__)
        wrapper.__doc__ = original.__doc__
    return wrapper


_WRAPPERS: dict = {}  # (role, id(original)) -> wrapper, so every module gets the same object


def _wrapper(role: str, original):
    key = (role, id(original))
    if key in _WRAPPERS:
        return _WRAPPERS[key]
    if role == PREDICATE:
        def replacement(model):
            return _is_fastpeft_model(model) or original(model)
    elif role == PREDICATE_UNWRAPPING:
        def replacement(model):
            if _is_fastpeft_model(model):
                return True
            if _fastpeft_class("PeftModel") is not None:  # DDP, DataParallel, DeepSpeed around a fastpeft model
                from accelerate.utils import extract_model_from_parallel

                if _is_fastpeft_model(extract_model_from_parallel(model)):
                    return True
            return original(model)
    elif role == AVAILABLE:
        def replacement():
            """True: a peft API is available (peft's, or fastpeft's, which this module was patched to accept)."""
            return True
    elif role == PEFT_HELPER:
        def replacement(model, *args, **kwargs):
            if _is_fastpeft_model(model) and not _peft_importable():
                return None  # nothing of peft's applies to a fastpeft model; the helper would fail importing peft
            return original(model, *args, **kwargs)
    elif role == DISPATCH:
        def replacement(model, peft_config, *args, **kwargs):
            fast_config = _fastpeft_class("PeftConfig")
            if original is None or (fast_config is not None and isinstance(peft_config, fast_config)):
                from fastpeft.mapping import get_peft_model

                return get_peft_model(model, peft_config, *args, **kwargs)
            return original(model, peft_config, *args, **kwargs)
    else:  # pragma: no cover
        raise ValueError(role)
    _WRAPPERS[key] = _mark(replacement, original)
    return _WRAPPERS[key]


# -------------------------------------------------------------------------------------------------
# patching one module
# -------------------------------------------------------------------------------------------------
def _library_version(library: str) -> str:
    try:
        from importlib.metadata import version

        return version(library)
    except Exception:  # pragma: no cover
        return getattr(sys.modules.get(library), "__version__", "(unknown version)")


def _warn(module_name: str, message: str) -> None:
    library = module_name.split(".")[0]
    installed, tested = _library_version(library), TESTED_VERSIONS.get(library, "?")
    warnings.warn(
        f"fastpeft cannot fully plug into {library} {installed}: {message} (fastpeft was tested with {library} "
        f"{tested}), so {library} may treat fastpeft models there as plain models. Install {library}=={tested}, or a "
        f"fastpeft version made for {library} {installed} (table: fastpeft/integrations/ecosystem.py).",
        FastPeftIntegrationWarning, stacklevel=3)


def _peft_loaded() -> bool:
    return sys.modules.get("peft") is not None


def _peft_importable() -> bool:
    try:
        return importlib.util.find_spec("peft") is not None
    except (ImportError, ValueError):
        return False


def _patch(module) -> None:
    name = module.__name__
    status = _STATUS.setdefault(name, {})
    filled = False
    for attr, role in _TARGETS.get(name, {}).items():
        current = module.__dict__.get(attr, _patch)  # _patch: a sentinel for "absent"
        if current is _patch:
            if role in (PREDICATE, PREDICATE_UNWRAPPING, AVAILABLE, ORIGINAL, PEFT_HELPER) or \
                    (role in (ACCEPT, DISPATCH) and _peft_loaded()):
                status[attr] = "missing"
                _warn(name, f"`{name}.{attr}` does not exist")
                continue
            # peft is not installed, so the module skipped `from peft import ...`: fill the name in
            if role in (ACCEPT, PEFT_ONLY, BUILD):
                setattr(module, attr, _stand_in(attr, name, None, role))
            else:  # DISPATCH
                setattr(module, attr, _wrapper(role, None))
            status[attr] = "filled in"
            filled = True
            continue
        if role == ORIGINAL:
            if getattr(current, "_fastpeft_patch", False):  # imported the patched one from its home module
                setattr(module, attr, current.__wrapped__)
            status[attr] = "kept original"
            continue
        if getattr(current, "_fastpeft_patch", False) or role in (PEFT_ONLY, BUILD):
            status.setdefault(attr, "kept")
            continue
        if role == ACCEPT:
            setattr(module, attr, _stand_in(attr, name, current, role))
        else:
            setattr(module, attr, _wrapper(role, current))
        status[attr] = "patched"
    if filled and AVAILABLE in _TARGETS.get(name, {}).values():
        _check_peft_names_covered(module)


def _check_peft_names_covered(module) -> None:
    """Without peft: warn about peft names the module reads that were not filled in (they would raise NameError)."""
    try:
        source = module.__spec__.loader.get_source(module.__name__)
    except Exception:
        return
    if not source:
        return
    handled = _TARGETS.get(module.__name__, {})
    uncovered = [n for n in peft_names_read(source, handled) if n not in handled]
    if uncovered:
        _warn(module.__name__, f"{module.__name__} uses peft's {', '.join(sorted(uncovered))}, which fastpeft does not "
                               f"provide, so it fails without peft installed")


def peft_names_read(source: str, roles: dict) -> dict:
    """Names a module binds from peft (``from peft... import X``, ``import peft``) and reads at run time
    -> the line numbers. Reads of the module ``peft`` itself only count when they can run for a fastpeft
    object: not when they sit in an ``and`` after ``isinstance(..., <a peft_only name>)`` (a peft-version check)."""
    tree = ast.parse(source)
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "peft" and not node.level:
            bound |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "peft"}
    peft_only = {n for n, r in roles.items() if r == PEFT_ONLY}
    guarded = set()  # ids of `peft` Name nodes behind a peft-only isinstance
    for node in ast.walk(tree):
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
            seen_guard = False
            for value in node.values:
                if seen_guard:
                    guarded |= {id(n) for n in ast.walk(value) if isinstance(n, ast.Name) and n.id == "peft"}
                if (isinstance(value, ast.Call) and getattr(value.func, "id", None) == "isinstance"
                        and len(value.args) == 2 and getattr(value.args[1], "id", None) in peft_only):
                    seen_guard = True
    reads: dict = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in bound \
                and id(node) not in guarded:
            reads.setdefault(node.id, []).append(node.lineno)
    return reads


# -------------------------------------------------------------------------------------------------
# the import hook
# -------------------------------------------------------------------------------------------------
def _patch_safely(module) -> None:
    try:
        _patch(module)
    except FastPeftIntegrationWarning:  # warnings turned into errors: let it through as it is
        raise
    except Exception as exc:  # never break the other library's import
        _warn(module.__name__, f"patching {module.__name__} failed ({type(exc).__name__}: {exc})")


class _PatchingLoader(importlib.abc.Loader):
    """Runs the module with its own loader, then patches it; anything else goes to that loader."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _patch_safely(module)

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

# the names under which modules outside the table hold the predicates
_PREDICATE_NAMES = ("is_peft_model", "_is_peft_model")


def _sweep_loaded_modules() -> None:
    """Modules outside the table (other TRL modules, the user's script) that did ``from accelerate.utils import
    is_peft_model`` before fastpeft was imported hold the original: give them the patched one (same object only)."""
    originals = {}
    for module_name, names in _TARGETS.items():
        module = sys.modules.get(module_name)
        for attr, role in names.items():
            value = getattr(module, attr, None) if module is not None else None
            wrapped = getattr(value, "__wrapped__", None)
            if role in (PREDICATE, PREDICATE_UNWRAPPING) and wrapped is not None:
                originals[id(wrapped)] = value
    if not originals:
        return
    for module_name, module in list(sys.modules.items()):
        try:
            namespace = vars(module)
        except Exception:  # None entries (blocked imports), objects without a __dict__
            continue
        if not isinstance(namespace, dict):
            continue
        for attr in _PREDICATE_NAMES:
            if _TARGETS.get(module_name, {}).get(attr) == ORIGINAL:
                continue
            value = namespace.get(attr)
            if value is not None and id(value) in originals and originals[id(value)] is not value:
                namespace[attr] = originals[id(value)]


def register() -> None:
    """Patch the target modules already imported; patch the others when they are imported."""
    for name in _TARGETS:
        module = sys.modules.get(name)
        if module is not None:
            _patch_safely(module)
    _sweep_loaded_modules()
    if _finder not in sys.meta_path and not all(n in sys.modules for n in _TARGETS):
        sys.meta_path.insert(0, _finder)
