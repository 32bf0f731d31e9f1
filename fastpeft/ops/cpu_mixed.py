"""The CPU kernel of mixed batches: csrc/lora_mixed_cpu.cpp, each row's adapter term added into Y in one pass.

The torch backend's mixed forward on CPU (torch_backend._mixed_forward, an adapter pool's call) computes the
base GEMM with torch and then hands Y to this kernel instead of its grouped path (gather x, two batched GEMMs
per rank bucket, scatter-add into Y): at a few rows per adapter each of those ops costs more in fixed overhead
than in arithmetic, and rank buckets make mixed ranks cost extra ops. The kernel reads each adapter's A and B^T
once per block of up to four of its rows, at its own rank, and writes Y in place (the source explains the
tiling). Same values as the grouped path up to fp32 summation order, and the same bits from run to run.

Measured on 2 CPU cores (benchmarks/mixed_rows_check.py, benchmarks/results/cpu-2core-mixed-rows.json: 2 or 8
adapters, r 16 or 64, K = N = 1024): its adapter work is 1.2x to 9x below the grouped path's at every batch
from 1 to 4096 rows.

Build: just in time on first use, with the host C++ compiler ($CXX, else c++ / g++ / clang++), ``-O3
-march=native -fopenmp`` (FLAG_SETS), no torch headers: a plain C function called through ctypes, about three
seconds to build. The shared object is cached under $FASTPEFT_CACHE_DIR (else ~/.cache/fastpeft)/cpu, or a
per-user folder under the temporary directory when that cannot be written, named by a hash of the source, the
compiler, the flags and this CPU's model and feature flags (a cache shared between machines never serves code
built for another CPU). It is written under a temporary name and renamed into place. When there is no
compiler or the build fails, :func:`unavailable` says why and the torch backend keeps its grouped path.

FASTPEFT_CPU_KERNEL=0 turns the kernel off (the grouped path runs; benchmarks compare the two this way).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from .csrc_files import csrc_dir

SOURCE = "lora_mixed_cpu.cpp"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
# OpenMP: the library then needs libgomp.so.1, which resolves to the one torch has already loaded (torch's
# wheels bundle it under that soname), so the kernel's blocks run on torch's threads and follow
# torch.set_num_threads. A compiler without OpenMP (or a torch built on another runtime) gets a
# single-threaded build: the second set of flags.
FLAG_SETS = (FLAGS + ("-fopenmp",), FLAGS)
ENV_VAR = "FASTPEFT_CPU_KERNEL"
ACT_DTYPES = (torch.float32, torch.bfloat16)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
MAX_RANK = 1024  # kMaxRank of the source; the kernel itself refuses a larger rank too (returns 1)

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded function, or "reason": why there is none


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_signature() -> str:
    """The CPU model and feature flags (what -march=native compiles for), as far as the OS tells them."""
    sig = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part"):
                    sig.append(line.strip())
                if len(sig) > 6:
                    break
    except OSError:
        pass
    return "\n".join(sig)


def cache_dir() -> Path:
    root = os.environ.get("FASTPEFT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastpeft")
    return Path(root) / "cpu"


def _cache_dirs() -> list:
    """Where a build is looked for, in order: cache_dir(), then a per-user folder under the temporary directory
    (for a home that is read-only or absent, as in some CI and container setups)."""
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    return [cache_dir(), Path(tempfile.gettempdir()) / f"fastpeft-{uid}" / "cpu"]


def _compile(cxx: str, flags: tuple, src: Path, target: Path) -> Optional[str]:
    """Build ``target``; None, or why it failed. Written under a temporary name and renamed into place (a
    concurrent build of the same key writes the same bytes)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
        os.close(fd)
        proc = subprocess.run([cxx, *flags, str(src), "-o", tmp], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            os.unlink(tmp)
            return f"building csrc/{SOURCE} with {cxx} {' '.join(flags)} failed:\n{proc.stderr[-2000:]}"
        os.replace(tmp, target)
    except OSError as e:
        return f"writing the build of csrc/{SOURCE} into {target.parent} failed ({type(e).__name__}: {e})"
    except subprocess.SubprocessError as e:
        return f"building csrc/{SOURCE} into {target.parent} failed ({type(e).__name__}: {e})"
    return None


def _build() -> tuple:
    """(the loaded function, None) or (None, why not)."""
    folder = csrc_dir((SOURCE,))
    if folder is None:
        return None, f"csrc/{SOURCE} was not found next to the fastpeft package"
    src = folder / SOURCE
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found ($CXX, c++, g++ or clang++) to build csrc/" + SOURCE
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the C++ compiler {cxx} does not run ({type(e).__name__}: {e})"
    code = src.read_bytes()
    threaded = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    errors = []
    for flags in FLAG_SETS if threaded else FLAG_SETS[1:]:
        key = hashlib.sha256(b"\0".join([code, cxx.encode(), version.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:20]
        name = f"lora_mixed_cpu_{key}.so"
        target = next((d / name for d in _cache_dirs() if (d / name).is_file()), None)
        err = None
        if target is None:
            for d in _cache_dirs():
                target = d / name
                err = _compile(cxx, flags, src, target)
                if err is None or not err.startswith("writing"):
                    break  # built, or the compiler failed (another folder will not help)
        if err is None:
            break
        errors.append(err)
    else:
        return None, "\n".join(errors)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"loading {target} failed: {e}"
    fn = lib.fastpeft_lora_mixed_cpu
    fn.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64, i64]
    fn.openmp = "-fopenmp" in flags
    fn.path = str(target)
    return fn, None


def _load():
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["reason"] = _build()
    return _state["lib"]


def unavailable() -> Optional[str]:
    """None when the kernel is built and loaded (building it on first call), else why it cannot run."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return f"{ENV_VAR}=0 turns the CPU mixed-batch kernel off"
    fn = _state.get("lib") if "lib" in _state else _load()
    return None if fn is not None else _state["reason"]


PANEL = 32  # columns of B^T per panel (the kernel's expand chunk)


@dataclass(frozen=True)
class SlotTables:
    """An adapter pool in the kernel's layout, kept with the pool until its tables change (:func:`slot_tables`).
    Only the slots a batch uses get their B panels (:meth:`lay_out`): a load into a large serving bank
    re-lays the adapters of the next batch, not the whole pool."""
    A: Tensor      # [R, K] contiguous, float32 or bfloat16: slot k's rank rows start[k] .. start[k] + rank[k] - 1
    B: Tensor      # the pool's B [N, R], the source of the panels
    start: Tensor  # [S] int64
    rank: Tensor   # [S] int64
    scale: Tensor  # [S] float32
    max_rank: int  # the largest rank among the slots
    bptr: Tensor   # [S] int64: the address of slot k's panels, 0 while not laid out
    panels: dict   # slot -> its panels [ceil(N / 32), r_k, 32] in A's dtype (B_k^T, zero-padded), kept alive here

    def lay_out(self, slots) -> None:
        """Lay out the panels of ``slots`` (slot ids; those already laid out or of rank 0 are skipped)."""
        missing = [k for k in slots if k not in self.panels]
        if not missing:
            return
        N = self.B.shape[0]
        Np = -(-N // PANEL) * PANEL
        starts, ranks = self.start.tolist(), self.rank.tolist()
        for k in missing:
            st, r = starts[k], ranks[k]
            Bt = self.B.new_zeros((r, Np), dtype=self.A.dtype)
            Bt[:, :N] = self.B[:, st:st + r].t()
            self.panels[k] = Bt.view(r, Np // PANEL, PANEL).transpose(0, 1).contiguous()
            self.bptr[k] = self.panels[k].data_ptr() if r else 0


def slot_tables(A: Tensor, B: Tensor, start: Tensor, rank: Tensor, scale: Tensor, slots=None) -> SlotTables:
    """The kernel's tables for a pool's A [R, K], B [N, R] and slot tables, with the panels of ``slots`` laid
    out (None: every slot). A bfloat16 pool (A and B) stays bfloat16, read as it is (no float32 copy beside
    the pool); any other dtype is copied to float32. A is copied only where its dtype or layout differs."""
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"cpu_mixed.slot_tables: A must be [R, K] and B [N, R]; got A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}")
    S = start.shape[0]
    if start.dim() != 1 or tuple(rank.shape) != (S,) or tuple(scale.shape) != (S,):
        raise ValueError(f"cpu_mixed.slot_tables: start, rank and scale must be [S]; got {tuple(start.shape)}, "
                         f"{tuple(rank.shape)}, {tuple(scale.shape)}")
    wdt = torch.bfloat16 if A.dtype == B.dtype == torch.bfloat16 else torch.float32
    ranks = rank.tolist()
    R = A.shape[0]
    for k, (st, r) in enumerate(zip(start.tolist(), ranks)):
        if r and (st < 0 or r < 0 or st + r > R):  # the kernel reads A[start : start + rank] unchecked
            raise ValueError(f"cpu_mixed.slot_tables: slot {k} takes rank rows [{st}, {st + r}), outside A's {R} "
                             f"rows")
    tables = SlotTables(A.detach().to(wdt).contiguous(), B.detach(), start.to(torch.int64).contiguous(), rank.to(torch.int64).contiguous(),
                        scale.to(torch.float32).contiguous(), max(ranks, default=0),
                        torch.zeros(S, dtype=torch.int64), {})
    tables.lay_out(range(S) if slots is None else slots)
    return tables


def plan_offsets(offsets: tuple) -> Tensor:
    """A plan's segment offsets (host ints) as the kernel's int64 tensor."""
    return torch.tensor(offsets, dtype=torch.int64)


def built_with_openmp() -> bool:
    """Whether the loaded kernel runs its blocks on torch's OpenMP threads (False: one thread, or not loaded)."""
    fn = _load()
    return bool(fn is not None and fn.openmp)


def mixed_add_(Y: Tensor, x: Tensor, tables: SlotTables, order: Tensor, offsets: Tensor,
               fn: str = "lora (mixed batch, cpu kernel)") -> Tensor:
    """Y[i] += scale_k * (x[i] A_k^T) B_k for every row i of slot k (segment k + 1 of the plan), in place.

    Y [M, N] and x [M, K]: CPU, float32 or bfloat16 (one dtype), unit column stride; ``tables`` from
    :func:`slot_tables` (K and N matching; float32 or bfloat16 weights, with either activation dtype); order [M]
    int64 (rows sorted by slot) and offsets [S + 2] int64 (:func:`plan_offsets`). Base rows (segment 0) and
    empty slots keep Y."""
    if Y.dim() != 2 or x.dim() != 2:
        raise ValueError(f"{fn}: x and Y must be 2-D; got x {tuple(x.shape)}, Y {tuple(Y.shape)}")
    if x.dtype != Y.dtype:
        raise ValueError(f"{fn}: x and Y must share a dtype among {ACT_DTYPES}; got x {x.dtype}, Y {Y.dtype}")
    return bind(tables, offsets, Y.dtype, fn)(Y, x, order)


def bind(tables: SlotTables, offsets: Tensor, dtype: torch.dtype,
         fn: str = "lora (mixed batch, cpu kernel)") -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """:func:`mixed_add_` with what stays fixed over a decode loop checked once: ``add(Y, x, order)`` for the slot
    tables, the plan's offsets [S + 2] (int64) and the activations' dtype. Each call still checks its own x, Y and
    order (a few comparisons; the full messages when one fails), and the kernel checks the plan's offsets and
    order before it writes, so a bound adder never reads or writes outside x, Y and the tables (slot_tables
    checks each slot's rank rows against A). It keeps the tables and offsets alive in ``add.keep`` (the kernel
    reads them by address)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"{fn}: the CPU mixed-batch kernel is unavailable: {_state['reason']}")
    if dtype not in ACT_DTYPES:
        raise ValueError(f"{fn}: x and Y must share a dtype among {ACT_DTYPES}; got x {dtype}, Y {dtype}")
    S = tables.start.shape[0]
    if offsets.dtype != torch.int64 or tuple(offsets.shape) != (S + 2,) or not offsets.is_contiguous():
        raise ValueError(f"{fn}: offsets must be contiguous int64 [{S + 2}] (the plan's segments for {S} slots); "
                         f"got {tuple(offsets.shape)} {offsets.dtype} strides {offsets.stride()}")
    if tables.A.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{fn}: the slot tables' A must be one of {WEIGHT_DTYPES}; got {tables.A.dtype}")
    if tables.max_rank > MAX_RANK:
        raise ValueError(f"{fn}: a slot has rank {tables.max_rank}, above the kernel's {MAX_RANK}")
    if not offsets.is_cpu:
        raise ValueError(f"{fn}: the plan's offsets must be a CPU tensor; got {offsets.device}")
    M, K, N = int(offsets[-1]), tables.A.shape[1], tables.B.shape[0]
    act_bf16, w_bf16 = int(dtype == torch.bfloat16), int(tables.A.dtype == torch.bfloat16)
    # the kernel's arguments after x, Y and order, by address (add.keep holds their tensors)
    fixed = (tables.A.data_ptr(), tables.bptr.data_ptr())
    rest = (offsets.data_ptr(), S, tables.start.data_ptr(), tables.rank.data_ptr(), tables.scale.data_ptr(), K, N)
    keep = (tables, offsets)

    def add(Y: Tensor, x: Tensor, order: Tensor) -> Tensor:
        if (Y.shape != (M, N) or x.shape != (M, K) or Y.dtype != dtype or x.dtype != dtype or Y.stride(1) != 1
                or x.stride(1) != 1 or order.dtype != torch.int64 or order.shape != (M,)
                or not order.is_contiguous() or not (Y.is_cpu and x.is_cpu and order.is_cpu)):
            _refuse(fn, Y, x, order, M, K, N, dtype)
        if M and N:
            rc = lib(act_bf16, w_bf16, x.data_ptr(), x.stride(0), Y.data_ptr(), Y.stride(0), *fixed,
                     order.data_ptr(), *rest)
            if rc == 2:
                raise ValueError(f"{fn}: a slot with rows has no B panels laid out (SlotTables.lay_out)")
            if rc == 3:
                raise ValueError(f"{fn}: the plan is malformed: its offsets {offsets.tolist()} must rise from 0 to "
                                 f"M={M}, and its order must hold rows in [0, {M})")
            if rc:
                raise ValueError(f"{fn}: a slot with rows has rank above the kernel's {MAX_RANK}")
        return Y

    add.keep = keep
    return add


def _refuse(fn: str, Y: Tensor, x: Tensor, order: Tensor, M: int, K: int, N: int, dtype: torch.dtype) -> None:
    """The ValueError for a call a bound adder does not take, naming what is wrong."""
    if Y.dim() != 2 or x.dim() != 2:
        raise ValueError(f"{fn}: x and Y must be 2-D; got x {tuple(x.shape)}, Y {tuple(Y.shape)}")
    if x.dtype != dtype or Y.dtype != dtype:
        raise ValueError(f"{fn}: x and Y must both be {dtype} (the bound dtype); got x {x.dtype}, Y {Y.dtype}")
    if x.shape[1] != K or Y.shape[1] != N:
        raise ValueError(f"{fn}: the slot tables are for K={K}, N={N}; x and Y have K={x.shape[1]}, N={Y.shape[1]}")
    if x.shape[0] != Y.shape[0] or x.stride(1) != 1 or Y.stride(1) != 1:
        raise ValueError(f"{fn}: x must be [M={Y.shape[0]}, K] and Y [M, N] with unit column strides; got x "
                         f"{tuple(x.shape)} strides {x.stride()}, Y strides {Y.stride()}")
    if Y.shape[0] != M:
        raise ValueError(f"{fn}: the plan's offsets are for {M} rows; x and Y have {Y.shape[0]}")
    if order.dtype != torch.int64 or tuple(order.shape) != (M,) or not order.is_contiguous():
        raise ValueError(f"{fn}: order must be contiguous int64 [{M}]; got {tuple(order.shape)} {order.dtype}")
    raise ValueError(f"{fn}: x, Y and the plan must be CPU tensors; got {x.device}, {Y.device}, {order.device}")
