"""The `cuda` backend: CUDA C++ kernels from csrc/ (currently the fused LoRA decode GEMV).

The kernels are built ahead of time by setup.py (FASTPEFT_BUILD_CUDA=1 -> module `fastpeft._C`) or,
failing that, just in time on first use with torch.utils.cpp_extension.load (ninja), for the compute
capability of the GPU in use (sm_90a on Hopper). The build is cached under $TORCH_EXTENSIONS_DIR when
set, else ~/.cache/fastpeft/torch_extensions, so it costs about a minute once per machine and torch
version. Importing this module never builds anything and works on CPU-only machines.

Coverage (supports() returns None only then): CUDA tensors, 1 <= M <= 8 rows (decode), a dense base
(or none) with x and weight in float16/bfloat16, exactly one adapter with lora_A/lora_B in float32 or
x's dtype, r <= 128, bias in x's dtype, no LoRA dropout (dropout is a training feature and this kernel
serves inference). The adapter may be DoRA (a magnitude): without dropout its output column scale
g = call.col_scale() (fp32 [N]) is applied to the kernel's fp32 accumulator in the epilogue, before the
bias, so Y = g * (x W^T + s S B^T) + bias is still written once. Backward is the torch backend's on the
saved S (for DoRA its _dora_backward: the LoRA backward on g * dY): decode is inference, and a training
step that does reach this backend with M <= 8 is too small for a dedicated kernel to matter.

Environment: FASTPEFT_CUDA_JIT=0 forbids the just-in-time build; FASTPEFT_CUDA_PDL=0 turns off
programmatic dependent launch (Hopper) between the shrink and GEMV kernels; FASTPEFT_CUDA_VERBOSE=1
shows the build log.
"""
from __future__ import annotations

import functools
import os
import re
import threading
from pathlib import Path
from typing import Optional

import torch

MAX_M = 8
# Automatic dispatch picks this kernel only up to AUTO_MAX_M rows. Measured on an H100 (bf16, K=N=4096,
# r in {16, 64}, CUDA graphs; benchmarks/results/h100_lora_gemv.json): M=1 16.2 us vs F.linear 15.7 us,
# M=4 25 us (peft-style eager 29-39 us), but M=8 37-43 us, slower than the unfused path (29-38 us).
AUTO_MAX_M = 4
GEMV_MAX_R = 128  # kMaxR of csrc/lora_gemv.cu (the Triton kernels go to kernels._common.MAX_R)
CSRC_FILES = ("binding.cpp", "lora_gemv.cu")  # setup.py lists the same two files

_lock = threading.Lock()
_PDL_ENABLED = os.environ.get("FASTPEFT_CUDA_PDL", "1") != "0"  # read once, at import
_modules: dict = {}  # arch string -> loaded module, or str (why it could not be loaded)


def csrc_dir() -> Optional[Path]:
    """csrc/ in a source checkout (editable install) or packaged next to this package."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "csrc", here.parents[1] / "csrc"):
        if all((cand / f).is_file() for f in CSRC_FILES):
            return cand
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def _device_index(device: torch.device) -> int:
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def arch_tag(device: torch.device) -> str:
    """'90a' for Hopper (arch-specific target, as the ahead-of-time build uses), else e.g. '80'."""
    major, minor = _capability(_device_index(device))
    return f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


def nvcc_flags(arch: str) -> list:
    return ["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def _build_dir(name: str) -> Optional[str]:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None  # torch puts it under $TORCH_EXTENSIONS_DIR/<name>
    path = Path(os.path.expanduser("~/.cache/fastpeft/torch_extensions")) / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _load_uncached(arch: str):
    try:  # ahead-of-time build from setup.py
        from fastpeft import _C  # type: ignore[attr-defined]

        if hasattr(_C, "lora_gemv"):
            return _C
    except ImportError:
        pass
    if os.environ.get("FASTPEFT_CUDA_JIT", "1") == "0":
        return "fastpeft._C is not built and FASTPEFT_CUDA_JIT=0 forbids the just-in-time build"
    src = csrc_dir()
    if src is None:
        return f"csrc sources {CSRC_FILES} not found next to {Path(__file__).resolve().parents[1]}"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "the just-in-time build of csrc needs ninja (pip install ninja)"
    # The name carries arch and torch/CUDA versions: one cached build per combination, never a stale
    # binary loaded into another torch.
    tag = re.sub(r"\W", "_", f"{torch.__version__}_cu{torch.version.cuda}")
    name = f"fastpeft_csrc_sm{arch}_pt{tag}"
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(src / f) for f in CSRC_FILES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=nvcc_flags(arch),
            build_directory=_build_dir(name),
            verbose=os.environ.get("FASTPEFT_CUDA_VERBOSE") == "1",
        )
    except Exception as exc:  # noqa: BLE001 - the reason is reported by supports() and lora_fwd
        return f"building csrc ({name}) failed: {type(exc).__name__}: {exc}"


def load(device: torch.device):
    """The compiled module for `device`, or a string saying why there is none (cached either way)."""
    arch = arch_tag(device)
    with _lock:
        if arch not in _modules:
            _modules[arch] = _load_uncached(arch)
        return _modules[arch]


def _shape_reason(x2d, weight, bias, A, B) -> Optional[str]:
    """What the GEMV kernel itself cannot take (shapes were validated by fastpeft.ops already)."""
    M, K = x2d.shape
    if not 1 <= M <= MAX_M:
        return f"the CUDA kernel is a decode GEMV for 1 <= M <= {MAX_M} rows, found M={M}"
    if x2d.dtype not in (torch.float16, torch.bfloat16):
        return f"x must be float16 or bfloat16 for the CUDA kernel, found {x2d.dtype}"
    r = A.shape[0]
    if r > GEMV_MAX_R:
        return f"the CUDA kernel supports r <= {GEMV_MAX_R}, found r={r}"
    if A.dtype != B.dtype or A.dtype not in (torch.float32, x2d.dtype):
        return f"lora_A/lora_B must share float32 or x's dtype {x2d.dtype}, found {A.dtype}/{B.dtype}"
    if bias is not None and bias.dtype != x2d.dtype:
        return f"bias must be in {x2d.dtype}, found {bias.dtype}"
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", A), ("lora_B", B)):
        if t is not None and t.device != x2d.device:
            return f"{name} is on {t.device} but x is on {x2d.device}"
    return None


def _call_reason(call) -> Optional[str]:
    """What the decode kernel cannot take about the call's base and adapter set (no GPU needed to ask)."""
    if call.plan is not None:
        return "a mixed batch (row_index: one adapter per row) is not in the CUDA decode kernel yet"
    if call.base.packed is not None:
        return "the CUDA decode kernel has no quantized base weights yet (the triton backend runs them)"
    if len(call.adapters) != 1:
        return f"the CUDA decode kernel takes exactly one adapter per call, found {len(call.adapters)}"
    a = call.adapters[0]
    if a.dropout_p > 0:
        if a.magnitude is not None:
            return ("DoRA with dropout (training: peft's extra base GEMM on the dropped-out input) is not "
                    "supported by the CUDA decode kernel (the other backends run it)")
        return "LoRA dropout (training) is not supported by the CUDA decode kernel"
    if a.magnitude is not None:
        if a.weight_norm is None:
            return "a DoRA call needs its weight_norm here (fastpeft.ops.lora computes it); found none"
        for name, t in (("magnitude", a.magnitude), ("weight_norm", a.weight_norm)):
            if t.device != call.x.device:
                return f"DoRA's {name} is on {t.device} but x is on {call.x.device}"
    return None


def _module_reason(mod, call) -> Optional[str]:
    """Why the loaded module cannot run this call: it failed to load (mod is the reason), or it is an
    ahead-of-time fastpeft._C built before a feature the call needs (csrc/binding.cpp's FEATURES)."""
    if isinstance(mod, str):
        return mod
    if call.is_dora and "col_scale" not in getattr(mod, "FEATURES", ()):
        return ("the loaded fastpeft._C predates DoRA's column scale in the CUDA decode kernel (its FEATURES "
                "lack 'col_scale'); rebuild it (FASTPEFT_BUILD_CUDA=1) or remove it to use the just-in-time build")
    return None


def supports(call) -> Optional[str]:
    """None when forward() can run this call, else the reason it cannot."""
    if not (call.x.is_cuda and torch.cuda.is_available()):
        return "the CUDA backend needs CUDA tensors"
    reason = _call_reason(call)
    if reason is not None:
        return reason
    a = call.adapters[0]
    reason = _shape_reason(call.x, call.base.weight, call.base.bias, a.A, a.B)
    if reason is not None:
        return reason
    return _module_reason(load(call.x.device), call)


def _use_pdl(device: torch.device, M: int) -> bool:
    # Measured on an H100 (K = N = 4096, bf16, CUDA graphs): PDL saves ~0.8 us at M = 1 (16.2 vs 17.0 us)
    # but cost ~1 us at M = 8, so it is used for single-row decode only.
    return M == 1 and _PDL_ENABLED and _capability(_device_index(device))[0] >= 9


def gemv(x2d, weight, bias, A, B, scale, use_pdl=None, out=None, s_out=None, col_scale=None):
    """Run the compiled kernel: (Y [M, N] in x.dtype, S [M, r] fp32); `out`/`s_out` optionally
    preallocated; `col_scale` (float32 [N] on x's device, or None) multiplies x W^T + s S B^T before the
    bias (DoRA). The binding reports bad arguments as a returned message (C++ exceptions crashed
    the test machine, see csrc/binding.cpp); raise it here."""
    mod = load(x2d.device)
    if isinstance(mod, str):
        raise RuntimeError(f"fastpeft cuda backend is unavailable: {mod}")
    if use_pdl is None:
        use_pdl = _use_pdl(x2d.device, x2d.shape[0])
    # col_scale only when given: a plain call still runs on an older fastpeft._C without that argument
    extra = {} if col_scale is None else {"col_scale": col_scale}
    y, s, err = mod.lora_gemv(x2d, weight, bias, A, B, float(scale), bool(use_pdl), out=out, s_out=s_out, **extra)
    if err:
        raise RuntimeError(f"fastpeft lora_gemv: {err}")
    return y, s


def col_scale_arg(call) -> Optional[torch.Tensor]:
    """The kernel's col_scale for this call: DoRA's g = call.col_scale() as contiguous float32 [N] on x's
    device (a float64 g, from float64 magnitudes, is rounded to the kernel's fp32), or None for plain LoRA."""
    g = call.col_scale()
    if g is None:
        return None
    return g.to(device=call.x.device, dtype=torch.float32).contiguous()


def forward(call):
    """(Y [M, N] in x.dtype, S = x A^T [M, r] fp32) from the fused decode GEMV; a DoRA call's Y is
    g * (x W^T + s S B^T) + bias (no dropout: supports() refuses it, so there is no Z_d to return). The
    dispatcher has run supports() for this call, so it is not repeated; gemv() still raises the
    binding's own message."""
    a = call.adapters[0]
    return gemv(call.x, call.base.weight, call.base.bias, a.A, a.B, a.scale, col_scale=col_scale_arg(call))


def backward(call, dY, S, needs_dx, needs_dA, needs_dB):
    """The torch backend's backward (no kernel: decode is inference; supports() refuses dropout, so
    there is no mask to regenerate). A DoRA call goes to torch_backend._dora_backward through it: the
    LoRA backward on g * dY (the magnitude gradient is dora.magnitude_grad's, outside the backends)."""
    from . import torch_backend

    return torch_backend.backward(call, dY, S, needs_dx, needs_dA, needs_dB)


def auto_ok(call) -> bool:
    """Whether automatic dispatch should pick this backend (see AUTO_MAX_M); forcing it still runs M <= 8."""
    return call.M <= AUTO_MAX_M
