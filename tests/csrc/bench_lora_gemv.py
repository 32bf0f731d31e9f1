"""Decode LoRA linear timings on one GPU: base F.linear, HF-peft-style eager LoRA, fastpeft csrc GEMV
(with and without programmatic dependent launch), and mixed batches (every row its own adapter: the csrc BGMV
kernels vs the torch backend's per-adapter segments). Not a test; run by hand or by the device check:
    python tests/csrc/bench_lora_gemv.py [out.json]
Each variant is captured in a CUDA graph of ITERS calls cycling over enough weight copies to exceed
L2, so the numbers are GPU time per call, not Python launch overhead. Median of REPEATS replays.
"""
import json
import sys

import torch
import torch.nn.functional as F

from fastpeft.bench.timing import cuda_graph_time_us
from fastpeft.ops import Adapter, Base, LoraCall, RowPlan, cuda_backend, torch_backend

ITERS, REPEATS = 64, 25


def graph_time_us(fn, sets):
    return cuda_graph_time_us(fn, sets, iters=ITERS, repeats=REPEATS)


def main(out_path=None):
    dev = torch.device("cuda")
    mod = cuda_backend.load(dev)
    assert not isinstance(mod, str), mod
    K = N = 4096
    dtype = torch.bfloat16
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    nsets = max(2, -(-3 * l2 // (N * K * 2)))
    rows = []
    for ab_dtype in (torch.float32, torch.bfloat16):
        for r in (16, 64):
            sets_w = [(torch.randn(N, K, device=dev, dtype=dtype) / 64, torch.randn(r, K, device=dev, dtype=ab_dtype) / 64,
                       torch.randn(N, r, device=dev, dtype=ab_dtype) / 8) for _ in range(nsets)]
            for M in (1, 4, 8):
                x = torch.randn(M, K, device=dev, dtype=dtype)
                sets = [(x,) + t for t in sets_w]
                scale = 2.0

                def base(x, w, a, b):
                    return F.linear(x, w)

                def peft_like(x, w, a, b):  # peft: base(x) + lora_B(lora_A(x.to(A.dtype))) * scale
                    y = F.linear(x, w)
                    return y + (F.linear(F.linear(x.to(a.dtype), a), b) * scale).to(y.dtype)

                def ours_pdl(x, w, a, b):
                    return cuda_backend.gemv(x, w, None, a, b, scale, True)

                def ours_nopdl(x, w, a, b):
                    return cuda_backend.gemv(x, w, None, a, b, scale, False)

                row = {"M": M, "K": K, "N": N, "r": r, "dtype": str(dtype), "ab_dtype": str(ab_dtype)}
                for name, fn in (("base_us", base), ("peft_us", peft_like), ("fastpeft_pdl_us", ours_pdl),
                                 ("fastpeft_nopdl_us", ours_nopdl)):
                    try:
                        row[name] = round(graph_time_us(fn, sets), 2)
                    except Exception as exc:  # noqa: BLE001 - report, keep the other numbers
                        row[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
                if isinstance(row["base_us"], float) and isinstance(row["fastpeft_pdl_us"], float):
                    row["GBps_pdl"] = round((N * K * 2 + r * K * ab_dtype.itemsize + N * r * ab_dtype.itemsize)
                                            / row["fastpeft_pdl_us"] / 1e3, 1)
                print(row, flush=True)
                rows.append(row)
    rows += mixed_rows(dev, K, N, dtype, nsets)
    meta = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
            "graph_iters": ITERS, "weight_sets": nsets}
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(meta)


def mixed_rows(dev, K, N, dtype, nsets):
    """Mixed batches: M rows, each with its own adapter (M adapters of rank r, fp32 as peft keeps them), one row
    of the base alone at M = 8. The adapter table is baked into the captured graph (same adapters every replay)."""
    out = []
    for r in (16, 64):
        for M in (4, 8):
            n = M
            idx = torch.arange(n, device=dev)
            if M == 8:
                idx[-1] = -1
            plan = RowPlan.build(idx, n)
            sets = []
            for _ in range(nsets):
                w = torch.randn(N, K, device=dev, dtype=dtype) / 64
                ads = tuple(Adapter(torch.randn(r, K, device=dev) / 64, torch.randn(N, r, device=dev) / 8, 2.0)
                            for _ in range(n))
                sets.append((LoraCall(torch.randn(M, K, device=dev, dtype=dtype), Base.dense(w), ads, plan=plan),))

            def base(call):
                return F.linear(call.x, call.base.weight)

            def torch_segments(call):
                return torch_backend.forward(call)

            def ours(call):
                return cuda_backend.forward(call)

            row = {"mixed": True, "M": M, "adapters": n, "K": K, "N": N, "r": r, "dtype": str(dtype),
                   "ab_dtype": "torch.float32"}
            for name, fn in (("base_us", base), ("torch_segments_us", torch_segments), ("fastpeft_mixed_us", ours)):
                try:
                    row[name] = round(graph_time_us(fn, sets), 2)
                except Exception as exc:  # noqa: BLE001 - report, keep the other numbers
                    row[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
            print(row, flush=True)
            out.append(row)
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
