"""Helpers shared by the benchmark modules (a plain module: conftest.py is not importable by name when
tests/ and benchmarks/ are collected together)."""
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def sync():
    if CUDA:
        torch.cuda.synchronize()


def run_pedantic(benchmark, fn, grads, rounds, warmup):
    """Time fn (with a device sync inside, so wall time covers the GPU work); grads are dropped
    before each round outside the timed span."""

    def setup():
        for g in grads:
            g.grad = None
        sync()

    def call():
        fn()
        sync()

    return benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
