"""The mixed-batch rows of `fastpeft bench --mixed`: many adapters in one batch, fastpeft vs. HF peft.

One batch whose samples each name their own adapter (peft's ``adapter_names=[...]``, the same call in both
libraries), in eval mode under torch.no_grad. Per case, seven rows built from one base model and one set
of adapters, and timed round-robin in one process (timing.time_interleaved, as the DoRA section does):

    base                the base model alone
    fastpeft            fastpeft, ``adapters`` distinct adapters of rank r, rows dealt out evenly, shuffled
    fastpeft_one        fastpeft, the same batch with every row on one adapter (adapter_names of one name)
    peft                peft, the ``adapters`` adapters (the same weights as fastpeft's)
    peft_one            peft, every row on one adapter
    fastpeft_ranks      fastpeft, ``adapters`` adapters of ranks 8, 16, 32, 64 in turn
    fastpeft_mean_rank  fastpeft, ``adapters`` adapters all of rank 30 (the mean of 8, 16, 32, 64)

Every row is its own model (a copy of the base), so a fastpeft layer's cached adapter pool (built on a
layer's first call with a set of names and reused while they and the weights stay: a decode loop) is
the steady state of each row rather than rebuilt when rows alternate.

Cases: one LoRA linear layer called directly with ``adapter_names`` (K = N = 1024, M = 32, fp32 on CPU;
K = N = 4096, M = 64, bf16 on CUDA), and on CPU one decode step of the bench's Llama-style decoder
(LoRA on q, k, v, o, gate, up, down): input_ids [batch, 1] with the KV cache of a short prompt (each
row prefilled with its own model), rolled back to the prompt before every call, outside the timed span.

What is reported: each row's median time with its 20th-80th percentile spread over rounds; the adapter
work (the row's time minus the base row's); ratios of adapter work (fastpeft/peft, many adapters/one,
mixed ranks/mean rank) and of total time to the base; each also "paired" (the median over rounds of the
per-round value). The issue's targets are evaluated alongside (JSON "targets"):
  CPU, 32 rows over 8 adapters (4 each): fastpeft's adapter work <= 1/3 of peft's, and <= 1.5x its own with
      one adapter for all rows; ranks {8, 16, 32, 64} x 2 <= 1.1x the work of 8 adapters of rank 30;
  GPU, layer K = N = 4096, M = 64, r = 16, bf16: one adapter <= 1.04x the base layer's time, 64 distinct
      adapters <= 1.5x, and two runs give identical outputs.
The verdict ("met") uses the ratios of medians; the paired values are printed beside them.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .models import (BenchSetupError, DecoderCase, _lora_config_kwargs, _make_llama, _OneLinear, _rel_diff,
                     _sync_lora_weights, draw_lora_weights, dtype_name, fastpeft_api, peft_api)
from .timing import paired, summarize, time_interleaved

MIXED_IMPLS = ("base", "fastpeft", "fastpeft_one", "peft", "peft_one", "fastpeft_ranks", "fastpeft_mean_rank")
RANK_MIX = (8, 16, 32, 64)
MEAN_RANK = 30  # sum(RANK_MIX) / len(RANK_MIX)

# Default shapes. CPU: the issue's batch, 32 rows over 8 adapters (4 rows each), through one 1024 x 1024
# projection and through a decode step of the bench's decoder (hidden 512, 4 layers). CUDA: the issue's
# decode, M = 64 rows over 64 distinct adapters through one 4096 x 4096 projection, bf16 (the layer only).
CPU_LAYER, CPU_ADAPTERS, CPU_BATCH, CPU_PROMPT = (32, 1024, 1024), 8, 32, 16
CUDA_LAYER, CUDA_ADAPTERS = (64, 4096, 4096), 64
QUICK_LAYER, QUICK_ADAPTERS, QUICK_BATCH, QUICK_PROMPT = (8, 64, 64), 4, 8, 4
# CPU layer calls take about a millisecond: each timed span runs this many calls (the sample is their mean).
CPU_LAYER_CALLS = 20

TARGET_WORK_VS_PEFT = 1 / 3
TARGET_MIXED_VS_ONE = 1.5
TARGET_RANKS_VS_MEAN = 1.1
TARGET_GPU_ONE_VS_BASE = 1.04
TARGET_GPU_MIXED_VS_BASE = 1.5


@dataclass
class MixedCase:
    kind: str                 # "layer" or "decoder"
    M: int                    # rows (layer) or samples (decoder: one new token each)
    adapters: int             # distinct adapters of the mixed rows
    r: int
    dtype: torch.dtype
    K: int = 0
    N: int = 0
    decoder: Optional[dict] = None  # hidden, intermediate, layers, heads, kv_heads, vocab (kind "decoder")
    prompt: int = 0           # decoder: tokens in the KV cache before the timed step
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    calls_per_sample: int = 1  # CPU: calls per timed span

    def label(self) -> str:
        per = f"{self.adapters} adapters x {self.M / self.adapters:g} rows"
        if self.kind == "layer":
            return f"M={self.M} K={self.K} N={self.N} r={self.r} {dtype_name(self.dtype)}, {per}"
        d = self.decoder
        return (f"Llama h={d['hidden']} L={d['layers']} decode batch={self.M} prompt={self.prompt} r={self.r} "
                f"{dtype_name(self.dtype)}, {per}")

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "M": self.M, "adapters": self.adapters, "r": self.r, "alpha": 2.0 * self.r,
               "dtype": dtype_name(self.dtype), "rank_mix": list(RANK_MIX), "mean_rank": MEAN_RANK,
               "calls_per_sample": self.calls_per_sample, "lora_dropout": 0.0}
        if self.kind == "layer":
            out.update(K=self.K, N=self.N, call="the LoRA layer itself: layer(x [M, K], adapter_names=[...])")
        else:
            out.update(decoder=dict(self.decoder), batch=self.M, prompt=self.prompt, targets=list(self.targets),
                       call=(f"one decode step: model(input_ids [{self.M}, 1], KV cache of the {self.prompt}-token "
                             "prompt, adapter_names=[...]); the cache is rolled back to the prompt before every "
                             "call, outside the timed span"))
        return out


def plan_cases(opts, device: torch.device, dtype: torch.dtype, dec: dict) -> None:
    """Fill opts.cases_mixed (the regular plan() has set repeats)."""
    cuda = device.type == "cuda"
    r = (opts.ranks or [16])[0]
    if opts.quick:
        (M, K, N), n, batch, prompt = QUICK_LAYER, QUICK_ADAPTERS, QUICK_BATCH, QUICK_PROMPT
    elif cuda:
        (M, K, N), n, batch, prompt = CUDA_LAYER, CUDA_ADAPTERS, None, None
    else:
        (M, K, N), n, batch, prompt = CPU_LAYER, CPU_ADAPTERS, CPU_BATCH, CPU_PROMPT
    if opts.layer_shapes:
        M, K, N = opts.layer_shapes[0]
    if opts.mixed_adapters:
        n = opts.mixed_adapters
    calls = 1 if cuda else (2 if opts.quick else CPU_LAYER_CALLS)
    cases = [MixedCase("layer", M, min(n, M), r, dtype, K=K, N=N, calls_per_sample=calls)]
    if batch is not None:  # the decoder's decode step: CPU (the bench's decoder shape, batch of 32)
        d = {k: dec[k] for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")}
        cases.append(MixedCase("decoder", batch, min(n, batch), r, dtype, decoder=d, prompt=prompt))
    opts.cases_mixed = cases


# ------------------------------------------------------------------------------------------- building
def _adapter_names(case: MixedCase, seed: int) -> List[str]:
    """Rows dealt out to the adapters in turn (M / adapters each), in shuffled order."""
    names = [f"a{i % case.adapters}" for i in range(case.M)]
    random.Random(seed).shuffle(names)
    return names


def _with_adapters(api, base, ranks, targets, task_type):
    get, cfg = api
    model = None
    for i, r in enumerate(ranks):
        c = cfg(**_lora_config_kwargs(r, 2.0 * r, 0.0, list(targets), task_type))
        if model is None:
            model = get(copy.deepcopy(base), c, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", c)
    model.eval()
    return model


def _models(case: MixedCase, base, targets, task_type, seed: int) -> dict:
    """{row: model} for MIXED_IMPLS (base: the base itself), one copy of the base per row."""
    f_api, p_api = fastpeft_api(), peft_api()
    n = case.adapters
    try:
        peft_m = _with_adapters(p_api, base, [case.r] * n, targets, task_type)
        fast_m = _with_adapters(f_api, base, [case.r] * n, targets, task_type)
        ranks_m = _with_adapters(f_api, base, [RANK_MIX[i % len(RANK_MIX)] for i in range(n)], targets, task_type)
        mean_m = _with_adapters(f_api, base, [MEAN_RANK] * n, targets, task_type)
    except (NotImplementedError, TypeError, ValueError) as e:
        raise BenchSetupError(f"--mixed: building the models with {n} adapters failed: {type(e).__name__}: {e}") \
            from e
    _sync_lora_weights(peft_m, fast_m, seed + 1)
    draw_lora_weights(ranks_m, seed + 3)
    draw_lora_weights(mean_m, seed + 4)
    base.eval()
    return {"base": base, "fastpeft": fast_m, "fastpeft_one": copy.deepcopy(fast_m), "peft": peft_m,
            "peft_one": copy.deepcopy(peft_m), "fastpeft_ranks": ranks_m, "fastpeft_mean_rank": mean_m}


def _peft_twin(model, ranks, base, targets, task_type):
    """A peft model with ``ranks`` holding ``model``'s (fastpeft) adapter weights: the reference of a check."""
    twin = _with_adapters(peft_api(), base, ranks, targets, task_type)
    _sync_lora_weights(model, twin, None)
    return twin


@contextlib.contextmanager
def _record_backends():
    """Counts the fastpeft.ops backends chosen inside the block (for the report; nothing else changes): every
    choice goes through dispatch.choose (the eager lanes' dispatch.pick calls it too; an eager pool call chooses
    when it builds its runner, so a case's first calls, which this block wraps, count)."""
    from fastpeft.ops import dispatch

    seen: collections.Counter = collections.Counter()
    original = dispatch.choose

    def choose(call):
        name = original(call)
        seen[name] += 1
        return name

    dispatch.choose = choose
    try:
        yield seen
    finally:
        dispatch.choose = original


def _cache_kw(model) -> str:
    """transformers 5 names the KV cache argument ``cache``; earlier versions ``past_key_values``."""
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass
class _Rows:
    """What run_case times and checks: per row a callable (and its setup) and a one-off output."""

    fns: Dict[str, object] = field(default_factory=dict)
    setup: Dict[str, object] = field(default_factory=dict)
    output: Dict[str, object] = field(default_factory=dict)   # row -> () -> fresh output (checks)
    twin_output: Dict[str, object] = field(default_factory=dict)


def _names_of(row: str, names: List[str]) -> Optional[List[str]]:
    if row == "base":
        return None
    return [names[0]] * len(names) if row.endswith("_one") else names


def _build_layer(case: MixedCase, device, seed: int, names: List[str]):
    torch.manual_seed(seed)
    base = _OneLinear(case.K, case.N).to(device=device, dtype=case.dtype).requires_grad_(False)
    models = _models(case, base, ["proj"], None, seed)
    layers = {n: (m.proj if n == "base" else m.base_model.model.proj) for n, m in models.items()}
    g = torch.Generator(device="cpu").manual_seed(seed + 2)
    pool = 4
    xs = [torch.randn(case.M, case.K, generator=g).to(device=device, dtype=case.dtype) for _ in range(pool)]
    rows = _Rows()
    for row, layer in layers.items():
        kw = {} if row == "base" else {"adapter_names": _names_of(row, names)}
        counter = {"i": 0}

        def fn(layer=layer, kw=kw, counter=counter):
            i = counter["i"] = (counter["i"] + 1) % pool
            return layer(xs[i], **kw)

        rows.fns[row] = fn
        rows.output[row] = lambda layer=layer, kw=kw: layer(xs[0], **kw)
    n = case.adapters
    for row, ranks in (("fastpeft_ranks", [RANK_MIX[i % len(RANK_MIX)] for i in range(n)]),
                       ("fastpeft_mean_rank", [MEAN_RANK] * n)):
        def twin_out(row=row, ranks=ranks):
            twin = _peft_twin(models[row], ranks, base, ["proj"], None)
            return twin.base_model.model.proj(xs[0], adapter_names=names)

        rows.twin_output[row] = twin_out
    return rows, models


def _build_decoder(case: MixedCase, device, seed: int, names: List[str]):
    d = case.decoder
    dcase = DecoderCase(r=case.r, dtype=case.dtype, dropout=0.0, seq=case.prompt + 1, batch=case.M, **d)
    base = _make_llama(dcase, device, seed).requires_grad_(False)
    models = _models(case, base, case.targets, "CAUSAL_LM", seed)
    ckw = _cache_kw(base)
    g = torch.Generator(device="cpu").manual_seed(seed + 2)
    prompt = torch.randint(0, d["vocab"], (case.M, case.prompt), generator=g).to(device)
    pool = 3
    toks = [torch.randint(0, d["vocab"], (case.M, 1), generator=g).to(device) for _ in range(pool)]
    P = case.prompt

    def prefill(model, kw):
        with torch.no_grad():
            return _returned_cache(model(input_ids=prompt, use_cache=True, **kw))

    def decode(model, cache, kw, tok):
        return model(input_ids=tok, use_cache=True, **{ckw: cache}, **kw).logits

    def rollback(cache):
        extra = cache.get_seq_length() - P
        if extra > 0:
            cache.crop(-extra)  # a negative count drops that many tokens (transformers 4.x and 5.x alike)

    rows = _Rows()
    for row, model in models.items():
        kw = {} if row == "base" else {"adapter_names": _names_of(row, names)}
        cache = prefill(model, kw)
        counter = {"i": 0}

        def fn(model=model, cache=cache, kw=kw, counter=counter):
            i = counter["i"] = (counter["i"] + 1) % pool
            return decode(model, cache, kw, toks[i])

        rows.fns[row] = fn
        rows.setup[row] = lambda cache=cache: rollback(cache)

        def output(model=model, cache=cache, kw=kw):
            rollback(cache)
            return decode(model, cache, kw, toks[0])

        rows.output[row] = output
    n = case.adapters
    for row, ranks in (("fastpeft_ranks", [RANK_MIX[i % len(RANK_MIX)] for i in range(n)]),
                       ("fastpeft_mean_rank", [MEAN_RANK] * n)):
        def twin_out(row=row, ranks=ranks):
            twin = _peft_twin(models[row], ranks, base, case.targets, "CAUSAL_LM")
            kw = {"adapter_names": names}
            return decode(twin, prefill(twin, kw), kw, toks[0])

        rows.twin_output[row] = twin_out
    return rows, models


def default_layer_case(device: torch.device, quick: bool = False) -> MixedCase:
    """The layer case `fastpeft bench --mixed` runs by default on this device (the pytest-benchmark module's)."""
    if quick:
        (M, K, N), n, dtype, calls = QUICK_LAYER, QUICK_ADAPTERS, torch.float32, 2
    elif device.type == "cuda":
        (M, K, N), n, dtype, calls = CUDA_LAYER, CUDA_ADAPTERS, torch.bfloat16, 1
    else:
        (M, K, N), n, dtype, calls = CPU_LAYER, CPU_ADAPTERS, torch.float32, CPU_LAYER_CALLS
    return MixedCase("layer", M, n, 16, dtype, K=K, N=N, calls_per_sample=calls)


def build_case(case: MixedCase, device: torch.device, seed: int = 0):
    """(rows, models, adapter_names) of one case: ``rows.fns[impl]`` is the call to time (under torch.no_grad),
    ``rows.setup[impl]`` (decoder) what must run before it, outside the timing."""
    names = _adapter_names(case, seed)
    build = _build_layer if case.kind == "layer" else _build_decoder
    rows, models = build(case, device, seed, names)
    return rows, models, names


def _checks(rows: _Rows) -> dict:
    """Outputs agree with peft's (same adapters, same rows), and two runs of a fastpeft row are identical."""
    out = {}
    with torch.no_grad():
        with _record_backends() as seen:
            ref = {n: rows.output[n]() for n in ("fastpeft", "fastpeft_one")}
        out["fastpeft_backends"] = dict(seen)
        for n, p in (("fastpeft", "peft"), ("fastpeft_one", "peft_one")):
            max_abs, rel = _rel_diff(ref[n], rows.output[p]())
            out[f"{n}_vs_{p}_max_abs_diff"], out[f"{n}_vs_{p}_rel_diff"] = max_abs, rel
        for n, twin in rows.twin_output.items():
            mine = rows.output[n]()
            out[f"{n}_vs_peft_rel_diff"] = _rel_diff(mine, twin())[1]
            ref[n] = mine
        det = {}
        for n in ("fastpeft", "fastpeft_one", "fastpeft_ranks"):
            again = rows.output[n]()
            det[n] = bool(torch.equal(ref[n], again))
        out["deterministic"] = det
    return out


# ------------------------------------------------------------------------------------------- timing
def cuda_host_and_kernel_ms(fn, device: torch.device, calls: int = 20) -> dict:
    """Where a CUDA call's time goes: ``host_ms``, the host's time to issue one call (perf_counter over
    ``calls`` calls with no synchronisation between them, except what the call itself does), and
    ``kernel_ms``, the summed time of the GPU kernels and copies of one call (torch.profiler; L2 not flushed).
    A row whose do_bench time is near host_ms and well above kernel_ms is bound by the host (Python and
    launches), not by its kernels. Errors are recorded, not raised: this is a diagnostic."""
    out: dict = {"calls": calls}
    try:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out["host_ms"] = (time.perf_counter() - t0) * 1e3 / calls
        torch.cuda.synchronize(device)
    except Exception as e:  # pragma: no cover - diagnostics only
        out["host_ms"], out["host_ms_error"] = None, f"{type(e).__name__}: {e}"
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize(device)
        us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA)
        if us > 0:
            out["kernel_ms"] = us / 1e3 / calls
        else:  # pragma: no cover - a profiler build without CUDA activity
            out["kernel_ms"], out["kernel_ms_error"] = None, "the profiler recorded no CUDA kernels"
    except Exception as e:  # pragma: no cover - diagnostics only
        out["kernel_ms"], out["kernel_ms_error"] = None, f"{type(e).__name__}: {e}"
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _summary(samples: dict) -> dict:
    med = {n: summarize(samples[n], "").median_ms for n in samples}
    base = samples["base"]
    work_s = {n: [a - b for a, b in zip(samples[n], base)] for n in samples if n != "base"}
    work = {n: med[n] - med["base"] for n in work_s}
    pairs = (("fastpeft/peft", "fastpeft", "peft"), ("fastpeft_one/peft_one", "fastpeft_one", "peft_one"),
             ("fastpeft/fastpeft_one", "fastpeft", "fastpeft_one"), ("peft/peft_one", "peft", "peft_one"),
             ("fastpeft_ranks/fastpeft_mean_rank", "fastpeft_ranks", "fastpeft_mean_rank"))
    return {
        "work_ms": work,
        "work_ratio": {k: _ratio(work[a], work[b]) for k, a, b in pairs},
        "time_ratio": dict({f"{n}/base": _ratio(med[n], med["base"]) for n in work},
                           **{"peft/fastpeft": _ratio(med["peft"], med["fastpeft"]),
                              "peft_one/fastpeft_one": _ratio(med["peft_one"], med["fastpeft_one"])}),
        "paired": {
            "work_ms": {n: paired(samples[n], base, "diff") for n in work_s},
            "work_ratio": {k: paired(work_s[a], work_s[b]) for k, a, b in pairs},
            "time_ratio": {f"{n}/base": paired(samples[n], base) for n in work_s},
        },
    }


def _target(value: Optional[float], limit: float, applies: bool, paired_value: Optional[float] = None) -> dict:
    return {"max": limit, "value": value, "paired": paired_value,
            "met": (value <= limit) if applies and value is not None else None}


def _targets(case: MixedCase, s: dict, checks: dict, device: torch.device) -> dict:
    """The issue's targets next to the measured values (``met`` is None where the case is not the issue's)."""
    wr, tr = s["work_ratio"], s["time_ratio"]
    pwr = {k: v["median"] for k, v in s["paired"]["work_ratio"].items()}
    ptr = {k: v["median"] for k, v in s["paired"]["time_ratio"].items()}
    if device.type == "cuda":
        applies = (case.kind == "layer" and (case.M, case.K, case.N, case.r, case.adapters) == (64, 4096, 4096, 16, 64)
                   and case.dtype == torch.bfloat16)
        det = checks["deterministic"]["fastpeft"]
        return {"conditions": "GPU: layer M = 64, K = N = 4096, r = 16, 64 adapters, bf16", "applies": applies,
                "fastpeft_one/base": _target(tr["fastpeft_one/base"], TARGET_GPU_ONE_VS_BASE, applies,
                                             ptr["fastpeft_one/base"]),
                "fastpeft/base": _target(tr["fastpeft/base"], TARGET_GPU_MIXED_VS_BASE, applies, ptr["fastpeft/base"]),
                "deterministic": {"value": det, "met": det if applies else None}}
    applies = (case.M, case.adapters) == (32, 8)
    return {"conditions": "CPU: 32 rows over 8 adapters (4 rows each)", "applies": applies,
            "fastpeft/peft": _target(wr["fastpeft/peft"], TARGET_WORK_VS_PEFT, applies, pwr["fastpeft/peft"]),
            "fastpeft/fastpeft_one": _target(wr["fastpeft/fastpeft_one"], TARGET_MIXED_VS_ONE, applies,
                                             pwr["fastpeft/fastpeft_one"]),
            "fastpeft_ranks/fastpeft_mean_rank": _target(wr["fastpeft_ranks/fastpeft_mean_rank"],
                                                         TARGET_RANKS_VS_MEAN, applies,
                                                         pwr["fastpeft_ranks/fastpeft_mean_rank"])}


def run_case(case: MixedCase, device: torch.device, *, repeats: int, warmup: int, seed: int, prog) -> dict:
    """Build the seven rows of one case, check their outputs, time them interleaved; one JSON entry."""
    label = f"mixed {case.kind} {case.label()}"
    prog.step(f"{label}: building the {len(MIXED_IMPLS)} rows")
    rows, models, names = build_case(case, device, seed)
    checks = _checks(rows)
    prog.step(f"{label}: {repeats} rounds x {len(MIXED_IMPLS)} rows, interleaved")
    with torch.no_grad():
        samples = time_interleaved({n: rows.fns[n] for n in MIXED_IMPLS}, device, warmup=warmup, repeats=repeats,
                                   setup=rows.setup or None, number=case.calls_per_sample)
    method = ("perf_counter, interleaved" + (f", {case.calls_per_sample} calls per sample"
                                             if case.calls_per_sample > 1 else "")
              if device.type != "cuda" else "triton.testing.do_bench, interleaved rounds")
    out_rows = {}
    for n in MIXED_IMPLS:
        t = summarize(samples[n], method)
        m = models[n]
        diag = {}
        if device.type == "cuda":
            with torch.no_grad():
                diag = cuda_host_and_kernel_ms(rows.fns[n], device)
        out_rows[n] = {"fwd_ms": t.median_ms, "fwd": t.to_dict(), "samples_ms": samples[n],
                       "adapter_names": _names_of(n, names),
                       "ranks": (None if n == "base" else
                                 sorted({int(v) for layer in m.modules() if hasattr(layer, "r") and
                                         isinstance(getattr(layer, "r"), dict) for v in layer.r.values()})),
                       **({"cuda_diagnostics": diag} if diag else {})}
    del rows, models
    s = _summary(samples)
    for n in out_rows:
        if n != "base":
            out_rows[n]["work_ms"] = s["work_ms"][n]
            out_rows[n]["work_paired"] = s["paired"]["work_ms"][n]
    return {"kind": case.kind, "case": case.to_dict(), "label": case.label(), "impls": list(MIXED_IMPLS),
            "adapter_names": names, "rows": out_rows, "mixed": s, "targets": _targets(case, s, checks, device),
            **checks}


# ------------------------------------------------------------------------------------------- table
def _names(case: dict) -> dict:
    n = case["adapters"]
    return {"base": "base", "fastpeft": f"fastpeft {n} adapters", "fastpeft_one": "fastpeft 1 adapter",
            "peft": f"peft {n} adapters", "peft_one": "peft 1 adapter",
            "fastpeft_ranks": f"fastpeft ranks {'/'.join(map(str, RANK_MIX))}",
            "fastpeft_mean_rank": f"fastpeft ranks all {MEAN_RANK}"}


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_mixed(entries: List[dict], cuda: bool) -> List[str]:
    lines = ["Many adapters in one batch (adapter_names=[...], one adapter per sample; eval, no_grad), fastpeft vs "
             "peft; all rows interleaved round-robin, medians over rounds; work = the row's time minus the base's"]
    for e in entries:
        c, rows, s = e["case"], e["rows"], e["mixed"]
        unit, mult = ("us", 1e3) if rows["base"]["fwd_ms"] < 0.1 else ("ms", 1.0)
        det = e["deterministic"]
        what = "layer call" if e["kind"] == "layer" else "decode step"
        lines.append(f"{what}: {e['label']}   (rel. diff vs peft: {c['adapters']} adapters "
                     f"{e['fastpeft_vs_peft_rel_diff']:.1e}, 1 adapter {e['fastpeft_one_vs_peft_one_rel_diff']:.1e}, "
                     f"ranks {e['fastpeft_ranks_vs_peft_rel_diff']:.1e}, all {MEAN_RANK} "
                     f"{e['fastpeft_mean_rank_vs_peft_rel_diff']:.1e}; identical on a rerun: "
                     f"{'yes' if all(det.values()) else 'NO ' + str(det)}; {rows['base']['fwd']['runs']} rounds"
                     f"{', ' + str(c['calls_per_sample']) + ' calls each' if c['calls_per_sample'] > 1 else ''}; "
                     f"backend {', '.join(e.get('fastpeft_backends') or {}) or '?'})")
        diag = cuda and any("cuda_diagnostics" in r for r in rows.values())
        lines.append(f"  {'impl':<26} {unit:>9} {'p20..p80':>19} {'work ' + unit:>9}  {'work paired [p20..p80]':<30}"
                     f"{'/base':>6}" + (f" {'host ' + unit:>9} {'kernel ' + unit:>9}" if diag else ""))
        names = _names(c)
        for n in e["impls"]:
            r, t = rows[n], rows[n]["fwd"]
            spread = f"{t['p20_ms'] * mult:.3f}..{t['p80_ms'] * mult:.3f}"
            line = f"  {names[n]:<26} {t['median_ms'] * mult:>9.3f} {spread:>19}"
            if n != "base":
                p = r["work_paired"]
                pw_txt = f"{p['median'] * mult:.3f} [{p['p20'] * mult:.3f}..{p['p80'] * mult:.3f}]"
                line += f" {r['work_ms'] * mult:>9.3f}  {pw_txt:<30}{_x(s['time_ratio'][n + '/base']):>6}"
            if diag:
                d = r.get("cuda_diagnostics") or {}
                line = line.ljust(2 + 26 + 1 + 9 + 1 + 19 + 1 + 9 + 2 + 30 + 6)
                line += "".join(f" {'-' if d.get(k) is None else format(d[k] * mult, '.1f'):>9}"
                                for k in ("host_ms", "kernel_ms"))
            lines.append(line)
        wr, pw = s["work_ratio"], s["paired"]["work_ratio"]

        def both(key):
            p = pw[key]
            return f"{_x(wr[key])} (paired {_x(p['median'])} [{_x(p['p20'])}..{_x(p['p80'])}])"

        n = c["adapters"]
        lines.append(f"  work fastpeft/peft: {n} adapters {both('fastpeft/peft')}, 1 adapter "
                     f"{both('fastpeft_one/peft_one')}")
        lines.append(f"  work {n} adapters/1 adapter: fastpeft {both('fastpeft/fastpeft_one')}, peft "
                     f"{both('peft/peft_one')}")
        lines.append(f"  work ranks {'/'.join(map(str, RANK_MIX))} / all {MEAN_RANK}: "
                     f"{both('fastpeft_ranks/fastpeft_mean_rank')}")
        lines.append("  " + _format_targets(e["targets"], n))
        if diag:
            lines.append("  host = the host's time to issue one call, kernel = its GPU kernels' summed time (L2 warm); "
                         "a row near its host time is bound by Python and launches, not by its kernels")
        lines.append("")
    return lines


def _format_targets(t: dict, n: int) -> str:
    def one(name, v, fmt="{:.2f}"):
        val = v["value"]
        shown = "-" if val is None else fmt.format(val)
        verdict = "" if v["met"] is None else (" met" if v["met"] else " NOT met")
        pv = v.get("paired")
        paired_txt = "" if pv is None else f" (paired {fmt.format(pv)})"
        return f"{name} {shown}{paired_txt} <= {v['max']:.2f}{verdict}"

    if "deterministic" in t:
        d = t["deterministic"]
        parts = [one("1 adapter/base", t["fastpeft_one/base"]), one(f"{n} adapters/base", t["fastpeft/base"]),
                 f"identical outputs {'yes' if d['value'] else 'no'}"
                 + ("" if d["met"] is None else (" met" if d["met"] else " NOT met"))]
    else:
        parts = [one("work fastpeft/peft", t["fastpeft/peft"]),
                 one(f"work {n} adapters/1 adapter", t["fastpeft/fastpeft_one"]),
                 one("work ranks/mean rank", t["fastpeft_ranks/fastpeft_mean_rank"])]
    tail = "" if t["applies"] else f"  (targets stated for {t['conditions']}: not applicable here)"
    return "issue targets: " + "; ".join(parts) + tail
