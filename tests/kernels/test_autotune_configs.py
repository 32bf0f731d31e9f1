"""Autotune spaces and pruning rules (the tuning itself needs a GPU; these are the CPU-checkable parts).

Every pruning rule keeps the configs it accepts, in order, and falls back to the documented smallest
config only when it accepts none. Which configs a rule accepts is read from the rule itself, one config
at a time: ``prune([c, NEVER])`` with a config ``NEVER`` that cannot fit (10^6 pipeline stages) and
sorts before every real config returns ``[c]`` if the rule accepts c and ``[NEVER]`` (the fallback)
if not. The accepted configs must then respect the documented bounds (tile <= the problem rounded up
to a power of two, etc.), and the fallback must be exactly the documented smallest config.
"""
import itertools

import pytest
import torch
import triton

from fastpeft.kernels import lora_bwd, lora_fwd, lora_quant, lora_shrink

TUNED = [lora_shrink.lora_shrink_kernel_tuned, lora_fwd.lora_matmul_kernel_tuned, lora_fwd.lora_fused_kernel_tuned,
         lora_bwd.lora_wgrad_kernel_tuned, lora_quant.lora_quant_kernel_tuned]
np2 = triton.next_power_of_2


@pytest.mark.parametrize("tuned", TUNED, ids=lambda t: t.base_fn.__name__)
def test_keys_are_kernel_arguments(tuned):
    """The autotuner silently ignores a key that is not an argument name: a typo would merge keys."""
    missing = [k for k in tuned.keys if k not in tuned.arg_names]
    assert not missing, f"{tuned.base_fn.__name__}: autotune keys {missing} are not kernel arguments"


def _t(dtype):
    return torch.empty(0, dtype=dtype)


class _Elt:
    """Stands in for a pointer argument whose elements are ``n`` bytes (only element_size() is read)."""

    def __init__(self, n):
        self.n = n

    def element_size(self):
        return self.n


# kernel -> (space, rule, block meta-parameters, documented fallback key: the smallest config)
KERNELS = {
    "shrink": (lora_shrink.get_shrink_configs, lora_shrink.prune_shrink_configs, ("BLOCK_M", "BLOCK_K"),
               lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps)),
    "matmul": (lora_fwd.get_lora_matmul_configs, lora_fwd.prune_lora_matmul_configs,
               ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"),
               lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])),
    "fused": (lora_fwd.get_lora_fused_configs, lora_fwd.prune_lora_fused_configs,
              ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"),
              lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])),
    "wgrad": (lora_bwd.get_wgrad_configs, lora_bwd.prune_wgrad_configs, ("BLOCK_P", "BLOCK_Q", "BLOCK_M"),
              lambda c: (c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_M"])),
    "quant": (lora_quant.get_lora_quant_configs, lora_quant.prune_lora_quant_configs,
              ("BLOCK_M", "BLOCK_P", "BLOCK_Q", "GROUP_M"),
              lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_P"], c.kwargs["BLOCK_Q"])),
}


def _prune(kernel, named, **flags):
    """(space, kept, accepted, smallest): what the rule keeps of the whole space, which configs it
    accepts one at a time, and the documented fallback config."""
    space_fn, rule, blocks, key = KERNELS[kernel]
    space = space_fn()
    never = triton.Config({b: 8 for b in blocks}, num_warps=1, num_stages=10**6)
    assert all(key(never) < key(c) for c in space)  # the fallback of [c, never] is never
    accepted = []
    for c in space:
        out = rule([c, never], named, **flags)
        assert len(out) == 1 and (out[0] is c or out[0] is never), (kernel, out)
        if out[0] is c:
            accepted.append(c)
    kept = rule(space, named, **flags)
    return space, kept, accepted, min(space, key=key)


def _check(kernel, named, bounds, **flags):
    """kept == the accepted configs, each within the documented bounds; or, when the rule accepts
    none, exactly the documented smallest config. Returns whether the fallback was used."""
    space, kept, accepted, smallest = _prune(kernel, named, **flags)
    what = f"{kernel} {dict((k, v) for k, v in named.items() if not k.endswith('_ptr'))} {flags}"
    if not accepted:
        assert kept == [smallest], f"{what}: the rule accepts nothing, the fallback must be {smallest}, got {kept}"
        return True
    assert kept == accepted, f"{what}: kept {kept} != the configs the rule accepts {accepted}"
    bad = [c for c in kept if not bounds(c)]
    assert not bad, f"{what}: kept configs outside the documented bounds: {bad}"
    return False


def _dropout_ok(rows, cols, c):  # _common.dropout_tile_ok: at most 32 mask elements per thread
    return rows * cols <= 32 * 32 * c.num_warps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_pruning_keeps_fitting_configs(dtype):
    """For every shape class each rule keeps exactly the configs it accepts, all within the M bucket /
    N / K / r bounds; the fallback only where it accepts none. Realistic shapes never fall back."""
    precisions = ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)  # 16-bit dots never run "ieee"
    fallbacks = set()
    for mb, n, k, r, flag, prec in itertools.product((16, 64, 4096), (16, 53, 4096), (16, 97, 4096), (1, 64, 256),
                                                     (False, True), precisions):
        br = min(max(16, 1 << (r - 1).bit_length()), 128)
        kb = max(32, np2(k))

        def shrink_bounds(c):
            bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
            return (bm <= mb and bk <= kb and (not flag or _dropout_ok(bm, bk, c))
                    and (prec != "ieee" or (bm * br <= 32 * 64 and bk <= 32)))

        def mm_bounds(c, dropout_cols=True, extra_cols=0):
            bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            return (bm <= mb and bn <= max(16, np2(n)) and bk <= kb
                    and (not flag or _dropout_ok(bm, bn if dropout_cols else bk, c))
                    and (prec != "ieee" or (bm * (bn + extra_cols) <= 32 * 64 and bk <= 32)))

        if _check("shrink", {"M_BUCKET": mb, "K": k, "x_ptr": _t(dtype), "a_ptr": _t(dtype)}, shrink_bounds,
                  HAS_DROPOUT=flag, INPUT_PRECISION=prec, BLOCK_R=br):
            fallbacks.add(("shrink", mb, n, k, r))
        if _check("matmul", {"M_BUCKET": mb, "N": n, "K": k, "x_ptr": _t(dtype)}, mm_bounds,
                  OUT_DROPOUT=flag, INPUT_PRECISION=prec):
            fallbacks.add(("matmul", mb, n, k))
        if r <= 128:
            brf = max(16, 1 << (r - 1).bit_length())
            if _check("fused", {"M_BUCKET": mb, "N": n, "K": k, "x_ptr": _t(dtype), "a_ptr": _t(torch.float32)},
                      lambda c: (mm_bounds(c, dropout_cols=False, extra_cols=brf)
                                 and brf * c.kwargs["BLOCK_N"] <= 128 * 64),
                      BLOCK_R=brf, IN_DROPOUT=flag, INPUT_PRECISION=prec):
                fallbacks.add(("fused", mb, n, k, r))
        if _check("wgrad", {"P": r, "Q": k, "lhs_ptr": _t(torch.float32), "rhs_ptr": _t(dtype)},
                  lambda c: (c.kwargs["BLOCK_P"] <= max(16, np2(r)) and c.kwargs["BLOCK_Q"] <= max(16, np2(k))
                             and (not flag or _dropout_ok(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_Q"], c))
                             and (prec != "ieee" or (c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"] <= 32 * 64
                                                     and c.kwargs["BLOCK_M"] <= 32))),
                  HAS_DROPOUT=flag, INPUT_PRECISION=prec):
            fallbacks.add(("wgrad", r, k))
        if _check("quant", {"M_BUCKET": mb, "P": n, "Q": k, "x_ptr": _t(dtype)},
                  lambda c: ((c.kwargs["BLOCK_M"] == 16 if mb <= lora_quant.DECODE_MAX_M else c.kwargs["BLOCK_M"] <= mb)
                             and c.kwargs["BLOCK_P"] <= max(32, np2(n)) and c.kwargs["BLOCK_Q"] <= kb
                             and (prec != "ieee" or (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_P"] <= 16 * 64
                                                     and c.kwargs["BLOCK_Q"] <= 32))),
                  OUT_DROPOUT=flag, INPUT_PRECISION=prec):
            fallbacks.add(("quant", mb, n, k))
    # A Llama-7B-sized layer (N = K = 4096, r = 64) never needs the fallback, whatever M.
    big = [f for f in fallbacks if f[0] != "wgrad" and f[2:4] == (4096, 4096) or f == ("wgrad", 64, 4096)]
    assert not big, big


@pytest.mark.parametrize("kernel,named,flags", [
    ("shrink", {"M_BUCKET": 16, "K": 4096, "x_ptr": _Elt(10**6), "a_ptr": _Elt(10**6)}, {"BLOCK_R": 16}),
    ("matmul", {"M_BUCKET": 1, "N": 4096, "K": 4096, "x_ptr": _t(torch.bfloat16)}, {}),
    ("fused", {"M_BUCKET": 1, "N": 4096, "K": 4096, "x_ptr": _t(torch.bfloat16), "a_ptr": _t(torch.float32)},
     {"BLOCK_R": 16}),
    ("wgrad", {"P": 64, "Q": 4096, "lhs_ptr": _Elt(10**6), "rhs_ptr": _Elt(10**6)}, {}),
    ("quant", {"M_BUCKET": 1, "P": 4096, "Q": 4096, "x_ptr": _t(torch.bfloat16)}, {}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_fallback_is_the_smallest_config_when_nothing_fits(kernel, named, flags):
    """Where the rule rejects every config (no BLOCK_M <= the M bucket, or no tile in shared memory),
    exactly one config is kept: the documented smallest one."""
    space, kept, accepted, smallest = _prune(kernel, named, **flags)
    assert accepted == []
    assert kept == [smallest]


def test_pruning_drops_spilling_tiles():
    """The register rules seen in ptxas -v: no 128x128 dropout tile on 8 warps, no big exact-fp32 tiles."""
    big = {"M_BUCKET": 4096, "N": 4096, "K": 4096}
    space, kept, accepted, _ = _prune("matmul", dict(big, x_ptr=_t(torch.bfloat16)), OUT_DROPOUT=True,
                                      INPUT_PRECISION="tf32")
    assert kept == accepted and kept
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 32 * c.num_warps for c in kept)
    assert any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 32 * 32 * c.num_warps for c in space)  # really pruned
    space, kept, accepted, _ = _prune("matmul", dict(big, x_ptr=_t(torch.float32)), INPUT_PRECISION="ieee")
    assert kept == accepted and kept
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 2048 and c.kwargs["BLOCK_K"] <= 32 for c in kept)
    assert any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 2048 for c in space)
