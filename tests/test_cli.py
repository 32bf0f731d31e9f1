"""The `fastpeft` command: bench (in-process, --quick), inspect and merge on tiny adapters."""
import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fastpeft.bench.timing import SavedTensorCounter, saved_bytes
from fastpeft.cli import main
from _support.models import tiny_model


# ------------------------------------------------------------------------------------------- helpers
def _tiny_llama(seed=0):
    # hidden 32: the inspect test reads the adapter's [4, 32] / [32, 4] shapes
    return tiny_model("llama", seed, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=False).eval()


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny base model folder and an adapter for it, saved by HF peft (the file format both share)."""
    import peft

    root = tmp_path_factory.mktemp("cli_models")
    base = _tiny_llama()
    base.save_pretrained(root / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          task_type="CAUSAL_LM", init_lora_weights=False)  # non-zero B: the merge must matter
    torch.manual_seed(1)
    pm = peft.get_peft_model(_tiny_llama(), cfg)
    pm.save_pretrained(root / "adapter")
    return root


# --------------------------------------------------------------------------------------------- bench
def test_saved_tensor_counter_dedupes_by_storage_and_skips_params():
    x = torch.randn(8, 16, requires_grad=True)
    # x * x saves x twice, and views of x share its storage: one storage, counted once.
    with SavedTensorCounter() as c:
        y = (x * x).sum() + (x.view(16, 8) * x.t().reshape(16, 8)).sum()
    assert c.count >= 2
    assert c.bytes == x.numel() * 4
    lin = torch.nn.Linear(16, 32, bias=False).requires_grad_(False)
    # Frozen weight, x requires grad: linear keeps only the weight (a parameter, excluded).
    assert saved_bytes(lambda: lin(x), exclude=list(lin.parameters())) == 0
    assert saved_bytes(lambda: lin(x)) == lin.weight.numel() * 4
    # Dropout keeps its mask; the dropped-out copy feeds a linear that needs it for dW.
    lin_t = torch.nn.Linear(16, 4, bias=False)
    drop = torch.nn.Dropout(0.5).train()
    b = saved_bytes(lambda: lin_t(drop(x)), exclude=list(lin_t.parameters()))
    assert b == 2 * x.numel() * 4  # the fp32 dropped-out copy + the mask (fp32 on CPU)
    del y


def test_saved_tensor_counter_counts_only_what_the_graph_keeps():
    """A graph built and dropped inside the forward (peft's DoRA does this for B A) keeps nothing for backward."""
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 16, requires_grad=True)

    def fwd():
        eye = torch.eye(16)
        (eye @ w).detach()   # saves eye [16, 16] for dW, then the graph dies
        return x * 2.0 * x   # keeps x (8 x 16), and the product's x * 2.0
    with SavedTensorCounter([w]) as c:
        out = fwd()
    kept = c.bytes
    assert kept == 2 * x.numel() * 4
    assert c.packed_bytes == kept + 16 * 16 * 4
    del out
    assert c.bytes == kept  # a snapshot taken when the context exited
    assert saved_bytes(fwd, exclude=[w]) == kept


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """One in-process `fastpeft bench --quick` run (a few seconds), shared by the tests that read it."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["bench", "--quick", "--device", "cpu", "--json", str(out), "--dropout", "0.1"])
    return rc, out, stdout.getvalue(), stderr.getvalue()


def test_bench_quick_json(quick_bench):
    rc, out, stdout, stderr = quick_bench
    assert rc == 0
    assert "peft/fastpeft" in stdout and "LoRA linear layer" in stdout and "counted once" in stdout
    assert "[fastpeft bench" in stderr  # the progress line goes to stderr
    data = json.loads(out.read_text())
    assert data["schema"] == "fastpeft-bench/1"
    env = data["env"]
    for key in ("device", "cpu_count", "torch", "triton", "transformers", "peft", "fastpeft"):
        assert key in env, key
    assert env["device"] == "cpu" and env["cpu_count"] >= 1
    assert data["settings"]["dropout"] == 0.1 and data["settings"]["quick"] is True
    assert "counted once" in data["settings"]["saved_bytes_note"]
    assert len(data["layer"]) == 1 and len(data["decoder"]) == 1
    layer = data["layer"][0]
    assert layer["case"]["M"] == 64 and layer["case"]["dtype"] == "fp32" and layer["case"]["dropout"] == 0.1
    assert set(layer["rows"]) == {"base", "fastpeft", "peft"}
    for name, row in layer["rows"].items():
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, name
        assert row["fwd"]["runs"] == 3
    # Same weights in both adapters: the outputs agree (fp32, dropout off for the check).
    assert layer["fastpeft_vs_peft_rel_diff"] < 1e-5
    # peft keeps dropout(x) (a copy of x) and the mask; fastpeft keeps x by reference and S [M, r].
    saved = {n: r["saved_bytes"] for n, r in layer["rows"].items()}
    assert saved["fastpeft"] < saved["peft"], saved
    assert layer["ratios"]["saved_bytes"]["peft/fastpeft"] == pytest.approx(saved["peft"] / saved["fastpeft"])
    for metric in ("fwd_ms", "fwd_bwd_ms"):
        assert set(layer["ratios"][metric]) == {"fastpeft/base", "peft/base", "peft/fastpeft"}
        assert layer["ratios"][metric]["peft/base"] > 0
    dec = data["decoder"][0]
    assert set(dec["rows"]) == {"base", "fastpeft", "peft"}
    for name, row in dec["rows"].items():
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["tokens_per_s"] > 0, name
        assert row["saved_bytes"] > 0
    assert dec["rows"]["base"]["trainable_params"] == 0
    assert dec["rows"]["fastpeft"]["trainable_params"] == dec["rows"]["peft"]["trainable_params"] > 0
    assert dec["fastpeft_vs_peft_logits_rel_diff"] < 1e-4
    assert dec["case"]["seq"] == 32 and dec["case"]["batch"] == 2


def test_plot_makes_a_png_of_the_ratios(quick_bench, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "fastpeft_bench_plot", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "plot.py"))
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    png = tmp_path / "ratios.png"
    assert plot.main([str(quick_bench[1]), str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(os.listdir(tmp_path)) == ["ratios.png"]  # written via a temporary name, nothing left over
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "something-else"}')
    with pytest.raises(SystemExit, match="not a `fastpeft bench --json` file"):
        plot.main([str(bad), str(tmp_path / "x.png")])


@pytest.fixture(scope="module")
def quick_dora_bench(tmp_path_factory):
    """One in-process `fastpeft bench --dora --quick` run at dropout 0 (the issue's DoRA targets' setting)."""
    out = tmp_path_factory.mktemp("bench_dora") / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["bench", "--dora", "--quick", "--device", "cpu", "--json", str(out), "--dropout", "0"])
    return rc, out, stdout.getvalue()


def test_bench_dora_quick_json(quick_dora_bench):
    """The DoRA section: five rows per case, the DoRA/LoRA ratios, extras and saved bytes (no timing claims)."""
    rc, out, stdout = quick_dora_bench
    assert rc == 0
    assert "DoRA vs LoRA" in stdout and "DoRA/LoRA" in stdout and "DoRA extra ms" in stdout
    assert "fastpeft DoRA" in stdout and "peft DoRA" in stdout and "issue targets" in stdout
    data = json.loads(out.read_text())
    assert data["schema"] == "fastpeft-bench/1" and data["settings"]["dora"] is True
    for key in ("device", "torch", "transformers", "peft", "fastpeft"):
        assert key in data["env"], key
    # --dora adds a section; the regular rows are still there
    assert len(data["layer"]) == 1 and len(data["decoder"]) == 1
    assert [e["kind"] for e in data["dora"]] == ["layer", "decoder"]
    impls = ["base", "fastpeft", "fastpeft_dora", "peft", "peft_dora"]
    for e in data["dora"]:
        assert e["impls"] == impls and set(e["rows"]) == set(impls)
        assert e["case"]["dropout"] == 0.0 and e["case"]["dtype"] == "fp32" and e["case"]["r"] == 8
        for name, row in e["rows"].items():
            assert row["fwd_bwd_ms"] > 0 and row["saved_bytes"] >= 0, name
            assert len(row["samples_ms"]) == row["fwd_bwd"]["runs"] == 3, name
            assert row["fwd_bwd"]["p20_ms"] <= row["fwd_bwd_ms"] <= row["fwd_bwd"]["p80_ms"], name
        rows, d = e["rows"], e["dora"]
        ms = {n: rows[n]["fwd_bwd_ms"] for n in impls}
        assert d["fastpeft_dora/fastpeft"] == pytest.approx(ms["fastpeft_dora"] / ms["fastpeft"])
        assert d["peft_dora/peft"] == pytest.approx(ms["peft_dora"] / ms["peft"])
        assert d["extra_ms"]["fastpeft"] == pytest.approx(ms["fastpeft_dora"] - ms["fastpeft"])
        assert d["extra_ms"]["peft"] == pytest.approx(ms["peft_dora"] - ms["peft"])
        assert d["extra_ratio"] == pytest.approx(d["extra_ms"]["fastpeft"] / d["extra_ms"]["peft"])
        for key in ("fastpeft_dora/fastpeft", "peft_dora/peft", "peft_dora/fastpeft_dora"):
            p = d["paired"][key]
            assert p["p20"] <= p["median"] <= p["p80"] and p["median"] > 0, key
        saved = {n: rows[n]["saved_bytes"] for n in impls}
        assert d["saved_bytes"]["extra"] == {"fastpeft": saved["fastpeft_dora"] - saved["fastpeft"],
                                             "peft": saved["peft_dora"] - saved["peft"]}
        # DoRA keeps more than LoRA in either library (fastpeft: the output, for the magnitude gradient)
        assert saved["fastpeft_dora"] > saved["fastpeft"] and saved["peft_dora"] > saved["peft"]
        t = e["targets"]
        assert t["applies"] is True  # CPU, dropout 0
        assert t["fastpeft_dora/fastpeft"]["max"] == 1.10 and t["extra_ratio"]["max"] == 0.5
        assert t["fastpeft_dora/fastpeft"]["met"] in (True, False)
    layer, dec = data["dora"]
    assert layer["case"]["M"] == 64 and layer["fastpeft_dora_vs_peft_dora_rel_diff"] < 1e-5
    assert layer["fastpeft_vs_peft_rel_diff"] < 1e-5
    assert dec["fastpeft_dora_vs_peft_dora_logits_rel_diff"] < 1e-4
    assert dec["rows"]["fastpeft_dora"]["trainable_params"] == dec["rows"]["peft_dora"]["trainable_params"] > \
        dec["rows"]["peft"]["trainable_params"]  # DoRA adds the magnitudes
    assert dec["rows"]["base"]["trainable_params"] == 0


def test_bench_only_dora_plans_only_the_dora_cases():
    from fastpeft.bench.runner import BenchOptions, plan

    opts = BenchOptions(only="dora", quick=True)
    plan(opts, torch.device("cpu"))
    assert opts.dora and opts.cases_layer == [] and opts.cases_decoder == [] and opts.cases_fsdp2 == []
    assert [(c.M, c.K, c.N, c.r, c.dropout) for c in opts.cases_dora_layer] == [(64, 128, 128, 8, 0.1)]
    assert len(opts.cases_dora_decoder) == 1
    opts = BenchOptions(dora=True, dropout=0.0, layer_shapes=[(32, 64, 48)], ranks=[4])
    plan(opts, torch.device("cpu"))
    assert len(opts.cases_layer) == 1 and len(opts.cases_decoder) == 1
    assert [(c.M, c.K, c.N, c.r, c.dropout) for c in opts.cases_dora_layer] == [(32, 64, 48, 4, 0.0)]
    opts = BenchOptions()  # no --dora: no DoRA cases
    plan(opts, torch.device("cpu"))
    assert not opts.dora and opts.cases_dora_layer == [] and opts.cases_dora_decoder == []
    from fastpeft.bench.dora import CPU_SHAPES
    opts = BenchOptions(dora=True)
    plan(opts, torch.device("cpu"))
    assert [(c.M, c.K, c.N, c.r) for c in opts.cases_dora_layer] == [(*CPU_SHAPES[0], 16)]


@pytest.fixture(scope="module")
def quick_mixed_bench(tmp_path_factory):
    """One in-process `fastpeft bench --only mixed --quick` run (many adapters in one batch)."""
    out = tmp_path_factory.mktemp("bench_mixed") / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["bench", "--only", "mixed", "--quick", "--device", "cpu", "--json", str(out)])
    return rc, out, stdout.getvalue()


MIXED_IMPLS = ["base", "fastpeft", "fastpeft_one", "peft", "peft_one", "fastpeft_ranks", "fastpeft_mean_rank"]


def test_bench_mixed_quick_json(quick_mixed_bench):
    """The mixed-batch section: seven rows per case, adapter work and its ratios, the checks (no timing claims)."""
    rc, out, stdout = quick_mixed_bench
    assert rc == 0
    assert "Many adapters in one batch" in stdout and "work fastpeft/peft" in stdout and "issue targets" in stdout
    assert "fastpeft 4 adapters" in stdout and "peft 1 adapter" in stdout and "ranks 8/16/32/64" in stdout
    data = json.loads(out.read_text())
    assert data["schema"] == "fastpeft-bench/1" and data["settings"]["mixed"] is True
    assert "mixed_timing" in data["settings"] and data["env"]["device"] == "cpu"
    assert data["layer"] == [] and data["decoder"] == [] and "dora" not in data  # --only mixed: only it
    assert [e["kind"] for e in data["mixed"]] == ["layer", "decoder"]
    for e in data["mixed"]:
        c = e["case"]
        assert e["impls"] == MIXED_IMPLS and set(e["rows"]) == set(MIXED_IMPLS)
        assert c["adapters"] == 4 and c["r"] == 16 and c["dtype"] == "fp32" and c["rank_mix"] == [8, 16, 32, 64]
        assert c["mean_rank"] == 30
        # rows dealt out evenly over the adapters; the "one" rows name a single adapter
        names = e["adapter_names"]
        assert len(names) == c["M"] and sorted(set(names)) == ["a0", "a1", "a2", "a3"]
        assert all(names.count(n) == c["M"] // 4 for n in set(names))
        rows = e["rows"]
        assert rows["fastpeft"]["adapter_names"] == names == rows["peft"]["adapter_names"]
        assert set(rows["fastpeft_one"]["adapter_names"]) == {names[0]} and rows["base"]["adapter_names"] is None
        assert rows["fastpeft_ranks"]["ranks"] == [8, 16, 32, 64] and rows["fastpeft_mean_rank"]["ranks"] == [30]
        assert rows["fastpeft"]["ranks"] == rows["peft"]["ranks"] == [16]
        ms = {n: rows[n]["fwd_ms"] for n in MIXED_IMPLS}
        for n in MIXED_IMPLS:
            assert ms[n] > 0 and len(rows[n]["samples_ms"]) == 3 and rows[n]["fwd"]["runs"] == 3, n
            if n != "base":
                assert rows[n]["work_ms"] == pytest.approx(ms[n] - ms["base"])
                p = rows[n]["work_paired"]
                assert p["p20"] <= p["median"] <= p["p80"]
        m = e["mixed"]
        work = {n: ms[n] - ms["base"] for n in MIXED_IMPLS if n != "base"}
        assert m["work_ratio"]["fastpeft/peft"] == pytest.approx(work["fastpeft"] / work["peft"])
        assert m["work_ratio"]["fastpeft/fastpeft_one"] == pytest.approx(work["fastpeft"] / work["fastpeft_one"])
        assert m["work_ratio"]["fastpeft_ranks/fastpeft_mean_rank"] == pytest.approx(
            work["fastpeft_ranks"] / work["fastpeft_mean_rank"])
        assert m["time_ratio"]["fastpeft/base"] == pytest.approx(ms["fastpeft"] / ms["base"])
        for key in ("fastpeft/peft", "fastpeft/fastpeft_one", "fastpeft_ranks/fastpeft_mean_rank"):
            assert set(m["paired"]["work_ratio"][key]) == {"median", "p20", "p80"}
        # the CPU targets, evaluated only for the batch (32 rows over 8 adapters), not --quick's
        t = e["targets"]
        assert t["applies"] is False and t["fastpeft/peft"]["max"] == pytest.approx(1 / 3)
        assert t["fastpeft/fastpeft_one"]["max"] == 1.5 and t["fastpeft_ranks/fastpeft_mean_rank"]["max"] == 1.1
        assert t["fastpeft/peft"]["met"] is None and t["fastpeft/peft"]["value"] == m["work_ratio"]["fastpeft/peft"]
        # the outputs agree with peft's (same adapters; the rank rows against a peft twin), and a rerun is identical
        tol = 1e-5 if e["kind"] == "layer" else 1e-4
        for key in ("fastpeft_vs_peft_rel_diff", "fastpeft_one_vs_peft_one_rel_diff", "fastpeft_ranks_vs_peft_rel_diff",
                    "fastpeft_mean_rank_vs_peft_rel_diff"):
            assert e[key] < tol, (e["kind"], key, e[key])
        assert e["deterministic"] == {"fastpeft": True, "fastpeft_one": True, "fastpeft_ranks": True}
        assert e["fastpeft_backends"] == {"torch": e["fastpeft_backends"]["torch"]}
    layer, dec = data["mixed"]
    assert (layer["case"]["M"], layer["case"]["K"], layer["case"]["N"]) == (8, 64, 64)
    assert layer["case"]["calls_per_sample"] == 2
    assert dec["case"]["batch"] == 8 and dec["case"]["prompt"] == 4 and "KV cache" in dec["case"]["call"]
    assert dec["case"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_bench_mixed_targets_and_table_on_cuda(quick_mixed_bench):
    """The GPU targets (one adapter <= 1.04x base, 64 adapters <= 1.5x, identical reruns) and the CUDA table,
    from the quick run's numbers relabelled as the issue's GPU case (no GPU needed)."""
    from fastpeft.bench.mixed import MixedCase, _targets, format_mixed

    entry = json.loads(quick_mixed_bench[1].read_text())["mixed"][0]
    case = MixedCase("layer", 64, 64, 16, torch.bfloat16, K=4096, N=4096)
    t = _targets(case, entry["mixed"], {"deterministic": {"fastpeft": True}}, torch.device("cuda"))
    tr = entry["mixed"]["time_ratio"]
    assert t["applies"] is True and t["deterministic"] == {"value": True, "met": True}
    assert t["fastpeft_one/base"]["value"] == tr["fastpeft_one/base"] and t["fastpeft_one/base"]["max"] == 1.04
    assert t["fastpeft_one/base"]["met"] is (tr["fastpeft_one/base"] <= 1.04)
    assert t["fastpeft/base"]["met"] is (tr["fastpeft/base"] <= 1.5)
    other = MixedCase("layer", 64, 64, 16, torch.float16, K=4096, N=4096)  # not the dtype
    assert _targets(other, entry["mixed"], {"deterministic": {"fastpeft": True}}, torch.device("cuda"))["applies"] \
        is False
    entry["targets"] = t
    for row in entry["rows"].values():
        row["cuda_diagnostics"] = {"calls": 20, "host_ms": 0.5, "kernel_ms": None}
    text = "\n".join(format_mixed([entry], cuda=True))
    assert "1 adapter/base" in text and "4 adapters/base" in text and "identical outputs yes met" in text
    # the table's unit follows the measured base time (us below 0.1 ms): a busy machine may print ms
    unit, host = ("us", "500.0") if entry["rows"]["base"]["fwd_ms"] < 0.1 else ("ms", "0.5")
    assert f"host {unit}" in text and f"kernel {unit}" in text and host in text


def test_bench_only_mixed_plans_only_the_mixed_cases():
    from fastpeft.bench import mixed
    from fastpeft.bench.runner import BenchOptions, plan

    opts = BenchOptions(only="mixed")
    plan(opts, torch.device("cpu"))
    assert opts.mixed and opts.cases_layer == [] and opts.cases_decoder == [] and opts.cases_dora_layer == []
    layer, dec = opts.cases_mixed
    assert (layer.kind, layer.M, layer.K, layer.N, layer.r, layer.adapters) == ("layer", 32, 1024, 1024, 16, 8)
    assert layer.dtype == torch.float32 and layer.calls_per_sample == mixed.CPU_LAYER_CALLS
    assert (dec.kind, dec.M, dec.adapters, dec.prompt, dec.decoder["hidden"], dec.decoder["layers"]) == \
        ("decoder", 32, 8, 16, 512, 4)
    opts = BenchOptions(only="mixed")
    plan(opts, torch.device("cuda"))  # planning only: no GPU needed
    (layer,) = opts.cases_mixed  # the layer alone on CUDA
    assert (layer.M, layer.K, layer.N, layer.adapters, layer.dtype, layer.calls_per_sample) == \
        (64, 4096, 4096, 64, torch.bfloat16, 1)
    opts = BenchOptions(mixed=True, layer_shapes=[(16, 64, 48)], ranks=[4], mixed_adapters=2)
    plan(opts, torch.device("cpu"))
    assert opts.cases_layer and opts.cases_decoder  # --mixed adds a section to the regular run
    assert [(c.M, c.K, c.N, c.r, c.adapters) for c in opts.cases_mixed] == [(16, 64, 48, 4, 2), (32, 0, 0, 4, 2)]
    opts = BenchOptions()
    plan(opts, torch.device("cpu"))
    assert not opts.mixed and opts.cases_mixed == []


def test_time_interleaved_setup_and_calls_per_sample():
    """setup runs before every call outside the timed span; number > 1 times several calls per span."""
    from fastpeft.bench import timing

    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b")}
    timing.time_interleaved(fns, torch.device("cpu"), warmup=1, repeats=2, setup={"a": lambda: calls.append("setup")})
    expect = ["setup", "a", "b"]  # warm-up in the given order, then each round's order
    for i in range(2):
        expect += [c for n in timing._round_order(["a", "b"], i) for c in (["setup", "a"] if n == "a" else ["b"])]
    assert calls == expect
    calls.clear()
    samples = timing.time_interleaved(fns, torch.device("cpu"), warmup=0, repeats=2, number=3)
    assert calls == [n for i in range(2) for n in timing._round_order(["a", "b"], i) for _ in range(3)]
    assert len(samples["a"]) == 2
    with pytest.raises(ValueError, match="setup"):
        timing.time_interleaved(fns, torch.device("cpu"), warmup=0, repeats=1, number=2, setup={"a": lambda: None})


def test_time_interleaved_round_robin(monkeypatch):
    """Each round runs every callable once, in an order drawn per round (seeded), so a callable does not always
    follow the same one; on CUDA rounds of do_bench measurements."""
    from fastpeft.bench import timing

    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    x = torch.zeros(2, requires_grad=True)
    x.grad = torch.ones(2)
    samples = timing.time_interleaved(fns, torch.device("cpu"), warmup=1, repeats=3, grad_to_none={"a": [x]})
    rounds = [calls[3 + 3 * i:6 + 3 * i] for i in range(3)]
    assert calls[:3] == ["a", "b", "c"] and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert rounds == [timing._round_order(["a", "b", "c"], i) for i in range(3)]
    # over many rounds every callable runs right after each of the others (a fixed cyclic order would not)
    follows = {(o[j - 1], o[j]) for i in range(40) for o in [timing._round_order(["a", "b", "c"], i)]
               for j in range(1, 3)}
    assert follows == {(p, q) for p in "abc" for q in "abc" if p != q}
    assert {n: len(v) for n, v in samples.items()} == {"a": 3, "b": 3, "c": 3} and x.grad is None
    p = timing.paired([2.0, 4.0, 6.0], [1.0, 2.0, 2.0])
    assert p["median"] == 2.0 and p["p20"] <= p["median"] <= p["p80"] == pytest.approx(2.6)
    assert timing.paired([2.0, 4.0], [1.0, 1.0], "diff")["median"] == 2.0

    seen = []

    def fake_time_cuda(fn, *, warmup, repeats, grad_to_none=None):
        seen.append((fn, warmup, repeats))
        return timing.Timing(float(len(seen)), 0.0, 0.0, repeats, "fake")

    monkeypatch.setattr(timing, "time_cuda", fake_time_cuda)
    samples = timing.time_interleaved(fns, torch.device("cuda"), warmup=3, repeats=50)
    assert len(seen) == 5 * 3 and {r for _, _, r in seen} == {10}
    assert [w for _, w, _ in seen] == [3] * 3 + [1] * 12  # warm-up in the first round only
    assert samples["a"] == [float(1 + 3 * i + timing._round_order(["a", "b", "c"], i).index("a")) for i in range(5)]


@pytest.mark.parametrize("argv, message", [
    (["--rank", "abc"], "--rank expects integers"),
    (["--layer-shapes", "4x8"], "--layer-shapes expects MxKxN"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--dtype", "int3"], "unknown dtype"),
    (["--mixed-adapters", "0"], "--mixed-adapters must be >= 1"),
])
def test_bench_rejects_bad_flags(argv, message, capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--no-progress"] + argv) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- inspect
def test_inspect_prints_config_and_tensors(saved_models, capsys):
    assert main(["inspect", str(saved_models / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "peft_type" in out and "LORA" in out and "CAUSAL_LM" in out
    assert "scaling                  2" in out  # lora_alpha 8 / r 4
    # 2 layers x 3 targets x (A, B) tensors, with shapes and dtypes
    assert "12 tensors" in out
    assert re.search(r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight +\[4, 32\] +F32", out)
    assert re.search(r"base_model\.model\.model\.layers\.1\.mlp\.down_proj\.lora_B\.weight +\[32, 4\] +F32", out)
    assert "warning" not in out


def test_inspect_errors_name_the_problem(tmp_path, saved_models, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["inspect", str(empty)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err

    parent = tmp_path / "parent"
    (parent / "second").mkdir(parents=True)
    (parent / "second" / "adapter_config.json").write_text((saved_models / "adapter" / "adapter_config.json").read_text())
    assert main(["inspect", str(parent)]) == 2
    assert "adapters found in subfolders: second" in capsys.readouterr().err

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text('{"peft_type": "LORA", "r": }')
    assert main(["inspect", str(bad_json)]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "line 1" in err

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((saved_models / "adapter" / "adapter_config.json").read_text())
    good = (saved_models / "adapter" / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(good[: len(good) // 2])  # truncated
    assert main(["inspect", str(corrupt)]) == 2
    err = capsys.readouterr().err
    assert "corrupt or not a safetensors file" in err and "adapter_model.safetensors" in err

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((saved_models / "adapter" / "adapter_config.json").read_text())
    assert main(["inspect", str(no_weights)]) == 2
    assert "no adapter weights" in capsys.readouterr().err


def test_inspect_warns_on_rank_mismatch(tmp_path, saved_models, capsys):
    folder = tmp_path / "mismatch"
    folder.mkdir()
    cfg = json.loads((saved_models / "adapter" / "adapter_config.json").read_text())
    cfg["r"] = 8  # the weights have rank 4
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    (folder / "adapter_model.safetensors").write_bytes((saved_models / "adapter" / "adapter_model.safetensors").read_bytes())
    assert main(["inspect", str(folder)]) == 0
    assert "rank 4 in the weights, config says r=8" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- merge
def test_merge_matches_peft_and_is_atomic(tmp_path, saved_models, capsys):
    import peft
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", str(saved_models / "base"), str(saved_models / "adapter"), str(out)]) == 0
    assert "saved to" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()

    ref_base = AutoModelForCausalLM.from_pretrained(saved_models / "base", local_files_only=True)
    ref = peft.PeftModel.from_pretrained(ref_base, saved_models / "adapter").merge_and_unload().eval()
    ref_sd = ref.state_dict()
    got_sd = merged.state_dict()
    assert set(got_sd) == set(ref_sd)
    for k in ref_sd:
        torch.testing.assert_close(got_sd[k], ref_sd[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    base_sd = AutoModelForCausalLM.from_pretrained(saved_models / "base", local_files_only=True).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(got_sd[q], base_sd[q])  # the adapter really was merged in
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)

    # No temporary folders left next to OUT; a second merge refuses to overwrite unless --force.
    assert sorted(os.listdir(tmp_path)) == ["merged"]
    assert main(["merge", str(saved_models / "base"), str(saved_models / "adapter"), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    (out / "marker.txt").write_text("old")
    assert main(["merge", str(saved_models / "base"), str(saved_models / "adapter"), str(out), "--force"]) == 0
    assert not (out / "marker.txt").exists() and (out / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_merge_errors(tmp_path, saved_models, capsys):
    assert main(["merge", str(tmp_path / "nobase"), str(saved_models / "adapter"), str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["merge", str(saved_models / "base"), str(tmp_path / "noadapter"), str(tmp_path / "o")]) == 2
    assert "noadapter: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_python_dash_m_runs_the_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastpeft", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "fastpeft inspect: error:" in proc.stderr and "no such folder" in proc.stderr
