"""lora_shrink (S = scale * (D x) A^T) against float64, and the dropout mask itself."""
import math

import pytest
import torch

from _support.reference import DEVICE, assert_close, mask, randn

from fastpeft.kernels.lora_shrink import lora_shrink

SMALL = {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
K = 97  # not a multiple of any block size: 3 full K steps of 32 and a masked tail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", [1, 4, 16, 64, 128])
def test_shrink_matches_float64(dtype, r, poison_outputs):
    torch.manual_seed(r)
    m = 37
    x, a = randn(m, K, dtype=dtype), randn(r, K)
    s = lora_shrink(x, a, config=SMALL)
    assert s.dtype == torch.float32 and s.shape == (m, r)
    assert_close("S", s, x.double().cpu() @ a.double().cpu().T, dtype)


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_small_m_dropout_scale(m, dtype, poison_outputs):
    torch.manual_seed(m)
    r, p, seed = 16, 0.25, 1234
    x, a = randn(m, K, dtype=dtype), randn(r, K, dtype=dtype)
    s = lora_shrink(x, a, scale=0.5, dropout_p=p, seed=seed, config=SMALL)
    ref = 0.5 * (mask(seed, m, K, p) * x.double().cpu()) @ a.double().cpu().T
    assert_close("S", s, ref, dtype)


def test_shrink_strided_x_and_a_and_r_over_128(poison_outputs):
    """x and A as transposed/sliced views (no copy), r = 200: two r tiles, the second masked."""
    torch.manual_seed(0)
    m, r = 29, 200
    x = randn(2 * K, m).t()[:, ::2]       # [m, K] with stride (1, 2m)
    a = randn(K, r).t()                    # [r, K] with stride (1, r)
    s_out = torch.full((m, 2 * r), float("nan"), device=DEVICE)[:, ::2]  # strided output too
    lora_shrink(x, a, out=s_out, config=SMALL)
    assert_close("S", s_out, x.double().cpu() @ a.double().cpu().T, torch.float32)


def test_shrink_autoconfig_and_errors():
    x, a = randn(5, 33), randn(3, 33)
    assert_close("S", lora_shrink(x, a), x.double().cpu() @ a.double().cpu().T, torch.float32)
    with pytest.raises(ValueError, match=r"a must be \[r, K=33\]"):
        lora_shrink(x, randn(3, 32))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        lora_shrink(x.long(), a)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_shrink(x, a, dropout_p=1.0)


def test_dropout_mask_statistics_and_seeds():
    """Kept fraction within 3 sigma of 1 - p, kept entries scaled by 1/(1-p), seeds differ."""
    m, k = 96, 160
    for p in (0.1, 0.5):
        d = mask(7, m, k, p)
        n = m * k
        kept = (d != 0).double().mean().item()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(kept - (1 - p)) <= 3 * sigma, (p, kept)
        assert torch.allclose(d[d != 0], torch.full_like(d[d != 0], 1 / (1 - p)))
    d1, d2 = mask(1, m, k, 0.5), mask(2, m, k, 0.5)
    assert (d1 != d2).double().mean().item() > 0.4  # independent masks disagree on ~half
    assert torch.equal(mask(1, m, k, 0.5), d1)  # and a seed always gives the same mask


def test_dropout_mask_is_independent_of_tiling():
    """The mask is a function of (seed, element index): different block sizes give the same S."""
    torch.manual_seed(1)
    x, a = randn(37, K), randn(16, K)
    s1 = lora_shrink(x, a, dropout_p=0.3, seed=99, config=SMALL)
    s2 = lora_shrink(x, a, dropout_p=0.3, seed=99,
                     config={"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2})
    assert torch.allclose(s1, s2, rtol=1e-6, atol=1e-5)
