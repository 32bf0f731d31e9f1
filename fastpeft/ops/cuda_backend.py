"""The `cuda` backend: CUDA C++ kernels from csrc/ (currently the fused LoRA decode GEMV, one adapter or a
mixed batch).

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

Mixed batches (call.plan: row i takes adapter k = row_index[i], -1 = the base alone; BGMV) run on the same
two-kernel GEMV (csrc/lora_gemv.cu, "mixed batches"): 1 <= M <= 8 rows, a dense base (or none), x in
float16/bfloat16, any number of adapters (or an adapter pool's slots) of ranks 0..128; the adapters that have
rows in the batch must share one lora_A/lora_B dtype (float32 or x's) and have no dropout and no DoRA magnitude
(a pool's DoRA slots: the other backends run them). Each row reads its own adapter's
A and B and loops to its own rank; Y is written once. forward() hands the kernel only the adapters that have
rows (at most M, known from the plan's host-side offsets, so no sync), as a by-value table of pointers;
row_index stays on the device. S is [M, max r over the call's adapters] fp32, row i's values in its first r_k
columns and zeros after them (the contract). Backward: torch_backend's _mixed_backward on that S.
CUDA graphs: a captured mixed launch keeps the adapter table it was captured with (see csrc/lora_gemv.cu);
rows that later name other adapters come out NaN, so recapture when the set of adapters changes.

Quantized base weights (call.base.packed: nf4 with or without double quant, int4 with or without g_idx, int8,
fp8) run csrc/lora_qgemv.cu's decode GEMV (fastpeft/ops/cuda_quant.py says what it takes): one adapter as above
or none (r = 0), no mixed batches; backward as for the dense GEMV (the torch backend's, W dequantized).

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

from . import cuda_quant
from .csrc_files import csrc_dir

MAX_M = 8
# Automatic dispatch picks this kernel only up to AUTO_MAX_M rows. Measured on an H100 (bf16, K=N=4096,
# r in {16, 64}, CUDA graphs; benchmarks/results/h100_lora_gemv.json): M=1 16.2 us vs F.linear 15.7 us,
# M=4 25 us (peft-style eager 29-39 us), but M=8 37-43 us, slower than the unfused path (29-38 us).
AUTO_MAX_M = 4
GEMV_MAX_R = 128  # kMaxR of csrc/lora_gemv.cu (the Triton kernels go to kernels._common.MAX_R)
CSRC_FILES = ("binding.cpp", "lora_gemv.cu", "lora_qgemv.cu")  # setup.py lists the same files

_lock = threading.Lock()
_PDL_ENABLED = os.environ.get("FASTPEFT_CUDA_PDL", "1") != "0"  # read once, at import
_modules: dict = {}  # arch string -> loaded module, or str (why it could not be loaded)


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
    src = csrc_dir(CSRC_FILES)
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
    """What the GEMV kernel itself cannot take (shapes were validated by fastpeft.ops already); A and B may be
    None (the base checks only)."""
    M, K = x2d.shape
    if not 1 <= M <= MAX_M:
        return f"the CUDA kernel is a decode GEMV for 1 <= M <= {MAX_M} rows, found M={M}"
    if x2d.dtype not in (torch.float16, torch.bfloat16):
        return f"x must be float16 or bfloat16 for the CUDA kernel, found {x2d.dtype}"
    if A is not None:
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


def _packed_reason(call) -> Optional[str]:
    """What the quantized decode GEMV (csrc/lora_qgemv.cu, cuda_quant.py) cannot take: the GEMV's own rules, with
    the adapter when there is one (its kMaxR equals the dense GEMV's), and the packed format's."""
    a = call.adapters[0] if call.adapters else None
    return (_shape_reason(call.x, None, call.base.bias, a.A if a else None, a.B if a else None)
            or cuda_quant.quant_reason(call.base.packed, call.x))


def _call_reason(call) -> Optional[str]:
    """What the decode kernel cannot take about the call's base and adapter set (no GPU needed to ask)."""
    if call.base.packed is not None:  # csrc/lora_qgemv.cu (cuda_quant): also without an adapter (r = 0)
        reason = cuda_quant.call_reason(call)
        if reason is not None or not call.adapters:
            return reason
    if call.plan is not None:
        return _mixed_call_reason(call)
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


def _active(call) -> list:
    """Indices k of a mixed call's adapters that have rows in this batch (at most M; host ints, no sync)."""
    plan = call.plan
    return [k for k in range(len(call.adapters)) if plan.count(k) > 0]


def _mixed_call_reason(call) -> Optional[str]:
    """The adapter rules of a mixed batch (call.plan): inference only, plain LoRA, for the adapters that have
    rows here (an adapter pool's other slots, DoRA or not, are never read); any number of adapters."""
    for k in _active(call):
        a = call.adapters[k]
        if a.dropout_p > 0:
            return (f"LoRA dropout (training) is not supported by the CUDA decode kernel (adapter {k} of a mixed "
                    f"batch has dropout_p={a.dropout_p})")
        if a.magnitude is not None:
            return f"DoRA in a mixed batch (adapter {k} has a magnitude) is not supported by the CUDA decode kernel"
    return None


def _mixed_shape_reason(call) -> Optional[str]:
    """What the mixed (BGMV) decode kernel cannot take about the tensors: _shape_reason for the base and for
    every adapter with rows here, S's width (the largest rank of all the call's adapters) <= 128, and one
    lora_A/lora_B dtype for the adapters with rows (the kernel is compiled per A/B dtype)."""
    x2d, base = call.x, call.base
    reason = _shape_reason(x2d, base.weight, base.bias, None, None)
    if reason is not None:
        return reason
    if call.r_total > GEMV_MAX_R:
        return (f"the CUDA kernel supports r <= {GEMV_MAX_R}; the mixed batch's largest rank (the width of S) is "
                f"{call.r_total}")
    active = _active(call)
    for k in active:
        a = call.adapters[k]
        reason = _shape_reason(x2d, None, None, a.A, a.B)
        if reason is not None:
            return f"adapter {k} of the mixed batch: {reason}"
    dtypes = sorted({str(call.adapters[k].A.dtype) for k in active})
    if len(dtypes) > 1:
        return (f"the CUDA mixed-batch kernel needs one lora_A/lora_B dtype for the adapters with rows, found "
                f"{', '.join(dtypes)}")
    if call.plan.row_index.device != x2d.device:
        return f"row_index is on {call.plan.row_index.device} but x is on {x2d.device}"
    return None


def _module_reason(mod, call) -> Optional[str]:
    """Why the loaded module cannot run this call: it failed to load (mod is the reason), or it is an
    ahead-of-time fastpeft._C built before a feature the call needs (csrc/binding.cpp's FEATURES)."""
    if isinstance(mod, str):
        return mod
    if call.is_dora and "col_scale" not in getattr(mod, "FEATURES", ()):
        return ("the loaded fastpeft._C predates DoRA's column scale in the CUDA decode kernel (its FEATURES "
                "lack 'col_scale'); rebuild it (FASTPEFT_BUILD_CUDA=1) or remove it to use the just-in-time build")
    if call.base.packed is not None and "qgemv" not in getattr(mod, "FEATURES", ()):
        return ("the loaded fastpeft._C predates the quantized decode GEMV (its FEATURES lack 'qgemv'); rebuild it "
                "(FASTPEFT_BUILD_CUDA=1) or remove it to use the just-in-time build")
    if call.plan is not None and "mixed" not in getattr(mod, "FEATURES", ()):
        return ("the loaded fastpeft._C predates mixed batches (row_index) in the CUDA decode kernel (its FEATURES "
                "lack 'mixed'); rebuild it (FASTPEFT_BUILD_CUDA=1) or remove it to use the just-in-time build")
    return None


def supports(call) -> Optional[str]:
    """None when forward() can run this call, else the reason it cannot."""
    if not (call.x.is_cuda and torch.cuda.is_available()):
        return "the CUDA backend needs CUDA tensors"
    reason = _call_reason(call)
    if reason is not None:
        return reason
    if call.plan is not None:
        reason = _mixed_shape_reason(call)
    elif call.base.packed is not None:
        reason = _packed_reason(call)
    else:
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


def gemv_mixed(x2d, weight, bias, As, Bs, scales, adapter_ids, row_index, s_cols, use_pdl=None, out=None,
               s_out=None):
    """Run the mixed-batch kernel: (Y [M, N] in x.dtype, S [M, s_cols] fp32). Row m takes the adapter q with
    adapter_ids[q] == row_index[m] (row_index: int64 [M] on x's device; -1 = base only); As/Bs/scales/
    adapter_ids list at most 8 adapters (those with rows; see mixed_args). S row m holds x[m] A_q^T in its
    first r_q columns and zeros after them. Errors come back from the binding as a message; raised here."""
    mod = load(x2d.device)
    if isinstance(mod, str):
        raise RuntimeError(f"fastpeft cuda backend is unavailable: {mod}")
    if not hasattr(mod, "lora_gemv_mixed"):
        raise RuntimeError("the loaded fastpeft._C predates mixed batches (no lora_gemv_mixed); rebuild it "
                           "(FASTPEFT_BUILD_CUDA=1) or remove it to use the just-in-time build")
    if use_pdl is None:
        use_pdl = _use_pdl(x2d.device, x2d.shape[0])
    if row_index.dtype != torch.int64:
        row_index = row_index.to(torch.int64)
    y, s, err = mod.lora_gemv_mixed(x2d, weight, bias, list(As), list(Bs), [float(v) for v in scales],
                                    [int(k) for k in adapter_ids], row_index, int(s_cols), bool(use_pdl),
                                    out=out, s_out=s_out)
    if err:
        raise RuntimeError(f"fastpeft lora_gemv_mixed: {err}")
    return y, s


def mixed_args(call) -> tuple:
    """(As, Bs, scales, adapter_ids, row_index, s_cols) for gemv_mixed from a mixed call: only the adapters that
    have rows in this batch (plan.count(k) > 0, host ints: no sync), at most M <= 8 of them, rank-0 ones
    included (their rows get the base alone); adapter_ids are their indices k in the call, which row_index
    holds; s_cols = call.r_total (the largest rank of all the call's adapters, the contract's width of S)."""
    active = _active(call)
    ads = [call.adapters[k] for k in active]
    return ([a.A for a in ads], [a.B for a in ads], [float(a.scale) for a in ads], active, call.plan.row_index,
            call.r_total)


def col_scale_arg(call) -> Optional[torch.Tensor]:
    """The kernel's col_scale for this call: DoRA's g = call.col_scale() as contiguous float32 [N] on x's
    device (a float64 g, from float64 magnitudes, is rounded to the kernel's fp32), or None for plain LoRA."""
    g = call.col_scale()
    if g is None:
        return None
    return g.to(device=call.x.device, dtype=torch.float32).contiguous()


def forward(call):
    """(Y [M, N] in x.dtype, S = x A^T [M, r] fp32) from the fused decode GEMV; a DoRA call's Y is
    g * (x W^T + s S B^T) + bias (no dropout: supports() refuses it, so there is no Z_d to return); a mixed
    call's S is [M, max r] (gemv_mixed). The dispatcher has run supports() for this call, so it is not
    repeated; gemv() / gemv_mixed() still raise the binding's own message."""
    if call.plan is not None:
        return gemv_mixed(call.x, call.base.weight, call.base.bias, *mixed_args(call))
    if call.base.packed is not None:
        mod = load(call.x.device)
        if isinstance(mod, str):
            raise RuntimeError(f"fastpeft cuda backend is unavailable: {mod}")
        return cuda_quant.forward(call, mod, _use_pdl(call.x.device, call.M), col_scale_arg(call))
    a = call.adapters[0]
    return gemv(call.x, call.base.weight, call.base.bias, a.A, a.B, a.scale, col_scale=col_scale_arg(call))


def backward(call, dY, S, needs_dx, needs_dA, needs_dB):
    """The torch backend's backward (no kernel: decode is inference; supports() refuses dropout, so
    there is no mask to regenerate). A DoRA call goes to torch_backend._dora_backward through it: the
    LoRA backward on g * dY (the magnitude gradient is dora.magnitude_grad's, outside the backends); a mixed
    call to its _mixed_backward, on the kernel's [M, max r] S."""
    from . import torch_backend

    return torch_backend.backward(call, dY, S, needs_dx, needs_dA, needs_dB)


def auto_ok(call) -> bool:
    """Whether automatic dispatch should pick this backend (see AUTO_MAX_M; a packed base:
    cuda_quant.QUANT_AUTO_MAX_M); forcing it still runs M <= 8."""
    return call.M <= (cuda_quant.QUANT_AUTO_MAX_M if call.base.packed is not None else AUTO_MAX_M)
