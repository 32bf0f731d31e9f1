"""`fastpeft bench`: fastpeft vs. HF peft vs. the base model, side by side in one process.

For each case, the three rows are built with identical weights (fastpeft.bench.models) and measured
one after another on the same device: forward time, forward+backward time, bytes saved for backward,
and for the decoder tokens/s and (CUDA) peak memory. Ratios are computed from medians.

``--dora`` adds the DoRA section (fastpeft.bench.dora): base, fastpeft LoRA, fastpeft DoRA, peft LoRA and
peft DoRA for one layer and the decoder's training step, timed round-robin (interleaved) in one process.
``--mixed`` adds the mixed-batch section (fastpeft.bench.mixed): many adapters in one batch (adapter_names),
fastpeft vs peft vs the base, for one layer call and (CPU) a decode step of the decoder, timed the same way.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, TextIO

import torch

from ..utils.atomic import write_json_atomic
from .models import IMPLS, BenchSetupError, DecoderCase, LayerCase, build_decoder, build_layer, parse_dtype
from .timing import environment, memory_fields, time_fn

SCHEMA = "fastpeft-bench/1"
SAVED_NOTE = ("saved = bytes autograd keeps for backward at the end of one forward, activations only (parameter "
              "and buffer storages excluded; tensors saved by a graph that dies inside the forward are not kept), "
              "each storage counted once (x saved by several ops counts once)")

HEADLINE_M = (1, 16, 512, 4096)
HEADLINE_KN = 4096
HEADLINE_R = (16, 64)


@dataclass
class BenchOptions:
    device: str = "auto"
    dtype: Optional[str] = None           # default: fp32 on CPU, bf16 on CUDA
    ranks: Optional[List[int]] = None     # default: 16 on CPU, 16 and 64 on CUDA
    dropout: float = 0.1
    repeats: Optional[int] = None
    warmup: Optional[int] = None
    quick: bool = False
    layer_shapes: Optional[List[tuple]] = None  # [(M, K, N)]
    only: Optional[str] = None            # "layer" | "decoder" | "fsdp2" | "dora" | "mixed" | None (layer, decoder)
    dora: bool = False                    # add the DoRA section (fastpeft.bench.dora); --only dora: only it
    mixed: bool = False                   # add the mixed-batch section (fastpeft.bench.mixed); --only mixed: only it
    mixed_adapters: Optional[int] = None  # distinct adapters of the mixed rows (default 8 on CPU, 64 on CUDA)
    fsdp2: bool = False                   # add the FSDP2 row (per-rank step time and peak memory; own launches)
    fsdp2_nproc: int = 2
    seed: int = 0
    json_path: Optional[str] = None
    progress: bool = True
    cases_layer: List[LayerCase] = field(default_factory=list)
    cases_decoder: List[DecoderCase] = field(default_factory=list)
    cases_fsdp2: List[DecoderCase] = field(default_factory=list)
    cases_dora_layer: List[LayerCase] = field(default_factory=list)
    cases_dora_decoder: List[DecoderCase] = field(default_factory=list)
    cases_mixed: list = field(default_factory=list)  # fastpeft.bench.mixed.MixedCase


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchSetupError("--device cuda was asked for but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    return dev


def plan(opts: BenchOptions, device: torch.device) -> None:
    """Fill the layer and decoder cases and the repeat counts from the flags and the device."""
    cuda = device.type == "cuda"
    dtype = parse_dtype(opts.dtype) if opts.dtype else (torch.bfloat16 if cuda else torch.float32)
    if opts.quick:
        shapes, ranks = [(64, 128, 128)], opts.ranks or [8]
        dec = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, vocab=256, seq=32, batch=2)
        opts.repeats = opts.repeats or 3
        opts.warmup = 1 if opts.warmup is None else opts.warmup
    elif cuda:
        shapes = [(m, HEADLINE_KN, HEADLINE_KN) for m in HEADLINE_M]
        ranks = opts.ranks or list(HEADLINE_R)
        dec = dict(hidden=2048, intermediate=5504, layers=4, heads=16, kv_heads=16, vocab=32000, seq=1024, batch=4)
        opts.repeats = opts.repeats or 50
        opts.warmup = 3 if opts.warmup is None else opts.warmup
    else:
        # Sized so the whole default run takes about a minute on 2 CPU cores.
        shapes, ranks = [(512, 1024, 1024)], opts.ranks or [16]
        dec = dict(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8, vocab=4096, seq=256, batch=2)
        opts.repeats = opts.repeats or 30
        opts.warmup = 2 if opts.warmup is None else opts.warmup
    if opts.layer_shapes:
        shapes = list(opts.layer_shapes)
    if opts.only in (None, "layer"):
        opts.cases_layer = [LayerCase(M, K, N, r, dtype, opts.dropout) for r in ranks for (M, K, N) in shapes]
    if opts.only in (None, "decoder"):
        opts.cases_decoder = [DecoderCase(r=ranks[0], dtype=dtype, dropout=opts.dropout, **dec)]
    if opts.fsdp2 or opts.only == "fsdp2":
        opts.fsdp2 = True
        opts.cases_fsdp2 = [DecoderCase(r=ranks[0], dtype=dtype, dropout=opts.dropout, **dec)]
    if opts.dora or opts.only == "dora":
        from .dora import plan_cases

        opts.dora = True
        plan_cases(opts, device, dtype, dec)
    if opts.mixed or opts.only == "mixed":
        from .mixed import plan_cases as plan_mixed

        opts.mixed = True
        plan_mixed(opts, device, dtype, dec)


class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, stream: TextIO = None, enabled: bool = True):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._width = 0

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        line = f"[fastpeft bench {self.done}/{self.total} {time.perf_counter() - self.t0:5.1f}s] {what}"
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _ratios(rows: dict, metrics: Sequence[str]) -> dict:
    out = {}
    for m in metrics:
        f, p, b = (rows[i].get(m) for i in ("fastpeft", "peft", "base"))
        out[m] = {"fastpeft/base": _ratio(f, b), "peft/base": _ratio(p, b), "peft/fastpeft": _ratio(p, f)}
    return out


def _decoder_counts(opts: BenchOptions):
    """A decoder step costs hundreds of layer calls: on CPU, half the repeats and one warm-up keep the
    default run near a minute on 2 cores (on CUDA do_bench sizes runs by time anyway)."""
    return max(3, opts.repeats // 2), min(opts.warmup, 1)


def _measure(bench, device, opts, prog, label, tokens: Optional[int] = None) -> dict:
    repeats, warmup = (opts.repeats, opts.warmup) if tokens is None else _decoder_counts(opts)
    prog.step(f"{label}: {bench.name} forward")
    fwd = time_fn(bench.forward, device, warmup=warmup, repeats=repeats, grad_to_none=bench.grad_tensors)
    prog.step(f"{label}: {bench.name} forward+backward")
    step = time_fn(bench.step, device, warmup=warmup, repeats=repeats, grad_to_none=bench.grad_tensors)
    for g in bench.grad_tensors:
        g.grad = None
    row = {"fwd_ms": fwd.median_ms, "fwd_bwd_ms": step.median_ms, "fwd": fwd.to_dict(), "fwd_bwd": step.to_dict()}
    row.update(memory_fields(bench, device, tokens, step.median_ms))
    return row


def run(opts: BenchOptions) -> dict:
    device = resolve_device(opts.device)
    plan(opts, device)
    steps = (2 * len(IMPLS) * (len(opts.cases_layer) + len(opts.cases_decoder)) + len(opts.cases_fsdp2)
             + 2 * (len(opts.cases_dora_layer) + len(opts.cases_dora_decoder)) + 2 * len(opts.cases_mixed))
    prog = Progress(steps, enabled=opts.progress)
    t_start = time.perf_counter()
    result = {"schema": SCHEMA, "env": environment(device),
              "settings": {"dropout": opts.dropout, "repeats": opts.repeats, "warmup": opts.warmup,
                           "quick": opts.quick, "seed": opts.seed, "saved_bytes_note": SAVED_NOTE,
                           "decoder_repeats": _decoder_counts(opts)[0], "decoder_warmup": _decoder_counts(opts)[1],
                           "decoder_step": "forward + causal-LM loss + backward (no optimizer step)",
                           "dora": opts.dora, "mixed": opts.mixed},
              "layer": [], "decoder": [], "fsdp2": []}
    if opts.dora:
        result["settings"]["dora_timing"] = (
            "DoRA section: each round runs every row once (in a fresh seeded order per round); per row the median and "
            "20th/80th percentiles over rounds; 'paired' values are medians over rounds of the per-round "
            "ratio or difference")
        result["dora"] = []
    if opts.mixed:
        result["settings"]["mixed_timing"] = (
            "mixed section: eval mode, torch.no_grad; each round runs every row once (in a fresh seeded order per round); "
            "per row the median and 20th/80th percentiles over rounds (CPU layer: each sample the mean of several "
            "calls in one span); work = row minus base; 'paired' values are medians over rounds of the per-round "
            "difference or ratio")
        result["mixed"] = []
    try:
        from fastpeft import ops as _ops  # noqa: F401  (report the backend fastpeft would pick)
        probe = torch.empty(1, 8, device=device, dtype=torch.float32)
        if hasattr(_ops, "current_backend"):
            result["env"]["fastpeft_backend"] = str(_ops.current_backend(probe))
    except Exception as e:  # the bench itself will raise a clearer error if fastpeft is unusable
        result["env"]["fastpeft_backend"] = f"unknown ({type(e).__name__}: {e})"

    try:
        for case in opts.cases_layer:
            benches, info = build_layer(case, device, seed=opts.seed)
            rows = {n: _measure(benches[n], device, opts, prog, case.label()) for n in IMPLS}
            result["layer"].append({"case": case.to_dict(), "label": case.label(), "rows": rows,
                                    "ratios": _ratios(rows, ("fwd_ms", "fwd_bwd_ms", "saved_bytes")), **info})
            del benches
        for case in opts.cases_decoder:
            benches, info = build_decoder(case, device, seed=opts.seed)
            rows = {n: _measure(benches[n], device, opts, prog, case.label(), tokens=case.tokens) for n in IMPLS}
            metrics = ("fwd_ms", "fwd_bwd_ms", "saved_bytes", "tokens_per_s") + (
                ("peak_mem_bytes",) if device.type == "cuda" else ())
            result["decoder"].append({"case": case.to_dict(), "label": case.label(), "rows": rows,
                                      "ratios": _ratios(rows, metrics), **info})
            del benches
        if opts.dora:
            from .dora import run_case

            for case in opts.cases_dora_layer:
                result["dora"].append(run_case("layer", case, device, repeats=opts.repeats, warmup=opts.warmup,
                                               seed=opts.seed, prog=prog))
            for case in opts.cases_dora_decoder:
                repeats, warmup = _decoder_counts(opts)
                result["dora"].append(run_case("decoder", case, device, repeats=repeats, warmup=warmup,
                                               seed=opts.seed, prog=prog))
        if opts.mixed:
            from .mixed import run_case as run_mixed

            for case in opts.cases_mixed:
                result["mixed"].append(run_mixed(case, device, repeats=opts.repeats, warmup=opts.warmup,
                                                 seed=opts.seed, prog=prog))
        for case in opts.cases_fsdp2:
            from .distributed import run_fsdp2

            prog.step(f"FSDP2 x{opts.fsdp2_nproc}: {case.label()} (fastpeft and peft launches)")
            repeats, warmup = _decoder_counts(opts)
            result["fsdp2"].append(run_fsdp2(case, device, nproc=opts.fsdp2_nproc, repeats=repeats,
                                             warmup=max(1, warmup), seed=opts.seed))
    finally:
        prog.close()
    result["wall_s"] = time.perf_counter() - t_start
    if opts.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json_path)), exist_ok=True)
        write_json_atomic(opts.json_path, result, trailing_newline=True, indent=2)
    return result


# ------------------------------------------------------------------------------------------- table
def _fmt_x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _mib(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / 2 ** 20:.2f}"


def _worst_spread(result: dict) -> Optional[float]:
    worst = None
    for entry in result.get("layer", []) + result.get("decoder", []) + result.get("dora", []) + result.get("mixed", []):
        for row in entry["rows"].values():
            for key in ("fwd", "fwd_bwd"):
                t = row.get(key)
                if t and t["median_ms"] > 0:
                    s = (t["p80_ms"] - t["p20_ms"]) / t["median_ms"]
                    worst = s if worst is None else max(worst, s)
    return worst


def format_table(result: dict) -> str:
    env, st = result["env"], result["settings"]
    lines = [f"fastpeft bench  device={env['device']} ({env.get('device_name')})  cpus={env.get('cpu_affinity')}  "
             f"torch {env['torch']}  peft {env.get('peft')}  transformers {env.get('transformers')}  "
             f"fastpeft {env.get('fastpeft')} (backend: {env.get('fastpeft_backend', '?')})",
             f"dropout={st['dropout']}  median of {st['repeats']} runs after {st['warmup']} warm-up (decoder: "
             f"{st.get('decoder_repeats')} after {st.get('decoder_warmup')}); inputs rotate",
             f"note: {SAVED_NOTE}", ""]
    if result["layer"]:
        lines.append("LoRA linear layer (one wrapped nn.Linear, no bias; x requires grad)")
        hdr = (f"  {'impl':<9} {'fwd ms':>9} {'fwd+bwd ms':>11} {'saved MiB':>10} {'fwd/base':>9} "
               f"{'f+b/base':>9}  adapter")
        for entry in result["layer"]:
            lines.append(f"{entry['label']}   (fastpeft vs peft rel. diff {entry['fastpeft_vs_peft_rel_diff']:.1e}; "
                         f"fastpeft backend: {entry.get('fastpeft_backend')})")
            lines.append(hdr)
            rows, base = entry["rows"], entry["rows"]["base"]
            for n in IMPLS:
                r = rows[n]
                lines.append(f"  {n:<9} {r['fwd_ms']:>9.3f} {r['fwd_bwd_ms']:>11.3f} {_mib(r['saved_bytes']):>10} "
                             f"{_fmt_x(_ratio(r['fwd_ms'], base['fwd_ms'])):>9} "
                             f"{_fmt_x(_ratio(r['fwd_bwd_ms'], base['fwd_bwd_ms'])):>9}  {r['adapter_dtype'] or '-'}")
            rt = entry["ratios"]
            lines.append(f"  peft/fastpeft: fwd {_fmt_x(rt['fwd_ms']['peft/fastpeft'])}  "
                         f"fwd+bwd {_fmt_x(rt['fwd_bwd_ms']['peft/fastpeft'])}  "
                         f"saved {_fmt_x(rt['saved_bytes']['peft/fastpeft'])}")
            lines.append("")
    if result["decoder"]:
        lines.append("Llama-style decoder, training step = forward + loss + backward (frozen base, LoRA on all "
                     "linear projections)")
        cuda = env["device"].startswith("cuda")
        for entry in result["decoder"]:
            lines.append(f"{entry['label']}   (logits rel. diff fastpeft vs peft "
                         f"{entry['fastpeft_vs_peft_logits_rel_diff']:.1e})")
            hdr = (f"  {'impl':<9} {'fwd ms':>9} {'step ms':>9} {'tokens/s':>10} {'saved MiB':>10} "
                   f"{'step/base':>10}" + (f" {'peak MiB':>9}" if cuda else ""))
            lines.append(hdr)
            rows, base = entry["rows"], entry["rows"]["base"]
            for n in IMPLS:
                r = rows[n]
                line = (f"  {n:<9} {r['fwd_ms']:>9.2f} {r['fwd_bwd_ms']:>9.2f} {r['tokens_per_s']:>10.0f} "
                        f"{_mib(r['saved_bytes']):>10} {_fmt_x(_ratio(r['fwd_bwd_ms'], base['fwd_bwd_ms'])):>10}")
                if cuda:
                    line += f" {_mib(r.get('peak_mem_bytes')):>9}"
                lines.append(line)
            rt = entry["ratios"]
            line = (f"  peft/fastpeft: fwd {_fmt_x(rt['fwd_ms']['peft/fastpeft'])}  "
                    f"step {_fmt_x(rt['fwd_bwd_ms']['peft/fastpeft'])}  "
                    f"saved {_fmt_x(rt['saved_bytes']['peft/fastpeft'])}")
            if cuda:
                line += f"  peak mem {_fmt_x(rt['peak_mem_bytes']['peft/fastpeft'])}"
            lines.append(line)
            lines.append("")
    if result.get("dora"):
        from .dora import format_dora

        lines.extend(format_dora(result["dora"], env["device"].startswith("cuda")))
    if result.get("mixed"):
        from .mixed import format_mixed

        lines.extend(format_mixed(result["mixed"], env["device"].startswith("cuda")))
    if result.get("fsdp2"):
        from .distributed import format_fsdp2

        lines.append("FSDP2 training step = forward + loss + backward + AdamW, fully_shard per decoder layer and "
                     "root; every rank its own batch")
        for entry in result["fsdp2"]:
            lines.extend(format_fsdp2(entry))
            lines.append("")
    spread = _worst_spread(result)
    if spread is not None and spread > 0.25:
        lines.append(f"warning: runs of one measurement differ by up to {spread:.0%} of the median (20th to 80th "
                     "percentile; a busy machine?): read the ratios with care, or rerun with more --repeats")
    lines.append(f"wall time {result.get('wall_s', 0):.1f}s")
    return "\n".join(lines)

