"""Quick CPU timing (not a test): one training step of a 4-layer LoRA MLP, fastpeft.ops vs HF peft.

    /work/venv/bin/python tests/ops/bench_train_step.py [--M 512] [--K 1024] [--r 16] [--iters 15]

Same parameters in both models; peft's layers are wrapped as `lora_linear` calls for ours. Runs are
interleaved (peft, ours, peft, ...) so load from other processes hits both alike; prints medians.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ops.test_memory import _OpsLora  # noqa: E402  (same wrapper the memory test uses)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, default=512)
    ap.add_argument("--K", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = torch's default). 1 is steadier on a shared, oversubscribed "
                         "machine, where multi-threaded elementwise ops stall on descheduled threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    mods = []
    for i in range(args.layers):
        mods += [nn.Linear(args.K, args.K), nn.ReLU()]
    base = nn.Sequential(*mods[:-1]).to(dtype)
    targets = [str(i) for i in range(0, len(base), 2)]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=args.r, lora_alpha=2 * args.r, lora_dropout=args.p, target_modules=targets))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.02)
    ours = nn.Sequential(*[_OpsLora(m) if hasattr(m, "lora_A") else m for m in pm.base_model.model])
    pm.train()
    ours.train()
    x = torch.randn(args.M, args.K, dtype=dtype)
    params = [p for p in pm.parameters() if p.requires_grad]

    def step(model):
        for p in params:
            p.grad = None
        model(x).float().square().mean().backward()

    times = {"peft": [], "fastpeft": []}
    for _ in range(3):
        step(pm)
        step(ours)
    for _ in range(args.iters):
        for name, model in (("peft", pm), ("fastpeft", ours)):
            t0 = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}, M={args.M} "
          f"K=N={args.K} r={args.r} layers={args.layers} dropout={args.p}")
    for k in ("peft", "fastpeft"):
        v = sorted(times[k])
        print(f"  {k:9s} median {med[k]:8.2f} ms  (min {v[0]*1e3:.2f}, max {v[-1]*1e3:.2f})")
    print(f"  peft / fastpeft = {med['peft'] / med['fastpeft']:.3f}")


if __name__ == "__main__":
    main()
