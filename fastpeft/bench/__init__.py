"""Benchmark machinery behind `fastpeft bench` and the pytest-benchmark suite in benchmarks/.

models.py builds the three rows compared everywhere (base, fastpeft, HF peft) with identical weights;
timing.py measures (CPU perf_counter / CUDA do_bench, round-robin interleaving, saved-for-backward bytes);
runner.py runs the cases, prints the table and writes the JSON; dora.py is the `--dora` section (DoRA vs
LoRA, fastpeft vs peft, rows interleaved); distributed.py the `--fsdp2` row.
"""
