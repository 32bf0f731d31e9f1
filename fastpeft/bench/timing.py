"""Measurement primitives shared by `fastpeft bench` and the pytest-benchmark suite.

Everything here measures one callable at a time; the side-by-side comparison (fastpeft vs. peft
vs. base, same process, same device) is arranged by fastpeft.bench.runner.
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import random
import statistics
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

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


def cuda_graph_time_us(fn: Callable[..., object], sets: Sequence[tuple], *, iters: int = 32,
                       repeats: int = 15) -> float:
    """Median GPU microseconds per call of fn(*args), args cycling over `sets`: `iters` calls captured in one
    CUDA graph, replayed `repeats` times. Decode kernels take microseconds, less than a Python call issues
    them in; the graph leaves the GPU's time only. `sets` should hold enough weight copies to exceed L2, so
    that each call reads its weights from HBM as a model's layers do. The warm-up (three calls on a side
    stream) runs Triton's autotuning and any build outside the capture."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fn(*sets[i % len(sets)])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fn(*sets[i % len(sets)])
    times = []
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1000 / iters)
    return statistics.median(times)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int,
            grad_to_none: Optional[Iterable[torch.Tensor]] = None) -> Timing:
    grads = list(grad_to_none) if grad_to_none is not None else []

    def drop_grads():
        for g in grads:
            g.grad = None

    if device.type == "cuda":
        return time_cuda(fn, warmup=warmup, repeats=repeats, grad_to_none=grads)
    return time_cpu(fn, warmup=warmup, repeats=repeats, before_each=drop_grads if grads else None)


def summarize(samples: Sequence[float], method: str) -> Timing:
    """Median and 20th/80th percentiles of per-run milliseconds."""
    vals = sorted(samples)
    return Timing(statistics.median(vals), _quantile(vals, 0.2), _quantile(vals, 0.8), len(vals), method)


def _round_order(names: list, i: int) -> list:
    """Round i's order of the callables: a permutation drawn from a generator seeded by i."""
    order = list(names)
    random.Random(i).shuffle(order)
    return order


def time_interleaved(fns: Mapping[str, Callable[[], object]], device: torch.device, *, warmup: int, repeats: int,
                     grad_to_none: Optional[Mapping[str, Iterable[torch.Tensor]]] = None,
                     setup: Optional[Mapping[str, Callable[[], None]]] = None,
                     number: int = 1) -> Dict[str, List[float]]:
    """Time several callables round-robin: round i runs each of them once, so a drift in the machine's speed
    (another process, clocks, thermals) reaches all of them alike, and run i of one callable can be paired with
    run i of another (same round, seconds apart). The order within a round is a fresh permutation each round
    (seeded: reruns repeat it), so no callable always runs right after the same one: a fixed cyclic order let
    a row that follows its twin (the same code, the same caches) run warmer than the twin did, which biased
    ratios between them by 10-15% on a 2-core CPU.

    Returns {name: [ms of round 0, round 1, ...]}; :func:`summarize` makes a Timing of one list, and the
    ratio of two callables is best taken as the median of the per-round ratios (:func:`paired`).

    CPU: one perf_counter span per call, ``repeats`` rounds, Python's garbage collector paused inside the
    timed spans (collected between rounds), .grad of ``grad_to_none[name]`` dropped outside them.
    CUDA: ``repeats`` is split into min(repeats, 5) rounds; in each round every callable gets one
    :func:`time_cuda` measurement (do_bench, L2 flushed per run) of about repeats / rounds runs, whose
    median is that round's sample.

    ``setup[name]`` (optional) runs before every call of that callable, outside the timed span (e.g. rolling
    a KV cache back to the prompt); on CUDA it makes time_cuda use CUDA events instead of do_bench.
    ``number`` (CPU only) calls per timed span, the sample being the span over ``number``: for calls of
    well under a millisecond, where one perf_counter span is mostly noise. It needs no ``setup``."""
    names = list(fns)
    setups = {n: (setup or {}).get(n) for n in names}
    if number < 1:
        raise ValueError(f"number must be >= 1, got {number}")
    if number > 1 and any(setups.values()):
        raise ValueError("time_interleaved: number > 1 times several calls per span, which a per-call setup "
                         "cannot precede")
    grads = {n: list(grad_to_none.get(n, ())) if grad_to_none else [] for n in names}

    def drop(n):
        for g in grads[n]:
            g.grad = None

    samples: Dict[str, List[float]] = {n: [] for n in names}
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if device.type == "cuda":
        rounds = min(repeats, 5)
        per_round = max(3, repeats // rounds)
        for i in range(rounds):
            order = _round_order(names, i)
            for n in order:
                kw = {"before_each": setups[n]} if setups[n] is not None else {}
                t = time_cuda(fns[n], warmup=warmup if i == 0 else 1, repeats=per_round, grad_to_none=grads[n], **kw)
                samples[n].append(t.median_ms)
        return samples
    for _ in range(warmup):
        for n in names:
            drop(n)
            if setups[n] is not None:
                setups[n]()
            fns[n]()
    gc_was_enabled = gc.isenabled()
    try:
        for i in range(repeats):
            gc.collect()
            gc.disable()
            order = _round_order(names, i)
            for n in order:
                drop(n)
                if setups[n] is not None:
                    setups[n]()
                fn = fns[n]
                t0 = time.perf_counter()
                for _ in range(number):
                    fn()
                samples[n].append((time.perf_counter() - t0) * 1e3 / number)
            if gc_was_enabled:
                gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    for n in names:
        drop(n)
    return samples


def paired(a: Sequence[float], b: Sequence[float], op: str = "ratio") -> dict:
    """Per-round a_i / b_i (op "ratio") or a_i - b_i ("diff") of two interleaved sample lists: median and
    20th/80th percentiles. Pairing runs of one round cancels the drift that both saw."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired: need two equally long non-empty sample lists, got {len(a)} and {len(b)}")
    vals = sorted((x / y if y else float("nan")) if op == "ratio" else x - y for x, y in zip(a, b))
    return {"median": statistics.median(vals), "p20": _quantile(vals, 0.2), "p80": _quantile(vals, 0.8)}


class _Held:
    """What the pack hook hands autograd instead of the tensor: the graph holds it as long as it keeps the
    saved tensor, so a weak reference to it says whether the tensor is still kept for backward."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class SavedTensorCounter:
    """Counts the bytes autograd keeps for backward while the context is active.

    Every tensor handed to ctx.save_for_backward (or saved by a built-in op) passes through the pack
    hook. Tensors are deduplicated by their storage, so x saved by three ops (or a view of x) counts
    once, and a storage counts with its full size. Storages that belong to the model's parameters or
    buffers are left out: they are alive anyway, and what we compare is the activation memory a
    training step adds.

    Only what the graph still holds when the context exits counts (``bytes``): a tensor saved by a
    graph that dies inside the forward (e.g. peft's DoRA computes B A through the LoRA modules on an
    identity matrix and keeps only the detached result) is not kept for backward. Its storage can even
    be reused by a later saved tensor of the same size, which dedup by storage would otherwise merge.
    ``packed_bytes`` is everything that passed the hook, those transient tensors included."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {self._key(t) for t in exclude}
        self._seen: dict = {}
        self._held: list = []  # (weak reference to the _Held the graph keeps, storage key)
        self._bytes_at_exit: Optional[int] = None
        self.count = 0
        self._ctx = None

    @staticmethod
    def _key(t: torch.Tensor):
        st = t.untyped_storage()
        return (t.device.type, t.device.index, st.data_ptr(), st.nbytes())

    def _pack(self, t):
        self.count += 1
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            try:
                key = self._key(t)
            except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. subclasses)
                key = None
            if key is not None and key not in self._exclude:
                self._seen.setdefault(key, key[3])
                held = _Held(t)
                self._held.append((weakref.ref(held), key))
                return held
        return t

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Held) else h

    def _live_bytes(self) -> int:
        live = {key for ref, key in self._held if ref() is not None}
        return int(sum(key[3] for key in live))

    @property
    def bytes(self) -> int:
        """Bytes of the distinct storages the graph still keeps (when the context exited, once it has)."""
        return self._bytes_at_exit if self._bytes_at_exit is not None else self._live_bytes()

    @property
    def packed_bytes(self) -> int:
        """Bytes of the distinct storages that passed the pack hook, kept or not."""
        return int(sum(self._seen.values()))

    def __enter__(self):
        self._bytes_at_exit = None
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._bytes_at_exit = self._live_bytes()
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


def memory_fields(bench, device: torch.device, tokens: Optional[int] = None, step_ms: Optional[float] = None) -> dict:
    """The memory part of a bench row (models.Bench): bytes saved for backward, the adapters' dtype, on CUDA the
    peak memory of one more step, tokens/s when ``tokens`` is given, and the bench's own extra fields."""
    row = {"saved_bytes": saved_bytes(bench.forward, exclude=bench.state), "adapter_dtype": bench.adapter_dtype}
    if tokens is not None:
        row["tokens_per_s"] = tokens / (step_ms / 1e3)
    if device.type == "cuda":
        with cuda_peak_memory(device) as mem:
            bench.step()
        row["peak_mem_bytes"] = mem["peak_bytes"]
        row["peak_mem_step_bytes"] = mem["peak_above_start_bytes"]
        for g in bench.grad_tensors:
            g.grad = None
    row.update(bench.extra)
    return row
