"""fastpeft.ops: the one door to the kernels.

Layers call these functions; the backend (cuda > triton > torch, or FASTPEFT_BACKEND) is picked per
call in :mod:`fastpeft.ops.dispatch`. Which code runs a LoRA layer's forward and backward:

| call                                   | CUDA, 16/32-bit x                                   | CPU               |
|----------------------------------------|-----------------------------------------------------|-------------------|
| lora_linear, M <= 4 rows, bf16/fp16,   | csrc/lora_gemv.cu (cuda_backend.py): S kernel, then  | torch_backend.py  |
|   no dropout (decode)                  |   the fused GEMV                                    |                   |
| lora_linear, other M                   | kernels/lora_fwd.py: lora_fused_kernel (M <= 64) or | torch_backend.py  |
|                                        |   kernels/lora_shrink.py + lora_matmul_kernel;      |                   |
|                                        |   backward kernels/lora_bwd.py (triton_backend.py)  |                   |
| lora_quant_linear (nf4/int8/int4 base) | kernels/lora_quant.py (lora_quant_kernel)           | lora_quant.py,    |
|                                        |                                                     |   dequant + torch |
| lora_embedding, lora_delta_weight      | torch (a lookup and a small matmul: nothing to fuse)| torch             |
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .lora_embedding import lora_delta_weight, lora_embedding
from .lora_linear import draw_seed, lora_linear
from .lora_quant import lora_quant_linear, register_quant_backend  # quantized base weights (fastpeft.quant)
from .torch_backend import dropout_mask


def current_backend(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    lora_A: Optional[Tensor] = None, lora_B: Optional[Tensor] = None,
                    dropout_p: float = 0.0) -> str:
    """Name of the backend lora_linear would use for x (and, if given, these weights).

    Raises RuntimeError like lora_linear when FASTPEFT_BACKEND forces a backend that cannot run it.
    Without lora_A/lora_B, a rank-1 adapter of x's dtype and device stands in for them.
    """
    x2d = x.reshape(-1, x.shape[-1])
    K = x2d.shape[1]
    if lora_A is None:
        lora_A = torch.empty(1, K, dtype=x.dtype, device=x.device)
    if lora_B is None:
        n = weight.shape[0] if weight is not None else 1
        lora_B = torch.empty(n, lora_A.shape[0], dtype=lora_A.dtype, device=x.device)
    return dispatch.choose(x2d, weight, bias, lora_A, lora_B, float(dropout_p))


__all__ = ["lora_linear", "lora_embedding", "lora_delta_weight", "current_backend", "dropout_mask",
           "draw_seed", "dispatch", "lora_quant_linear", "register_quant_backend"]
