"""lora_fwd (both variants) against float64: Y = x W^T + s (D x) A^T B^T + bias, and S."""
import pytest
import torch

from _support.reference import assert_close, mask, randn, ref_forward

from fastpeft.kernels.lora_fwd import lora_fwd

N, K = 53, 97  # not multiples of any block size
CFG = {
    "fused": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2},
    "split": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2},
}
SHRINK = {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}

# (variant, dtype, M, r, bias, dropout_p, adapters in x dtype)
CASES = [
    ("fused", torch.float32, 1, 16, True, 0.0, False),
    ("fused", torch.bfloat16, 3, 4, False, 0.3, False),
    ("fused", torch.float16, 37, 64, True, 0.1, True),
    ("fused", torch.bfloat16, 31, 128, True, 0.0, True),
    ("fused", torch.float32, 17, 1, False, 0.5, False),
    ("split", torch.float32, 37, 1, True, 0.2, False),
    ("split", torch.bfloat16, 1, 16, True, 0.0, False),
    ("split", torch.float16, 3, 128, False, 0.0, False),
    ("split", torch.bfloat16, 37, 64, False, 0.5, True),
    ("split", torch.float32, 23, 4, True, 0.0, True),
]


@pytest.mark.parametrize("variant,dtype,m,r,has_bias,p,same_dtype", CASES)
def test_fwd_matches_float64(variant, dtype, m, r, has_bias, p, same_dtype, poison_outputs):
    torch.manual_seed(m * 1000 + r)
    adt = dtype if same_dtype else torch.float32
    x, w = randn(m, K, dtype=dtype), randn(N, K, dtype=dtype, scale=0.1)
    a, b = randn(r, K, dtype=adt, scale=0.1), randn(N, r, dtype=adt)
    bias = randn(N, dtype=dtype) if has_bias else None
    scale, seed = 2.0, 4242
    y, s = lora_fwd(x, w, bias, a, b, scale, p, seed, variant=variant, config=CFG[variant], shrink_config=SHRINK)
    assert y.dtype == dtype and y.shape == (m, N) and s.dtype == torch.float32 and s.shape == (m, r)
    yr, sr = ref_forward(x, w, bias, a, b, scale, mask(seed, m, K, p))
    assert_close("S", s, sr, dtype)  # 16-bit x: S comes from a tf32/bf16 dot on GPU
    assert_close("Y", y, yr, dtype)
    # The LoRA term alone must be right too (a wrong LoRA term can hide under the base GEMM).
    yl, _ = lora_fwd(x, None, None, a, b, scale, p, seed, variant=variant, config=CFG[variant], shrink_config=SHRINK)
    assert_close("Y (lora only)", yl, ref_forward(x, None, None, a, b, scale, mask(seed, m, K, p))[0], dtype)


@pytest.mark.parametrize("variant", ["fused", "split"])
def test_fwd_strided_inputs(variant, poison_outputs):
    """x.reshape(-1, K) of a transposed activation is a strided view; W and A/B views too."""
    torch.manual_seed(3)
    m, r = 13, 8
    x = randn(K, m, dtype=torch.bfloat16).t()
    w = randn(K, N, dtype=torch.bfloat16, scale=0.1).t()
    a, b = randn(K, r, scale=0.1).t(), randn(r, N).t()
    y, s = lora_fwd(x, w, None, a, b, 0.5, 0.0, 0, variant=variant, config=CFG[variant], shrink_config=SHRINK)
    yr, sr = ref_forward(x, w, None, a, b, 0.5, mask(0, m, K, 0.0))
    assert_close("Y", y, yr, torch.bfloat16)
    assert_close("S", s, sr, torch.bfloat16)


def test_fwd_r256_split_and_auto(poison_outputs):
    """r = 256 (largest supported) runs the split path; 'auto' picks it too."""
    torch.manual_seed(5)
    m, n, k, r = 5, 17, 33, 256
    x, w, a, b = randn(m, k), randn(n, k), randn(r, k, scale=0.1), randn(n, r, scale=0.1)
    for variant in ("split", "auto"):
        y, s = lora_fwd(x, w, None, a, b, 1.0, 0.0, 0, variant=variant, config=CFG["split"], shrink_config=SHRINK)
        yr, sr = ref_forward(x, w, None, a, b, 1.0, mask(0, m, k, 0.0))
        assert_close("Y", y, yr, torch.float32)
    with pytest.raises(ValueError, match="fused variant holds r <= 128"):
        lora_fwd(x, w, None, a, b, 1.0, variant="fused")


# (variant, dtype, M, bias, dropout_p, explicit configs)
RANK0_CASES = [
    ("split", torch.float32, 1, True, 0.0, True),
    ("auto", torch.bfloat16, 37, False, 0.3, True),
    ("fused", torch.float16, 1, True, 0.5, True),
    ("auto", torch.float32, 3, True, 0.0, False),  # default configs
]


@pytest.mark.parametrize("variant,dtype,m,has_bias,p,explicit", RANK0_CASES)
def test_fwd_rank0_is_the_base_gemm(variant, dtype, m, has_bias, p, explicit, poison_outputs):
    """r = 0 (no adapter): Y = x W^T (+ bias) by the split path's GEMM alone, S empty [M, 0]."""
    torch.manual_seed(m)
    x, w = randn(m, K, dtype=dtype), randn(N, K, dtype=dtype, scale=0.1)
    a, b = randn(0, K), randn(N, 0)
    bias = randn(N, dtype=dtype) if has_bias else None
    cfg, shrink = (CFG["split"], SHRINK) if explicit else (None, None)
    for weight in (w, None):  # without W: Y = bias, or 0
        y, s = lora_fwd(x, weight, bias, a, b, 2.0, p, 3, variant=variant, config=cfg, shrink_config=shrink)
        assert y.dtype == dtype and y.shape == (m, N) and s.dtype == torch.float32 and s.shape == (m, 0)
        assert_close("Y", y, ref_forward(x, weight, bias, a, b, 2.0, mask(3, m, K, p))[0], dtype)


def test_fwd_dropout_seeds_and_default_config(poison_outputs):
    """Same seed: same output; another seed: another mask. Default (untuned) configs also pass."""
    torch.manual_seed(6)
    m, r = 7, 16
    x, w, a, b = randn(m, K), randn(N, K), randn(r, K), randn(N, r)
    y1, s1 = lora_fwd(x, w, None, a, b, 1.0, 0.5, 11)
    y2, s2 = lora_fwd(x, w, None, a, b, 1.0, 0.5, 11, variant="split")
    y3, s3 = lora_fwd(x, w, None, a, b, 1.0, 0.5, 12)
    assert torch.allclose(s1, s2, rtol=1e-5, atol=1e-5)  # fused and split regenerate the same mask
    assert not torch.allclose(s1, s3, rtol=1e-2, atol=1e-2)
    assert_close("S", s1, ref_forward(x, w, None, a, b, 1.0, mask(11, m, K, 0.5))[1], torch.float32)


def test_fwd_argument_errors():
    x, w, a, b = randn(4, 8), randn(6, 8), randn(2, 8), randn(6, 2)
    with pytest.raises(ValueError, match=r"lora_B must be \[N, r=2\]"):
        lora_fwd(x, w, None, a, randn(6, 3), 1.0)
    with pytest.raises(ValueError, match=r"weight: expected shape \(6, 8\)"):
        lora_fwd(x, randn(6, 9), None, a, b, 1.0)
    with pytest.raises(TypeError, match="weight: dtype torch.bfloat16"):
        lora_fwd(x, w.bfloat16(), None, a, b, 1.0)
    with pytest.raises(ValueError, match="bias must be"):
        lora_fwd(x, w, randn(5), a, b, 1.0)
    with pytest.raises(ValueError, match="variant"):
        lora_fwd(x, w, None, a, b, 1.0, variant="fast")
