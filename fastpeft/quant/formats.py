"""Quantized weight formats: how a [N, K] (out, in) weight is packed, and the reference dequantization.

This file is plain torch and imports nothing else from fastpeft: the ops layer (torch backend of
``lora_quant_linear``), QuantLinear and the tests all use these functions, and the Triton kernels are
tested against :func:`dequantize`. Four formats:

``nf4`` (bitsandbytes' layout, so bnb checkpoints import without re-quantizing)
    The weight is flattened row-major (element i = n * K + k) and cut into blocks of ``blocksize``
    elements (64 by default; the last block may be partial, so blocks need not divide K and may
    straddle rows). Each block keeps ``absmax`` (fp32) = max |w| of the block; each element becomes
    the index (0..15) of the NF4 code nearest to w / absmax. Two codes per byte, the earlier element
    (even i) in the HIGH nibble: ``qdata[i // 2] = code[2j] << 4 | code[2j + 1]``.
    Dequantization: ``w = NF4[code] * absmax[i // blocksize]`` computed in fp32, then cast.
    Double quantization (QLoRA's "dq") stores absmax itself in 8 bits: ``offset = mean(absmax)``,
    ``absmax - offset`` is cut into blocks of 256, each with its own fp32 ``absmax2``, and each
    entry becomes the index of the nearest value of the signed 8-bit dynamic code book ``CODE2``.
    Dequantized absmax = ``CODE2[q] * absmax2[j // 256] + offset`` (fp32), exactly bnb's order.
``int8``
    Symmetric, one fp32 scale per output channel: ``scale[n] = max_k |w[n, k]| / 127``,
    ``q = round(w / scale)`` in int8 [N, K]; ``w = q * scale[n]``.
``int4``
    Asymmetric, groups of ``group_size`` consecutive elements along K (the last group may be
    partial): per (n, g) a float ``scale`` and an integer ``zero``; ``w = (q - zero) * scale``.
    Packed like nf4 but per row: ``qdata [N, ceil(K / 2)]`` uint8, element k in the high nibble when
    k is even. scales [N, G] (float, fp16 for GPTQ/AWQ imports), zeros [N, G] uint8 holding the
    integer zero (0..16: GPTQ's "stored zero + 1" can reach 16, so zeros are NOT 4-bit), optional
    ``g_idx`` [K] int32 (GPTQ act-order: group of each input column; None means k // group_size).
``fp8``
    e4m3fn codes ``qdata`` [N, K] as torch.float8_e4m3fn (max 448, no inf; transformers' FP8 layout)
    and fp32 ``scales`` [ceil(N / block_n), ceil(K / block_k)]: ``w = float(q) * scales[n // block_n,
    k // block_k]`` (transformers calls them ``weight_scale_inv``: they multiply). ``blocksize`` is
    block_k and ``blocksize2`` block_n: 128 x 128 blocks ("fine-grained" FP8), per output channel
    (block_n = 1, block_k = K: scales [N, 1]) or per tensor (block_n = N, block_k = K: scales [1, 1]).
    Quantization: scale = absmax(block) / 448 (1 for an all-zero block), q = e4m3fn(w / scale)
    (round to nearest even, the cast torch does).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

FORMATS = ("nf4", "int8", "int4", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the sizes bitsandbytes accepts
NESTED_BLOCKSIZE = 256

# The 16 NF4 values (QLoRA paper, appendix: normal-distribution quantiles normalised to [-1, 1], with
# an exact zero). Written as the float32 values bitsandbytes uses, so codes and dequantization agree
# with it to the bit.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)


def _dynamic_code() -> Tensor:
    """The signed 8-bit "dynamic" code book used for double quantization (256 sorted fp32 values).

    Built from the 8-bit-optimizers recipe: magnitudes 10^-e * m for e = 0..6, where at exponent e
    the mantissas m are the 2^(6-e) midpoints of an even split of [0.1, 1]; both signs, plus 0 and
    1. The arithmetic (fp32 linspace and midpoints, then the power of ten) is the one that yields
    the same float32 values as bitsandbytes' table; tests check this bit for bit.
    """
    mags = []
    for e in range(7):
        grid = torch.linspace(0.1, 1.0, 2 ** (6 - e) + 1, dtype=torch.float32)
        mags.append((grid[:-1] + grid[1:]) / 2 * (10 ** (-e)))
    m = torch.cat(mags)
    return torch.cat([m, -m, torch.tensor([0.0, 1.0])]).sort().values


CODE2 = _dynamic_code()


def _midpoints(code: Tensor) -> Tensor:
    # Nearest-code search as a bucketize over the midpoints; a value exactly on a midpoint goes to
    # the lower code (bucketize right=False), which is the tie rule bitsandbytes' nf4 uses.
    return (code[1:] + code[:-1]) / 2


_NF4_MID = _midpoints(NF4_CODE)


class QuantizedWeight(NamedTuple):
    """A packed weight as the ops layer and its kernels see it (fields unused by a format are None).

    fmt        "nf4" | "int8" | "int4" | "fp8"
    N, K       logical weight shape [N, K] (out, in)
    qdata      nf4: uint8 [ceil(N*K/2)]; int8: int8 [N, K]; int4: uint8 [N, ceil(K/2)];
               fp8: float8_e4m3fn [N, K]
    scales     nf4: fp32 absmax [nblocks], or uint8 [nblocks] codes into code2 when double-quantized;
               int8: fp32 [N]; int4: float [N, G]; fp8: fp32 [ceil(N/blocksize2), ceil(K/blocksize)]
    zeros      int4: uint8 [N, G] integer zero points
    code       nf4: fp32 [16] code book
    absmax2    nf4 double quant: fp32 [ceil(nblocks / blocksize2)]
    code2      nf4 double quant: fp32 [256]
    offset     nf4 double quant: fp32 [] (0-dim)
    g_idx      int4 act-order: int32 [K]
    blocksize  nf4 block size; int4 group size; int8: K; fp8: scale block along K (K per channel)
    blocksize2 nf4 double-quant block size (256); fp8: scale block along N (1 per channel); else 0
    """
    fmt: str
    N: int
    K: int
    qdata: Tensor
    scales: Tensor
    zeros: Optional[Tensor] = None
    code: Optional[Tensor] = None
    absmax2: Optional[Tensor] = None
    code2: Optional[Tensor] = None
    offset: Optional[Tensor] = None
    g_idx: Optional[Tensor] = None
    blocksize: int = 0
    blocksize2: int = 0

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None


def check_format(fmt: str) -> str:
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt.lower()


# -- nibble packing -------------------------------------------------------------------------------
def pack_nibbles(codes: Tensor, pad: int = 0) -> Tensor:
    """uint8 codes 0..15 along the last dim -> bytes, two per byte, earlier element in the high nibble.

    An odd length is padded with the code ``pad`` in the low nibble of the last byte (nf4 pads with
    7, the code of 0.0, as bitsandbytes does; the padding is never read back).
    """
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1), value=pad)
    c = codes.to(torch.uint8)
    return (c[..., 0::2] << 4) | c[..., 1::2]


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``n`` codes along the last dim (uint8)."""
    hi = packed >> 4
    lo = packed & 0xF
    return torch.stack([hi, lo], dim=-1).flatten(-2)[..., :n]


# -- nf4 ------------------------------------------------------------------------------------------
def _blocks(flat: Tensor, bs: int) -> Tensor:
    """[n] -> [ceil(n / bs), bs], zero-padded (zeros change neither a block's absmax nor its codes)."""
    nb = -(-flat.numel() // bs)
    if nb * bs != flat.numel():
        flat = torch.nn.functional.pad(flat, (0, nb * bs - flat.numel()))
    return flat.view(nb, bs)


def _absmax_quantize(flat: Tensor, bs: int, code: Tensor, mid: Tensor,
                     grid16: bool = False) -> tuple[Tensor, Tensor]:
    """Blockwise absmax quantization of fp32 ``flat`` onto ``code``: (indices uint8 [n], absmax [nb])."""
    blocks = _blocks(flat, bs)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block has absmax 0: divide by 1 instead so its elements land on the zero code.
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    scaled = blocks / safe[:, None]  # division, not multiplication by 1/absmax: matches bnb's codes
    if grid16:
        # bitsandbytes' 8-bit blockwise quantizer (used for the nested absmax) does not search the
        # code book with the value itself: it first snaps the value in [-1, 1] to a 65536-point grid,
        # u = floor((v + 1) * 32767.5 + 0.5), and takes the code nearest to u / 32767.5 - 1 (a
        # lookup table over u). That differs from "nearest code" for ~0.1% of values close to a
        # midpoint; we reproduce it (fp32 arithmetic, in this order) so the nested codes are bnb's.
        u = torch.floor((scaled + 1.0) * 32767.5 + 0.5)
        scaled = u / 32767.5 - 1.0
    idx = torch.bucketize(scaled, mid).to(torch.uint8)
    if grid16:
        # bnb's 8-bit path gives code 0 to the entries of an all-zero block (its 0/0 is NaN); the
        # dequantized value is 0 either way (absmax 0), this only keeps the stored bytes identical.
        idx[absmax == 0] = 0
    return idx.view(-1)[: flat.numel()], absmax


def nf4_quantize(w: Tensor, blocksize: int = 64, double_quant: bool = False) -> dict:
    """Quantize a float weight [N, K] to nf4. Returns the QuantizedWeight fields as a dict."""
    if blocksize not in NF4_BLOCKSIZES:
        raise ValueError(f"nf4 blocksize must be one of {NF4_BLOCKSIZES} (bitsandbytes' sizes); got {blocksize}")
    N, K = w.shape
    flat = w.detach().reshape(-1).float()
    if not torch.isfinite(flat).all():
        raise ValueError(f"cannot quantize a weight [{N}, {K}] holding NaN or inf values")
    idx, absmax = _absmax_quantize(flat, blocksize, NF4_CODE.to(flat.device), _NF4_MID.to(flat.device))
    out = dict(fmt="nf4", N=N, K=K, qdata=pack_nibbles(idx, pad=7), scales=absmax, code=NF4_CODE.to(flat.device),
               blocksize=blocksize)
    if double_quant:
        out.update(double_quantize_absmax(absmax))
    return out


def double_quantize_absmax(absmax: Tensor) -> dict:
    """8-bit blockwise quantization of the nf4 absmax (blocks of 256, mean offset, dynamic code)."""
    offset = absmax.mean()
    c2 = CODE2.to(absmax.device)
    q, absmax2 = _absmax_quantize(absmax - offset, NESTED_BLOCKSIZE, c2, _midpoints(c2), grid16=True)
    return dict(scales=q, absmax2=absmax2, code2=c2, offset=offset, blocksize2=NESTED_BLOCKSIZE)


def nf4_absmax(qw: QuantizedWeight) -> Tensor:
    """The fp32 per-block absmax of an nf4 weight (undoing double quantization when present)."""
    if qw.absmax2 is None:
        return qw.scales.float()
    nb = qw.scales.numel()
    a2 = qw.absmax2.float().repeat_interleave(qw.blocksize2)[:nb]
    return qw.code2.float()[qw.scales.long()] * a2 + qw.offset.float()


def nf4_dequantize(qw: QuantizedWeight, dtype: torch.dtype) -> Tensor:
    n = qw.N * qw.K
    idx = unpack_nibbles(qw.qdata.reshape(-1), n).long()
    absmax = nf4_absmax(qw).repeat_interleave(qw.blocksize)[:n]
    return (qw.code.float()[idx] * absmax).view(qw.N, qw.K).to(dtype)


# -- int8 -----------------------------------------------------------------------------------------
def int8_quantize(w: Tensor) -> dict:
    N, K = w.shape
    wf = w.detach().float()
    absmax = wf.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return dict(fmt="int8", N=N, K=K, qdata=q, scales=scale, blocksize=K)


def int8_dequantize(qw: QuantizedWeight, dtype: torch.dtype) -> Tensor:
    return (qw.qdata.float() * qw.scales.float()[:, None]).to(dtype)


# -- int4 -----------------------------------------------------------------------------------------
def int4_quantize(w: Tensor, group_size: int = 128, scale_dtype: Optional[torch.dtype] = None) -> dict:
    """Min/max asymmetric 4-bit quantization in groups along K.

    The range always contains 0 (so zero weights stay exact); scale = (max - min) / 15 rounded to
    ``scale_dtype`` first, and the codes are computed from that rounded scale, so dequantization
    reproduces what was measured here.
    """
    N, K = w.shape
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"int4 group_size must be a positive int (or -1 for one group per row); got {group_size!r}")
    G = -(-K // group_size)
    wf = w.detach().float()
    pad = G * group_size - K
    wg = torch.nn.functional.pad(wf, (0, pad)).view(N, G, group_size)  # zero padding: see docstring
    wmin = wg.amin(dim=2).clamp(max=0.0)
    wmax = wg.amax(dim=2).clamp(min=0.0)
    scale = (wmax - wmin) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    sdt = scale_dtype or (w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32)
    scale = scale.to(sdt)
    s = scale.float()
    zero = torch.round(-wmin / s).clamp(0, 15)
    q = torch.round(wg / s[..., None] + zero[..., None]).clamp(0, 15).view(N, G * group_size)[:, :K]
    return dict(fmt="int4", N=N, K=K, qdata=pack_nibbles(q.to(torch.uint8)), scales=scale,
                zeros=zero.to(torch.uint8), blocksize=group_size)


def int4_groups(qw: QuantizedWeight) -> Tensor:
    """The group index of each input column k: g_idx, or k // group_size."""
    if qw.g_idx is not None:
        return qw.g_idx.long()
    return torch.arange(qw.K, device=qw.qdata.device) // qw.blocksize


def int4_dequantize(qw: QuantizedWeight, dtype: torch.dtype) -> Tensor:
    q = unpack_nibbles(qw.qdata, qw.K).to(torch.int32)
    g = int4_groups(qw)
    zeros = qw.zeros.to(torch.int32)[:, g]
    # (q - zero) is a small exact integer; one fp32 multiply by the scale then one cast to dtype.
    return ((q - zeros).float() * qw.scales.float()[:, g]).to(dtype)


# -- fp8 ------------------------------------------------------------------------------------------
def fp8_block(N: int, K: int, block_size) -> tuple[int, int]:
    """(block_n, block_k) for ``block_size``: None = per output channel (1, K); "tensor" = (N, K);
    an int b = (b, b); a pair (bn, bk) as transformers' weight_block_size."""
    if block_size is None or block_size == "channel":
        return 1, max(1, K)
    if block_size == "tensor":
        return max(1, N), max(1, K)
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    try:
        bn, bk = (int(b) for b in block_size)
    except (TypeError, ValueError):
        raise ValueError(f"fp8 block_size must be None (per channel), 'tensor', an int or [block_n, block_k]; "
                         f"got {block_size!r}") from None
    if bn <= 0 or bk <= 0:
        raise ValueError(f"fp8 block_size must be positive; got {block_size!r}")
    return bn, bk


def fp8_scale_shape(N: int, K: int, block_n: int, block_k: int) -> tuple[int, int]:
    return -(-N // block_n), -(-K // block_k)


def _expand_blocks(scales: Tensor, N: int, K: int, bn: int, bk: int) -> Tensor:
    """[ceil(N/bn), ceil(K/bk)] -> [N, K] (each block's value over its elements)."""
    return scales.repeat_interleave(bn, dim=0)[:N].repeat_interleave(bk, dim=1)[:, :K]


def fp8_quantize(w: Tensor, block_size=128) -> dict:
    """Quantize a float weight [N, K] to e4m3fn with one fp32 scale per [block_n, block_k] block."""
    N, K = w.shape
    bn, bk = fp8_block(N, K, block_size)
    wf = w.detach().float()
    if not torch.isfinite(wf).all():
        raise ValueError(f"cannot quantize a weight [{N}, {K}] holding NaN or inf values")
    gn, gk = fp8_scale_shape(N, K, bn, bk)
    padded = torch.nn.functional.pad(wf.abs(), (0, gk * bk - K, 0, gn * bn - N))  # zeros change no absmax
    absmax = padded.view(gn, bn, gk, bk).amax(dim=(1, 3))
    scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
    q = (wf / _expand_blocks(scale, N, K, bn, bk)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return dict(fmt="fp8", N=N, K=K, qdata=q, scales=scale, blocksize=bk, blocksize2=bn)


def fp8_dequantize(qw: QuantizedWeight, dtype: torch.dtype) -> Tensor:
    q = qw.qdata.view(FP8_DTYPE) if qw.qdata.dtype == torch.uint8 else qw.qdata
    scale = _expand_blocks(qw.scales.float(), qw.N, qw.K, qw.blocksize2, qw.blocksize)
    return (q.float() * scale).to(dtype)


# -- dispatch -------------------------------------------------------------------------------------
def quantize_weight(w: Tensor, fmt: str, blocksize: int = 64, double_quant: bool = False,
                    group_size: int = 128, fp8_block_size=128) -> QuantizedWeight:
    """Quantize a float [N, K] weight to ``fmt`` (fp8: ``fp8_block_size``, see :func:`fp8_block`)."""
    fmt = check_format(fmt)
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight [out, in]; got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"quantize expects a float weight; got {w.dtype}")
    if fmt == "nf4":
        return QuantizedWeight(**nf4_quantize(w, blocksize, double_quant))
    if fmt == "int8":
        return QuantizedWeight(**int8_quantize(w))
    if fmt == "fp8":
        return QuantizedWeight(**fp8_quantize(w, fp8_block_size))
    return QuantizedWeight(**int4_quantize(w, w.shape[1] if group_size == -1 else group_size))


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The [N, K] weight in ``dtype`` (the reference every kernel is checked against)."""
    if qw.fmt == "nf4":
        return nf4_dequantize(qw, dtype)
    if qw.fmt == "int8":
        return int8_dequantize(qw, dtype)
    if qw.fmt == "int4":
        return int4_dequantize(qw, dtype)
    if qw.fmt == "fp8":
        return fp8_dequantize(qw, dtype)
    raise ValueError(f"unknown quantization format {qw.fmt!r}; expected one of {', '.join(FORMATS)}")


def expected_shapes(fmt: str, N: int, K: int, blocksize: int, double_quant: bool = False,
                    act_order: bool = False, blocksize2: int = 0) -> dict:
    """Shapes (and dtypes where fixed) of every packed field for a [N, K] layer: used to check
    buffers coming from checkpoints and importers, so a mismatch names the field and both shapes.
    fp8: blocksize = block_k, blocksize2 = block_n."""
    if fmt == "fp8":
        if blocksize <= 0 or blocksize2 <= 0:
            raise ValueError(f"fp8 [{N}, {K}] needs positive scale blocks; got block_n={blocksize2}, "
                             f"block_k={blocksize}")
        return {"qdata": ((N, K), FP8_DTYPE), "scales": (fp8_scale_shape(N, K, blocksize2, blocksize), torch.float32)}
    if fmt == "nf4":
        nb = -(-N * K // blocksize)
        out = {"qdata": ((-(-N * K // 2),), torch.uint8), "code": ((16,), torch.float32)}
        if double_quant:
            out["scales"] = ((nb,), torch.uint8)
            out["absmax2"] = ((-(-nb // NESTED_BLOCKSIZE),), torch.float32)
            out["code2"] = ((256,), torch.float32)
            out["offset"] = ((), torch.float32)
        else:
            out["scales"] = ((nb,), torch.float32)
        return out
    if fmt == "int8":
        return {"qdata": ((N, K), torch.int8), "scales": ((N,), None)}
    G = -(-K // blocksize)
    out = {"qdata": ((N, -(-K // 2)), torch.uint8), "scales": ((N, G), None), "zeros": ((N, G), torch.uint8)}
    if act_order:
        out["g_idx"] = ((K,), torch.int32)
    return out


def packed_nbytes(qw: QuantizedWeight) -> int:
    return sum(t.numel() * t.element_size() for t in
               (qw.qdata, qw.scales, qw.zeros, qw.code, qw.absmax2, qw.code2, qw.offset, qw.g_idx)
               if t is not None)


def bits_per_param(qw: QuantizedWeight) -> float:
    return 8.0 * packed_nbytes(qw) / max(1, qw.N * qw.K)


__all__ = ["FORMATS", "NF4_CODE", "CODE2", "QuantizedWeight", "quantize_weight", "dequantize", "pack_nibbles",
           "unpack_nibbles", "nf4_absmax", "expected_shapes", "packed_nbytes", "check_format", "FP8_MAX", "FP8_DTYPE",
           "fp8_block"]
