"""The adapted weight W + s * B A as a tensor, for base layers that read their weight themselves.

Most LoRA layers never form W + s B A: fastpeft.ops.lora folds the adapter into the base GEMM. Two base
layers leave no GEMM to fold into, because the module's own forward reads the weight tensor directly:
nn.MultiheadAttention (its fused in_proj_weight and out_proj.weight go into
F.multi_head_attention_forward) and bare nn.Parameter targets (LoraConfig.target_parameters, e.g. MoE
expert stacks [E, in, out] used by bmm / grouped_mm inside the experts module). For them the adapter's
effect is the weight itself; this op makes it in one GEMM (addmm / baddbmm: the product s B A is added
into the copy of W inside the GEMM, no separate delta tensor), differentiable in A and B (and W).

The result has W's dtype (a module given a swapped weight expects that dtype). The GEMM runs in W's
dtype with A and B cast to it (on CUDA, 16-bit GEMMs accumulate in fp32 and round once); autocast is
off for it, since it would otherwise cast an fp32 W down.
"""
from __future__ import annotations

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def lora_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, transpose: bool = False) -> Tensor:
    """``weight + scale * lora_B @ lora_A`` (``transpose``: ``+ scale * (lora_B @ lora_A)^T``).

    2-D: weight [N, K] (transpose: [K, N]), lora_A [r, K], lora_B [N, r].
    3-D, a stack of E matrices (MoE experts): weight [E, N, K] (transpose: [E, K, N]), lora_A [E, r, K],
    lora_B [E, N, r]; expert e gets its own s * B_e A_e.
    """
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"lora_weight: weight must be fp16, bf16, fp32 or fp64; got {weight.dtype} "
                        f"(shape {tuple(weight.shape)})")
    nd = weight.dim()
    if nd not in (2, 3) or lora_A.dim() != nd or lora_B.dim() != nd:
        raise ValueError(f"lora_weight: weight, lora_A and lora_B must all be 2-D or all 3-D (a leading expert "
                         f"dim); got weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}, "
                         f"lora_B {tuple(lora_B.shape)}")
    N, r = lora_B.shape[-2], lora_B.shape[-1]
    K = lora_A.shape[-1]
    lead = tuple(weight.shape[:-2])
    want = lead + ((K, N) if transpose else (N, K))
    if lora_A.shape[-2] != r or tuple(weight.shape) != want or (nd == 3 and (lora_A.shape[0] != lead[0]
                                                                            or lora_B.shape[0] != lead[0])):
        raise ValueError(f"lora_weight: expected weight {want}{' (transpose=True)' if transpose else ''}, "
                         f"lora_A {lead + (r, K)}, lora_B {lead + (N, r)}; got weight {tuple(weight.shape)}, "
                         f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}")
    dt = weight.dtype
    A, B = lora_A.to(dt), lora_B.to(dt)
    if transpose:
        lhs, rhs = A.transpose(-2, -1), B.transpose(-2, -1)   # (B A)^T = A^T B^T
    else:
        lhs, rhs = B, A
    with torch.autocast(device_type=weight.device.type, enabled=False):
        if nd == 2:
            return torch.addmm(weight, lhs, rhs, alpha=scale)
        return torch.baddbmm(weight, lhs, rhs, alpha=scale)
