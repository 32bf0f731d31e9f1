"""fastpeft.ops: the one door to the kernels.

Every LoRA computation is one call of :func:`lora` (contract.py: a base, an adapter set, a seed), run
by the custom ops of lora_op.py on the backend :func:`dispatch.choose` picks per call
(cuda > triton > torch, or FASTPEFT_BACKEND). Which code runs a LoRA layer's forward and backward:

| call (fastpeft.ops.lora)               | CUDA, 16/32-bit x                                   | CPU               |
|----------------------------------------|-----------------------------------------------------|-------------------|
| dense base, one adapter, M <= 4 rows,  | csrc/lora_gemv.cu (cuda_backend.py): S kernel, then | torch_backend.py  |
|   bf16/fp16, no dropout (decode)       |   the fused GEMV                                    |                   |
| dense or no base, other calls          | kernels/lora_fwd.py: lora_fused_kernel (M <= 64, one| torch_backend.py  |
|                                        |   adapter) or kernels/lora_shrink.py +              |                   |
|                                        |   lora_matmul_kernel (decode: K split, finished by  |                   |
|                                        |   kernels/lora_splitk.py); backward lora_bwd.py     |                   |
|                                        |   (triton_backend.py)                               |                   |
| packed base (nf4/int8/int4/fp8), one   | csrc/lora_qgemv.cu (cuda_backend.py, cuda_quant.py) | torch_backend.py, |
|   adapter or none, M <= 4, bf16/fp16   |                                                     |   dequant + GEMM  |
| packed base, other calls (QuantLinear) | kernels/lora_quant.py (lora_quant_kernel; decode:   | torch_backend.py, |
|                                        |   K split as above; fp8 on sm_89+ beyond 16 rows:   |   dequant + GEMM  |
|                                        |   W8A8 on e4m3 tensor cores, FASTPEFT_FP8_DOT)      |                   |
| DoRA (one adapter with a magnitude),   | decode as above (csrc, g in its epilogue); else the | torch_backend.py  |
|   dense or packed base                 |   kernels above with g in their shared epilogue;    |   (_dora_forward, |
|                                        |   with dropout lora_matmul_kernel or                |   _dora_backward) |
|                                        |   lora_quant_kernel, two accumulators per W tile    |                   |
| mixed batch (row_index / an adapter    | dense base, bf16/fp16, M <= 4 rows (8 when forced): | torch_backend.py  |
|   pool: each row its own adapter, -1 = |   csrc/lora_gemv.cu BGMV (each row reads its own    |   (_mixed_forward,|
|   base), dense or packed base, no      |   adapter from a table passed by value); else       |  _mixed_backward);|
|   dropout (DoRA slots: g per row in the|   kernels/lora_mixed.py on the kernels above (MIXED |   a pool call in  |
|   epilogue; their backward: torch)     |   constexpr): segmented shrink, then                |  fp32/bf16, no   |
|                                        |   lora_matmul_kernel / lora_quant_kernel on segment |   rows on a DoRA  |
|                                        |   tiles (one adapter per row tile, any M) or decode |   slot: its LoRA  |
|                                        |   tiles (M <= 16, each row its own B); backward the |   terms by csrc/  |
|                                        |   same GEMMs for dX, lora_wgrad_kernel per adapter  |   lora_mixed_cpu. |
|                                        |                                                     |   cpp (cpu_mixed) |
| lora_embedding, lora_delta_weight      | torch (a lookup and a small matmul: nothing to fuse)| torch             |
| token_embedding, token_linear,         | torch (trainable tokens: a lookup + row replace, no | torch             |
|   token_merged_weight                  |   [V, D] table copy; see trainable_tokens.py)       |                   |
| lora_weight (W + s B A as a tensor, for| torch addmm / baddbmm (one GEMM; cuBLAS on CUDA)    | torch             |
|   MHA and target_parameters)           |                                                     |                   |
| lora_conv (Conv1d/2d/3d LoRA layers,   | torch (lora_conv.py): inference without dropout and | same as CUDA      |
|   ConvSpec, DoRA via col_scale),       |   with A's geometry = the base's: one conv with     |                   |
|   lora_conv_delta_weight               |   W + s B A (fold); else the base conv + the        |                   |
|                                        |   r-channel conv + baddbmm_ into the output, custom |                   |
|                                        |   ops fastpeft::lora_conv_fwd/_bwd (mask regenerated|                   |
|                                        |   from the seed; no Triton/CUDA kernel: cuDNN convs)|                   |

This package imports neither transformers nor fastpeft's tuners or models: an inference server can
use it alone.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .contract import Adapter, AdapterSet, Base, LoraCall, adapter_seed
from .dispatch import register_backend
from .lora_embedding import lora_delta_weight, lora_embedding
from .lora_conv import ConvSpec, lora_conv, lora_conv_delta_weight
from .lora_weight import lora_weight
from .lora_op import draw_seed, lora, lora_linear, lora_quant_linear
from .plan import RowPlan
from .pool import AdapterPool
from .torch_backend import dropout_mask
from .trainable_tokens import token_embedding, token_linear, token_merged_weight


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
    adapter = Adapter(lora_A, lora_B, 1.0, float(dropout_p))
    return dispatch.choose(LoraCall(x2d, Base(weight=weight, bias=bias), (adapter,)))


__all__ = ["Adapter", "AdapterSet", "Base", "LoraCall", "adapter_seed", "current_backend", "dispatch", "draw_seed",
           "dropout_mask", "lora", "lora_delta_weight", "lora_embedding", "lora_linear", "lora_quant_linear", "lora_weight",
           "register_backend", "RowPlan", "AdapterPool", "token_embedding", "token_linear", "token_merged_weight",
           "ConvSpec", "lora_conv", "lora_conv_delta_weight"]
