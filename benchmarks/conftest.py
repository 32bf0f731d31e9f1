"""pytest-benchmark suite: fastpeft vs. HF peft vs. the base model, each row timed in this process.

Not part of the default `pytest` run (pyproject's testpaths is tests/). Run it with
    pytest benchmarks --benchmark-json results.json
On CUDA it covers the headline shapes (M in 1, 16, 512, 4096; K = N = 4096; r in 16, 64; bf16);
without a GPU a small fp32 set. `fastpeft bench` is the side-by-side table with ratios; this suite is
the same measurement through pytest-benchmark's statistics and comparison tools.
"""
import os
import sys

# The benchmark modules import bench_common by name; make that work under any --import-mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
