"""A serving bank's decode step on CPU, side by side (not a test): the base model, the bank on the CPU
mixed-batch kernel, the bank on the grouped GEMMs (FASTPEFT_CPU_KERNEL=0), and the same adapters through peft's
API in fastpeft (``adapter_names=[...]``), all in one run.

    .venv/bin/python benchmarks/bank_check.py [--rounds 30] [--json out.json]

A Llama-style decoder (hidden 512, 4 layers, LoRA on all seven projections) with random weights, 8 adapters of
rank 16 saved by HF peft, 32 samples with 4 on each adapter (shuffled), one new token over a 16-token KV cache
that is rolled back outside the timed span. fp32, eval, torch.no_grad. Timed by fastpeft.bench.timing's
time_interleaved (each round runs every row once, in a fresh seeded order); per row the median over rounds
in ms, and the adapter work = row - base.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import random
import statistics
import tempfile
import warnings

import torch

from fastpeft.bench.mixed import _cache_kw, _returned_cache
from fastpeft.bench.timing import time_interleaved
from fastpeft.utils.atomic import write_json_atomic

PROMPT, BATCH, ADAPTERS, RANK = 16, 32, 8, 16
FULL = dict(hidden=512, intermediate=1376, layers=4, heads=8, batch=BATCH, adapters=ADAPTERS)
QUICK = dict(hidden=64, intermediate=128, layers=2, heads=4, batch=4, adapters=2)  # the test's smoke run
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _build(root: str, shape: dict):
    import peft
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastpeft
    from fastpeft.serving import AdapterBank

    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["heads"])
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    names = [f"a{i}" for i in range(shape["adapters"])]
    for i, name in enumerate(names):
        torch.manual_seed(i + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=RANK, lora_alpha=2 * RANK,
                                                                          target_modules=TARGETS,
                                                                          init_lora_weights=False))
        pm.save_pretrained(os.path.join(root, name))
    banked = copy.deepcopy(base)
    bank = AdapterBank(banked, TARGETS, max_slots=len(names), max_rank=RANK)
    for name in names:
        bank.load(os.path.join(root, name), name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(root, names[0]), names[0])
        for name in names[1:]:
            api.load_adapter(os.path.join(root, name), name)
    return base, banked, bank, api.eval(), names


def run(rounds: int, shape: dict = FULL) -> dict:
    with tempfile.TemporaryDirectory() as root:
        base, banked, bank, api, names = _build(root, shape)
    rows_names = [names[i % len(names)] for i in range(shape["batch"])]
    random.Random(0).shuffle(rows_names)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 4096, (len(rows_names), PROMPT), generator=g)
    tok = torch.randint(0, 4096, (len(rows_names), 1), generator=g)

    def prefill(model, **kw):
        return _returned_cache(model(input_ids=prompt, use_cache=True, **kw))

    with torch.no_grad():
        caches = {"base": prefill(base), "api": prefill(api, adapter_names=rows_names)}
        with bank.batch(rows_names):
            caches["bank"] = prefill(banked)
    caches["bank_grouped"] = copy.deepcopy(caches["bank"])

    ckw = _cache_kw(base)

    def step(row):
        kw = {"input_ids": tok, ckw: caches[row], "use_cache": True}
        os.environ["FASTPEFT_CPU_KERNEL"] = "0" if row == "bank_grouped" else "1"  # (set for every row)
        if row == "base":
            return base(**kw).logits
        if row == "api":
            return api(**kw, adapter_names=rows_names).logits
        with bank.batch(rows_names):
            return banked(**kw).logits

    def rollback(cache):
        extra = cache.get_seq_length() - PROMPT
        if extra > 0:
            cache.crop(-extra)

    rows = ["base", "bank", "bank_grouped", "api"]
    outs = {}
    with torch.no_grad():
        for r in rows:  # the outputs to compare
            rollback(caches[r])
            outs[r] = step(r)
        times = time_interleaved({r: (lambda r=r: step(r)) for r in rows}, torch.device("cpu"), warmup=1,
                                 repeats=rounds, setup={r: (lambda r=r: rollback(caches[r])) for r in rows})
    os.environ.pop("FASTPEFT_CPU_KERNEL", None)
    med = {r: statistics.median(v) for r, v in times.items()}
    work = {r: med[r] - med["base"] for r in rows if r != "base"}
    diff = {r: float((outs[r] - outs["api"]).abs().max()) for r in ("bank", "bank_grouped")}
    return {"case": {"model": f"Llama h={shape['hidden']}, {shape['layers']} layers, LoRA on 7 projections",
                     "batch": len(rows_names), "prompt": PROMPT, "adapters": len(names), "r": RANK, "dtype": "fp32"},
            "ms": med, "work_ms": work, "max_abs_diff_vs_adapter_names": diff, "samples_ms": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="a tiny model and batch (the smoke test's run)")
    args = ap.parse_args()
    env = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    res = run(args.rounds, QUICK if args.quick else FULL)
    print(f"# {env}  {res['case']}")
    for r, v in res["ms"].items():
        w = res["work_ms"].get(r)
        print(f"  {r:13s} {v:8.2f} ms" + ("" if w is None else f"   adapter work {w:6.2f} ms"))
    print(f"  max |bank - adapter_names| logits: {res['max_abs_diff_vs_adapter_names']}")
    if args.json:
        write_json_atomic(args.json, {"env": env, **res}, indent=1)


if __name__ == "__main__":
    main()
