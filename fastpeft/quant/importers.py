"""Import already-quantized weights without re-quantizing: the codes are only repacked.

bitsandbytes Linear4bit (nf4)  -> QuantLinear nf4 (same layout: codes, absmax and the nested 8-bit
                                  statistics are taken over as they are)
GPTQ (qweight, qzeros, scales, g_idx) -> QuantLinear int4
AWQ  (qweight, qzeros, scales)        -> QuantLinear int4

GPTQ layout ("v1", AutoGPTQ / optimum checkpoints), N = out, K = in, G groups, 4 bits:
    qweight int32 [K / 8, N]: packed along K; input row k of column n is in qweight[k // 8, n] at
            bits 4 * (k % 8) .. +3 (lowest nibble = first row).
    qzeros  int32 [G, N / 8]: packed along N the same way (column n in nibble n % 8) and stored as
            zero - 1, so the real zero point is stored + 1 (it can be 16).
    scales  fp16 [G, N]; g_idx int32 [K]: the group of input row k (k // group_size unless the
            model was quantized with act order / desc_act, where it is a permutation-like map).
    W[n, k] = scales[g, n] * (q[k, n] - (z[g, n] + 1)),  g = g_idx[k]
AWQ layout (GEMM version): packed along N with an interleaved nibble order.
    qweight int32 [K, N / 8]: the 8 columns 8j .. 8j+7 of row k share qweight[k, j]; nibble i (bits
            4i..4i+3) holds column 8j + AWQ_ORDER[i], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7].
    qzeros  int32 [G, N / 8], same packing, zero used as stored.  scales fp16 [G, N].
    W[n, k] = scales[k // group_size, n] * (q[k, n] - z[k // group_size, n])
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..utils.modules import get_submodules
from .formats import NESTED_BLOCKSIZE, QuantizedWeight, pack_nibbles
from .linear import QuantLinear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _nibbles_int32(packed: Tensor) -> Tensor:
    """int32 [..., P] -> int32 [..., P, 8]: nibble i = bits 4i..4i+3 (as unsigned 0..15)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF


def _need(name: str, t: Tensor, shape: tuple, dtype=None, what: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{what}: {name} has dtype {t.dtype}, expected {dtype}")


def _int4(N: int, K: int, q_nk: Tensor, zeros_ng: Tensor, scales_ng: Tensor, group_size: int,
          g_idx: Optional[Tensor], bias: Optional[Tensor]) -> QuantLinear:
    qw = QuantizedWeight("int4", N, K, pack_nibbles(q_nk.to(torch.uint8)).contiguous(), scales_ng.contiguous(),
                         zeros_ng.to(torch.uint8).contiguous(), g_idx=g_idx, blocksize=group_size)
    cdt = scales_ng.dtype if scales_ng.is_floating_point() else torch.float16
    return QuantLinear.from_quantized(qw, bias, compute_dtype=cdt)


def from_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Optional[Tensor] = None,
              bias: Optional[Tensor] = None, bits: int = 4, group_size: Optional[int] = None) -> QuantLinear:
    """An int4 QuantLinear from GPTQ tensors (layout in the module docstring).

    group_size: taken from g_idx / the shapes when not given. An act-order g_idx (not k // group_size)
    is kept as the layer's g_idx. Only 4-bit GPTQ is supported.
    """
    what = "GPTQ import"
    if bits != 4:
        raise ValueError(f"{what}: only 4-bit GPTQ is supported; got bits={bits}")
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(f"{what}: qweight must be int32 [K/8, N]; got {qweight.dtype} {tuple(qweight.shape)}")
    K8, N = qweight.shape
    K = K8 * 8
    if scales.dim() != 2 or scales.shape[1] != N:
        raise ValueError(f"{what}: scales must be [G, N={N}] (N from qweight {tuple(qweight.shape)}); "
                         f"got {tuple(scales.shape)}")
    G = scales.shape[0]
    if N % 8:
        raise ValueError(f"{what}: N={N} is not a multiple of 8, so qzeros cannot be packed along N")
    _need("qzeros", qzeros, (G, N // 8), torch.int32, what)
    if group_size is None:
        group_size = K if G == 1 else -(-K // G)
    if -(-K // group_size) != G:
        raise ValueError(f"{what}: group_size={group_size} gives {-(-K // group_size)} groups for K={K}, but "
                         f"scales has {G} rows")
    if g_idx is not None:
        _need("g_idx", g_idx, (K,), None, what)
        g_idx = g_idx.to(torch.int32)
        if g_idx.min() < 0 or g_idx.max() >= G:
            raise ValueError(f"{what}: g_idx values must be in [0, {G}); got {int(g_idx.min())}..{int(g_idx.max())}")
        if torch.equal(g_idx.long(), torch.arange(K, device=g_idx.device) // group_size):
            g_idx = None  # the plain layout: no gather needed
    q = _nibbles_int32(qweight).permute(0, 2, 1).reshape(K, N)          # [K/8, 8, N] -> [K, N]
    z = _nibbles_int32(qzeros).reshape(G, N) + 1                         # stored zero - 1 -> zero
    return _int4(N, K, q.t(), z.t(), scales.t(), group_size, g_idx, bias)


def from_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor, bias: Optional[Tensor] = None,
             group_size: int = 128, bits: int = 4) -> QuantLinear:
    """An int4 QuantLinear from AWQ (GEMM) tensors (layout in the module docstring)."""
    what = "AWQ import"
    if bits != 4:
        raise ValueError(f"{what}: only 4-bit AWQ is supported; got bits={bits}")
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(f"{what}: qweight must be int32 [K, N/8]; got {qweight.dtype} {tuple(qweight.shape)}")
    K, N8 = qweight.shape
    N = N8 * 8
    if group_size == -1:
        group_size = K
    G = -(-K // group_size)
    _need("scales", scales, (G, N), None, what + f" (K={K}, N={N}, group_size={group_size})")
    _need("qzeros", qzeros, (G, N8), torch.int32, what + f" (K={K}, N={N}, group_size={group_size})")
    inv = torch.tensor([AWQ_ORDER.index(c) for c in range(8)], device=qweight.device)  # column -> nibble

    def unpack(t: Tensor) -> Tensor:  # [R, N/8] -> [R, N] in column order
        return _nibbles_int32(t)[..., inv].reshape(t.shape[0], N)

    return _int4(N, K, unpack(qweight).t(), unpack(qzeros).t(), scales.t(), group_size, None, bias)


def from_bnb(layer: nn.Module) -> QuantLinear:
    """An nf4 QuantLinear from a bitsandbytes Linear4bit (Params4bit weight with its QuantState)."""
    w = layer.weight
    st = getattr(w, "quant_state", None)
    name = type(layer).__name__
    if st is None:
        raise ValueError(f"{name}.weight has no quant_state: the layer is not quantized yet (move it to a device "
                         f"or quantize it with bitsandbytes first)")
    if st.quant_type != "nf4":
        raise ValueError(f"{name} uses bitsandbytes quant_type={st.quant_type!r}; fastpeft imports nf4 only")
    N, K = (int(s) for s in st.shape)
    nested = getattr(st, "nested", False) or st.state2 is not None
    qw = QuantizedWeight("nf4", N, K, w.data.reshape(-1).contiguous(), st.absmax.contiguous(),
                         code=st.code.float(), blocksize=int(st.blocksize))
    if nested:
        s2 = st.state2
        if int(s2.blocksize) != NESTED_BLOCKSIZE:
            raise ValueError(f"{name}: nested absmax block size {s2.blocksize}; fastpeft expects {NESTED_BLOCKSIZE}")
        off = st.offset if torch.is_tensor(st.offset) else torch.tensor(float(st.offset))
        qw = qw._replace(absmax2=s2.absmax.float(), code2=s2.code.float(), offset=off.float().reshape(()),
                         blocksize2=NESTED_BLOCKSIZE)
    bias = layer.bias.data if getattr(layer, "bias", None) is not None else None
    return QuantLinear.from_quantized(qw, bias, compute_dtype=st.dtype)


def import_bnb(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes Linear4bit in ``model`` by a QuantLinear (in place); returns the names."""
    done = []
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ in ("Linear4bit", "LinearNF4") and hasattr(mod.weight, "quant_state"):
            parent, _, attr = get_submodules(model, name)
            setattr(parent, attr, from_bnb(mod))
            done.append(name)
    return done
