"""Per-call host overhead of one LoRA linear layer on CPU (not a test): fastpeft vs HF peft vs F.linear.

    .venv/bin/python benchmarks/overhead_check.py [--rounds 15] [--calls 200] [--threads 1] [--quick]

At K = N = 8 the math is nothing, so a call's time is its Python and dispatch overhead: what an eager
decode step on a GPU pays per layer (a decode kernel takes ~15 us there). Rows (fp32, rank 8):

    F.linear                 the base layer alone
    peft / fastpeft layer    the LoRA Linear module: eval + no_grad, train + no_grad, and a forward + backward
                             (train mode, lora_dropout 0 and 0.1)
    ops.lora                 fastpeft.ops.lora called directly (no layer bookkeeping)
    mixed                    a layer call with adapter_names (4 adapters, M = 16), both libraries

plus the training step (forward + backward) at K = N = 2048, M = 1, 4, 16, dropout 0.1.

Timing: fastpeft.bench.timing.time_interleaved, ``--calls`` calls per timed span, the libraries interleaved
round by round in a fresh order (so a load spike from another process hits all alike), median over ``--rounds``
rounds, in us per call; the spread column is (max - min) / median of the per-round times, the noise of that row.
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.bench.timing import time_interleaved

R = 8


class _Wrap(nn.Module):
    def __init__(self, K: int, N: int):
        super().__init__()
        self.lin = nn.Linear(K, N)

    def forward(self, x):
        return self.lin(x)


def _layers(K: int, N: int, n_adapters: int = 1, dropout: float = 0.0):
    """(fastpeft layer, peft layer): the same nn.Linear [N, K] wrapped by both libraries with the same
    adapters (names a0..; weights copied from peft's, non-zero B)."""
    import peft
    import transformers

    import fastpeft

    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    torch.manual_seed(0)
    base = _Wrap(K, N)
    cfg = dict(r=R, lora_alpha=2 * R, lora_dropout=dropout, target_modules=["lin"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg), adapter_name="a0")
        ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg), adapter_name="a0")
        for i in range(1, n_adapters):
            theirs.add_adapter(f"a{i}", peft.LoraConfig(**cfg))
            ours.add_adapter(f"a{i}", fastpeft.LoraConfig(**cfg))
    sd = {k: v for k, v in theirs.state_dict().items()}
    missing = ours.load_state_dict(sd, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return ours.base_model.model.lin, theirs.base_model.model.lin


def _time_rounds(fns: dict, rounds: int, calls: int) -> dict:
    """{name: (median us per call, spread)}: fastpeft.bench.timing.time_interleaved (each round runs every fn
    ``calls`` times in one span, the fns in a fresh order per round)."""
    per = time_interleaved(fns, torch.device("cpu"), warmup=max(3, calls // 10), repeats=rounds, number=calls)
    out = {}
    for k, v in per.items():  # ms per call
        med = statistics.median(v)
        out[k] = (med * 1e3, (max(v) - min(v)) / med)
    return out


def _forward(layer, x, **kw):
    def fn():
        with torch.no_grad():
            layer(x, **kw)
    return fn


def _step(layer, x):
    params = [p for p in layer.parameters() if p.requires_grad]

    def fn():
        for p in params:
            p.grad = None
        layer(x).sum().backward()
    return fn


def _ops_call(layer, x, training: bool, grad: bool):
    from fastpeft import ops

    def fn():
        with torch.set_grad_enabled(grad):
            names = layer.active_adapters
            ads = [layer.lora_variant[n].op_adapter(layer, n) for n in names]
            y = ops.lora(x, layer._op_base(), ads, training)
        if grad:
            y.sum().backward()
    return fn


def _check_same(ours, theirs, x, **kw):
    with torch.no_grad():
        a, b = ours(x, **kw), theirs(x, **kw)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _row(table, label, res):
    for lib, (med, spread) in res.items():
        table.append((label, lib, med, spread))


def run(rounds: int, calls: int, quick: bool) -> list:
    table = []
    shapes = [(1, 8), (16, 8), (1, 1024), (16, 1024)]
    for M, K in shapes:
        ours, theirs = _layers(K, K)
        lin = theirs.base_layer
        x = torch.randn(M, K)
        _check_same(ours, theirs, x)
        n_calls = calls if K <= 64 else max(20, calls // 4)
        for mode in ("eval", "train"):
            ours.train(mode == "train")
            theirs.train(mode == "train")
            fns = {"peft": _forward(theirs, x), "fastpeft": _forward(ours, x),
                   "ops.lora": _ops_call(ours, x, mode == "train", False)}
            if mode == "eval":
                fns["F.linear"] = _forward(lambda t: F.linear(t, lin.weight, lin.bias), x)
            _row(table, f"M={M:<3d} K=N={K:<5d} {mode} no_grad fwd", _time_rounds(fns, rounds, n_calls))
        ours.train()
        theirs.train()
        fns = {"peft": _step(theirs, x), "fastpeft": _step(ours, x), "ops.lora": _ops_call(ours, x, True, True)}
        _row(table, f"M={M:<3d} K=N={K:<5d} train fwd+bwd", _time_rounds(fns, rounds, max(10, n_calls // 2)))
    # a mixed batch: 4 adapters, 16 rows (4 each), eval mode, at the layer level
    for K in (8, 1024):
        ours, theirs = _layers(K, K, n_adapters=4)
        ours.eval()
        theirs.eval()
        x = torch.randn(16, K)
        names = [f"a{i % 4}" for i in range(16)]
        _check_same(ours, theirs, x, adapter_names=names)
        fns = {"peft": _forward(theirs, x, adapter_names=names), "fastpeft": _forward(ours, x, adapter_names=names)}
        _row(table, f"M=16  K=N={K:<5d} mixed 4 adapters", _time_rounds(fns, rounds, calls // 2))
    # the training step the issue names: K = N = 2048, dropout 0.1
    for M in ((1, 16) if quick else (1, 4, 16)):
        ours, theirs = _layers(2048, 2048, dropout=0.1)
        ours.train()
        theirs.train()
        x = torch.randn(M, 2048)
        fns = {"peft": _step(theirs, x), "fastpeft": _step(ours, x)}
        _row(table, f"M={M:<3d} K=N=2048  train p=0.1 fwd+bwd", _time_rounds(fns, rounds, 10))
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200)
    # 1 thread by default: on this 2-vCPU machine a 2-thread GEMM waits on its second thread whenever that vCPU is
    # busy elsewhere (F.linear at M=16, K=N=1024 measured 0.6 ms on 1 thread, 5-8 ms on 2), which buries the
    # per-call overhead this script is about
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and calls (a smoke run)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, calls = (3, 20) if args.quick else (args.rounds, args.calls)
    table = run(rounds, calls, args.quick)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, fp32, r={R}; us per call, median of "
          f"{rounds} rounds (spread = (max - min) / median)")
    print(f"{'case':40s} {'lib':9s} {'us/call':>10s} {'spread':>7s}")
    for label, lib, med, spread in table:
        print(f"{label:40s} {lib:9s} {med:10.1f} {spread:7.0%}")


if __name__ == "__main__":
    main()
