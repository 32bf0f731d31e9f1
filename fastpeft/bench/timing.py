"""Measurement primitives shared by `fastpeft bench` and the pytest-benchmark suite.

Everything here measures one callable at a time; the side-by-side comparison (fastpeft vs. peft
vs. base, same process, same device) is arranged by fastpeft.bench.runner.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch


@dataclass
class Timing:
    """Milliseconds per call: the median and the 20th/80th percentiles (the spread we report)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    method: str

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms,
                "runs": self.runs, "method": self.method}


def _quantile(sorted_vals: list, q: float) -> float:
    # Linear interpolation between order statistics; fine for the handful of runs we take.
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def time_cpu(fn: Callable[[], object], *, warmup: int, repeats: int,
             before_each: Optional[Callable[[], None]] = None) -> Timing:
    """Wall-clock timing with perf_counter; `before_each` (e.g. dropping grads) runs outside the timed span."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        if before_each is not None:
            before_each()
        fn()
    times = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), repeats, "perf_counter")


def time_cuda(fn: Callable[[], object], *, warmup: int, repeats: int,
              before_each: Optional[Callable[[], None]] = None,
              grad_to_none: Optional[Iterable[torch.Tensor]] = None) -> Timing:
    """GPU timing. triton.testing.do_bench when triton is importable: it flushes L2 before every run, so
    a weight that would fit in L2 (a 4096x4096 bf16 W is 32 MiB, the H100's L2 is 50 MB) is re-read from
    HBM each time, as it would be in a real network. Otherwise CUDA events around each call, with an
    explicit L2 flush through a 256 MiB buffer."""
    grads = list(grad_to_none) if grad_to_none is not None else None
    try:
        from triton.testing import do_bench
    except Exception:  # pragma: no cover - triton ships with CUDA torch on Linux
        do_bench = None
    if do_bench is not None and before_each is None:
        torch.cuda.synchronize()
        for _ in range(max(1, warmup)):
            fn()  # compile/autotune outside do_bench's own estimate
        torch.cuda.synchronize()
        # do_bench sizes its loop by time (rep ms); estimate one call to ask for about `repeats` runs.
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        rep_ms = max(est_ms * repeats, 20.0)
        q = do_bench(fn, warmup=max(5.0, est_ms * 2), rep=rep_ms, grad_to_none=grads,
                     quantiles=[0.5, 0.2, 0.8])
        med, p20, p80 = (float(v) for v in q)
        return Timing(med, p20, p80, max(1, int(rep_ms / est_ms)), "triton.testing.do_bench")
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    for _ in range(warmup):
        if before_each is not None:
            before_each()
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        if before_each is not None:
            before_each()
        if grads is not None:
            for g in grads:
                g.grad = None
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), repeats, "cuda events")


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int,
            grad_to_none: Optional[Iterable[torch.Tensor]] = None) -> Timing:
    grads = list(grad_to_none) if grad_to_none is not None else []

    def drop_grads():
        for g in grads:
            g.grad = None

    if device.type == "cuda":
        return time_cuda(fn, warmup=warmup, repeats=repeats, grad_to_none=grads)
    return time_cpu(fn, warmup=warmup, repeats=repeats, before_each=drop_grads if grads else None)


class SavedTensorCounter:
    """Counts the bytes autograd keeps for backward while the context is active.

    Every tensor handed to ctx.save_for_backward (or saved by a built-in op) passes through the pack
    hook. Tensors are deduplicated by their storage, so x saved by three ops (or a view of x) counts
    once, and a storage counts with its full size. Storages that belong to the model's parameters or
    buffers are left out: they are alive anyway, and what we compare is the activation memory a
    training step adds."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {self._key(t) for t in exclude}
        self._seen: dict = {}
        self.count = 0
        self._ctx = None

    @staticmethod
    def _key(t: torch.Tensor):
        st = t.untyped_storage()
        return (t.device.type, t.device.index, st.data_ptr(), st.nbytes())

    def _pack(self, t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            try:
                key = self._key(t)
            except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. subclasses)
                key = None
            if key is not None and key not in self._exclude and key not in self._seen:
                self._seen[key] = key[3]
        self.count += 1
        return t

    @staticmethod
    def _unpack(t):
        return t

    @property
    def bytes(self) -> int:
        return int(sum(self._seen.values()))

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        return False


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes saved for backward by one call of fn (the graph is dropped afterwards)."""
    with SavedTensorCounter(exclude) as c:
        out = fn()
    del out
    return c.bytes


def _version(mod_name: str) -> Optional[str]:
    try:
        mod = __import__(mod_name)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What a result file must say about where it was measured."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    env = {
        "device": str(device),
        "device_name": _cpu_name(),
        "cpu_name": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "fastpeft": _version("fastpeft"),
        "fastpeft_backend_env": os.environ.get("FASTPEFT_BACKEND"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["cuda"] = torch.version.cuda
        env["sm_count"] = props.multi_processor_count
        env["gpu_memory_bytes"] = props.total_memory
        env["capability"] = f"{props.major}.{props.minor}"
    return env


@contextlib.contextmanager
def cuda_peak_memory(device: torch.device):
    """Yields a dict filled on exit with the peak bytes allocated inside the block (absolute, and above
    what was allocated when it began). Empty on CPU, where torch has no allocator statistics."""
    stats: dict = {}
    if device.type != "cuda":
        yield stats
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    yield stats
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    stats["peak_bytes"] = int(peak)
    stats["peak_above_start_bytes"] = int(peak - start)
