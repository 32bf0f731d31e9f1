"""LoRA embedding and the merge helper ``lora_delta_weight`` (plain torch; autograd does the rest).

An embedding lookup is a gather, not a GEMM, so there is nothing for a fused kernel to win here:
the LoRA term gathers r columns of lora_A per id and multiplies by lora_B^T, folded into the base
lookup with one addmm.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_embedding(ids: Tensor, weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scale: float,
                   padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
                   norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                   sparse: bool = False) -> Tensor:
    """``F.embedding(ids, weight) + scale * F.embedding(ids, lora_A.T) @ lora_B.T``.

    weight [V, D] (None: LoRA term only), lora_A [r, V], lora_B [D, r] (peft's lora_embedding_A/B
    layout). The embedding options apply to both lookups, as peft does (so padding_idx rows get no
    gradient in lora_A either). Result in weight's dtype (lora_B's when weight is None).
    """
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"lora_embedding: lora_A must be [r, V] and lora_B [D, r]; got lora_A "
                         f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}")
    if weight is not None and (weight.shape[0] != lora_A.shape[1] or weight.shape[1] != lora_B.shape[0]):
        raise ValueError(f"lora_embedding: weight must be [V={lora_A.shape[1]}, D={lora_B.shape[0]}] "
                         f"(from lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}); "
                         f"got {tuple(weight.shape)}")
    kw = dict(padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
              scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)
    after_A = F.embedding(ids, lora_A.t(), **kw)  # [..., r]
    D = lora_B.shape[0]
    dt = weight.dtype if weight is not None else lora_B.dtype
    a2 = after_A.reshape(-1, after_A.shape[-1]).to(dt)
    Bt = lora_B.to(dt).t()
    if weight is None:
        out = torch.mm(a2, Bt) * scale
    else:
        base = F.embedding(ids, weight, **kw).reshape(-1, D)
        out = torch.addmm(base, a2, Bt, alpha=scale)
    return out.reshape(*ids.shape, D)


def lora_delta_weight(lora_A: Tensor, lora_B: Tensor, scale: float,
                      dtype: Optional[torch.dtype] = None) -> Tensor:
    """``scale * lora_B @ lora_A`` [N, K], computed in fp32 (fp64 for fp64 inputs) for merging.

    Returned in ``dtype`` (default: the promoted dtype of lora_A and lora_B) so the caller can add it
    to a 16-bit base weight without a second rounding step being hidden here.
    """
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"lora_delta_weight: need lora_A [r, K] and lora_B [N, r]; got lora_A "
                         f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}")
    out_dtype = dtype if dtype is not None else torch.promote_types(lora_A.dtype, lora_B.dtype)
    cdt = torch.promote_types(torch.promote_types(lora_A.dtype, lora_B.dtype), torch.float32)
    delta = torch.mm(lora_B.to(cdt), lora_A.to(cdt))
    if scale != 1.0:
        delta = delta * scale
    return delta.to(out_dtype)
