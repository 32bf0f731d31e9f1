"""Autotune spaces and pruning rules (the tuning itself needs a GPU; these are the CPU-checkable parts)."""
import itertools

import pytest
import torch

from fastpeft.kernels import lora_bwd, lora_fwd, lora_quant, lora_shrink

TUNED = [lora_shrink.lora_shrink_kernel_tuned, lora_fwd.lora_matmul_kernel_tuned, lora_fwd.lora_fused_kernel_tuned,
         lora_bwd.lora_wgrad_kernel_tuned, lora_quant.lora_quant_kernel_tuned]


@pytest.mark.parametrize("tuned", TUNED, ids=lambda t: t.base_fn.__name__)
def test_keys_are_kernel_arguments(tuned):
    """The autotuner silently ignores a key that is not an argument name: a typo would merge keys."""
    missing = [k for k in tuned.keys if k not in tuned.arg_names]
    assert not missing, f"{tuned.base_fn.__name__}: autotune keys {missing} are not kernel arguments"


def _t(dtype):
    return torch.empty(0, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_pruning_keeps_fitting_configs(dtype):
    """For every shape class the rules keep >= 1 config, all within the M bucket / N / K / r bounds."""
    for mb, n, k, r, flag, prec in itertools.product((16, 64, 4096), (16, 53, 4096), (16, 97, 4096), (1, 64, 256),
                                                     (False, True), ("ieee", "tf32")):
        br = min(max(16, 1 << (r - 1).bit_length()), 128)
        for c in lora_shrink.prune_shrink_configs(
                lora_shrink.get_shrink_configs(), {"M_BUCKET": mb, "K": k, "x_ptr": _t(dtype), "a_ptr": _t(dtype)},
                HAS_DROPOUT=flag, INPUT_PRECISION=prec, BLOCK_R=br):
            assert c.kwargs["BLOCK_M"] <= mb or c.kwargs["BLOCK_M"] == 16
        kept = lora_fwd.prune_lora_matmul_configs(
            lora_fwd.get_lora_matmul_configs(), {"M_BUCKET": mb, "N": n, "K": k, "x_ptr": _t(dtype)},
            OUT_DROPOUT=flag, INPUT_PRECISION=prec)
        assert kept and all(c.kwargs["BLOCK_M"] <= max(mb, 16) for c in kept)
        if r <= 128:
            kept = lora_fwd.prune_lora_fused_configs(
                lora_fwd.get_lora_fused_configs(),
                {"M_BUCKET": mb, "N": n, "K": k, "x_ptr": _t(dtype), "a_ptr": _t(torch.float32)},
                BLOCK_R=max(16, 1 << (r - 1).bit_length()), IN_DROPOUT=flag, INPUT_PRECISION=prec)
            assert kept
        kept = lora_bwd.prune_wgrad_configs(
            lora_bwd.get_wgrad_configs(), {"P": r, "Q": k, "l_ptr": _t(torch.float32), "r_ptr": _t(dtype)},
            HAS_DROPOUT=flag, INPUT_PRECISION=prec)
        assert kept and all(c.kwargs["BLOCK_P"] <= max(16, r) or len(kept) == 1 for c in kept)


def test_pruning_drops_spilling_tiles():
    """The register rules seen in ptxas -v: no 128x128 dropout tile on 8 warps, no big exact-fp32 tiles."""
    kept = lora_fwd.prune_lora_matmul_configs(
        lora_fwd.get_lora_matmul_configs(), {"M_BUCKET": 4096, "N": 4096, "K": 4096, "x_ptr": _t(torch.bfloat16)},
        OUT_DROPOUT=True, INPUT_PRECISION="tf32")
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 32 * c.num_warps for c in kept)
    kept = lora_fwd.prune_lora_matmul_configs(
        lora_fwd.get_lora_matmul_configs(), {"M_BUCKET": 4096, "N": 4096, "K": 4096, "x_ptr": _t(torch.float32)},
        INPUT_PRECISION="ieee")
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 2048 and c.kwargs["BLOCK_K"] <= 32 for c in kept)
