"""The DoRA rows of `fastpeft bench --dora`: DoRA vs. LoRA, fastpeft vs. HF peft, side by side.

Per case (one DoRA linear layer, and the decoder's training step), five rows built with one set of weights
(models.DORA_IMPLS: base, fastpeft LoRA, fastpeft DoRA, peft LoRA, peft DoRA; DoRA's A and B are the
LoRA rows' A and B) and timed round-robin in one process (timing.time_interleaved): each round runs
every row once, so the machine's speed drifting (on a shared CPU it does, by tens of percent) reaches
every row alike. What is reported per case:

- each row's forward+backward (layer) or training step (decoder) time: median and 20th/80th percentiles
  of the rounds, and the bytes kept for backward at the end of one forward (timing.saved_bytes);
- DoRA/LoRA of each library: DoRA's step time over the same library's LoRA step time;
- DoRA's extra cost of each library, DoRA minus the same library's LoRA (ms), and the ratio of the two
  extras (fastpeft's / peft's);
- each of these twice: from the medians ("ratio of medians"), and paired, as the median over rounds of
  the per-round value (DoRA and LoRA of one round ran seconds apart, so most drift cancels), with its
  20th-80th percentile spread.

The issue's targets are evaluated alongside (JSON "targets"), for the record; they are stated for dropout
0 (`--dropout 0`): on CPU a fastpeft DoRA step <= 1.10x a fastpeft LoRA step, and DoRA's extra cost over
LoRA <= 1/2 of peft's; on a GPU, DoRA forward+backward <= 1.10x LoRA at M = K = N = 4096, r = 16, bf16.
The verdict ("met") uses the ratios of medians; the paired values are printed beside them.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .models import DORA_IMPLS, DecoderCase, LayerCase, build_decoder, build_layer
from .timing import memory_fields, paired, summarize, time_interleaved

# Default DoRA layer shapes. CPU: a fine-tuning batch of 2048 tokens through a 2048 x 2048 projection (the
# hidden size of 1-3B models), fp32; about 40 s of the default `fastpeft bench --dora` run on 2 quiet cores.
# DoRA's extra work is elementwise over [M, N] plus one read of W per step, against GEMMs of M N K, so its
# relative cost grows as K shrinks: `--layer-shapes 2048x1024x1024` shows the harder case (and the decoder,
# hidden 512, is harder still). CUDA: the shape, M = K = N = 4096 (bf16 by default).
CPU_SHAPES = [(2048, 2048, 2048)]
CUDA_SHAPES = [(4096, 4096, 4096)]
QUICK_SHAPES = [(64, 128, 128)]
TARGET_DORA_OVER_LORA = 1.10
TARGET_EXTRA_RATIO = 0.5


def plan_cases(opts, device: torch.device, dtype: torch.dtype, dec: dict) -> None:
    """Fill opts.cases_dora_layer / opts.cases_dora_decoder (the regular plan() has set repeats)."""
    cuda = device.type == "cuda"
    if opts.quick:
        shapes, ranks = QUICK_SHAPES, opts.ranks or [8]
    else:
        shapes, ranks = (CUDA_SHAPES if cuda else CPU_SHAPES), opts.ranks or [16]
    if opts.layer_shapes:
        shapes = list(opts.layer_shapes)
    opts.cases_dora_layer = [LayerCase(M, K, N, r, dtype, opts.dropout) for r in ranks for (M, K, N) in shapes]
    opts.cases_dora_decoder = [DecoderCase(r=ranks[0], dtype=dtype, dropout=opts.dropout, **dec)]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _summary(samples: dict, key: str, saved: dict) -> dict:
    """The DoRA-vs-LoRA numbers of one case from the per-round samples of each row."""
    med = {n: summarize(samples[n], "").median_ms for n in samples}
    extra = {lib: med[f"{lib}_dora"] - med[lib] for lib in ("fastpeft", "peft")}
    p_extra = {lib: paired(samples[f"{lib}_dora"], samples[lib], "diff") for lib in ("fastpeft", "peft")}
    return {
        "metric": key,
        "fastpeft_dora/fastpeft": _ratio(med["fastpeft_dora"], med["fastpeft"]),
        "peft_dora/peft": _ratio(med["peft_dora"], med["peft"]),
        "peft_dora/fastpeft_dora": _ratio(med["peft_dora"], med["fastpeft_dora"]),
        "peft/fastpeft": _ratio(med["peft"], med["fastpeft"]),
        "fastpeft_dora/base": _ratio(med["fastpeft_dora"], med["base"]),
        "peft_dora/base": _ratio(med["peft_dora"], med["base"]),
        "extra_ms": extra,
        "extra_ratio": _ratio(extra["fastpeft"], extra["peft"]),
        "paired": {
            "fastpeft_dora/fastpeft": paired(samples["fastpeft_dora"], samples["fastpeft"]),
            "peft_dora/peft": paired(samples["peft_dora"], samples["peft"]),
            "peft_dora/fastpeft_dora": paired(samples["peft_dora"], samples["fastpeft_dora"]),
            "extra_ms": p_extra,
            "extra_ratio": _ratio(p_extra["fastpeft"]["median"], p_extra["peft"]["median"]),
        },
        "saved_bytes": {
            "fastpeft_dora/fastpeft": _ratio(saved["fastpeft_dora"], saved["fastpeft"]),
            "peft_dora/peft": _ratio(saved["peft_dora"], saved["peft"]),
            "peft_dora/fastpeft_dora": _ratio(saved["peft_dora"], saved["fastpeft_dora"]),
            "extra": {lib: saved[f"{lib}_dora"] - saved[lib] for lib in ("fastpeft", "peft")},
        },
    }


def _targets(kind: str, case, summary: dict, device: torch.device) -> dict:
    """The issue's targets next to the measured values (``met`` is None where the target does not apply
    to this case: dropout > 0, or on CUDA a shape other than the issue's)."""
    cuda = device.type == "cuda"
    applies = case.dropout == 0.0
    if cuda:
        applies = applies and kind == "layer" and (case.M, case.K, case.N, case.r) == (4096, 4096, 4096, 16)
    ratio, extra = summary["fastpeft_dora/fastpeft"], summary["extra_ratio"]
    out = {"conditions": ("GPU: dropout 0, layer M = K = N = 4096, r = 16" if cuda else "CPU: dropout 0"),
           "applies": applies,
           "fastpeft_dora/fastpeft": {"max": TARGET_DORA_OVER_LORA, "value": ratio,
                                      "met": (ratio <= TARGET_DORA_OVER_LORA) if applies and ratio else None}}
    if not cuda:
        out["extra_ratio"] = {"max": TARGET_EXTRA_RATIO, "value": extra,
                              "met": (extra <= TARGET_EXTRA_RATIO) if applies and extra is not None else None}
    return out


def run_case(kind: str, case, device: torch.device, *, repeats: int, warmup: int, seed: int, prog) -> dict:
    """Build the five rows of one case, time them interleaved, count saved bytes; one JSON entry."""
    label = f"DoRA {kind} {case.label()}"
    prog.step(f"{label}: building the {len(DORA_IMPLS)} rows")
    if kind == "layer":
        benches, info = build_layer(case, device, seed=seed, dora=True)
    else:
        benches, info = build_decoder(case, device, seed=seed, dora=True)
    prog.step(f"{label}: {repeats} rounds x {len(DORA_IMPLS)} rows, interleaved")
    samples = time_interleaved({n: benches[n].step for n in DORA_IMPLS}, device, warmup=warmup, repeats=repeats,
                               grad_to_none={n: benches[n].grad_tensors for n in DORA_IMPLS})
    method = "perf_counter, interleaved" if device.type != "cuda" else "triton.testing.do_bench, interleaved rounds"
    rows = {}
    for n in DORA_IMPLS:
        b = benches[n]
        t = summarize(samples[n], method)
        row = {"fwd_bwd_ms": t.median_ms, "fwd_bwd": t.to_dict(), "samples_ms": samples[n]}
        row.update(memory_fields(b, device, case.tokens if kind == "decoder" else None, t.median_ms))
        rows[n] = row
    del benches
    summary = _summary(samples, "fwd_bwd_ms", {n: rows[n]["saved_bytes"] for n in DORA_IMPLS})
    return {"kind": kind, "case": case.to_dict(), "label": case.label(), "impls": list(DORA_IMPLS),
            "rows": rows, "dora": summary, "targets": _targets(kind, case, summary, device), **info}


# ------------------------------------------------------------------------------------------- table
_NAMES = {"base": "base", "fastpeft": "fastpeft LoRA", "fastpeft_dora": "fastpeft DoRA", "peft": "peft LoRA",
          "peft_dora": "peft DoRA"}


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _mib(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / 2 ** 20:.2f}"


def _spread(p: dict, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(p['median'])} [{fmt.format(p['p20'])}..{fmt.format(p['p80'])}]"


def format_dora(entries: List[dict], cuda: bool) -> List[str]:
    lines = ["DoRA vs LoRA (use_dora=True vs False, same A and B), fastpeft vs peft: forward+backward of one layer, "
             "training step of the decoder; all rows interleaved round-robin, medians over rounds"]
    for e in entries:
        kind, d, rows = e["kind"], e["dora"], e["rows"]
        diff = e.get("fastpeft_dora_vs_peft_dora_rel_diff", e.get("fastpeft_dora_vs_peft_dora_logits_rel_diff"))
        what = "layer fwd+bwd" if kind == "layer" else "decoder step"
        lines.append(f"{what}: {e['label']}  dropout={e['case']['dropout']}   (DoRA fastpeft vs peft rel. diff "
                     f"{diff:.1e}; {rows['base']['fwd_bwd']['runs']} rounds)")
        hdr = (f"  {'impl':<14} {'ms':>9} {'p20..p80 ms':>17} {'saved MiB':>10} {'/base':>7}"
               + (f" {'tokens/s':>9}" if kind == "decoder" else "") + (f" {'peak MiB':>9}" if cuda else ""))
        lines.append(hdr)
        for n in DORA_IMPLS:
            r = rows[n]
            t = r["fwd_bwd"]
            line = (f"  {_NAMES[n]:<14} {t['median_ms']:>9.2f} {t['p20_ms']:>8.2f}..{t['p80_ms']:<8.2f} "
                    f"{_mib(r['saved_bytes']):>10} {_x(_ratio(t['median_ms'], rows['base']['fwd_bwd_ms'])):>7}")
            if kind == "decoder":
                line += f" {r['tokens_per_s']:>9.0f}"
            if cuda:
                line += f" {_mib(r.get('peak_mem_bytes')):>9}"
            lines.append(line)
        p = d["paired"]
        lines.append(f"  DoRA/LoRA      fastpeft {_x(d['fastpeft_dora/fastpeft'])} (paired "
                     f"{_spread(p['fastpeft_dora/fastpeft'])})   peft {_x(d['peft_dora/peft'])} (paired "
                     f"{_spread(p['peft_dora/peft'])})")
        lines.append(f"  DoRA extra ms  fastpeft {d['extra_ms']['fastpeft']:.2f} (paired "
                     f"{_spread(p['extra_ms']['fastpeft'])})   peft {d['extra_ms']['peft']:.2f} (paired "
                     f"{_spread(p['extra_ms']['peft'])})")
        er, per = d["extra_ratio"], p["extra_ratio"]
        sv = d["saved_bytes"]
        lines.append(f"  extra fastpeft/peft {'-' if er is None else f'{er:.2f}'} (paired "
                     f"{'-' if per is None else f'{per:.2f}'})   peft DoRA/fastpeft DoRA: time "
                     f"{_x(d['peft_dora/fastpeft_dora'])}, saved {_x(sv['peft_dora/fastpeft_dora'])}   "
                     f"DoRA extra saved MiB: fastpeft {_mib(sv['extra']['fastpeft'])}, "
                     f"peft {_mib(sv['extra']['peft'])}")
        lines.append("  " + _format_targets(e["targets"]))
        lines.append("")
    return lines


def _format_targets(t: dict) -> str:
    def one(name, v):
        val = v["value"]
        shown = "-" if val is None else f"{val:.2f}"
        verdict = "" if v["met"] is None else (" met" if v["met"] else " NOT met")
        return f"{name} {shown} <= {v['max']:.2f}{verdict}"

    parts = [one("fastpeft DoRA/LoRA", t["fastpeft_dora/fastpeft"])]
    if "extra_ratio" in t:
        parts.append(one("extra fastpeft/peft", t["extra_ratio"]))
    tail = "" if t["applies"] else f"  (targets stated for {t['conditions']}: not applicable here)"
    return "issue targets: " + "; ".join(parts) + tail
