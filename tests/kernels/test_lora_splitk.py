"""Split-K decode (kernels/lora_splitk.py and the SPLIT_K constexpr of the dense and packed GEMMs).

Every split launch is checked against the float64 reference: dense and packed W (each format), odd
shapes (M = 1, primes), r from 0 to 128, every dtype, bias, DoRA's column scale, a mixed batch's
decode rows; outputs and the workspace NaN-poisoned (a slice some program does not write fails);
a split count that leaves programs with an empty stretch of K; the same bits on a second run; the
refusals (dropout, DoRA with dropout, segment tiles) and the split_k_for rule.
"""
from types import SimpleNamespace

import pytest
import torch

from _support.reference import DEVICE, assert_close, randn, ref_forward

from fastpeft.kernels import lora_mixed, lora_splitk
from fastpeft.kernels._common import MIXED_SEGMENT
from fastpeft.kernels.lora_fwd import launch_lora_matmul, lora_fwd
from fastpeft.kernels.lora_quant import launch_lora_quant, lora_quant_fwd
from fastpeft.ops import RowPlan
from fastpeft.quant.formats import dequantize, quantize_weight

MM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
QC = {"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
SHRINK = {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}


def _qw(fmt, n, k):
    torch.manual_seed(n + 3 * k)
    kw = {"nf4": dict(blocksize=32), "nf4dq": dict(blocksize=64, double_quant=True), "int4": dict(group_size=32),
          "int8": {}, "fp8": dict(fp8_block_size=32)}[fmt]
    qw = quantize_weight(torch.randn(n, k) * 0.2, fmt.replace("dq", ""), **kw)
    return type(qw)(*[t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in qw])


# (base, x dtype, M, N, K, r, bias, split)
CASES = [
    ("dense", torch.float32, 1, 37, 131, 16, True, 2),
    ("dense", torch.bfloat16, 5, 29, 257, 1, False, 4),
    ("dense", torch.float16, 17, 31, 97, 128, True, 3),     # 4 tiles of K over 3 programs: uneven stretches
    ("dense", torch.bfloat16, 3, 29, 64, 0, True, 8),       # r = 0; 2 tiles of K, 6 programs with nothing to do
    ("nf4", torch.bfloat16, 1, 29, 130, 16, True, 2),       # blocks straddle rows (odd K / 2)
    ("nf4dq", torch.float16, 3, 31, 256, 64, False, 4),
    ("int4", torch.float32, 2, 29, 97, 8, True, 2),         # partial last group
    ("int8", torch.bfloat16, 13, 37, 160, 128, False, 5),
    ("fp8", torch.bfloat16, 1, 33, 96, 16, True, 2),
]


@pytest.mark.parametrize("base,dtype,m,n,k,r,with_bias,split", CASES)
def test_split_forward_matches_float64_and_repeats(base, dtype, m, n, k, r, with_bias, split, poison_outputs):
    torch.manual_seed(m * 1000 + n + k + r)
    x = randn(m, k, dtype=dtype)
    a, b = randn(r, k, scale=0.2), randn(n, r)
    bias = randn(n, dtype=dtype) if with_bias else None
    if base == "dense":
        w = randn(n, k, dtype=dtype, scale=0.2)
        run = lambda: lora_fwd(x, w, bias, a, b, 0.75, config=MM, shrink_config=SHRINK, split_k=split)
        w_ref = w
    else:
        qw = _qw(base, n, k)
        run = lambda: lora_quant_fwd(x, qw, bias, a, b, 0.75, config=QC, shrink_config=SHRINK, split_k=split)
        w_ref = dequantize(qw, x.dtype)
    y, s = run()
    yr, sr = ref_forward(x, w_ref, bias, a, b, 0.75, None)
    assert y.dtype == dtype and y.shape == (m, n)
    assert not torch.isnan(y).any()
    assert_close("Y", y, yr, dtype)
    assert_close("S", s, sr, dtype)
    y2, _ = run()
    assert torch.equal(y, y2)  # fixed-order reduction: the same bits every run


def test_split_equals_unsplit_in_fp32_and_the_workspace_is_written(poison_outputs):
    """Split 1 and split 4 agree to fp32 rounding on fp32 inputs (only the summation order differs), and
    with every workspace slice poisoned the split result has no NaN."""
    torch.manual_seed(0)
    m, n, k, r = 4, 45, 300, 12
    x, w, a, b = randn(m, k), randn(n, k, scale=0.1), randn(r, k, scale=0.1), randn(n, r)
    s = (x @ a.t()).float()
    y1 = torch.empty(m, n, device=DEVICE)
    y4 = torch.full((m, n), float("nan"), device=DEVICE)
    launch_lora_matmul(x, w, s, b, None, y1, 2.0, config=MM, split_k=1)
    launch_lora_matmul(x, w, s, b, None, y4, 2.0, config=MM, split_k=4)
    assert not torch.isnan(y4).any()
    torch.testing.assert_close(y4, y1, rtol=1e-5, atol=1e-5)


def test_split_applies_dora_column_scale_after_the_sum(poison_outputs):
    torch.manual_seed(1)
    m, n, k, r = 3, 29, 130, 8
    x, a, b = randn(m, k, dtype=torch.bfloat16), randn(r, k, scale=0.2), randn(n, r)
    bias = randn(n, dtype=torch.bfloat16)
    g = (torch.rand(n, device=DEVICE) + 0.5).float()
    for base in ("dense", "nf4"):
        if base == "dense":
            w = randn(n, k, dtype=torch.bfloat16, scale=0.2)
            y, s = lora_fwd(x, w, bias, a, b, 1.5, config=MM, shrink_config=SHRINK, col_scale=g, split_k=3)
        else:
            qw = _qw("nf4", n, k)
            w = dequantize(qw, torch.bfloat16)
            y, s = lora_quant_fwd(x, qw, bias, a, b, 1.5, config=QC, shrink_config=SHRINK, col_scale=g, split_k=3)
        yr, _ = ref_forward(x, w, None, a, b, 1.5, None)
        yr = yr * g.cpu().double() + bias.cpu().double()
        assert_close(f"DoRA Y ({base})", y, yr, torch.bfloat16)


@pytest.mark.parametrize("base", ["dense", "int4"])
def test_split_mixed_decode_rows_match_float64(base, poison_outputs):
    """A mixed batch's decode (gather) rows: each row its own adapter in the finish kernel's LoRA step."""
    torch.manual_seed(7)
    m, n, k, ranks = 9, 29, 131, (16, 1, 64, 0)
    x = randn(m, k, dtype=torch.bfloat16)
    As = [randn(r, k, scale=0.3) for r in ranks]
    Bs = [randn(n, r) for r in ranks]
    scales = [0.5, 1.0, 2.0, 1.5]
    idx = torch.tensor([0, 2, -1, 1, 2, 0, 3, -1, 2], device=DEVICE)
    plan = RowPlan.build(idx, len(ranks))
    bank = lora_mixed.adapter_bank(As, Bs, scales, [plan.count(i) > 0 for i in range(len(ranks))], x.device)
    if base == "dense":
        w, qw = randn(n, k, dtype=torch.bfloat16, scale=0.2), None
        w_ref, cfg = w, MM
    else:
        w, qw = None, _qw("int4", n, k)
        w_ref, cfg = dequantize(qw, x.dtype), QC
    bias = randn(n, dtype=torch.bfloat16)
    y, s = lora_mixed.lora_mixed_fwd(x, w, qw, bias, bank, plan.row_index, plan.order, plan.offsets, n, max(ranks),
                                     variant="gather", config=cfg, shrink_config=SHRINK, split_k=4)
    rows = []
    for i, kk in enumerate(idx.tolist()):
        yi = x[i].cpu().double() @ w_ref.cpu().double().t() + bias.cpu().double()
        if kk >= 0 and ranks[kk]:
            yi = yi + scales[kk] * (x[i].cpu().double() @ As[kk].cpu().double().t()) @ Bs[kk].cpu().double().t()
        rows.append(yi)
    assert_close("mixed Y", y, torch.stack(rows), torch.bfloat16)


def test_split_refuses_training_cases_and_segment_tiles():
    x, w = randn(2, 64), randn(8, 64)
    s, b, y = torch.zeros(2, 4, device=DEVICE), randn(8, 4), torch.empty(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="split_k=2 runs without dropout"):
        launch_lora_matmul(x, w.t(), s, randn(64, 4), None, torch.empty(2, 64, device=DEVICE), 1.0,
                           out_dropout_p=0.1, config=MM, split_k=2)
    with pytest.raises(ValueError, match="split_k must be in"):
        launch_lora_matmul(x, w, s, b, None, y, 1.0, config=MM, split_k=lora_splitk.MAX_SPLIT_K + 1)
    with pytest.raises(ValueError, match="not 'fused'"):
        lora_fwd(x, w, None, randn(4, 64), b, 1.0, variant="fused", split_k=2)
    with pytest.raises(ValueError, match="decode \\(gather\\) tiles"):  # segment tiles (prefill) never split
        lora_splitk.split_workspace("f", 2, 2, 8, 0.0, False, SimpleNamespace(mode=MIXED_SEGMENT.value), DEVICE)
    qw = _qw("int8", 8, 64)
    with pytest.raises(ValueError, match="runs without dropout"):
        launch_lora_quant(x, qw, s, b, None, y, 1.0, True, config=QC, col_scale=torch.ones(8, device=DEVICE),
                          in_dropout_p=0.1, z=torch.empty(2, 8, device=DEVICE), split_k=2)


def test_split_k_for_rule(monkeypatch):
    monkeypatch.delenv(lora_splitk.SPLIT_K_ENV, raising=False)
    assert lora_splitk.split_k_for(1, 4096, 4096, "cpu") == 1  # CPU tensors never split by themselves
    monkeypatch.setattr(lora_splitk, "sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    # M = 1, N = K = 4096: 64 tiles of 16 x 64 -> 4 programs per tile (256 programs, each K / 4 = 1024)
    assert lora_splitk.split_k_for(1, 4096, 4096, cuda) == 4
    assert lora_splitk.split_k_for(64, 4096, 4096, cuda) == 1   # 256 tiles already fill 132 SMs
    assert lora_splitk.split_k_for(65, 512, 4096, cuda) == 1    # beyond decode
    assert lora_splitk.split_k_for(1, 4096, 1024, cuda) == 2    # each program keeps >= 512 of K
    assert lora_splitk.split_k_for(1, 4096, 512, cuda) == 1
    monkeypatch.setenv(lora_splitk.SPLIT_K_ENV, "3")
    assert lora_splitk.split_k_for(64, 4096, 4096, "cpu") == 3
    monkeypatch.setenv(lora_splitk.SPLIT_K_ENV, "zero")
    with pytest.raises(RuntimeError, match="FASTPEFT_SPLIT_K='zero'"):
        lora_splitk.split_k_for(1, 8, 8, "cpu")


def test_auto_prefers_the_fused_kernel_and_splits_only_where_it_does_not_run(monkeypatch):
    """Under "auto" the one-launch fused kernel serves the rows it takes, whatever split_k_for would pick; the
    split path runs when the fused kernel does not (r above its register budget) or FASTPEFT_SPLIT_K forces it.
    Either way the result is the float64 reference."""
    from fastpeft.kernels import lora_fwd as fwd_mod

    seen = []
    monkeypatch.delenv(lora_splitk.SPLIT_K_ENV, raising=False)
    monkeypatch.setattr(fwd_mod, "split_k_for", lambda m, n, k, device: 2)  # what a GPU's rule might say
    real_fused, real_mm = fwd_mod.launch_lora_fused, fwd_mod.launch_lora_matmul
    monkeypatch.setattr(fwd_mod, "launch_lora_fused", lambda *a, **k: seen.append("fused") or real_fused(*a, **k))
    monkeypatch.setattr(fwd_mod, "launch_lora_matmul",
                        lambda *a, **k: seen.append(("split", k.get("split_k"))) or real_mm(*a, **k))
    x, w = randn(3, 64), randn(16, 64)
    for r, env, expect in ((8, None, "fused"), (fwd_mod.FUSED_MAX_R + 1, None, ("split", 2)), (8, "2", ("split", 2))):
        if env is not None:
            monkeypatch.setenv(lora_splitk.SPLIT_K_ENV, env)
        a, b = randn(r, 64), randn(16, r)
        seen.clear()
        y, _ = lora_fwd(x, w, None, a, b, 0.5, config=MM, shrink_config=SHRINK)
        assert seen == [expect], (r, env, seen)
        assert_close(f"auto r={r} split env {env}", y, ref_forward(x, w, None, a, b, 0.5, 1.0)[0], x.dtype)
