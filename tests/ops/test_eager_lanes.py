"""The op's eager fast lanes (fastpeft/ops/eager.py) give what the general path gives, bit for bit, and
leave tracers the custom ops.

The general path is reached with the same inputs by passing an AdapterSet (the lanes take a plain
sequence of Adapters only), so each test compares the two paths on identical tensors and seeds.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastpeft import ops
from fastpeft.ops import Adapter, AdapterSet, Base, dispatch, eager, lora_op


def _inputs(M=5, K=12, N=10, ranks=(4,), bias=True, grad=True, dtype=torch.float32, lead=()):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*lead, M, K, generator=g, dtype=dtype)
    W = torch.randn(N, K, generator=g, dtype=dtype) / 3
    b = torch.randn(N, generator=g, dtype=dtype) if bias else None
    ads = [(torch.randn(r, K, generator=g).requires_grad_(grad), torch.randn(N, r, generator=g).requires_grad_(grad))
           for r in ranks]
    return x, W, b, ads


def _run(x, W, b, ads, scales, ps, training, general: bool, seed=7):
    adapters = [Adapter(A, B, s, p) for (A, B), s, p in zip(ads, scales, ps)]
    for A, B in ads:
        A.grad = B.grad = None
    if x.requires_grad:
        x.grad = None
    torch.manual_seed(seed)
    y = ops.lora(x, Base(W, None, b), AdapterSet(tuple(adapters)) if general else adapters, training)
    out = [y.detach().clone()]
    if y.requires_grad:
        y.square().sum().backward()
        out += [t.grad.clone() for A, B in ads for t in (A, B)]
        if x.requires_grad:
            out.append(x.grad.clone())
    return out, y.grad_fn


@pytest.mark.parametrize("ranks,scales,ps,training", [
    ((4,), (0.5,), (0.0,), True),
    ((4,), (0.5,), (0.3,), True),             # dropout: the same seed drawn, the same masks in fwd and bwd
    ((4,), (2,), (0.3,), False),              # an int scale; eval: no dropout
    ((3, 5), (0.5, 1.5), (0.2, 0.0), True),   # two adapters, one with dropout
    ((), (), (), True),                        # no adapter: the base through the same path
])
@pytest.mark.parametrize("x_grad", [False, True])
def test_plain_lane_matches_the_general_path_bit_for_bit(ranks, scales, ps, training, x_grad):
    x, W, b, ads = _inputs(ranks=ranks, lead=(2,))
    x.requires_grad_(x_grad)
    if not ranks and not x_grad:
        x.requires_grad_(True)  # something must need a gradient
    fast, fn_fast = _run(x, W, b, ads, scales, ps, training, general=False)
    slow, fn_slow = _run(x, W, b, ads, scales, ps, training, general=True)
    assert type(fn_fast).__name__ == "_PlainLoraBackward" and type(fn_slow).__name__ == "_LoraFunctionBackward"
    assert len(fast) == len(slow) and len(fast) > 1
    for a, c in zip(fast, slow):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_plain_lane_other_dtypes_match_the_general_path(dtype):
    # 16-bit x and W with fp32 adapters (peft's default): S in fp32, Y in x's dtype, grads in each tensor's dtype
    x, W, b, ads = _inputs(ranks=(4,), dtype=dtype)
    if dtype == torch.float64:
        ads = [(A.detach().double().requires_grad_(), B.detach().double().requires_grad_()) for A, B in ads]
    x.requires_grad_(True)
    fast, _ = _run(x, W, b, ads, (0.5,), (0.25,), True, general=False)
    slow, _ = _run(x, W, b, ads, (0.5,), (0.25,), True, general=True)
    assert [t.dtype for t in fast] == [dtype, ads[0][0].dtype, ads[0][1].dtype, dtype]
    for a, c in zip(fast, slow):
        assert torch.equal(a, c)


@pytest.mark.parametrize("ps,training", [((0.0,), False), ((0.3,), False), ((0.0, 0.0), True)])
def test_plain_inference_lane_matches_the_general_path(ps, training):
    x, W, b, ads = _inputs(ranks=(4,) * len(ps), grad=False, lead=(3,))
    with torch.no_grad():
        fast, _ = _run(x, W, b, ads, (0.5,) * len(ps), ps, training, general=False)
        slow, _ = _run(x, W, b, ads, (0.5,) * len(ps), ps, training, general=True)
    assert torch.equal(fast[0], slow[0])


def test_inference_in_training_mode_with_dropout_draws_the_seed_as_before():
    # no gradient, but dropout in effect: the general path runs it and consumes one seed from the CPU RNG
    x, W, b, ads = _inputs(grad=False)
    torch.manual_seed(11)
    with torch.no_grad():
        ops.lora(x, Base(W, None, b), [Adapter(*ads[0], 0.5, 0.4)], True)
    after = torch.randint(0, 1000, (4,))
    torch.manual_seed(11)
    lora_op.draw_seed()
    assert torch.equal(torch.randint(0, 1000, (4,)), after)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("case,match", [
    ("K", r"x's last dim must be K=12"),
    ("dtype", r"must have the same dtype"),
    ("B", r"lora_B must be \[N, r=4\]"),
    ("p", r"dropout_p must be in \[0, 1\]"),
    ("bias", r"bias must be \[N=10\]"),
])
def test_bad_inputs_still_get_the_validators_errors(case, match, grad):
    x, W, b, ads = _inputs(grad=grad)
    A, B = ads[0]
    p = 0.0
    if case == "K":
        x = torch.randn(5, 13)
    elif case == "dtype":
        x = x.double()
    elif case == "B":
        B = torch.randn(10, 3, requires_grad=grad)
    elif case == "p":
        p = 1.5
    elif case == "bias":
        b = torch.randn(11)
    with pytest.raises(ValueError, match=match):
        ops.lora(x, Base(W, None, b), [Adapter(A, B, 0.5, p)], True)


class _Names(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_custom_ops():
    x, W, b, ads = _inputs()
    with _Names() as mode:
        y = ops.lora(x, Base(W, None, b), [Adapter(*ads[0], 0.5, 0.2)], True)
        y.sum().backward()
    assert any("fastpeft.lora_fwd" in n for n in mode.names), mode.names
    assert any("fastpeft.lora_bwd" in n for n in mode.names), mode.names


def test_direct_is_false_for_tracers_and_subclasses():
    t = torch.randn(2)
    assert eager.direct([t, None, torch.nn.Parameter(t)])
    with _Names():
        assert not eager.direct([t])
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as fm:
        fake = fm.from_tensor(t)
    assert not eager.direct([fake])


def test_outside_the_lane_the_function_calls_the_op_implementation_directly(monkeypatch):
    # a packed-free call the lane does not take (a DoRA adapter): _LoraFunction skips the custom-op boundary in
    # eager mode (the module's functions are called), and keeps it under a dispatch mode
    calls = []
    real_fwd, real_bwd = lora_op._lora_fwd, lora_op._lora_bwd
    monkeypatch.setattr(lora_op, "_lora_fwd", lambda *a: calls.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(lora_op, "_lora_bwd", lambda *a: calls.append("bwd") or real_bwd(*a))
    x, W, b, ads = _inputs()
    m = torch.rand(10, requires_grad=True)
    y = ops.lora(x, Base(W, None, b), [Adapter(*ads[0], 0.5, 0.0, m)], True)
    y.sum().backward()
    assert calls == ["fwd", "bwd"]
    assert m.grad is not None and ads[0][0].grad is not None


def test_checkpointed_plain_lane_replays_its_masks():
    from torch.utils.checkpoint import checkpoint

    x, W, b, ads = _inputs(ranks=(4,))
    A, B = ads[0]

    def f(x):
        return ops.lora(x, Base(W, None, b), [Adapter(A, B, 0.5, 0.3)], True)

    def grads(fn):
        A.grad = B.grad = None
        torch.manual_seed(5)
        fn(x.requires_grad_(True)).square().sum().backward()
        return [A.grad.clone(), B.grad.clone(), x.grad.clone()]

    ref = grads(f)
    x.grad = None
    for reentrant in (False, True):
        x.grad = None
        got = grads(lambda t: checkpoint(f, t, use_reentrant=reentrant))
        for a, c in zip(got, ref):
            assert torch.equal(a, c)


def test_forced_backend_is_read_on_every_call(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.forced_backend() is None
    os.environ[dispatch.ENV_VAR] = " Torch "
    try:
        assert dispatch.forced_backend() == "torch"
    finally:
        del os.environ[dispatch.ENV_VAR]
    assert dispatch.forced_backend() is None
    # os.environ replaced wholesale: read through the mapping itself
    monkeypatch.setattr(os, "environ", {dispatch.ENV_VAR: "cuda"})
    assert dispatch.forced_backend() == "cuda"


def test_forced_unavailable_backend_refuses_the_lanes_calls(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    x, W, b, ads = _inputs(grad=False)
    with pytest.raises(RuntimeError, match=r"FASTPEFT_BACKEND=cuda.*CUDA tensors"):
        with torch.no_grad():
            ops.lora(x, Base(W, None, b), [Adapter(*ads[0], 0.5)], False)
    x, W, b, ads = _inputs(grad=True)
    with pytest.raises(RuntimeError, match=r"FASTPEFT_BACKEND=cuda.*CUDA tensors"):
        ops.lora(x, Base(W, None, b), [Adapter(*ads[0], 0.5)], True)


def test_registered_backend_runs_the_lanes_calls_forward_and_backward():
    rec = []

    class Spy:
        supports = staticmethod(lambda call: None)

        @staticmethod
        def forward(call):
            rec.append("fwd")
            return ops.torch_backend.forward(call)

        @staticmethod
        def backward(call, *a):
            rec.append("bwd")
            return ops.torch_backend.backward(call, *a)

    x, W, b, ads = _inputs()
    dispatch.register_backend("torch", Spy)
    try:
        ops.lora(x, Base(W, None, b), [Adapter(*ads[0], 0.5, 0.1)], True).sum().backward()
        with torch.no_grad():
            ops.lora(x, Base(W, None, b), [Adapter(*ads[0], 0.5)], False)
    finally:
        dispatch.register_backend("torch", None)
    assert rec == ["fwd", "bwd", "fwd"]


def _pool_inputs(M=9, K=12, N=10, dtype=torch.float32):
    g = torch.Generator().manual_seed(8)
    ranks = [3, 0, 5]
    pool = ops.AdapterPool(torch.randn(sum(ranks), K, generator=g, dtype=dtype),
                           torch.randn(N, sum(ranks), generator=g, dtype=dtype),
                           torch.tensor([0, 3, 3]), torch.tensor(ranks), torch.tensor([0.5, 1.0, 2.0]), 5)
    x = torch.randn(3, M // 3, K, generator=g, dtype=dtype)
    W, b = torch.randn(N, K, generator=g, dtype=dtype), torch.randn(N, generator=g, dtype=dtype)
    plan = ops.RowPlan.build(torch.tensor([0, 2, -1, 1, 0, 2, 2, -1, 0]), 3)
    return x, W, b, pool, plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pool_lane_matches_the_general_path_bit_for_bit(monkeypatch, dtype):
    """A pool call with a prepared plan and nothing needing a gradient runs eager.pool_call; the general path
    (reached here with a row_index tensor instead of the plan, which the lane does not take) gives the same
    bits."""
    x, W, b, pool, plan = _pool_inputs(dtype=dtype)
    taken = []
    real = eager.pool_call
    monkeypatch.setattr(eager, "pool_call", lambda *a: taken.append(real(*a)) or taken[-1])
    with torch.no_grad():
        fast = ops.lora(x, Base(W, None, b), AdapterSet(row_index=plan, pool=pool))
        slow = ops.lora(x, Base(W, None, b), AdapterSet(row_index=plan.row_index, pool=pool))
    assert taken[0] is not None and taken[1] is None
    assert fast.shape == x.shape[:-1] + (10,) and torch.equal(fast, slow)


def test_pool_lane_stays_out_of_the_way_of_gradients_autocast_and_tracers(monkeypatch):
    x, W, b, pool, plan = _pool_inputs()
    base = Base(W, None, b)
    assert eager.pool_call(x, base, plan, pool) is not None
    xg = x.clone().requires_grad_(True)
    assert eager.pool_call(xg, base, plan, pool) is None  # x needs a gradient: the autograd path
    y = ops.lora(xg, base, AdapterSet(row_index=plan, pool=pool))
    assert y.grad_fn is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert eager.pool_call(x, base, plan, pool) is None
    assert eager.pool_call(x[:2], base, plan, pool) is None  # rows != the plan's: validate() words the error
    with pytest.raises(ValueError, match="row plan is for 9 rows"):
        ops.lora(x[:2], base, AdapterSet(row_index=plan, pool=pool))

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert eager.pool_call(x, base, plan, pool) is None


def _spy_choices(monkeypatch):
    """Counts dispatch.choose calls (a pool call's runner is built once per pool state, plan and x layout)."""
    seen = []
    real = dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda call: seen.append(1) or real(call))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_lane_keeps_its_runner_and_follows_every_change_it_depends_on(monkeypatch, dtype):
    """The CPU kernel's runner is built on the first pool call and kept: later calls make no backend choice
    and give the general path's bits. A write to the pool, another plan's segments, another x dtype or layout,
    or a changed FASTPEFT_CPU_KERNEL rebuild it; W and bias are read on every call."""
    from fastpeft.ops import cpu_mixed

    if cpu_mixed.unavailable() is not None:
        pytest.skip(f"the CPU kernel is unavailable here: {cpu_mixed.unavailable()}")
    x, W, b, pool, plan = _pool_inputs(dtype=dtype)
    base = Base(W, None, b)
    seen = _spy_choices(monkeypatch)

    def both(x, base, plan):
        with torch.no_grad():
            fast = ops.lora(x, base, AdapterSet(row_index=plan, pool=pool))
            slow = ops.lora(x, base, AdapterSet(row_index=plan.row_index, pool=pool))  # the general path
        assert torch.equal(fast, slow)
        return fast

    first = both(x, base, plan)
    n = len(seen)
    for _ in range(3):
        assert torch.equal(both(x, base, plan), first)
    assert len(seen) - n == 3  # the general path's choices only: the lane chose once

    with torch.no_grad():
        pool.B[:, 3:].mul_(2.0)  # a write to the pool (a bank's load): rebuilt, and the output follows
    n = len(seen)
    moved = both(x, base, plan)
    assert len(seen) - n == 2 and not torch.equal(moved, first)

    with torch.no_grad():
        W.add_(1.0)  # the base weight is read on every call
        b.zero_()
    assert not torch.equal(both(x, base, plan), moved)

    same_sizes = ops.RowPlan.build(torch.tensor([2, 2, 2, 0, 0, 0, -1, -1, 1]), 3)  # other rows, same segments
    n = len(seen)
    both(x, base, same_sizes)  # the kept runner, with this plan's order
    assert len(seen) - n == 1
    other = ops.RowPlan.build(torch.tensor([2, 2, 0, 0, 0, 0, -1, 1, 1]), 3)  # other segment sizes
    n = len(seen)
    both(x, base, other)
    assert len(seen) - n == 2

    both(x, base, plan)  # the runner for the contiguous x, then the same plan with a column-strided x
    n = len(seen)
    strided = torch.randn(x.shape[-1], 9, dtype=dtype).t()  # x with a column stride: off the kernel
    both(strided, base, plan)  # a runner asked for (the backend has none for it), then the backend's forward
    assert len(seen) - n == 3
    other_dtype = torch.bfloat16 if dtype == torch.float32 else torch.float32  # another x dtype, same pool and plan
    n = len(seen)
    both(x.to(other_dtype), Base(W.to(other_dtype), None, b.to(other_dtype)), plan)
    assert len(seen) - n == 2
    y_kernel = both(x, base, plan)
    monkeypatch.setenv(cpu_mixed.ENV_VAR, "0")  # the switch: rebuilt, now the grouped path
    n = len(seen)
    y_grouped = both(x, base, plan)
    assert len(seen) - n == 3  # no runner for the grouped path: asked for once, then the backend's forward
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y_grouped, y_kernel, **tol)


def test_a_kept_runner_refuses_inputs_it_was_not_built_for():
    """The bound kernel call checks each call's x, Y and order (a runner used past its key fails with a message
    naming the tensor, never reads out of bounds)."""
    from fastpeft.ops import cpu_mixed, torch_backend
    from fastpeft.ops.contract import LoraCall

    if cpu_mixed.unavailable() is not None:
        pytest.skip(f"the CPU kernel is unavailable here: {cpu_mixed.unavailable()}")
    x, W, b, pool, plan = _pool_inputs()
    x2d = x.reshape(-1, x.shape[-1])
    run = torch_backend.pool_runner(LoraCall(x2d, Base(W, None, b), pool.views(), 0, plan, pool))
    assert run is not None
    with pytest.raises(ValueError, match="offsets are for 9 rows"):
        run(x2d[:4], W, b, plan.order[:4])
    with pytest.raises(ValueError, match="offsets are for 9 rows"):  # the rows alone, with the plan's own order
        run(x2d[:4], W, b, plan.order)
    with pytest.raises(ValueError, match="order must be contiguous int64"):
        run(x2d, W, b, plan.order.int())
    with pytest.raises(ValueError, match="must both be torch.float32"):
        run(x2d.double(), W.double(), b.double(), plan.order)


def test_a_kept_pool_runner_gives_way_to_a_newly_registered_backend():
    """A backend registered after a pool call's runner was kept serves the next call (the registration is part
    of what the runner is kept for)."""
    x, W, b, pool, plan = _pool_inputs()
    base = Base(W, None, b)
    with torch.no_grad():
        first = ops.lora(x, base, AdapterSet(row_index=plan, pool=pool))
    rec = []

    class Spy:
        supports = staticmethod(ops.torch_backend.supports)
        backward = staticmethod(ops.torch_backend.backward)

        @staticmethod
        def forward(call):
            rec.append("fwd")
            return ops.torch_backend.forward(call)

    dispatch.register_backend("torch", Spy)
    try:
        with torch.no_grad():
            again = ops.lora(x, base, AdapterSet(row_index=plan, pool=pool))
    finally:
        dispatch.register_backend("torch", None)
    assert rec == ["fwd"] and torch.equal(again, first)
