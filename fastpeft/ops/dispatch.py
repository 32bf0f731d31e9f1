"""Per-call backend choice: cuda > triton > torch, or the one FASTPEFT_BACKEND forces.

One registry for every call (dense, quantized or no base; any adapter set). A backend is the module
``fastpeft.ops.<name>_backend`` or an object given to :func:`register_backend`, with the protocol of
contract.py: ``supports(call)``, ``forward(call)``, ``backward(call, ...)``, optional ``auto_ok(call)`` and
``pool_runner(call)``.

The triton and cuda backends are optional (they need triton / a CUDA build), so they are imported
lazily, and a failure to import one makes it unavailable, with the reason kept for the error message
when it is forced.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

from . import cpu_mixed
from .contract import LoraCall

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "FASTPEFT_BACKEND"
REQUIRED = ("supports", "forward", "backward")

_registered: dict = {}   # name -> object registered in place of fastpeft.ops.<name>_backend
_registrations = [0]     # bumped by every register_backend: a kept choice is stale after one (settings())
_loaded: dict = {}       # name -> (module or None, reason it is unavailable or None)


def _missing(impl) -> list:
    return [f for f in REQUIRED if not callable(getattr(impl, f, None))]


def register_backend(name: str, impl) -> None:
    """Serve backend ``name`` (one of BACKENDS) with ``impl`` (an object with the contract's
    functions) instead of its module; ``impl=None`` removes the registration."""
    if name not in BACKENDS:
        raise ValueError(f"unknown fastpeft backend {name!r}; expected one of {', '.join(BACKENDS)}")
    _registrations[0] += 1
    if impl is None:
        _registered.pop(name, None)
        return
    missing = _missing(impl)
    if missing:
        raise TypeError(f"fastpeft backend {name!r} must define {', '.join(missing)}")
    _registered[name] = impl


def load_backend(name: str) -> tuple:
    """(implementation, None) or (None, the reason backend ``name`` is unavailable)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown fastpeft backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name in _registered:
        return _registered[name], None
    if name not in _loaded:
        modname = f"fastpeft.ops.{name}_backend"
        try:
            mod = importlib.import_module(modname)
        except Exception as e:  # ImportError, or e.g. a triton/CUDA runtime error raised at import
            _loaded[name] = (None, f"{modname} could not be imported ({type(e).__name__}: {e})")
        else:
            missing = _missing(mod)
            _loaded[name] = (None, f"{modname} does not define {', '.join(missing)}") if missing else (mod, None)
    return _loaded[name]


def forced_backend() -> Optional[str]:
    """The backend named by FASTPEFT_BACKEND, or None when unset/empty/auto (= automatic choice)."""
    val = os.environ.get(ENV_VAR)
    if not val:  # unset: the common case
        return None
    val = val.strip().lower()
    if not val or val == "auto":
        return None
    if val not in BACKENDS:
        raise RuntimeError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a fastpeft backend; "
                           f"expected one of {', '.join(BACKENDS)} (or unset)")
    return val


def settings() -> tuple:
    """What the choice and the backends' paths read besides the call: the environment (FASTPEFT_BACKEND,
    FASTPEFT_CPU_KERNEL) and the registrations. A kept choice (eager.pool_call's runner) is rebuilt when it
    changes."""
    get = os.environ.get
    return _registrations[0], get(ENV_VAR), get(cpu_mixed.ENV_VAR)


def triton_interpreting() -> bool:
    """TRITON_INTERPRET set to anything but ''/'0' (Triton's own rule): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device_reason(name: str, call: LoraCall, forced: bool) -> Optional[str]:
    """Device rules that hold whatever a backend's supports() says."""
    dev = call.x.device.type
    if name == "torch" or dev == "cuda":
        return None
    if name == "triton" and forced and triton_interpreting():
        return None  # the CI path: Triton kernels run on CPU tensors through the interpreter
    if name == "triton":
        return (f"tensors are on {dev}; the triton backend runs on CUDA tensors, or on CPU tensors only "
                f"with TRITON_INTERPRET=1 and {ENV_VAR}=triton")
    return f"tensors are on {dev}; the {name} backend needs CUDA tensors"


def why_not(name: str, call: LoraCall, forced: bool = False) -> Optional[str]:
    """None if backend ``name`` can run this call, else the reason it cannot."""
    reason = _device_reason(name, call, forced)
    if reason is not None:
        return reason
    impl, reason = load_backend(name)
    if impl is None:
        return reason
    try:
        return impl.supports(call)
    except Exception as e:  # a backend bug must not take down the automatic fallback
        return f"{name}.supports raised {type(e).__name__}: {e}"


def _wins(name: str, call: LoraCall) -> bool:
    """Automatic choice only: a backend may run more cases than it is measured to win (its optional
    ``auto_ok(call)``); a forced backend runs whatever its supports() accepts."""
    auto_ok = getattr(load_backend(name)[0], "auto_ok", None)
    return auto_ok is None or bool(auto_ok(call))


def _runs(impl, call: LoraCall) -> bool:
    """why_not(...) is None and _wins(...) for a loaded backend whose device rule holds."""
    try:
        if impl.supports(call) is not None:
            return False
    except Exception:  # a backend bug must not take down the automatic choice (why_not words it)
        return False
    auto_ok = getattr(impl, "auto_ok", None)
    return auto_ok is None or bool(auto_ok(call))


def choose(call: LoraCall) -> str:
    """The backend for one call; every rule is here.

    The forced backend (FASTPEFT_BACKEND), or a RuntimeError naming it, the call and the reason; else
    the first of BACKENDS that can run the call and is measured to win it.
    """
    forced = forced_backend()
    if forced is not None:
        reason = why_not(forced, call, forced=True)
        if reason is not None:
            raise RuntimeError(f"{ENV_VAR}={forced} forces the {forced} backend, which cannot run this "
                               f"{call.describe()}: {reason}")
        return forced
    if not call.x.is_cuda:
        # off CUDA only torch runs automatically (the device rule of why_not, without its messages): its
        # supports() and auto_ok() asked directly, as why_not and _wins would
        impl = _registered.get("torch") or load_backend("torch")[0]
        if impl is not None and _runs(impl, call):
            return "torch"
    else:
        for name in BACKENDS:
            if why_not(name, call) is None and _wins(name, call):
                return name
    # torch runs every valid call; reaching here means a backend-independent problem.
    raise RuntimeError(f"no fastpeft backend can run this {call.describe()}: {why_not('torch', call)}")


def pick(call: LoraCall):
    """The implementation of the backend :func:`choose` picks for one call (what the eager lanes run)."""
    return get(choose(call))


def get(name: str):
    impl = _registered.get(name)  # (the common case in one lookup: a registered or an already loaded backend)
    if impl is not None:
        return impl
    hit = _loaded.get(name)
    if hit is not None and hit[0] is not None:
        return hit[0]
    impl, reason = load_backend(name)
    if impl is None:
        raise RuntimeError(f"fastpeft backend {name!r} is unavailable: {reason}")
    return impl
