"""lora_linear (torch backend) vs the float64 reference: forward, all grads, dropout, checkpoint."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastpeft.ops import draw_seed, dropout_mask, lora_linear

from _support.reference import TOL, check_mask_consistency, rel_err, run_and_compare

SHAPES = [  # (leading dims of x, K, N, r)
    ((1,), 17, 13, 1),          # M = 1
    ((37,), 31, 29, 4),         # primes
    ((2, 3, 11), 64, 48, 16),   # 3 leading dims
    ((5,), 130, 7, 64),
    ((3,), 257, 131, 128),
]


def _make(lead, K, N, r, dtype, lora_dtype, bias, weight, train_base=False):
    g = torch.Generator().manual_seed(hash((lead, K, N, r)) % 2**31)

    def rnd(*shape, dt, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dt)

    x = rnd(*lead, K, dt=dtype).requires_grad_(True)
    W = rnd(N, K, dt=dtype, s=1 / math.sqrt(K)).requires_grad_(train_base) if weight else None
    b = rnd(N, dt=dtype).requires_grad_(train_base) if bias else None
    A = rnd(r, K, dt=lora_dtype, s=1 / math.sqrt(K)).requires_grad_(True)
    B = rnd(N, r, dt=lora_dtype, s=1 / math.sqrt(r)).requires_grad_(True)
    return x, W, b, A, B


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{math.prod(s[0])}K{s[1]}N{s[2]}r{s[3]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p.25"])
def test_matches_float64_reference(shape, dtype, bias, p):
    lead, K, N, r = shape
    x, W, b, A, B = _make(lead, K, N, r, dtype, dtype, bias, weight=True)
    run_and_compare(x, W, b, A, B, 0.5, p, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fp32_adapters_on_16bit_input(dtype, p):
    """peft keeps adapters in fp32 while the model is bf16: grads of A/B come back fp32, Y in x's dtype."""
    x, W, b, A, B = _make((23,), 67, 41, 8, dtype, torch.float32, bias=True, weight=True)
    run_and_compare(x, W, b, A, B, 2.0, p, TOL[dtype])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_weight_none_is_lora_term_only(bias, p):
    x, W, b, A, B = _make((19,), 33, 21, 4, torch.float32, torch.float32, bias, weight=False)
    run_and_compare(x, W, b, A, B, 1.5, p, TOL[torch.float32])


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_base_weight_and_bias_grads_when_trainable(p):
    x, W, b, A, B = _make((13,), 29, 31, 4, torch.float32, torch.float32, True, True, train_base=True)
    run_and_compare(x, W, b, A, B, 0.7, p, TOL[torch.float32])


def test_frozen_base_gets_no_grad_and_x_without_grad():
    x, W, b, A, B = _make((9,), 16, 12, 4, torch.float32, torch.float32, True, True)
    x.requires_grad_(False)
    lora_linear(x, W, b, A, B, 1.0).sum().backward()
    assert W.grad is None and b.grad is None and x.grad is None
    assert A.grad is not None and B.grad is not None


def test_eval_and_p0_ignore_dropout():
    x, W, b, A, B = _make((50,), 32, 16, 4, torch.float32, torch.float32, True, True)
    ref = F.linear(x, W, b) + 0.5 * (x @ A.t()) @ B.t()
    y_eval = lora_linear(x, W, b, A, B, 0.5, dropout_p=0.5, training=False)
    y_p0 = lora_linear(x, W, b, A, B, 0.5, dropout_p=0.0, training=True)
    assert rel_err(y_eval, ref) < 1e-5 and rel_err(y_p0, ref) < 1e-5


def _observe_mask(M, K, p, seed_base=None):
    """Y of lora_linear with A = I, B = I, no base weight, x = 1 is exactly D (the scaled mask)."""
    if seed_base is not None:
        torch.manual_seed(seed_base)
    x = torch.ones(M, K)
    eye = torch.eye(K)
    return lora_linear(x, None, None, eye, eye, 1.0, dropout_p=p, training=True)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kept_fraction_and_scaling(p):
    M, K = 512, 64
    D = _observe_mask(M, K, p, seed_base=3)
    n = M * K
    kept = (D != 0)
    # Kept entries are scaled by exactly 1/(1-p); dropped entries are exactly 0.
    assert torch.allclose(D[kept], torch.full_like(D[kept], 1.0 / (1.0 - p)))
    frac = kept.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 3 * sigma, (frac, 1 - p, sigma)
    # And it is the mask the public helper regenerates for the drawn seed.
    torch.manual_seed(3)
    seed = int(draw_seed())
    assert torch.equal(kept, dropout_mask(seed, (M, K), p, "cpu"))


def test_dropout_seeds_differ_between_calls():
    torch.manual_seed(0)
    D1 = _observe_mask(64, 32, 0.5)
    D2 = _observe_mask(64, 32, 0.5)
    assert not torch.equal(D1, D2)
    # Re-seeding torch reproduces the first call.
    assert torch.equal(D1, _observe_mask(64, 32, 0.5, seed_base=0))


def test_dropout_mask_differs_for_different_seeds():
    m1 = dropout_mask(1, (40, 40), 0.5, "cpu")
    m2 = dropout_mask(2, (40, 40), 0.5, "cpu")
    assert not torch.equal(m1, m2)
    assert torch.equal(m1, dropout_mask(1, (40, 40), 0.5, "cpu"))


def test_dropout_p1_drops_everything():
    x, W, b, A, B = _make((8,), 16, 12, 4, torch.float32, torch.float32, True, True)
    y = lora_linear(x, W, b, A, B, 1.0, dropout_p=1.0, training=True)
    assert rel_err(y, F.linear(x, W, b)) < 1e-6


class _Block(torch.nn.Module):
    def __init__(self, K, r, p):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.W = torch.nn.Parameter(torch.randn(K, K, generator=g) / K**0.5, requires_grad=False)
        self.A = torch.nn.Parameter(torch.randn(r, K, generator=g) / K**0.5)
        self.B = torch.nn.Parameter(torch.randn(K, r, generator=g) / r**0.5)
        self.p = p

    def forward(self, x):
        return torch.tanh(lora_linear(x, self.W, None, self.A, self.B, 0.5, self.p, self.training))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recompute_gives_identical_grads(use_reentrant):
    blocks = torch.nn.ModuleList([_Block(24, 4, 0.3) for _ in range(2)])
    x0 = torch.randn(17, 24)

    def run(ckpt):
        for p in blocks.parameters():
            p.grad = None
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(123)
        h = x
        for blk in blocks:
            h = checkpoint(blk, h, use_reentrant=use_reentrant) if ckpt else blk(h)
        h.square().sum().backward()
        return [x.grad] + [p.grad.clone() for p in blocks.parameters() if p.requires_grad]

    plain, ck = run(False), run(True)
    for a, b in zip(plain, ck):
        assert torch.equal(a, b)


def test_bad_shapes_raise_clear_errors():
    x = torch.randn(4, 8)
    A, B, W = torch.randn(2, 8), torch.randn(5, 2), torch.randn(5, 8)
    with pytest.raises(ValueError, match="last dim must be K=8"):
        lora_linear(torch.randn(4, 7), W, None, A, B, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \[N, r=2\]"):
        lora_linear(x, W, None, A, torch.randn(5, 3), 1.0)
    with pytest.raises(ValueError, match=r"weight must be \[N=5, K=8\]"):
        lora_linear(x, torch.randn(6, 8), None, A, B, 1.0)
    with pytest.raises(ValueError, match="same dtype"):
        lora_linear(x, W.double(), None, A, B, 1.0)
    with pytest.raises(ValueError, match=r"bias must be \[N=5\]"):
        lora_linear(x, W, torch.randn(4), A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, W, None, A, B, 1.0, dropout_p=1.5, training=True)


def test_forward_and_backward_use_the_same_mask_observed():
    check_mask_consistency("cpu")


def test_autocast_runs_in_autocast_dtype_like_nn_linear():
    """Under autocast the base GEMM runs in the autocast dtype as nn.Linear's would (output in that
    dtype); fp32 parameters still get fp32 grads."""
    x, W, b, A, B = _make((21,), 48, 40, 8, torch.float32, torch.float32, True, True, train_base=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, b, A, B, 0.5)
        ref = F.linear(x, W, b) + 0.5 * F.linear(F.linear(x, A), B)
    assert y.dtype == torch.bfloat16 == ref.dtype
    assert rel_err(y, ref) < TOL[torch.bfloat16]
    y.float().sum().backward()
    for t in (x, W, b, A, B):
        assert t.grad is not None and t.grad.dtype == torch.float32
