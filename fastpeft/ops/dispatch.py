"""Per-call backend choice: cuda > triton > torch, or the one FASTPEFT_BACKEND forces.

Backends are modules ``fastpeft.ops.<name>_backend`` implementing (spec.md):

    supports(x2d, weight, bias, A, B, dropout_p) -> None | str    # None = can run, str = why not
    lora_fwd(x2d, weight, bias, A, B, scale, dropout_p, seed) -> (Y, S)
    lora_bwd(dY, x2d, weight, A, B, S, scale, dropout_p, seed, needs_dx, needs_dA, needs_dB)

The triton and cuda backends are optional (written separately, need triton / a CUDA build), so they
are imported lazily and any failure to import them just makes them unavailable, with the reason kept
for the error message when one is forced.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable, Optional

from torch import Tensor

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "FASTPEFT_BACKEND"
_REQUIRED = ("supports", "lora_fwd", "lora_bwd")

# name -> (module or None, reason it is unavailable or None)
_loaded: dict[str, tuple[Optional[ModuleType], Optional[str]]] = {}


def load_backend(name: str) -> tuple[Optional[ModuleType], Optional[str]]:
    """Import ``fastpeft.ops.<name>_backend`` once. Returns (module, None) or (None, reason)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown fastpeft backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name not in _loaded:
        modname = f"fastpeft.ops.{name}_backend"
        try:
            mod = importlib.import_module(modname)
        except Exception as e:  # ImportError, or e.g. a triton/CUDA runtime error raised at import
            _loaded[name] = (None, f"{modname} could not be imported ({type(e).__name__}: {e})")
        else:
            missing = [f for f in _REQUIRED if not callable(getattr(mod, f, None))]
            if missing:
                _loaded[name] = (None, f"{modname} does not define {', '.join(missing)}")
            else:
                _loaded[name] = (mod, None)
    return _loaded[name]


def forced_backend() -> Optional[str]:
    """The backend named by FASTPEFT_BACKEND, or None when unset/empty (= automatic choice)."""
    val = os.environ.get(ENV_VAR, "").strip().lower()
    if not val or val == "auto":
        return None
    if val not in BACKENDS:
        raise RuntimeError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a fastpeft backend; "
                           f"expected one of {', '.join(BACKENDS)} (or unset)")
    return val


def triton_interpreting() -> bool:
    """TRITON_INTERPRET set to anything but ''/'0' (Triton's own rule): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_reason(name: str, x2d: Tensor, forced: bool) -> Optional[str]:
    """Device rules that hold whatever a backend's supports() says."""
    if name == "torch":
        return None
    if x2d.device.type == "cuda":
        return None
    if name == "triton" and forced and triton_interpreting():
        return None  # CI path: Triton kernels run on CPU tensors through the interpreter.
    if name == "triton":
        return (f"tensors are on {x2d.device.type}; the triton backend runs on CUDA tensors, or on CPU "
                f"tensors only with TRITON_INTERPRET=1 and {ENV_VAR}=triton")
    return f"tensors are on {x2d.device.type}; the {name} backend needs CUDA tensors"


def why_not(name: str, x2d: Tensor, weight, bias, A, B, dropout_p: float,
            forced: bool = False) -> Optional[str]:
    """None if backend ``name`` can run this call, else the reason it cannot."""
    reason = device_reason(name, x2d, forced)
    if reason is not None:
        return reason
    mod, reason = load_backend(name)
    if mod is None:
        return reason
    try:
        return mod.supports(x2d, weight, bias, A, B, dropout_p)
    except Exception as e:  # a backend bug must not take down the automatic fallback
        return f"{name}.supports raised {type(e).__name__}: {e}"


def _wins(name: str, x2d: Tensor, A: Tensor) -> bool:
    """Automatic choice only: a backend may run more cases than it is measured to win (its
    optional ``auto_ok(x2d, A)``); a forced backend runs whatever its supports() accepts."""
    mod, _ = load_backend(name)
    auto_ok = getattr(mod, "auto_ok", None)
    return auto_ok is None or bool(auto_ok(x2d, A))


def pick(why_not_fn: Callable[[str, bool], Optional[str]], call: str,
         auto_ok: Callable[[str], bool] = lambda name: True) -> str:
    """The backend for one call, given ``why_not_fn(name, forced)`` (None = it can run the call).

    The forced backend (FASTPEFT_BACKEND) or a RuntimeError naming it, the call and the reason; else
    the first of BACKENDS that can run the call and ``auto_ok`` accepts. Shared by every op so the
    rules (order, forcing, errors) live in one place. ``call`` describes the call for messages.
    """
    forced = forced_backend()
    if forced is not None:
        reason = why_not_fn(forced, True)
        if reason is not None:
            raise RuntimeError(f"{ENV_VAR}={forced} forces the {forced} backend, which cannot run this {call}: "
                               f"{reason}")
        return forced
    for name in BACKENDS:
        if why_not_fn(name, False) is None and auto_ok(name):
            return name
    # torch supports every float input; reaching here means non-float tensors were passed.
    raise RuntimeError(f"no fastpeft backend can run this {call}: {why_not_fn('torch', False)}")


def choose(x2d: Tensor, weight, bias, A, B, dropout_p: float) -> str:
    """Name of the backend that runs this lora_linear call. Raises RuntimeError when a forced one cannot."""
    return pick(lambda name, forced: why_not(name, x2d, weight, bias, A, B, dropout_p, forced=forced),
                f"lora_linear call (x {tuple(x2d.shape)} {x2d.dtype} on {x2d.device}, lora_A {A.dtype}, "
                f"r={A.shape[0]}, dropout_p={dropout_p})",
                auto_ok=lambda name: _wins(name, x2d, A))


def get(name: str) -> ModuleType:
    mod, reason = load_backend(name)
    if mod is None:
        raise RuntimeError(f"fastpeft backend {name!r} is unavailable: {reason}")
    return mod
