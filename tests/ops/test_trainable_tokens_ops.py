"""fastpeft.ops trainable-token ops against their definition (peft's: the table with rows replaced, then
F.embedding / F.linear), values and gradients, and the memory claim: no [V, D] tensor in forward or backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastpeft import ops
from fastpeft.ops.trainable_tokens import last_occurrences, token_slots


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _case(V=40, D=6, ids_shape=(3, 9), tokens=(3, 17, 0, 39), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, D, generator=g).to(dtype)
    idx = torch.tensor(tokens, dtype=torch.int64)
    values = torch.randn(len(tokens), D, generator=g)
    ids = torch.randint(0, V, ids_shape, generator=g)
    ids.view(-1)[: len(tokens)] = idx  # every selected token occurs
    return ids, weight, idx, values


def _reference_embedding(ids, weight, idx, values, **kw):
    return F.embedding(ids, weight.index_copy(0, idx, values.to(weight.dtype)), **kw)


@pytest.mark.parametrize("padding_idx", [None, 0, 5, -1])
def test_token_embedding_matches_the_merged_table(padding_idx):
    ids, weight, idx, values = _case()
    w1, v1, w2, v2 = _leaf(weight), _leaf(values), _leaf(weight), _leaf(values)
    got = ops.token_embedding(ids, w1, idx, v1, padding_idx=padding_idx)
    ref = _reference_embedding(ids, w2, idx, v2, padding_idx=padding_idx)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    dy = torch.randn_like(ref)
    (got * dy).sum().backward()
    (ref * dy).sum().backward()
    torch.testing.assert_close(v1.grad, v2.grad)  # incl. no gradient for a selected padding row (id 0 / 39)
    torch.testing.assert_close(w1.grad, w2.grad)  # replaced rows get none
    assert v1.grad.abs().sum() > 0


@pytest.mark.parametrize("opts", [dict(max_norm=1.0), dict(scale_grad_by_freq=True)])
def test_token_embedding_whole_table_options(opts):
    ids, weight, idx, values = _case()
    v1, v2 = _leaf(values), _leaf(values)
    w = weight.clone()
    got = ops.token_embedding(ids, w, idx, v1, **opts)
    ref = _reference_embedding(ids, weight.clone(), idx, v2, **opts)
    torch.testing.assert_close(got, ref)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(v1.grad, v2.grad)
    torch.testing.assert_close(w, weight)  # max_norm renormalises the merged copy, never the caller's table


def test_token_embedding_sparse_table_gradient():
    # peft's merged copy fails here in backward; the rows' gradient is the dense one of sparse=False
    ids, weight, idx, values = _case()
    w1, v1, w2, v2 = _leaf(weight), _leaf(values), _leaf(weight), _leaf(values)
    got = ops.token_embedding(ids, w1, idx, v1, sparse=True)
    ref = _reference_embedding(ids, w2, idx, v2)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    got.sum().backward()
    ref.sum().backward()
    assert w1.grad.is_sparse
    torch.testing.assert_close(v1.grad, v2.grad)
    torch.testing.assert_close(w1.grad.to_dense(), w2.grad)


def test_token_embedding_bf16_table_fp32_rows_and_empty():
    ids, weight, idx, values = _case(dtype=torch.bfloat16)
    got = ops.token_embedding(ids, weight, idx, values)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, _reference_embedding(ids, weight, idx, values), rtol=0, atol=0)
    empty = ops.token_embedding(ids, weight, idx[:0], values[:0])
    torch.testing.assert_close(empty, F.embedding(ids, weight), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_token_linear_matches_the_merged_table(bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, generator=g)
    weight = torch.randn(40, 6, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    idx = torch.tensor([7, 0, 39])
    values = torch.randn(3, 6, generator=g)
    x1, v1, x2, v2 = _leaf(x), _leaf(values), _leaf(x), _leaf(values)
    got = ops.token_linear(x1, weight, b, idx, v1)
    ref = F.linear(x2, weight.index_copy(0, idx, v2), b)
    torch.testing.assert_close(got, ref)
    dy = torch.randn_like(ref)
    (got * dy).sum().backward()
    (ref * dy).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(v1.grad, v2.grad)


def test_slots_and_last_occurrences():
    idx = torch.tensor([9, 2, 30])
    ids = torch.tensor([[2, 3, 30], [9, 0, 31]])
    assert token_slots(ids, idx).tolist() == [[1, -1, 2], [0, -1, -1]]
    assert token_slots(ids, idx[:0]).tolist() == [[-1] * 3] * 2
    assert last_occurrences([4, 1, 4, 7, 1]) == ([4, 7, 1], [2, 3, 4])
    assert last_occurrences([4, 1]) == ([4, 1], None)


def test_bad_shapes_name_the_tensor():
    ids, weight, idx, values = _case()
    with pytest.raises(ValueError, match=r"values must be \[n=4, D=6\].*got \(4, 5\)"):
        ops.token_embedding(ids, weight, idx, values[:, :5])
    with pytest.raises(ValueError, match="token_indices must be a 1-d int64/int32 tensor"):
        ops.token_linear(torch.randn(2, 6), weight, None, idx.float(), values)


class _Sizes(TorchDispatchMode):
    """The largest tensor any op allocates (views and in-place results share an input's storage: not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        shared = {a.untyped_storage().data_ptr() for a in inputs if not a.is_sparse}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and (t.is_sparse or t.untyped_storage().data_ptr() not in shared):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", ["embedding", "linear"])
def test_no_table_sized_tensor_in_forward_or_backward(kind):
    """The reason for the op: peft copies the [V, D] table every step and gets a dense [V, D] gradient back."""
    V, D, M = 20000, 64, 12
    weight = torch.randn(V, D)  # frozen
    idx = torch.tensor([5, 17, 19999])
    values = torch.randn(3, D, requires_grad=True)
    ids = torch.tensor([[5, 1, 17, 3, 19999, 4] * 2])
    x = torch.randn(1, M, D)

    def step(fn):
        with _Sizes() as sizes:
            fn().square().sum().backward()
        return sizes.largest

    if kind == "embedding":
        ours = step(lambda: ops.token_embedding(ids, weight, idx, values))
        theirs = step(lambda: _reference_embedding(ids, weight, idx, values))
        assert ours <= M * D + V  # outputs and rows only (searchsorted works on the n ids, not on V)
    else:
        ours = step(lambda: ops.token_linear(x, weight, None, idx, values))
        theirs = step(lambda: F.linear(x, weight.index_copy(0, idx, values)))
        assert ours <= M * V  # the logits themselves
    assert ours < V * D <= theirs  # the peft way does build the table (the check can fail)
