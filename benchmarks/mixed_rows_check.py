"""The torch backend's two ways to run an adapter pool call on CPU, side by side (not a test): the CPU kernel
(csrc/lora_mixed_cpu.cpp through fastpeft.ops.cpu_mixed) against the grouped GEMMs (a gather of x, two bmm
per rank bucket, a scatter-add into Y; FASTPEFT_CPU_KERNEL=0), over batch sizes from decode to prefill.

    .venv/bin/python benchmarks/mixed_rows_check.py [--rounds 15] [--json out.json]

One dense fp32 layer K = N = 1024 (torch.mm for the base, the same in both), rows dealt to the adapters at
random, eager under torch.no_grad. Per case the median over rounds (the two paths and the base GEMM
interleaved round by round: fastpeft.bench.timing.time_interleaved) in ms, and the adapter work = call - base GEMM. This is what picks the kernel's
range in torch_backend._cpu_kernel_runs.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics

import torch

from fastpeft import ops
from fastpeft.bench.timing import time_interleaved
from fastpeft.utils.atomic import write_json_atomic

CASES = [(8, 16), (2, 16), (8, 64)]  # (adapters, rank)
ROWS = (1, 32, 128, 512, 2048, 4096)


def run(rounds: int, K: int = 1024, N: int = 1024) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for n, r in CASES:
        pool = ops.AdapterPool(torch.randn(n * r, K, generator=g), torch.randn(N, n * r, generator=g),
                               torch.arange(n) * r, torch.full((n,), r), torch.ones(n), r)
        W = torch.randn(N, K, generator=g)
        for M in ROWS:
            x = torch.randn(M, K, generator=g)
            plan = ops.RowPlan.build(torch.randint(0, n, (M,), generator=g), n)

            def call(mode):
                os.environ["FASTPEFT_CPU_KERNEL"] = mode
                return ops.lora(x, ops.Base.dense(W), ops.AdapterSet(pool=pool, row_index=plan))

            fns = {"base": lambda: torch.mm(x, W.t()), "kernel": lambda: call("1"), "grouped": lambda: call("0")}
            times = time_interleaved(fns, torch.device("cpu"), warmup=1, repeats=rounds)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"adapters": n, "r": r, "M": M, "K": K, "N": N, "ms": med,
                   "work_ms": {k: med[k] - med["base"] for k in ("kernel", "grouped")}}
            row["work_ratio_kernel_over_grouped"] = row["work_ms"]["kernel"] / max(row["work_ms"]["grouped"], 1e-9)
            out.append(row)
            print(f"adapters {n} r {r:3d} M {M:5d}: base {med['base']:7.3f}  kernel {med['kernel']:7.3f}  grouped "
                  f"{med['grouped']:7.3f} ms   work kernel {row['work_ms']['kernel']:6.3f}  grouped "
                  f"{row['work_ms']['grouped']:6.3f}", flush=True)
    os.environ.pop("FASTPEFT_CPU_KERNEL", None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    env = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "dtype": "fp32"}
    print(f"# {env}")
    rows = run(args.rounds)
    if args.json:
        write_json_atomic(args.json, {"env": env, "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
