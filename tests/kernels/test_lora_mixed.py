"""Mixed batches on the Triton kernels (kernels/lora_mixed.py): each row its own adapter, against float64.

    y_i = x_i W^T (+ bias) + s_k (x_i A_k^T) B_k^T,   k = row_index[i]   (-1: the base alone)

Segment tiles (prefill: one adapter per row tile, rows gathered through the plan's order) and decode tiles
(each row reads its own adapter) of the dense and packed GEMMs; mixed ranks, rank-0 adapters, base rows,
adapters without rows; every dtype; outputs NaN-poisoned, so an element no kernel writes fails; the same
bits on a second run. The reference is the row-wise formula in float64 (autograd for the gradients).
"""
import pytest
import torch

from _support.reference import DEVICE, assert_close, randn

from fastpeft import ops
from fastpeft.kernels import lora_mixed
from fastpeft.ops import Adapter, Base, LoraCall, RowPlan
from fastpeft.ops import triton_backend as tb
from fastpeft.quant.formats import dequantize, quantize_weight

N = 29
CONFIGS = {
    16: dict(matmul={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2},
             quant={"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2},
             shrink={"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
             wgrad={"BLOCK_P": 16, "BLOCK_Q": 32, "BLOCK_M": 32, "num_warps": 4, "num_stages": 2}),
    32: dict(matmul={"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 2},
             quant={"BLOCK_M": 32, "BLOCK_P": 32, "BLOCK_Q": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 2},
             shrink={"BLOCK_M": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
             wgrad={"BLOCK_P": 32, "BLOCK_Q": 16, "BLOCK_M": 16, "num_warps": 4, "num_stages": 2}),
}


def _batch(m, k, ranks, dtype, adt, base, with_bias, seed):
    """x, the base (weight or packed), bias, adapters, row_index: base rows (-1), the last adapter without rows."""
    torch.manual_seed(seed)
    x = randn(m, k, dtype=dtype)
    weight = qw = None
    if base == "dense":
        weight = randn(N, k, dtype=dtype, scale=0.2)
    elif base != "none":
        fmt, kw = {"nf4": ("nf4", dict(blocksize=32)), "nf4dq": ("nf4", dict(blocksize=64, double_quant=True)),
                   "int8": ("int8", {}), "int4": ("int4", dict(group_size=16))}[base]
        qw = quantize_weight(torch.randn(N, k) * 0.2, fmt, **kw)
        qw = type(qw)(*[t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in qw])
    bias = randn(N, dtype=dtype) if with_bias else None
    adapters = [Adapter(randn(r, k, dtype=adt, scale=0.3), randn(N, r, dtype=adt), 0.5 + 0.75 * i)
                for i, r in enumerate(ranks)]
    n_used = len(ranks) - 1  # the last adapter gets no rows
    idx = torch.randint(-1, n_used, (m,))
    idx[0] = n_used - 1 if m > 1 else idx[0]
    return x, weight, qw, bias, adapters, idx.to(DEVICE)


def _w64(x, weight, qw):
    if weight is not None:
        return weight.detach().cpu().double()
    if qw is not None:
        return dequantize(qw, x.dtype).cpu().double()  # the kernels round W to x's dtype, as the reference does
    return None


def _reference(x, weight, qw, bias, adapters, idx, dy=None):
    """float64 (Y, S [M, max r], and with dy: dX, [dA_k], [dB_k]) of the row-wise formula, by autograd."""
    x64 = x.detach().cpu().double().requires_grad_()
    leaves = [(a.A.detach().cpu().double().requires_grad_(), a.B.detach().cpu().double().requires_grad_())
              for a in adapters]
    W = _w64(x, weight, qw)
    idx = idx.cpu()
    m, rmax = x.shape[0], max(a.r for a in adapters)
    rows = []
    S = torch.zeros(m, rmax, dtype=torch.float64)
    for i in range(m):
        y = x64[i] @ W.t() if W is not None else torch.zeros(N, dtype=torch.float64)
        if bias is not None:
            y = y + bias.detach().cpu().double()
        k = int(idx[i])
        if k >= 0 and adapters[k].r:
            A, B = leaves[k]
            s = x64[i] @ A.t()
            S[i, :A.shape[0]] = s.detach()
            y = y + adapters[k].scale * (s @ B.t())
        rows.append(y)
    Y = torch.stack(rows)
    if dy is None:
        return Y.detach(), S
    Y.backward(dy.detach().cpu().double())
    zero = torch.zeros_like
    return (Y.detach(), S, x64.grad, [A.grad if A.grad is not None else zero(A) for A, _ in leaves],
            [B.grad if B.grad is not None else zero(B) for _, B in leaves])


def _run(x, weight, qw, bias, adapters, idx, variant, block, dy=None):
    plan = RowPlan.build(idx, len(adapters))
    cfg = CONFIGS[block]
    bank = lora_mixed.adapter_bank([a.A for a in adapters], [a.B for a in adapters], [a.scale for a in adapters],
                                   [plan.count(k) > 0 for k in range(len(adapters))], x.device)
    y, s = lora_mixed.lora_mixed_fwd(x, weight, qw, bias, bank, plan.row_index, plan.order, plan.offsets, N,
                                     max(a.r for a in adapters), variant=variant,
                                     config=cfg["quant" if qw is not None else "matmul"], shrink_config=cfg["shrink"])
    if dy is None:
        return y, s
    dx, da, dbt = lora_mixed.lora_mixed_bwd(dy, x, weight, qw, bank, plan.row_index, plan.order, plan.offsets, s,
                                            variant=variant, configs=cfg)
    das = [da[o:o + r] if r else None for o, r in zip(bank.cat_offs, bank.ranks)]
    dbs = [dbt[o:o + r].t() if r else None for o, r in zip(bank.cat_offs, bank.ranks)]
    return y, s, dx, das, dbs


# (variant, x dtype, adapters in x's dtype, M, K, base, bias, ranks (the last: no rows), BLOCK_M)
CASES = [
    ("segment", torch.float32, False, 37, 45, "dense", True, (1, 16, 0, 64, 5), 16),
    ("segment", torch.bfloat16, False, 41, 45, "dense", False, (16, 3, 64, 8), 32),
    ("segment", torch.float16, True, 23, 46, "nf4", True, (7, 0, 33, 2), 16),
    ("segment", torch.bfloat16, True, 19, 45, "int4", False, (1, 64, 16, 4), 32),
    ("segment", torch.float32, False, 13, 45, "none", True, (16, 1, 0, 3), 16),
    ("gather", torch.float32, False, 1, 45, "dense", True, (64, 16, 1, 2), 16),
    ("gather", torch.bfloat16, True, 13, 46, "nf4dq", True, (1, 16, 64, 0, 9), 16),
    ("gather", torch.float16, False, 7, 45, "int8", False, (33, 0, 16, 5), 16),
    ("gather", torch.bfloat16, False, 17, 45, "none", False, (4, 16, 2), 16),
]


@pytest.mark.parametrize("variant,dtype,same_dtype,m,k,base,with_bias,ranks,block", CASES)
def test_mixed_forward_and_backward_match_float64(variant, dtype, same_dtype, m, k, base, with_bias, ranks, block,
                                                  poison_outputs):
    x, weight, qw, bias, adapters, idx = _batch(m, k, ranks, dtype, dtype if same_dtype else torch.float32, base,
                                                with_bias, seed=m * 100 + k)
    dy = randn(m, N, dtype=dtype)
    y, s, dx, das, dbs = _run(x, weight, qw, bias, adapters, idx, variant, block, dy)
    yr, sr, dxr, dar, dbr = _reference(x, weight, qw, bias, adapters, idx, dy)
    assert y.dtype == dtype and y.shape == (m, N) and s.dtype == torch.float32 and s.shape == (m, max(ranks))
    assert_close("Y", y, yr, dtype)
    assert_close("S", s, sr, dtype)
    # S beyond each row's rank (and base rows' S) is exactly zero
    pad = torch.ones_like(s, dtype=torch.bool)
    for i, kk in enumerate(idx.tolist()):
        pad[i, :ranks[kk] if kk >= 0 else 0] = False
    assert (s[pad] == 0).all()
    # the LoRA term alone is right too (a wrong one can hide under the base GEMM)
    base_only = _reference(x, weight, qw, bias, [Adapter(a.A * 0, a.B, a.scale) for a in adapters], idx)[0]
    assert_close("Y - base", y.double().cpu() - base_only, yr - base_only, dtype)
    assert_close("dX", dx, dxr, dtype)
    plan = RowPlan.build(idx, len(adapters))
    for kk, a in enumerate(adapters):
        if plan.count(kk) and a.r:
            assert_close(f"dA_{kk}", das[kk], dar[kk], dtype)
            assert_close(f"dB_{kk}", dbs[kk], dbr[kk], dtype)
        else:  # rank 0 or no rows: nothing computed for it
            assert das[kk] is None and dbs[kk] is None
    # deterministic: the same bits again (no atomics anywhere)
    y2, s2, dx2, das2, dbs2 = _run(x, weight, qw, bias, adapters, idx, variant, block, dy)
    assert torch.equal(y, y2) and torch.equal(s, s2) and torch.equal(dx, dx2)
    assert all(a is None or torch.equal(a, b) for a, b in zip(das, das2))
    assert all(a is None or torch.equal(a, b) for a, b in zip(dbs, dbs2))


def test_segment_and_gather_agree_and_m_picks_the_variant(poison_outputs):
    """Both tile kinds compute the same batch; "auto" gathers for M <= GATHER_MAX_M (decode) only."""
    assert lora_mixed.use_gather("auto", lora_mixed.GATHER_MAX_M) and not lora_mixed.use_gather("auto", 17)
    x, weight, qw, bias, adapters, idx = _batch(11, 45, (16, 2, 64, 4), torch.float32, torch.float32, "dense",
                                                True, seed=3)
    (ys, ss), (yg, sg) = (_run(x, weight, qw, bias, adapters, idx, v, 16) for v in ("segment", "gather"))
    assert torch.equal(ss, sg)  # one shrink for both
    assert_close("Y gather vs segment", yg, ys.double().cpu(), torch.float32)
    with pytest.raises(ValueError, match="variant"):
        lora_mixed.use_gather("bgmv", 3)


def test_only_base_rows_and_rank_zero_run_the_base_gemm(poison_outputs):
    """No adapter with rows and a rank: S = 0 and Y = x W^T (+ bias) (a batch of base rows, or a layer that
    has none of the batch's adapters)."""
    x, weight, qw, bias, _, _ = _batch(5, 45, (1,), torch.bfloat16, torch.float32, "dense", True, seed=4)
    adapters = [Adapter(randn(0, 45), randn(N, 0), 1.0), Adapter(randn(3, 45), randn(N, 3), 2.0)]
    for idx in (torch.tensor([-1, 0, 0, -1, 0]), torch.full((5,), -1)):
        y, s = _run(x, weight, qw, bias, adapters, idx.to(DEVICE), "auto", 16)
        assert s.shape == (5, 3) and (s == 0).all()
        assert_close("Y", y, _reference(x, weight, qw, bias, adapters, idx)[0], torch.bfloat16)


def test_tile_table_covers_every_row_once_per_section():
    offsets = (0, 3, 3, 40, 41, 75)  # base rows 0..2, adapter 0 none, adapter 1: 37 rows, 2: 1, 3: 34
    ints, counts = lora_mixed.tile_entries(offsets)
    head, body = ints[:lora_mixed.TILE_HEADER], ints[lora_mixed.TILE_HEADER:]
    entries = [tuple(body[i:i + 3]) for i in range(0, len(body), 3)]
    assert counts[0] == 3  # whole adapter segments (the dA / dB reductions): adapters 1, 2, 3
    assert entries[head[0]:head[0] + head[1]] == [(3, 40, 2), (40, 41, 3), (41, 75, 4)]
    for bm in lora_mixed.TILE_BLOCKS:
        sec = bm // 16
        tiles = entries[head[2 * sec]:head[2 * sec] + head[2 * sec + 1]]
        assert counts[sec] == len(tiles)
        pos = [p for b, e, _ in tiles for p in range(b, e)]
        assert pos == list(range(75))  # every position once, in order
        assert all(0 < e - b <= bm and offsets[j] <= b < e <= offsets[j + 1] for b, e, j in tiles)  # one segment


def test_adapters_cut_from_one_pool_are_read_in_place(poison_outputs):
    """A serving bank's pool (A [R, K], B [N, R], adapters = slices with the same offsets) reaches the
    kernels without a copy; separate adapters are concatenated once (fp32 when their dtypes differ)."""
    torch.manual_seed(5)
    k, ranks, starts = 45, (16, 1, 0, 8), (8, 0, 1, 40)
    poolA, poolB = randn(64, k, scale=0.3), randn(N, 64)
    adapters = [Adapter(poolA[st:st + r], poolB[:, st:st + r], 0.5 + i) for i, (st, r) in
                enumerate(zip(starts, ranks))]
    x, weight = randn(13, k), randn(N, k, scale=0.2)
    idx = torch.tensor([0, 1, -1, 3, 3, 0, 2, 1, 0, 3, -1, 0, 1]).to(DEVICE)
    used = [True] * 4
    bank = lora_mixed.adapter_bank([a.A for a in adapters], [a.B for a in adapters], [a.scale for a in adapters],
                                   used, x.device)
    assert bank.copied == (False, False)
    assert bank.a.untyped_storage().data_ptr() == poolA.untyped_storage().data_ptr()
    assert bank.a_off.tolist()[1:] == [8, 0, 0, 40] and bank.b_off.tolist()[1:] == [8, 0, 0, 40]
    y, s = _run(x, weight, None, None, adapters, idx, "segment", 16)
    assert_close("Y (pool)", y, _reference(x, weight, None, None, adapters, idx)[0], torch.float32)
    # separate tensors: one concatenation; mixed dtypes: in fp32
    sep = [Adapter(a.A.clone(), a.B.clone(), a.scale) for a in adapters]
    bank = lora_mixed.adapter_bank([a.A for a in sep], [a.B for a in sep], [a.scale for a in sep], used, x.device)
    assert bank.copied == (True, True) and bank.a.shape == (25, k) and bank.b.shape == (N, 25)
    # A copied (mixed dtypes: in fp32), B still read from the pool
    sep = [Adapter(a.A.clone().bfloat16() if i == 0 else a.A.clone(), a.B, a.scale) for i, a in enumerate(adapters)]
    bank = lora_mixed.adapter_bank([a.A for a in sep], [a.B for a in sep], [a.scale for a in sep], used, x.device)
    assert bank.copied == (True, False) and bank.a.dtype == torch.float32 and bank.b.dtype == poolB.dtype
    y, s = _run(x, weight, None, None, sep, idx, "gather", 16)
    assert_close("Y (copied A)", y, _reference(x, weight, None, None, sep, idx)[0], torch.float32)
    # a transposed view is no row slice of the pool: copied
    assert lora_mixed.pooled([poolA[0:4], poolA.t()[0:4, :N]], 0) is None


def _op(x, base, adapters, idx, backend, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    leaves = [t.detach().clone().requires_grad_() for a in adapters for t in (a.A, a.B)]
    xl = x.detach().clone().requires_grad_()
    ads = [Adapter(leaves[2 * i], leaves[2 * i + 1], a.scale) for i, a in enumerate(adapters)]
    y = ops.lora(xl, base, ops.AdapterSet(ads, idx))
    return y, xl, leaves


@pytest.mark.parametrize("m,dtype,base", [(3, torch.bfloat16, "dense"), (29, torch.float32, "dense"),
                                          (5, torch.float32, "nf4")])
def test_through_the_op_forced_triton_matches_the_torch_backend(m, dtype, base, monkeypatch, poison_outputs):
    """fastpeft.ops.lora with a row_index on the triton backend (default configs): forward and the
    gradients of x, every A_k and B_k match the torch backend in float64."""
    x, weight, qw, bias, adapters, idx = _batch(m, 46, (16, 0, 5, 64, 2), dtype, torch.float32, base, True,
                                                seed=m)
    call = LoraCall(x, Base(weight=weight, packed=qw, bias=bias), tuple(adapters), 0,
                    RowPlan.build(idx, len(adapters)))
    assert tb.supports(call) is None
    y, xl, leaves = _op(x, Base(weight=weight, packed=qw, bias=bias), adapters, idx, "triton", monkeypatch)
    dy = randn(m, N, dtype=dtype)
    y.backward(dy)
    a64 = [Adapter(a.A.double(), a.B.double(), a.scale) for a in adapters]
    w64 = weight.double() if qw is None else dequantize(qw, dtype).double()  # the kernels' W, in float64
    yr, xr, lr = _op(x.double(), Base.dense(w64, bias.double()), a64, idx, "torch", monkeypatch)
    yr.backward(dy.double())
    assert_close("Y", y, yr, dtype)
    assert_close("dX", xl.grad, xr.grad, dtype)
    for i, (g, gr) in enumerate(zip(leaves, lr)):
        assert g.grad.dtype == g.dtype and g.grad.shape == g.shape and g.grad.is_contiguous()
        assert_close(f"{'AB'[i % 2]}_{i // 2} grad", g.grad, gr.grad, dtype)


def test_supports_mixed_calls():
    x, w = randn(4, 8), randn(6, 8)
    plan = RowPlan.build(torch.tensor([0, 1, -1, 0]).to(DEVICE), 2)
    ads = [Adapter(randn(2, 8), randn(6, 2), 1.0), Adapter(randn(0, 8), randn(6, 0), 1.0)]  # rank 0 is fine
    assert tb.supports(LoraCall(x, Base(weight=w), tuple(ads), 0, plan)) is None
    drop = (Adapter(ads[0].A, ads[0].B, 1.0, 0.1), ads[1])
    assert "dropout in a mixed batch" in tb.supports(LoraCall(x, Base(weight=w), drop, 0, plan))
    ones = torch.ones(6, device=DEVICE)
    dora = (Adapter(ads[0].A, ads[0].B, 1.0, magnitude=ones, weight_norm=ones), ads[1])
    assert tb.supports(LoraCall(x, Base(weight=w), dora, 0, plan)) is None  # DoRA slots: the epilogue's table
    no_norm = (Adapter(ads[0].A, ads[0].B, 1.0, magnitude=ones), ads[1])
    assert "weight_norm" in tb.supports(LoraCall(x, Base(weight=w), no_norm, 0, plan))
    rank0 = (ads[0], Adapter(ads[1].A, ads[1].B, 1.0, magnitude=ones, weight_norm=ones))
    assert "needs rank > 0" in tb.supports(LoraCall(x, Base(weight=w), rank0, 0, plan))
    big = (Adapter(randn(300, 8), randn(6, 300), 1.0), ads[1])
    assert "r=300" in tb.supports(LoraCall(x, Base(weight=w), big, 0, plan))


@pytest.mark.parametrize("m,base,split", [(5, "dense", 1), (7, "nf4", 3), (37, "int8", 1), (29, "dense", 1)])
def test_dora_slots_in_a_mixed_batch_match_the_torch_backend(m, base, split, monkeypatch, poison_outputs):
    """DoRA adapters next to plain ones and base rows (a pool's DoRA slots): each row scaled by its own
    adapter's g in the GEMM epilogue (decode rows, with and without split-K, and segment tiles), against the
    torch backend in float64; the backward (the torch backend's, on the triton forward's S) too."""
    from fastpeft.ops.dora import weight_norm

    dtype = torch.bfloat16
    x, weight, qw, bias, adapters, idx = _batch(m, 46, (16, 5, 64, 3), dtype, torch.float32, base, True, seed=m + 1)
    w_base = Base(weight=weight, packed=qw, bias=bias)
    for i in (0, 2):  # two DoRA slots among the adapters with rows
        a = adapters[i]
        norm = weight_norm(w_base, a.A, a.B, a.scale).detach()
        adapters[i] = Adapter(a.A, a.B, a.scale, magnitude=(norm * (1.0 + 0.3 * torch.rand_like(norm))),
                              weight_norm=norm)
    monkeypatch.setenv("FASTPEFT_SPLIT_K", str(split))
    call = LoraCall(x, w_base, tuple(adapters), 0, RowPlan.build(idx, len(adapters)))
    assert tb.supports(call) is None
    y, s = tb.forward(call)
    w64 = weight.double() if qw is None else dequantize(qw, dtype).double()
    a64 = [Adapter(a.A.double(), a.B.double(), a.scale,
                   magnitude=None if a.magnitude is None else a.magnitude.double(),
                   weight_norm=None if a.weight_norm is None else a.weight_norm.double()) for a in adapters]
    call64 = LoraCall(x.double(), Base.dense(w64, bias.double()), tuple(a64), 0, RowPlan.build(idx, len(adapters)))
    from fastpeft.ops import torch_backend

    yr, sr = torch_backend.forward(call64)
    assert_close("Y (DoRA slots)", y, yr, dtype)
    assert_close("S", s, sr[:, :s.shape[1]], dtype)
    dy = randn(m, N, dtype=dtype)
    dx, das, dbs = tb.backward(call, dy, s, True, [True] * 4, [True] * 4)
    dxr, dar, dbr = torch_backend.backward(call64, dy.double(), sr, True, [True] * 4, [True] * 4)
    assert_close("dX (DoRA slots)", dx, dxr, dtype)
    for k in range(4):
        assert_close(f"dA_{k}", das[k], dar[k], dtype)
        assert_close(f"dB_{k}", dbs[k], dbr[k], dtype)
