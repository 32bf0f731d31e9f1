"""QuantLinear: an nn.Linear whose weight is stored packed (nf4 / int8 / int4 / fp8, see formats.py).

The packed weight and its statistics are buffers, so they save and load with state_dict (and move
with .to()); only the bias, if any, stays a (frozen) float parameter. Buffer names are the
QuantizedWeight field names, with the packed codes under ``weight``:

    nf4   weight (uint8 [ceil(N*K/2)]), scales, code[, absmax2, code2, offset]   (double quant)
    int8  weight (int8 [N, K]), scales
    int4  weight (uint8 [N, ceil(K/2)]), scales, zeros[, g_idx]                  (act order)
    fp8   weight (float8_e4m3fn [N, K]), scales (fp32 [ceil(N/block_n), ceil(K/block_k)])

It subclasses nn.Linear (as bitsandbytes' Linear4bit does) so that code looking for linear layers,
such as LoRA's ``target_modules="all-linear"``, still finds it; it never holds a float weight.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops  # ops imports only quant.formats (a leaf): no cycle
from . import formats
from .formats import QuantizedWeight, check_format, expected_shapes

_FIELDS = ("scales", "zeros", "code", "absmax2", "code2", "offset", "g_idx")


class QuantLinear(nn.Linear):
    """y = x W^T + b with W = dequantize(packed buffers), computed in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "nf4",
                 blocksize: int = 64, double_quant: bool = False, group_size: int = 128,
                 act_order: bool = False, compute_dtype: torch.dtype = torch.float32,
                 scale_dtype: torch.dtype = torch.float32, device=None, fp8_block_size=128) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no float weight to allocate
        fmt = check_format(fmt)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.fmt = fmt
        if fmt == "nf4":
            if blocksize not in formats.NF4_BLOCKSIZES:
                raise ValueError(f"nf4 blocksize must be one of {formats.NF4_BLOCKSIZES}; got {blocksize}")
            self.blocksize = int(blocksize)
        elif fmt == "int4":
            if group_size == -1:
                group_size = self.in_features
            if not isinstance(group_size, int) or group_size <= 0:
                raise ValueError(f"int4 group_size must be a positive int or -1; got {group_size!r}")
            self.blocksize = int(group_size)
        elif fmt == "fp8":
            # fp8 scale blocks: blocksize along K, block_n along N (formats.fp8_block: None = per channel)
            self.block_n, self.blocksize = formats.fp8_block(self.out_features, self.in_features, fp8_block_size)
        else:
            self.blocksize = self.in_features
        if fmt != "fp8":
            self.block_n = 0
        self.double_quant = bool(double_quant) and fmt == "nf4"
        self.act_order = bool(act_order) and fmt == "int4"
        self.compute_dtype = compute_dtype  # the dtype dequantize() returns by default (the original weight's)
        shapes = expected_shapes(fmt, self.out_features, self.in_features, self.blocksize, self.double_quant,
                                 self.act_order, self.block_n)
        for name in ("weight",) + _FIELDS:
            key = "qdata" if name == "weight" else name
            if key in shapes:
                shape, dt = shapes[key]
                self.register_buffer(name, torch.zeros(shape, dtype=dt or scale_dtype, device=device))
            else:
                self.register_buffer(name, None)
        if fmt == "nf4":
            self.code.copy_(formats.NF4_CODE)
            if self.double_quant:
                self.code2.copy_(formats.CODE2)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[Tensor] = None,
                       compute_dtype: Optional[torch.dtype] = None) -> "QuantLinear":
        """A QuantLinear holding ``qw`` (tensors used as they are, after checking their shapes)."""
        cdt = compute_dtype or (bias.dtype if bias is not None and bias.is_floating_point() else torch.float32)
        m = cls(qw.K, qw.N, bias=bias is not None, fmt=qw.fmt, blocksize=qw.blocksize if qw.fmt == "nf4" else 64,
                double_quant=qw.absmax2 is not None,
                group_size=qw.blocksize if qw.fmt == "int4" else 128, act_order=qw.g_idx is not None,
                compute_dtype=cdt, scale_dtype=qw.scales.dtype, device="meta",
                fp8_block_size=(qw.blocksize2, qw.blocksize) if qw.fmt == "fp8" else 128)
        m.set_quantized(qw)
        if bias is not None:
            if tuple(bias.shape) != (qw.N,):
                raise ValueError(f"bias must be [{qw.N}] for a [{qw.N}, {qw.K}] weight; got {tuple(bias.shape)}")
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, blocksize: int = 64, double_quant: bool = False,
                    group_size: int = 128, fp8_block_size=128) -> "QuantLinear":
        """Quantize an nn.Linear (its weight [out, in]) to ``fmt`` (fp8 scale blocks: formats.fp8_block)."""
        w = linear.weight
        if w.dim() != 2 or tuple(w.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"{type(linear).__name__} weight has shape {tuple(w.shape)}; expected "
                             f"[out_features={linear.out_features}, in_features={linear.in_features}]")
        qw = formats.quantize_weight(w.data, fmt, blocksize=blocksize, double_quant=double_quant,
                                     group_size=group_size, fp8_block_size=fp8_block_size)
        return cls.from_quantized(qw, linear.bias.data if linear.bias is not None else None, compute_dtype=w.dtype)

    def set_quantized(self, qw: QuantizedWeight) -> None:
        """Take the packed fields of ``qw`` as this layer's buffers, after checking every shape."""
        if qw.fmt != self.fmt or (qw.N, qw.K) != (self.out_features, self.in_features):
            raise ValueError(f"packed weight is {qw.fmt} [{qw.N}, {qw.K}] but this QuantLinear is {self.fmt} "
                             f"[{self.out_features}, {self.in_features}]")
        check_packed(qw, self.blocksize, self.double_quant, self.act_order, self.block_n)
        self.weight = qw.qdata
        for name in _FIELDS:
            setattr(self, name, getattr(qw, name))

    # -- use ------------------------------------------------------------------------------------------
    def quantized(self) -> QuantizedWeight:
        """The packed weight as a QuantizedWeight (views of the buffers, no copies)."""
        return QuantizedWeight(self.fmt, self.out_features, self.in_features, self.weight, self.scales, self.zeros,
                               self.code, self.absmax2, self.code2, self.offset, self.g_idx,
                               self.blocksize, formats.NESTED_BLOCKSIZE if self.double_quant else self.block_n)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The float weight [out, in] (in ``compute_dtype`` unless told), freshly from the buffers."""
        return formats.dequantize(self.quantized(), dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        # Through the LoRA op with no adapters, so a backend's fused dequant-GEMM kernel also serves the
        # layers LoRA does not target (triton: W dequantized in registers; torch: dequantize + one GEMM;
        # dX flows through W, no gradient to the packed buffers).
        return ops.lora(x, ops.Base.quantized(self.quantized(), self.bias), (), fn=f"{type(self).__name__}.forward")

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() must not cast the packed statistics (absmax, scales, code
        # books): that would silently change every dequantized value. Buffers only follow device moves;
        # the bias and compute_dtype follow float casts (the layer then computes in the new dtype).
        bufs = dict(self._buffers)
        for name in bufs:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, b in bufs.items():
                if b is not None:
                    moved = fn(b)
                    if moved.dtype != b.dtype:
                        moved = b.to(moved.device)
                    b = moved
                self._buffers[name] = b
        probe = fn(torch.zeros((), dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def packed_nbytes(self) -> int:
        return formats.packed_nbytes(self.quantized())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Packed buffers are integer codes: a dtype mismatch is a different format, not something to cast.
        for name, buf in self._buffers.items():
            t = state_dict.get(prefix + name)
            # (fp8 codes are a float dtype but codes all the same: a bf16 "weight" there is a different checkpoint)
            codes = not buf.is_floating_point() or buf.dtype == formats.FP8_DTYPE if buf is not None else False
            if buf is not None and t is not None and t.dtype != buf.dtype and codes:
                error_msgs.append(f"dtype mismatch for {prefix + name}: checkpoint has {t.dtype}, this {self.fmt} "
                                  f"QuantLinear [{self.out_features}, {self.in_features}] expects {buf.dtype}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        extra = {"nf4": f"blocksize={self.blocksize}, double_quant={self.double_quant}",
                 "int4": f"group_size={self.blocksize}, act_order={self.act_order}", "int8": "",
                 "fp8": f"block_size=[{self.block_n}, {self.blocksize}]"}[self.fmt]
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fmt={self.fmt}" + (f", {extra}" if extra else ""))


def check_packed(qw: QuantizedWeight, blocksize: int, double_quant: bool, act_order: bool, block_n: int = 0) -> None:
    """ValueError naming the field and both shapes when a packed tensor does not fit the layer."""
    if qw.fmt in ("nf4", "int4") and qw.blocksize != blocksize:
        raise ValueError(f"{qw.fmt} packed weight has block/group size {qw.blocksize}, the layer {blocksize}")
    if qw.fmt == "fp8" and (qw.blocksize2, qw.blocksize) != (block_n, blocksize):
        raise ValueError(f"fp8 packed weight [{qw.N}, {qw.K}] has scale blocks [{qw.blocksize2}, {qw.blocksize}], "
                         f"the layer [{block_n}, {blocksize}]")
    shapes = expected_shapes(qw.fmt, qw.N, qw.K, blocksize, double_quant, act_order, block_n)
    for key, (shape, dt) in shapes.items():
        t = getattr(qw, key)
        if t is None:
            raise ValueError(f"{qw.fmt} weight [{qw.N}, {qw.K}]: packed field {key!r} is missing (expected shape "
                             f"{tuple(shape)})")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{qw.fmt} weight [{qw.N}, {qw.K}] (block/group size {blocksize}): packed field "
                             f"{key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if dt is not None and t.dtype != dt:
            raise ValueError(f"{qw.fmt} weight [{qw.N}, {qw.K}]: packed field {key!r} has dtype {t.dtype}, "
                             f"expected {dt}")
        if dt is None and not t.is_floating_point():
            raise ValueError(f"{qw.fmt} weight [{qw.N}, {qw.K}]: packed field {key!r} must be a float tensor; "
                             f"got {t.dtype}")
    if act_order:
        g = qw.g_idx.long()
        G = -(-qw.K // blocksize)
        if g.numel() and (g.min() < 0 or g.max() >= G):
            raise ValueError(f"int4 g_idx values must lie in [0, {G}) for K={qw.K}, group size {blocksize}; "
                             f"got min {int(g.min())}, max {int(g.max())}")
