"""lora_bwd (dX, dA, dB) against float64; the dropout mask of backward equals forward's."""
import pytest
import torch

from _support.reference import assert_close, mask, randn, ref_backward

from fastpeft.kernels.lora_bwd import lora_bwd, lora_wgrad
from fastpeft.kernels.lora_fwd import lora_fwd

N, K = 53, 97
SMALL = {
    "shrink": {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    "matmul": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2},
    "fused": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2},
    "wgrad": {"BLOCK_P": 16, "BLOCK_Q": 32, "BLOCK_M": 16, "num_warps": 4, "num_stages": 2},
}

# (variant, dtype, M, r, dropout_p, weight is None, adapters in x dtype, split_m)
CASES = [
    ("fused", torch.float32, 1, 16, 0.0, False, False, None),
    ("fused", torch.bfloat16, 3, 4, 0.3, False, False, 2),
    ("fused", torch.float16, 37, 64, 0.1, False, True, 3),
    ("fused", torch.float32, 19, 128, 0.5, True, False, 3),
    ("split", torch.float32, 37, 1, 0.2, False, False, 3),
    ("split", torch.bfloat16, 1, 16, 0.0, True, False, None),
    ("split", torch.float16, 29, 128, 0.0, False, False, 2),
    ("split", torch.bfloat16, 37, 64, 0.5, False, True, 4),
]


@pytest.mark.parametrize("variant,dtype,m,r,p,no_weight,same_dtype,split_m", CASES)
def test_bwd_matches_float64(variant, dtype, m, r, p, no_weight, same_dtype, split_m, poison_outputs):
    torch.manual_seed(m * 100 + r)
    adt = dtype if same_dtype else torch.float32
    x, dy = randn(m, K, dtype=dtype), randn(m, N, dtype=dtype)
    w = None if no_weight else randn(N, K, dtype=dtype, scale=0.1)
    a, b = randn(r, K, dtype=adt, scale=0.1), randn(N, r, dtype=adt)
    scale, seed = 0.5, 77
    fwd_cfg = SMALL["fused" if variant == "fused" else "matmul"]
    _, s = lora_fwd(x, w, None, a, b, scale, p, seed, variant=variant, config=fwd_cfg, shrink_config=SMALL["shrink"])
    cfg = dict(SMALL, split_m=split_m)
    dx, da, db = lora_bwd(dy, x, w, a, b, s, scale, p, seed, variant=variant, configs=cfg)
    assert dx.dtype == dtype and da.dtype == adt and db.dtype == adt
    # One mask for forward (inside S) and backward (dX, dA): a backward mask differing from the
    # forward's would fail these against the single-mask reference.
    dxr, dar, dbr, _ = ref_backward(dy, x, w, a, b, scale, mask(seed, m, K, p))
    assert_close("dX", dx, dxr, dtype)
    assert_close("dA", da, dar, dtype)  # 16-bit x: tf32/bf16 dots on GPU
    assert_close("dB", db, dbr, dtype)


@pytest.mark.parametrize("variant,dtype,m,p,explicit", [("split", torch.float32, 1, 0.0, True),
                                                        ("auto", torch.bfloat16, 37, 0.5, True),
                                                        ("fused", torch.float16, 3, 0.2, True),
                                                        ("auto", torch.float32, 1, 0.3, False)])
def test_bwd_rank0(variant, dtype, m, p, explicit, poison_outputs):
    """r = 0 (no adapter): dX = dY W (the output dropout multiplies only the LoRA term), dA / dB empty."""
    torch.manual_seed(m)
    x, dy, w = randn(m, K, dtype=dtype), randn(m, N, dtype=dtype), randn(N, K, dtype=dtype, scale=0.1)
    a, b = randn(0, K), randn(N, 0)
    _, s = lora_fwd(x, w, None, a, b, 0.5, p, 7, config=SMALL["matmul"], shrink_config=SMALL["shrink"])
    dx, da, db = lora_bwd(dy, x, w, a, b, s, 0.5, p, 7, variant=variant, configs=SMALL if explicit else None)
    assert dx.dtype == dtype and da.shape == (0, K) and db.shape == (N, 0)
    assert_close("dX", dx, ref_backward(dy, x, w, a, b, 0.5, mask(7, m, K, p))[0], dtype)


def test_bwd_needs_flags_and_strided(poison_outputs):
    torch.manual_seed(1)
    m, r = 11, 8
    x = randn(K, m, dtype=torch.bfloat16).t()
    dy = randn(N, m, dtype=torch.bfloat16).t()
    w, a, b = randn(N, K, dtype=torch.bfloat16, scale=0.1), randn(r, K, scale=0.1), randn(N, r)
    _, s = lora_fwd(x, w, None, a, b, 2.0, 0.2, 5, config=SMALL["fused"])
    dxr, dar, dbr, _ = ref_backward(dy, x, w, a, b, 2.0, mask(5, m, K, 0.2))
    dx, da, db = lora_bwd(dy, x, w, a, b, s, 2.0, 0.2, 5, needs_dx=False, needs_db=False, configs=SMALL)
    assert dx is None and db is None
    assert_close("dA", da, dar, torch.bfloat16)
    dx, da, db = lora_bwd(dy, x, w, a, b, s, 2.0, 0.2, 5, needs_da=False, variant="split", configs=SMALL)
    assert da is None
    assert_close("dX", dx, dxr, torch.bfloat16)
    assert_close("dB", db, dbr, torch.bfloat16)


def test_wgrad_deterministic_and_atomic():
    """Fixed-order split reduction: bit-identical across runs; atomic mode agrees numerically."""
    torch.manual_seed(2)
    lhs, rhs = randn(45, 16), randn(45, 40)
    cfg = SMALL["wgrad"]
    r1 = lora_wgrad(lhs, rhs, 0.5, 0.3, 9, deterministic=True, split_m=4, config=cfg)
    r2 = lora_wgrad(lhs, rhs, 0.5, 0.3, 9, deterministic=True, split_m=4, config=cfg)
    assert torch.equal(r1, r2)
    ref = 0.5 * lhs.double().cpu().T @ (mask(9, 45, 40, 0.3) * rhs.double().cpu())
    assert_close("wgrad", r1, ref, torch.float32)
    ra = lora_wgrad(lhs, rhs, 0.5, 0.3, 9, deterministic=False, split_m=4, config=cfg)
    assert_close("wgrad atomic", ra, ref, torch.float32)
    assert_close("wgrad default config", lora_wgrad(lhs, rhs, 0.5, 0.3, 9), ref, torch.float32)


def test_empty_batch():
    """M = 0 (an empty batch) gives empty Y/S/dX and zero dA/dB, without launching on no rows."""
    x, w, a, b = randn(0, 8), randn(6, 8), randn(2, 8), randn(6, 2)
    y, s = lora_fwd(x, w, None, a, b, 1.0)
    assert y.shape == (0, 6) and s.shape == (0, 2)
    dx, da, db = lora_bwd(randn(0, 6), x, w, a, b, s, 1.0)
    assert dx.shape == (0, 8) and torch.equal(da, torch.zeros_like(a)) and torch.equal(db, torch.zeros_like(b))


def test_bwd_argument_errors():
    x, w, a, b = randn(4, 8), randn(6, 8), randn(2, 8), randn(6, 2)
    s = torch.zeros(4, 2, device=x.device)
    with pytest.raises(ValueError, match=r"dY must be torch.float32 \[4, 6\]"):
        lora_bwd(randn(4, 5), x, w, a, b, s, 1.0)
    with pytest.raises(ValueError, match=r"S must be fp32 \[4, 2\]"):
        lora_bwd(randn(4, 6), x, w, a, b, s.half(), 1.0)
