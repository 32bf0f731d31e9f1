"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed): sm_90 matrix
kernels use wgmma, ptxas -v reports no spills, shared memory fits the chip.

Default: one representative config (the largest dot tile the pruning rule keeps for a big shape)
of each variant in aot_compile.DEFAULT_VARIANTS (every kernel, DoRA's two-accumulator variants and the
mixed-batch segment / decode tiles too, both archs, ~40 s on 2 cores).
`slow` (--runslow or FASTPEFT_SLOW=1): every config the autotuner can run, for every dtype/flag
variant listed in aot_compile.py.
"""
import json
import os
import subprocess
import sys

import pytest

import aot_compile

HERE = os.path.dirname(os.path.abspath(__file__))
SMEM = {80: 163 * 1024, 90: 227 * 1024}


def _compile(mode):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, os.path.join(HERE, "aot_compile.py"), mode], capture_output=True, text=True,
                       env=env, timeout=3600)
    assert r.returncode == 0, f"aot_compile.py {mode} failed:\n{r.stderr[-4000:]}"
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert rows, f"aot_compile.py {mode} compiled nothing:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return rows


def _check(rows):
    problems = []
    for d in rows:
        what = f"{d['kernel']}[{d['variant']}] {d['config']} sm_{d['cap']}"
        if d["spill_stores"] or d["spill_loads"]:
            problems.append(f"{what}: spills {d['spill_stores']} B stores / {d['spill_loads']} B loads")
        if d["shared"] > SMEM[d["cap"]]:
            problems.append(f"{what}: {d['shared']} B shared memory > {SMEM[d['cap']]}")
        if d["dot_rows"] is not None:  # tensor-core variants (not fp32 "ieee")
            if d["cap"] == 90 and d["dot_rows"] >= 64 and not d["wgmma"]:
                problems.append(f"{what}: no wgmma in the sm_90 PTX")
            if not d["mma"]:
                problems.append(f"{what}: no tensor-core mma instruction")
    assert not problems, "\n".join(problems)
    by_arch = {(d["kernel"], d["variant"], d["config"]): set() for d in rows}
    for d in rows:
        by_arch[(d["kernel"], d["variant"], d["config"])].add(d["cap"])
    wrong = {k: v for k, v in by_arch.items() if v != set(aot_compile.arches(k[1]))}
    assert not wrong, wrong


def test_aot_compile_representative_configs():
    rows = _compile("default")
    assert {d["kernel"] for d in rows} == {"lora_shrink", "lora_matmul", "lora_fused", "lora_wgrad", "lora_quant",
                                           "lora_splitk"}
    # every default variant compiled: one representative config, once per arch it targets
    assert sorted(d["variant"] for d in rows) == sorted(v for v in aot_compile.DEFAULT_VARIANTS
                                                         for _ in aot_compile.arches(v))
    # fp8 W8A8: the packed GEMM's dot runs on e4m3 operands (wgmma) on sm_90
    w8a8 = [d for d in rows if "_w8a8_" in d["variant"]]
    assert w8a8 and all(d["fp8_mma"] and d["wgmma"] for d in w8a8), w8a8
    # the quant GEMM: a 64+-row prefill tile on wgmma, and the decode variant on 16-row tiles
    assert any(d["wgmma"] for d in rows if d["kernel"] == "lora_quant" and d["cap"] == 90)
    decode = [d for d in rows if d["variant"].endswith("_decode")]
    assert {d["cap"] for d in decode} == {80, 90}, "no decode variant compiled"
    assert all(d["dot_rows"] == 16 for d in decode), [(d["variant"], d["dot_rows"]) for d in decode]
    assert any(d["wgmma"] for d in rows if d["cap"] == 90)
    # DoRA with dropout (two accumulators sharing each W tile): dense forward, packed forward, dense dX,
    # each still on a 64+-row wgmma tile on sm_90
    dora = [d for d in rows if "_dora_" in d["variant"]]
    assert {(d["kernel"], d["variant"].split("_dora_")[0]) for d in dora} == {
        ("lora_matmul", "fwd"), ("lora_quant", "fwd"), ("lora_matmul", "bwd_dx")}
    assert all(d["wgmma"] and d["dot_rows"] >= 64 for d in dora if d["cap"] == 90), dora
    # mixed batches: segment tiles (rows gathered through the plan's order) of the dense and nf4 GEMMs on
    # 64+-row wgmma tiles on sm_90, and the decode tiles (each row its own adapter) on 16-row tiles
    mixed = {d["variant"]: d for d in rows if "_mixed_" in d["variant"] and d["cap"] == 90}
    assert {(d["kernel"], v) for v, d in mixed.items()} == {
        ("lora_matmul", "fwd_mixed_segment_bf16"), ("lora_quant", "fwd_mixed_segment_nf4_bf16"),
        ("lora_matmul", "fwd_mixed_gather_bf16_decode")}
    assert all(d["wgmma"] and d["dot_rows"] >= 64 for v, d in mixed.items() if "_segment_" in v), mixed
    assert mixed["fwd_mixed_gather_bf16_decode"]["dot_rows"] == 16
    _check(rows)


@pytest.mark.slow
def test_aot_compile_every_config():
    rows = _compile("all")
    # every variant of aot_compile.py compiled at least one config (an empty pruned space compiles nothing)
    assert {d["variant"] for d in rows} == {v[1] for v in aot_compile._variants()}
    decode = [d for d in rows if d["variant"].endswith("_decode")]
    assert decode and all(d["dot_rows"] == 16 for d in decode)
    _check(rows)
