"""DTensor inputs (contract.prepare) and gradient layouts of the LoRA op.

DTensors: a 1-rank gloo process group and device mesh in this process (the 2-rank engine runs are in
tests/distributed). A Replicate DTensor computes as its local tensor; a sharded one that needs no
gradient is gathered; a sharded one that needs a gradient is refused, naming it; x as a DTensor is
refused. Gradients: the op returns dA / dB in their parameters' strides (contiguous for contiguous
parameters), which DDP buckets, FSDP2's reduce-scatter and ZeRO's partitioning read as flat views.
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from fastpeft import ops
from fastpeft.quant import quantize_weight


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mesh():
    if not dist.is_available():
        pytest.skip("torch without distributed")
    from torch.distributed.device_mesh import init_device_mesh

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        if owned:
            dist.destroy_process_group()


def _tensors(seed=0, K=24, N=20, r=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, K, generator=g)
    W = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g)
    A = (torch.randn(r, K, generator=g) / K ** 0.5).requires_grad_(True)
    B = (torch.randn(N, r, generator=g) / r ** 0.5).requires_grad_(True)
    return x, W, b, A, B


def _dt(t, mesh, placement):
    from torch.distributed.tensor import distribute_tensor

    out = distribute_tensor(t.detach(), mesh, [placement])
    return out.requires_grad_(t.requires_grad)


def _run(x, W, b, As, Bs, p=0.0, training=False):
    ads = [ops.Adapter(A, B, 0.5, p) for A, B in zip(As, Bs)]
    return ops.lora(x, ops.Base.dense(W, b), ads, training)


def test_replicate_dtensors_compute_as_local(mesh):
    from torch.distributed.tensor import Replicate

    x, W, b, A, B = _tensors()
    want = _run(x, W, b, [A], [B])
    want.sum().backward()
    dA, dB = A.grad.clone(), B.grad.clone()
    A2, B2 = _dt(A, mesh, Replicate()), _dt(B, mesh, Replicate())
    got = _run(x, _dt(W, mesh, Replicate()), _dt(b, mesh, Replicate()), [A2], [B2])
    assert type(got) is torch.Tensor
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    torch.testing.assert_close(A2.grad.to_local(), dA, rtol=0, atol=0)
    torch.testing.assert_close(B2.grad.to_local(), dB, rtol=0, atol=0)


def test_sharded_frozen_base_is_gathered(mesh):
    from torch.distributed.tensor import Shard

    x, W, b, A, B = _tensors(1)
    want = _run(x, W, b, [A], [B])
    want.sum().backward()
    dA = A.grad.clone()
    A.grad = None
    got = _run(x, _dt(W, mesh, Shard(0)), _dt(b, mesh, Shard(0)), [A], [B])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    torch.testing.assert_close(A.grad, dA, rtol=0, atol=0)


def test_sharded_packed_weight_is_gathered(mesh):
    from torch.distributed.tensor import Shard

    x, W, b, A, B = _tensors(2, K=64, N=32)
    qw = quantize_weight(W, "nf4", blocksize=64)
    ad = [ops.Adapter(A, B, 0.5)]
    want = ops.lora(x, ops.Base.quantized(qw, b), ad)
    sharded = qw._replace(qdata=_dt(qw.qdata, mesh, Shard(0)), scales=_dt(qw.scales, mesh, Shard(0)))
    got = ops.lora(x, ops.Base.quantized(sharded, b), ad)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["A", "B"])
def test_sharded_adapter_needing_grad_is_refused(mesh, which):
    from torch.distributed.tensor import Shard

    x, W, b, A, B = _tensors(3)
    A1, B1 = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    if which == "A":
        A1 = _dt(A1, mesh, Shard(0))
    else:
        B1 = _dt(B1, mesh, Shard(0))
    with pytest.raises(ValueError, match=rf"lora_{which} \(adapter 1\) is a DTensor .*Shard.*fully_shard"):
        _run(x, W, b, [A, A1], [B, B1])
    with pytest.raises(ValueError, match=rf"lora_{which} is a DTensor"):
        _run(x, W, b, [A1], [B1])


def test_sharded_adapter_without_grad_is_gathered(mesh):
    from torch.distributed.tensor import Shard

    x, W, b, A, B = _tensors(4)
    with torch.no_grad():
        want = _run(x, W, b, [A], [B])
        got = _run(x, W, b, [_dt(A, mesh, Shard(0))], [_dt(B, mesh, Shard(1))])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dtensor_x_is_refused(mesh):
    from torch.distributed.tensor import Replicate

    x, W, b, A, B = _tensors(5)
    with pytest.raises(ValueError, match="x is a DTensor"):
        _run(_dt(x, mesh, Replicate()), W, b, [A], [B])


# -- gradient layouts --------------------------------------------------------------------------------
def _grads_of(base_kind, p, params_layout):
    x, W, b, A, B = _tensors(6, K=64, N=32)
    x = x.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # a non-contiguous x
    if params_layout == "transposed":  # parameters stored [K, r] / [r, N] and used as views
        A = A.detach().t().contiguous().t().requires_grad_(True)
        B = B.detach().t().contiguous().t().requires_grad_(True)
    A2 = (A.detach() * 0.5).requires_grad_(True)
    B2 = (B.detach() * 2.0).requires_grad_(True)
    if params_layout == "transposed":
        A2 = A2.detach().t().contiguous().t().requires_grad_(True)
        B2 = B2.detach().t().contiguous().t().requires_grad_(True)
    base = {"dense": ops.Base.dense(W, b), "dense_t": ops.Base.dense(W.t().contiguous().t(), b),
            "quant": ops.Base.quantized(quantize_weight(W, "nf4", blocksize=64), b),
            "none": ops.Base.none(b)}[base_kind]
    ads = [ops.Adapter(A, B, 0.5, p), ops.Adapter(A2, B2, 2.0, p)]
    torch.manual_seed(0)
    y = ops.lora(x, base, ads, training=True)
    grads = torch.autograd.grad(y, [A, B, A2, B2], torch.randn_like(y))
    return list(zip((A, B, A2, B2), grads))


@pytest.mark.parametrize("base_kind", ["dense", "dense_t", "quant", "none"])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("params_layout", ["contiguous", "transposed"])
def test_adapter_grads_have_the_parameters_strides(base_kind, p, params_layout):
    for param, grad in _grads_of(base_kind, p, params_layout):
        assert grad.shape == param.shape
        assert grad.stride() == param.stride(), (grad.stride(), param.stride())
        if params_layout == "contiguous":
            assert grad.is_contiguous()


def test_checkpointed_dropout_replays_the_seed():
    """The op draws its dropout seed from torch's CPU generator, which checkpoint restores: the
    recomputed forward draws the same seed, so the gradients equal the plain run's exactly."""
    from torch.utils.checkpoint import checkpoint

    x, W, b, A, B = _tensors(7)
    x.requires_grad_(True)

    def f(x):
        return _run(x, W, b, [A], [B], p=0.3, training=True)

    def grads(run):
        for t in (x, A, B):
            t.grad = None
        torch.manual_seed(11)
        run(x).square().sum().backward()
        return [t.grad.clone() for t in (x, A, B)]

    plain = grads(f)
    for reentrant in (True, False):
        got = grads(lambda x: checkpoint(f, x, use_reentrant=reentrant))
        for g, w in zip(got, plain):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.manual_seed(12)  # and the masks are really there: another seed, other gradients
    assert not torch.equal(_run(x, W, b, [A], [B], p=0.3, training=True), _run(x, W, b, [A], [B]))
