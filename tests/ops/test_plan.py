"""Mixed batches in the op (ops/plan.py, the torch backend's segment path): each row with its own adapter."""
from __future__ import annotations

import pytest
import torch

from fastpeft import ops
from fastpeft.quant.formats import dequantize, quantize_weight


def test_plan_sorts_rows_by_adapter_stably_and_counts_segments():
    idx = torch.tensor([2, -1, 0, 2, 0, -1, 1])
    plan = ops.RowPlan.build(idx, 3)
    assert plan.offsets == (0, 2, 4, 5, 7)
    assert plan.segment(-1).tolist() == [1, 5]
    assert plan.segment(0).tolist() == [2, 4]
    assert plan.segment(1).tolist() == [6]
    assert plan.segment(2).tolist() == [0, 3]
    rows = plan.per_row(3)  # samples of 3 rows each: sample s -> rows 3s, 3s+1, 3s+2
    assert rows.segment(0).tolist() == [6, 7, 8, 12, 13, 14]
    assert rows.row_index.tolist() == idx.repeat_interleave(3).tolist()
    assert plan.for_rows(14).offsets == tuple(2 * o for o in plan.offsets)
    with pytest.raises(ValueError, match="13 rows, not a multiple of the 7 samples"):
        plan.for_rows(13)


@pytest.mark.parametrize("bad,match", [(torch.tensor([0, 3]), r"holds 3, outside \[-1, 2\]"),
                                       (torch.tensor([-2, 0]), r"holds -2"),
                                       (torch.tensor([[0, 1]]), "1-D integer tensor"),
                                       (torch.tensor([0.0, 1.0]), "1-D integer tensor")])
def test_bad_row_index_is_refused_naming_it(bad, match):
    with pytest.raises(ValueError, match=match):
        ops.RowPlan.build(bad, 3)


def _reference(x, W, b, adapters, idx):
    rows = []
    for i in range(x.shape[0]):
        y = x[i] @ W.t() + (b if b is not None else 0)
        k = int(idx[i])
        if k >= 0:
            A, B, s = adapters[k]
            y = y + s * (x[i] @ A.t()) @ B.t()
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("M", [1, 13])
@pytest.mark.parametrize("with_bias", [True, False])
def test_mixed_batch_forward_and_grads_match_float64_rowwise_reference(M, with_bias):
    g = torch.Generator().manual_seed(M)
    K, N = 11, 7
    dt = torch.float64
    x = torch.randn(M, K, generator=g, dtype=dt, requires_grad=True)
    W, b = torch.randn(N, K, generator=g, dtype=dt), torch.randn(N, generator=g, dtype=dt) if with_bias else None
    ranks = [2, 5, 1, 3]  # mixed ranks; adapter 3 gets no rows
    adapters = [(torch.randn(r, K, generator=g, dtype=dt, requires_grad=True),
                 torch.randn(N, r, generator=g, dtype=dt, requires_grad=True), 0.5 + i) for i, r in enumerate(ranks)]
    idx = torch.randint(-1, 3, (M,), generator=g)
    y = ops.lora(x, ops.Base.dense(W, b), ops.AdapterSet([ops.Adapter(A, B, s) for A, B, s in adapters], idx))
    ref = _reference(x, W, b, adapters, idx)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    leaves = [x] + [t for A, B, _ in adapters for t in (A, B)]
    dY = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, leaves, dY), torch.autograd.grad(ref, leaves, dY, allow_unused=True)):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, rtol=1e-12, atol=1e-12)


def test_mixed_batch_over_a_packed_base_and_rank_zero_stand_ins():
    g = torch.Generator().manual_seed(2)
    K, N = 64, 10
    qw = quantize_weight(torch.randn(N, K, generator=g), "nf4")
    x = torch.randn(6, K, generator=g)
    A, B = torch.randn(4, K, generator=g), torch.randn(N, 4, generator=g)
    empty = ops.Adapter(x.new_empty(0, K), x.new_empty(N, 0), 1.0)  # a layer without that adapter: base rows
    idx = torch.tensor([0, 1, -1, 1, 0, 0])
    y = ops.lora(x, ops.Base.quantized(qw), ops.AdapterSet([ops.Adapter(A, B, 2.0), empty], idx))
    ref = _reference(x.double(), dequantize(qw, torch.float64), None, [(A.double(), B.double(), 2.0),
                                                                       (torch.zeros(1, K).double(),
                                                                        torch.zeros(N, 1).double(), 1.0)], idx)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case,match", [("length", r"one entry per row of x: expected \[M=4\]"),
                                        ("count", "for 3 adapters; the call has 2"),
                                        ("dropout", "dropout in a mixed batch"),
                                        ("dora", "DoRA")])
def test_bad_mixed_calls_are_refused(case, match):
    x, W = torch.randn(4, 5), torch.randn(3, 5)
    ads = [ops.Adapter(torch.randn(2, 5), torch.randn(3, 2), 1.0) for _ in range(2)]
    idx, training = torch.tensor([0, 1, 0, -1]), False
    if case == "length":
        idx = torch.tensor([0, 1, 0])
    elif case == "count":
        idx = ops.RowPlan.build(idx, 3)
    elif case == "dropout":
        ads, training = [ops.Adapter(a.A, a.B, 1.0, 0.1) for a in ads], True
    else:
        ads[0] = ops.Adapter(ads[0].A, ads[0].B, 1.0, magnitude=torch.ones(3))
    with pytest.raises(ValueError, match=match):
        ops.lora(x, ops.Base.dense(W), ops.AdapterSet(ads, idx), training=training)


def test_mixed_batch_traces_under_torch_compile_with_a_prebuilt_plan():
    g = torch.Generator().manual_seed(4)
    x, W = torch.randn(6, 8, generator=g), torch.randn(5, 8, generator=g)
    ads = [ops.Adapter(torch.randn(r, 8, generator=g), torch.randn(5, r, generator=g), 1.0) for r in (2, 3)]
    plan = ops.RowPlan.build(torch.tensor([1, 0, -1, 1, 1, 0]), 2)

    def f(x):
        return ops.lora(x, ops.Base.dense(W), ops.AdapterSet(ads, plan))

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


def _pool(slots, K, N, max_rank=8, dora_slots=(), dtype=torch.float64, seed=0):
    """An AdapterPool with ``slots`` = [(rank, scale), ...] laid out in order, plus the per-slot tensors."""
    g = torch.Generator().manual_seed(seed)
    R = sum(r for r, _ in slots) + 3  # some unused rows at the end
    A, B = torch.randn(R, K, generator=g, dtype=dtype), torch.randn(N, R, generator=g, dtype=dtype)
    start = torch.tensor([sum(r for r, _ in slots[:j]) for j in range(len(slots))])
    rank = torch.tensor([r for r, _ in slots])
    scale = torch.tensor([s for _, s in slots], dtype=torch.float32)
    kw = {}
    if dora_slots:
        kw = dict(magnitude=torch.rand(len(slots), N, generator=g, dtype=dtype) + 0.5,
                  weight_norm=torch.rand(len(slots), N, generator=g, dtype=dtype) + 0.5,
                  dora=torch.tensor([j in dora_slots for j in range(len(slots))]))
    return ops.AdapterPool(A, B, start, rank, scale, max_rank, **kw)


def test_pool_call_equals_the_same_adapters_as_a_list_and_dora_slots_scale_their_rows():
    g = torch.Generator().manual_seed(9)
    K, N, M = 10, 6, 11
    W, b = torch.randn(N, K, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    pool = _pool([(2, 0.5), (0, 1.0), (5, 2.0), (1, 1.5)], K, N, dora_slots=(2,))
    idx = torch.randint(-1, 4, (M,), generator=g)
    x = torch.randn(M, K, generator=g, dtype=torch.float64, requires_grad=True)
    y = ops.lora(x, ops.Base.dense(W, b), ops.AdapterSet(pool=pool, row_index=idx))
    rows = []
    for i in range(M):
        j = int(idx[i])
        yi = x[i] @ W.t()
        if j >= 0 and int(pool.rank[j]):
            st, r = int(pool.start[j]), int(pool.rank[j])
            yi = yi + float(pool.scale[j]) * (x[i] @ pool.A[st:st + r].t()) @ pool.B[:, st:st + r].t()
        if j == 2:
            yi = yi * (pool.magnitude[2] / pool.weight_norm[2])
        rows.append(yi + b)
    ref = torch.stack(rows)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dY = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, dY)[0], torch.autograd.grad(ref, x, dY)[0],
                               rtol=1e-12, atol=1e-12)


def test_loading_into_a_warm_pool_does_not_recompile():
    """New adapters change the pool's contents, not its shapes: the compiled graph is reused."""
    g = torch.Generator().manual_seed(5)
    K, N = 8, 5
    W = torch.randn(N, K, generator=g)
    pool = _pool([(2, 1.0), (3, 1.0)], K, N, dtype=torch.float32)
    x = torch.randn(4, K, generator=g)

    def f(x, idx):
        return ops.lora(x, ops.Base.dense(W), ops.AdapterSet(pool=pool, row_index=idx))

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        y1 = compiled(x, torch.tensor([0, 1, -1, 0]))
        torch.testing.assert_close(y1, f(x, torch.tensor([0, 1, -1, 0])))
        pool.A[:5].normal_(generator=g)  # "load" new adapters into both slots, with new ranks and scales
        pool.rank.copy_(torch.tensor([1, 4]))
        pool.start.copy_(torch.tensor([4, 0]))
        pool.scale.fill_(3.0)
        y2 = compiled(x, torch.tensor([1, 1, 0, -1]))
    y2_eager = f(x, torch.tensor([1, 1, 0, -1]))
    torch.testing.assert_close(y2, y2_eager)
    assert (y2 - y1).abs().max() > 1e-3


@pytest.mark.parametrize("case,match", [("both", "pool or a list of adapters"), ("no_index", "needs row_index"),
                                        ("bad_B", r"pool's B must be \[N=6"), ("bad_rank", "pool's rank must be")])
def test_bad_pool_calls_are_refused(case, match):
    pool = _pool([(2, 1.0), (1, 1.0)], 10, 6, dtype=torch.float32)
    x, W, idx = torch.randn(3, 10), torch.randn(6, 10), torch.tensor([0, 1, -1])
    ads = ()
    if case == "both":
        ads = (ops.Adapter(torch.randn(1, 10), torch.randn(6, 1), 1.0),)
    elif case == "no_index":
        idx = None
    elif case == "bad_B":
        pool = ops.AdapterPool(pool.A, pool.B[:5], pool.start, pool.rank, pool.scale, pool.max_rank)
    else:
        pool = ops.AdapterPool(pool.A, pool.B, pool.start, pool.rank[:1], pool.scale, pool.max_rank)
    with pytest.raises(ValueError, match=match):
        ops.lora(x, ops.Base.dense(W), ops.AdapterSet(ads, idx, pool=pool))


def _rowwise(x, W, b, pool, idx):
    rows = []
    for i in range(x.shape[0]):
        j = int(idx[i])
        yi = x[i].double() @ W.double().t() + b.double()
        if j >= 0 and int(pool.rank[j]):
            st, r = int(pool.start[j]), int(pool.rank[j])
            A, B = pool.A[st:st + r].double(), pool.B[:, st:st + r].double()
            yi = yi + float(pool.scale[j]) * (x[i].double() @ A.t()) @ B.t()
        rows.append(yi)
    return torch.stack(rows)


@pytest.mark.parametrize("counts", [(4, 4, 4), (3, 1, 2), (5, 0, 5)], ids=["full", "padded", "empty-slot"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pool_rows_run_as_batched_gemms_per_adapter_group(monkeypatch, counts, dtype):
    """The torch backend's grouped path (two bmm over adapters padded to one row count and one rank) equals
    the row-wise float64 reference, with mixed ranks, a rank-0 slot, base rows, and NaN in a base row
    staying in that row."""
    from fastpeft.ops import torch_backend

    monkeypatch.setenv("FASTPEFT_CPU_KERNEL", "0")  # this test is about the grouped GEMMs (test_cpu_mixed: the kernel)
    taken = []
    real = torch_backend._grouped_pool
    monkeypatch.setattr(torch_backend, "_grouped_pool", lambda call, Y: taken.append(real(call, Y)) or taken[-1])
    g = torch.Generator().manual_seed(sum(counts))
    K, N = 13, 7
    pool = _pool([(3, 0.5), (3, 2.0), (5, 1.5), (0, 1.0)], K, N, dtype=dtype)  # slots 0 and 1 share a bucket
    idx = torch.tensor(sum(([k] * n for k, n in enumerate(counts)), []) + [-1, -1, 3], dtype=torch.int64)
    idx = idx[torch.randperm(idx.numel(), generator=g)]
    W, b = torch.randn(N, K, generator=g, dtype=dtype), torch.randn(N, generator=g, dtype=dtype)
    x = torch.randn(idx.numel(), K, generator=g, dtype=dtype)
    nan_row = int((idx == -1).nonzero()[0])
    x[nan_row, 0] = float("nan")
    with torch.no_grad():
        y = ops.lora(x, ops.Base.dense(W, b), ops.AdapterSet(pool=pool, row_index=idx))
    assert taken == [True]
    ref = _rowwise(x, W, b, pool, idx)
    assert torch.isnan(y[nan_row]).all() and not torch.isnan(y[torch.arange(len(idx)) != nan_row]).any()
    keep = torch.arange(len(idx)) != nan_row
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[keep].double(), ref[keep], **tol)


def test_pool_buckets_are_by_rank_and_uneven_rows_run_per_adapter():
    """Adapters share a bucket (one bmm pair) only with adapters of their own rank (ranks are never padded),
    and only while padding their rows costs less than the ops it saves: in a prefill with one adapter on
    most rows each adapter runs alone. Results equal the row-wise reference either way."""
    from fastpeft.ops import torch_backend
    from fastpeft.ops.contract import LoraCall

    g = torch.Generator().manual_seed(3)
    K, N = 256, 64
    pool = _pool([(8, 0.5), (8, 2.0), (16, 1.5), (8, 1.0), (16, 0.5)], K, N, max_rank=16)
    W, b = torch.randn(N, K, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    for idx, expect in ((torch.tensor([0, 1, 2, 3, 4] * 4), (((0, 1, 3), 4), ((2, 4), 4))),
                        (torch.tensor([0] * 400 + [1, 2, 4]), (((0,), 400), ((1,), 1), ((2, 4), 1)))):
        plan = ops.RowPlan.build(idx, pool.slots)
        x = torch.randn(idx.numel(), K, generator=g, dtype=torch.float64)
        call = LoraCall(x, ops.Base.dense(W, b), pool.views(), 0, plan, pool)
        assert torch_backend._buckets(call) == expect
        with torch.no_grad():
            y = ops.lora(x, ops.Base.dense(W, b), ops.AdapterSet(pool=pool, row_index=idx))
        torch.testing.assert_close(y, _rowwise(x, W, b, pool, idx), rtol=1e-12, atol=1e-12)


def test_pool_call_with_the_same_counts_but_other_rows_recomputes_its_gather():
    """Two batches through one pool whose adapters have the same row counts but other rows (a decode loop
    whose requests change places): what the pool keeps between calls must not be keyed by the counts alone."""
    g = torch.Generator().manual_seed(11)
    K, N = 12, 7
    pool = _pool([(4, 0.5), (4, 2.0), (4, 1.5)], K, N)
    W, b = torch.randn(N, K, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    x = torch.randn(6, K, generator=g, dtype=torch.float64)
    for idx in (torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 0, 1, 1, 2, 0]), torch.tensor([1, 1, 0, 2, 0, 2])):
        with torch.no_grad():
            y = ops.lora(x, ops.Base.dense(W, b), ops.AdapterSet(pool=pool, row_index=idx))
        torch.testing.assert_close(y, _rowwise(x, W, b, pool, idx), rtol=1e-12, atol=1e-12)
