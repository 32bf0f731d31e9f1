"""The CPU mixed-batch kernel (csrc/lora_mixed_cpu.cpp through fastpeft/ops/cpu_mixed.py) against a float64
row-by-row reference: odd shapes (M = 1, primes, K and N off the 16 / 32 tiles), ranks 1..128 mixed in one
call, empty slots, base rows, both activation dtypes; rows that must keep the base output are compared bit for
bit, so a kernel that writes where it must not (or skips what it must write) fails."""
from __future__ import annotations

import pytest
import torch

from fastpeft import ops
from fastpeft.ops import cpu_mixed, torch_backend


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    monkeypatch.delenv(cpu_mixed.ENV_VAR, raising=False)


def test_the_kernel_builds_on_this_machine():
    """Built and loaded, and threaded: this torch runs on OpenMP, so the library is built with it and shares
    torch's libgomp (a build that fell back to one thread would be slower, not wrong: this says so)."""
    assert cpu_mixed.unavailable() is None, cpu_mixed.unavailable()
    assert "parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert cpu_mixed.built_with_openmp()


def _case(M, K, N, ranks, dtype, seed, base_rows=2):
    g = torch.Generator().manual_seed(seed)
    R = sum(ranks)
    A = torch.randn(R, K, generator=g)
    B = torch.randn(N, R, generator=g)
    start = torch.tensor([sum(ranks[:j]) for j in range(len(ranks))], dtype=torch.int64)
    rank = torch.tensor(ranks, dtype=torch.int64)
    scale = torch.rand(len(ranks), generator=g) + 0.25
    idx = torch.randint(0, len(ranks), (M,), generator=g)
    idx[torch.randperm(M, generator=g)[:min(base_rows, M - 1)]] = -1  # some base rows (never all)
    x = torch.randn(M, K, generator=g).to(dtype)
    Y = torch.randn(M, N, generator=g).to(dtype)  # "the base output": the kernel adds into it
    return x, Y, A, B, start, rank, scale, idx


def _reference(x, Y, A, B, start, rank, scale, idx):
    ref = Y.double().clone()
    for i in range(x.shape[0]):
        k = int(idx[i])
        if k < 0 or int(rank[k]) == 0:
            continue
        st, r = int(start[k]), int(rank[k])
        ref[i] += float(scale[k]) * (x[i].double() @ A[st:st + r].double().t()) @ B[:, st:st + r].double().t()
    return ref


def _run(x, Y, A, B, start, rank, scale, idx):
    plan = ops.RowPlan.build(idx, start.shape[0])
    tables = cpu_mixed.slot_tables(A, B, start, rank, scale)
    assert tables.A.dtype == (torch.bfloat16 if A.dtype == B.dtype == torch.bfloat16 else torch.float32)
    out = Y.clone()
    cpu_mixed.mixed_add_(out, x, tables, plan.order, cpu_mixed.plan_offsets(plan.offsets))
    return out


SHAPES = [(1, 1, 1), (1, 17, 13), (5, 16, 32), (7, 31, 37), (13, 67, 101), (37, 130, 47), (64, 97, 129)]
RANK_SETS = [(1,), (3, 0, 5), (8, 16, 32, 64), (128, 1, 7), (2, 13, 4, 0, 9, 16, 1)]


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["w32", "wbf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ranks", RANK_SETS, ids=lambda r: "r" + "-".join(map(str, r)))
@pytest.mark.parametrize("M,K,N", SHAPES, ids=lambda v: str(v))
def test_rows_get_their_own_adapter_and_the_others_keep_the_base(M, K, N, ranks, dtype, wdtype):
    """Weights float32 or bfloat16 (a bf16 pool is read as it is), with either activation dtype; the reference
    takes the weights the kernel reads."""
    x, Y, A, B, start, rank, scale, idx = _case(M, K, N, list(ranks), dtype, seed=M * 1000 + K + N + sum(ranks))
    A, B = A.to(wdtype), B.to(wdtype)
    out = _run(x, Y, A, B, start, rank, scale, idx)
    ref = _reference(x, Y, A, B, start, rank, scale, idx)
    assert not torch.isnan(out).any()
    untouched = torch.tensor([int(k) < 0 or int(rank[int(k)]) == 0 for k in idx])
    assert torch.equal(out[untouched], Y[untouched])  # bit for bit: base rows and rank-0 slots
    if dtype == torch.float32:
        tol = 2e-5 * max(K, N, max(ranks))
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=tol * 1e-2)
    else:  # fp32 sums of bf16 inputs, rounded once: within a bf16 step of the exact value (plus fp32 noise)
        err = (out.double() - ref).abs()
        assert (err <= ref.abs() * 2 ** -8 + 1e-3 * (1 + max(ranks))).all(), err.max()


def test_bf16_outputs_round_to_nearest_even_once():
    """bf16 Y: the fp32 sum (Y's value plus the LoRA term) rounded once, to nearest even, as torch rounds. The
    inputs make every sum exact in fp32 and land many of them on ties (odd integers in [256, 512), where bf16
    steps by 2), in the vector body (the first 32 columns) and the scalar tail (8 more)."""
    M, K, N = 9, 16, 40
    A = torch.zeros(1, K)
    A[0, 0] = 1.0                                            # S_i = x[i, 0]
    B = torch.ones(N, 1)
    x = torch.zeros(M, K)
    x[:, 0] = torch.arange(1, M + 1, dtype=torch.float32)   # deltas 1..9: odd ones tie
    Y32 = 256.0 + 2.0 * torch.arange(N, dtype=torch.float32).expand(M, N)  # bf16-exact, even mantissas and odd
    Y = Y32.bfloat16()
    idx = torch.zeros(M, dtype=torch.int64)
    out = _run(x.bfloat16(), Y, A, B, torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]), idx)
    assert torch.equal(out, (Y32 + x[:, :1]).bfloat16())
    assert not torch.equal(out.float(), Y32 + x[:, :1])     # ties were rounded, not kept


def test_nan_stays_in_its_row_and_results_repeat_bit_for_bit_at_any_thread_count():
    M, K, N = 24, 200, 72
    x, Y, A, B, start, rank, scale, idx = _case(M, K, N, [16, 8, 32], torch.float32, seed=7, base_rows=3)
    lora_row = int((idx >= 0).nonzero()[0])
    x[lora_row, 5] = float("nan")
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (before, 1, before):
            torch.set_num_threads(threads)
            outs.append(_run(x, Y, A, B, start, rank, scale, idx))
    finally:
        torch.set_num_threads(before)
    assert torch.isnan(outs[0][lora_row]).all()
    others = torch.arange(M) != lora_row
    assert not torch.isnan(outs[0][others]).any()
    for o in outs[1:]:
        assert torch.equal(torch.nan_to_num(o), torch.nan_to_num(outs[0]))


@pytest.mark.parametrize("case,match", [
    ("dtype", "must share a dtype"), ("fp16", "must share a dtype"), ("K", "slot tables are for K=16"),
    ("stride", "unit column strides"), ("order", "order must be contiguous int64"),
    ("offsets", r"offsets must be contiguous int64 \[4\]"), ("rank", "above the kernel's"),
    ("no_panels", "no B panels laid out"), ("order_range", "plan is malformed"),
    ("offsets_order", "plan is malformed"), ("offsets_strided", "must be contiguous int64"),
])
def test_bad_calls_are_refused_naming_the_tensor(case, match):
    x, Y, A, B, start, rank, scale, idx = _case(5, 16, 8, [2, 3], torch.float32, seed=1)
    plan = ops.RowPlan.build(idx, 2)
    order, offsets = plan.order, cpu_mixed.plan_offsets(plan.offsets)
    tables = cpu_mixed.slot_tables(A, B, start, rank, scale)
    if case == "dtype":
        x = x.double()
    elif case == "fp16":
        x, Y = x.half(), Y.half()
    elif case == "K":
        x = torch.randn(5, 17)
    elif case == "stride":
        x = torch.randn(16, 5).t()
    elif case == "order":
        order = order.int()
    elif case == "offsets":
        offsets = offsets[:3]
    elif case == "order_range":  # a hand-built plan whose order names a row past M
        order = order.clone()
        order[-1] = 5
    elif case == "offsets_order":  # segment ends that fall back
        offsets = torch.tensor([0, 3, 2, 5])
    elif case == "offsets_strided":
        offsets = torch.stack([offsets, offsets], 1)[:, 0]
    elif case == "no_panels":  # tables whose slots' panels were never laid out: the kernel refuses, writes nothing
        tables = cpu_mixed.slot_tables(A, B, start, rank, scale, slots=())
    else:
        tables = cpu_mixed.slot_tables(torch.randn(2000, 16), torch.randn(8, 2000), torch.tensor([0, 0]),
                                       torch.tensor([2000, 3]), scale)
    before = Y.clone()
    with pytest.raises(ValueError, match=match):
        cpu_mixed.mixed_add_(Y, x, tables, order, offsets)
    assert torch.equal(Y, before)


def test_a_missing_compiler_is_reported_and_the_pool_call_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_mixed, "_state", {})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FASTPEFT_CACHE_DIR", str(tmp_path))
    reason = cpu_mixed.unavailable()
    assert reason is not None and "no-such-compiler" in reason
    x, Y, A, B, start, rank, scale, idx = _case(9, 20, 11, [3, 5], torch.float32, seed=4)
    pool = ops.AdapterPool(A, B, start, rank, scale, 5)
    W = torch.randn(11, 20)
    with torch.no_grad():
        y = ops.lora(x, ops.Base.dense(W), ops.AdapterSet(pool=pool, row_index=idx))
    torch.testing.assert_close(y.double(), _reference(x, x.double() @ W.double().t(), A, B, start, rank, scale, idx),
                               rtol=1e-5, atol=1e-4)


def test_the_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv(cpu_mixed.ENV_VAR, "0")
    assert "FASTPEFT_CPU_KERNEL=0" in cpu_mixed.unavailable()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_torch_backend_runs_pool_calls_on_the_kernel_and_agrees_with_its_grouped_path(monkeypatch, dtype):
    """A pool call on CPU goes to the kernel (spied), a float64 call to the grouped GEMMs; both paths give the
    row-wise reference."""
    calls = []
    real = cpu_mixed.bind
    monkeypatch.setattr(cpu_mixed, "bind", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(2)
    K, N, M = 40, 24, 19
    x, _, A, B, start, rank, scale, idx = _case(M, K, N, [4, 0, 9, 16], dtype, seed=12)
    A, B = A.to(dtype), B.to(dtype)
    pool = ops.AdapterPool(A, B, start, rank, scale, 16)
    W, b = torch.randn(N, K, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    with torch.no_grad():
        y = ops.lora(x, ops.Base.dense(W, b), ops.AdapterSet(pool=pool, row_index=idx))
        assert calls == [1]
        monkeypatch.setenv(cpu_mixed.ENV_VAR, "0")
        y_grouped = ops.lora(x, ops.Base.dense(W, b), ops.AdapterSet(pool=pool, row_index=idx))
        assert calls == [1]
    ref = _reference(x, (x.double() @ W.double().t() + b.double()).to(dtype), A, B, start, rank, scale, idx)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.1)
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(y, y_grouped, **tol)
    monkeypatch.delenv(cpu_mixed.ENV_VAR)
    with torch.no_grad():
        ops.lora(x.double(), ops.Base.dense(W.double(), b.double()),
                 ops.AdapterSet(pool=ops.AdapterPool(A.double(), B.double(), start, rank, scale, 16), row_index=idx))
    assert calls == [1]


def test_cpu_kernel_rule_refuses_calls_whose_dora_slots_have_rows():
    """A pool that carries DoRA tables (a serving bank's always does) runs on the kernel while no DoRA slot has
    rows in the call; rows on a DoRA slot send the call to the grouped path, which applies g."""
    from fastpeft.ops.contract import LoraCall

    x, _, A, B, start, rank, scale, _ = _case(4, 8, 6, [2, 3], torch.float32, seed=5)
    pool = ops.AdapterPool(A, B, start, rank, scale, 3, torch.ones(2, 6), torch.ones(2, 6), torch.tensor([False, True]))
    for idx, runs in ((torch.tensor([0, -1, 0, 0]), True), (torch.tensor([0, 1, -1, 0]), False)):
        call = LoraCall(x, ops.Base.dense(torch.randn(6, 8)), pool.views(), 0, ops.RowPlan.build(idx, 2), pool)
        assert torch_backend._cpu_kernel_runs(call) is runs


def test_an_unwritable_cache_folder_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("FASTPEFT_CACHE_DIR", str(blocker))
    monkeypatch.setattr(cpu_mixed.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(cpu_mixed, "_state", {})
    assert cpu_mixed.unavailable() is None, cpu_mixed.unavailable()
    built = list((tmp_path / "tmp").glob("fastpeft-*/cpu/lora_mixed_cpu_*.so"))
    assert len(built) == 1 and cpu_mixed._state["lib"].path == str(built[0])
    assert not list((tmp_path / "tmp").glob("fastpeft-*/cpu/*.tmp.so"))  # no half-written leftovers


def test_only_the_slots_a_batch_uses_are_laid_out_and_a_load_relays_them(monkeypatch):
    """A pool call lays out the B panels of the slots that have rows, keeps them with the pool for the next
    call, adds those of new slots when a later batch uses them, and starts over when the pool is written (a
    bank's load), so the next call sees the new weights."""
    x, _, A, B, start, rank, scale, _ = _case(6, 20, 40, [3, 5, 2, 4], torch.float32, seed=9)
    pool = ops.AdapterPool(A, B, start, rank, scale, 5)
    W = torch.randn(40, 20)

    def call(idx):
        with torch.no_grad():
            y = ops.lora(x, ops.Base.dense(W), ops.AdapterSet(pool=pool, row_index=ops.RowPlan.build(idx, 4)))
        ref = _reference(x, x.double() @ W.double().t(), pool.A, pool.B, start, rank, scale, idx)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
        return pool.cached("cpu tables", None)

    t1 = call(torch.tensor([0, 1, 0, -1, 1, 0]))
    assert sorted(t1.panels) == [0, 1] and int(t1.bptr[2]) == int(t1.bptr[3]) == 0
    t2 = call(torch.tensor([3, 1, 3, -1, 1, 3]))
    assert t2 is t1 and sorted(t1.panels) == [0, 1, 3]
    with torch.no_grad():
        pool.B[:, 3:8].mul_(-2.0)  # "load" new weights into slot 1's columns
    t3 = call(torch.tensor([1, 1, 1, 1, 1, 1]))
    assert t3 is not t1 and sorted(t3.panels) == [1]


def test_compiled_pool_calls_reuse_the_kernel_tables_across_calls(monkeypatch):
    """The custom op rebuilds an AdapterPool from its tensors on every compiled call; what backends derive from a
    pool is kept with those tensors, so the CPU kernel's tables are built once, not per call, and a write to
    the pool (a load) is still seen."""
    built = []
    real = cpu_mixed.slot_tables
    monkeypatch.setattr(cpu_mixed, "slot_tables", lambda *a, **k: built.append(1) or real(*a, **k))
    x, _, A, B, start, rank, scale, idx = _case(8, 24, 40, [4, 4, 4], torch.float32, seed=21)
    pool = ops.AdapterPool(A, B, start, rank, scale, 4)
    W = torch.randn(40, 24)

    def f(x, idx):
        return ops.lora(x, ops.Base.dense(W), ops.AdapterSet(pool=pool, row_index=idx))

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        outs = [compiled(x, idx) for _ in range(3)]
        assert len(built) == 1 and all(torch.equal(o, outs[0]) for o in outs)
        pool.B.mul_(2.0)  # a load writes the pool in place
        after = compiled(x, idx)
    assert len(built) == 2
    ref = _reference(x, x.double() @ W.double().t(), A, pool.B, start, rank, scale, idx)
    torch.testing.assert_close(after.double(), ref, rtol=1e-5, atol=1e-4)


def test_slots_whose_rank_rows_run_past_A_are_refused():
    """slot_tables (the kernel's tables) and the pool's views (every path) refuse a slot whose start + rank runs
    past A's rows, naming the slot, instead of reading past A or silently serving fewer rows."""
    A, B = torch.randn(7, 12), torch.randn(10, 7)
    start, rank, scale = torch.tensor([0, 6]), torch.tensor([4, 2]), torch.tensor([1.0, 1.0])
    with pytest.raises(ValueError, match=r"slot 1 takes rank rows \[6, 8\), outside A's 7 rows"):
        cpu_mixed.slot_tables(A, B, start, rank, scale)
    pool = ops.AdapterPool(A, B, start, rank, scale, 4)
    for idx in (torch.tensor([0, 1, 1]), ops.RowPlan.build(torch.tensor([0, 1, 1]), 2)):
        with torch.no_grad(), pytest.raises(ValueError, match=r"slot 1 takes rank rows \[6, 8\)"):
            ops.lora(torch.randn(3, 12), ops.Base.dense(torch.randn(10, 12)), ops.AdapterSet(row_index=idx, pool=pool))
