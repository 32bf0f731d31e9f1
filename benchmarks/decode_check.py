"""Decode timings for issue 14, side by side in one process on one GPU (device_check.sh step `decode-bench`).

    python benchmarks/decode_check.py out.json            # a CUDA machine
    python benchmarks/decode_check.py out.json --cpu-smoke  # tiny shapes on CPU: the script's own test

Sections (K = N = 4096, r = 16, bf16; every call captured in a CUDA graph of ITERS calls cycling over
enough weight copies to exceed L2, so the numbers are GPU time per call, the median of REPEATS replays):

  dense   M in {1, 4, 8, 16, 32, 64}: F.linear (`base`), peft's eager LoRA (`peft`), fastpeft.ops.lora with
          automatic dispatch (`auto`), the triton backend forced with FASTPEFT_SPLIT_K = 1, 2, 4, 8
          (`triton_split<n>`: the crossover the split_k_for rule should follow) and the csrc GEMV (`cuda`,
          M <= 8). Target: fastpeft <= 1.10x base at every M.
  quant   nf4 (double quant, blocks of 64), int4 (groups of 128), int8, fp8 (128 x 128 blocks) at M in {1, 4, 16}:
          the bf16 base (`base_bf16`), fastpeft with LoRA (`auto`, `triton`, `triton_split1`, `cuda` for M <= 8),
          fastpeft without LoRA (`auto_r0`: the same kernels at rank 0) and, where bitsandbytes has CUDA
          kernels, peft over bitsandbytes (`bnb_peft`: nf4, int8). Targets at M = 1: base_bf16 / auto >= 3.0
          (nf4), 3.3 (int4), 1.8 (fp8); auto <= 1.05x auto_r0.
  w8a8    fp8 prefill M = 4096: the dequantized path (FASTPEFT_FP8_DOT=0) against W8A8 on e4m3 tensor cores
          (FASTPEFT_FP8_DOT=1) and the bf16 F.linear.

Rows are written to the JSON file as they are measured, so a step cut short by its timeout keeps what it
measured; a row that fails records its error and the others go on.
"""
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from fastpeft.bench.timing import cuda_graph_time_us
from fastpeft.ops import Adapter, Base, lora
from fastpeft.quant.formats import quantize_weight
from fastpeft.utils.atomic import write_json_atomic

ITERS, REPEATS = 32, 15
R, SCALE = 16, 2.0


@contextlib.contextmanager
def env(**kw):
    """Set environment variables (None: unset) for the block; fastpeft reads them per call."""
    old = {k: os.environ.get(k) for k in kw}
    for k, v in kw.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = str(v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def time_us(fn, sets, device):
    """Median microseconds per call of fn over the argument tuples `sets` (cycled): CUDA graphs on a GPU
    (fastpeft.bench.timing.cuda_graph_time_us); on CPU (the smoke) the wall clock of a few calls."""
    if device.type == "cuda":
        return cuda_graph_time_us(fn, sets, iters=ITERS, repeats=REPEATS)
    for s in sets[:2]:
        fn(*s)
    t = time.perf_counter()
    for i in range(4):
        fn(*sets[i % len(sets)])
    return (time.perf_counter() - t) / 4 * 1e6


def measure(row, name, fn, sets, device, **environ):
    try:
        with env(**environ):
            row[name] = round(time_us(fn, sets, device), 2)
    except Exception as exc:  # noqa: BLE001 - record it, keep the other rows
        row[name] = f"failed: {type(exc).__name__}: {exc}"[:300]


def ratio(row, a, b):
    return round(row[a] / row[b], 3) if isinstance(row.get(a), float) and isinstance(row.get(b), float) else None


def copies(nbytes_one, device):
    """How many weight copies to cycle so that their bytes exceed twice the L2 cache."""
    if device.type != "cuda":
        return 2
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, -(-2 * l2 // nbytes_one))


def dense_rows(device, dtype, k, n, ms, emit):
    nsets = copies(n * k * 2, device)
    ws = [(torch.randn(n, k, device=device, dtype=dtype) / 64, torch.randn(R, k, device=device, dtype=dtype) / 64,
           torch.randn(n, R, device=device, dtype=dtype) / 8) for _ in range(nsets)]
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=dtype)
        sets = [(x,) + w for w in ws]
        row = {"section": "dense", "M": m, "K": k, "N": n, "r": R, "dtype": str(dtype)}
        measure(row, "base", lambda x, w, a, b: F.linear(x, w), sets, device)
        measure(row, "peft", lambda x, w, a, b: F.linear(x, w) + F.linear(F.linear(x, a), b) * SCALE, sets, device)

        def ours(x, w, a, b):
            return lora(x, Base.dense(w), [Adapter(a, b, SCALE)])

        measure(row, "auto", ours, sets, device)
        if device.type == "cuda":
            for split in (1, 2, 4, 8):
                measure(row, f"triton_split{split}", ours, sets, device, FASTPEFT_BACKEND="triton",
                        FASTPEFT_SPLIT_K=split)
            if m <= 8:
                measure(row, "cuda", ours, sets, device, FASTPEFT_BACKEND="cuda")
        row["auto_over_base"] = ratio(row, "auto", "base")
        best = [v for key, v in row.items() if key in ("auto", "cuda") or key.startswith("triton_split")]
        best = [v for v in best if isinstance(v, float)]
        if best and isinstance(row["base"], float):
            row["best_over_base"] = round(min(best) / row["base"], 3)
            row["target_1_10_met"] = row["best_over_base"] <= 1.10
        emit(row)


QUANT = {"nf4": dict(blocksize=64, double_quant=True), "int4": dict(group_size=128), "int8": {},
         "fp8": dict(fp8_block_size=128)}
QUANT_TARGET = {"nf4": 3.0, "int4": 3.3, "fp8": 1.8}


def _bnb_peft(fmt, w, a, b, dtype):
    """A callable x -> peft LoRA over a bitsandbytes layer holding w (nf4 / int8), or the reason it is absent."""
    try:
        import bitsandbytes as bnb
        import peft
    except Exception as e:  # noqa: BLE001
        return f"bitsandbytes/peft not importable: {type(e).__name__}: {e}"[:200]
    if fmt not in ("nf4", "int8") or w.device.type != "cuda":
        return "bitsandbytes has no such format here"

    n, k = w.shape
    if fmt == "nf4":
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w.detach().cpu(), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(w.detach().cpu(), requires_grad=False)
    model = torch.nn.Sequential(layer).to(w.device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=R * SCALE, target_modules=["0"]))
    lin = model.base_model.model[0]
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(a)
        lin.lora_B["default"].weight.copy_(b)
    return lambda x: model(x)


def quant_rows(device, dtype, k, n, ms, emit):
    for fmt, kw in QUANT.items():
        w16 = torch.randn(n, k, dtype=torch.float32) / 64
        qw = quantize_weight(w16, fmt, **kw)
        qws = [type(qw)(*[t.to(device) if isinstance(t, torch.Tensor) else t for t in qw])
               for _ in range(copies(n * k // (2 if fmt in ("nf4", "int4") else 1), device))]
        w16s = [w16.to(device, dtype) for _ in range(copies(n * k * 2, device))]
        a = torch.randn(R, k, device=device, dtype=dtype) / 64
        b = torch.randn(n, R, device=device, dtype=dtype) / 8
        try:
            bnb_fn = _bnb_peft(fmt, w16.to(device, dtype), a, b, dtype)
        except Exception as exc:  # noqa: BLE001 - bitsandbytes/peft setup failed: recorded in the row
            bnb_fn = f"failed: {type(exc).__name__}: {exc}"[:300]
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            row = {"section": "quant", "format": fmt, "M": m, "K": k, "N": n, "r": R, "dtype": str(dtype)}
            measure(row, "base_bf16", lambda w: F.linear(x, w), [(w,) for w in w16s], device)
            qsets = [(q,) for q in qws]
            ours = lambda q: lora(x, Base.quantized(q), [Adapter(a, b, SCALE)])  # noqa: E731
            measure(row, "auto", ours, qsets, device)
            measure(row, "auto_r0", lambda q: lora(x, Base.quantized(q), []), qsets, device)
            if device.type == "cuda":
                measure(row, "triton", ours, qsets, device, FASTPEFT_BACKEND="triton")
                measure(row, "triton_split1", ours, qsets, device, FASTPEFT_BACKEND="triton", FASTPEFT_SPLIT_K=1)
                if m <= 8:
                    measure(row, "cuda", ours, qsets, device, FASTPEFT_BACKEND="cuda")
            if callable(bnb_fn):
                measure(row, "bnb_peft", lambda: bnb_fn(x), [()], device)
            else:
                row["bnb_peft"] = bnb_fn
            row["base_bf16_over_auto"] = ratio(row, "base_bf16", "auto")
            row["lora_overhead"] = ratio(row, "auto", "auto_r0")
            if m == 1 and fmt in QUANT_TARGET and row["base_bf16_over_auto"] is not None:
                row["target_speedup"] = QUANT_TARGET[fmt]
                row["target_speedup_met"] = row["base_bf16_over_auto"] >= QUANT_TARGET[fmt]
            if m == 1 and row["lora_overhead"] is not None:
                row["target_lora_5pct_met"] = row["lora_overhead"] <= 1.05
            emit(row)


def w8a8_rows(device, dtype, k, n, m, emit):
    qw = quantize_weight(torch.randn(n, k) / 64, "fp8", fp8_block_size=128)
    q = [(type(qw)(*[t.to(device) if isinstance(t, torch.Tensor) else t for t in qw]),)]
    x = torch.randn(m, k, device=device, dtype=dtype)
    a, b = torch.randn(R, k, device=device, dtype=dtype) / 64, torch.randn(n, R, device=device, dtype=dtype) / 8
    row = {"section": "w8a8", "M": m, "K": k, "N": n, "r": R, "dtype": str(dtype)}
    measure(row, "base_bf16", lambda w: F.linear(x, w), [(torch.randn(n, k, device=device, dtype=dtype),)], device)
    ours = lambda q: lora(x, Base.quantized(q), [Adapter(a, b, SCALE)])  # noqa: E731
    measure(row, "fp8_dequant", ours, q, device, FASTPEFT_BACKEND="triton", FASTPEFT_FP8_DOT=0)
    measure(row, "fp8_w8a8", ours, q, device, FASTPEFT_BACKEND="triton", FASTPEFT_FP8_DOT=1)
    row["w8a8_over_dequant"] = ratio(row, "fp8_w8a8", "fp8_dequant")
    emit(row)


def main(out_path, cpu_smoke=False):
    device = torch.device("cpu" if cpu_smoke else "cuda")
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke: not timings)",
            "torch": torch.__version__, "graph_iters": ITERS, "repeats": REPEATS}
    result = {"meta": meta, "rows": []}

    def emit(row):
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        write_json_atomic(out_path, result, indent=1)

    torch.manual_seed(0)
    if cpu_smoke:
        dense_rows(device, torch.float32, 64, 48, (1, 3), emit)
        quant_rows(device, torch.float32, 128, 40, (1,), emit)
        return result
    dtype = torch.bfloat16
    quant_rows(device, dtype, 4096, 4096, (1, 4, 16), emit)
    dense_rows(device, dtype, 4096, 4096, (1, 4, 8, 16, 32, 64), emit)
    w8a8_rows(device, dtype, 4096, 4096, 4096, emit)
    return result


if __name__ == "__main__":
    main(sys.argv[1], cpu_smoke="--cpu-smoke" in sys.argv[2:])
