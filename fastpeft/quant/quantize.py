"""``fastpeft.quantize(model, fmt, ...)``: replace a model's nn.Linear layers by QuantLinear in place."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Union

import torch
from torch import nn

from ..utils.modules import get_submodules, name_matches
from .formats import NF4_BLOCKSIZES, check_format, fp8_block
from .linear import QuantLinear


@dataclass
class QuantizeReport:
    """What quantize() did. Byte counts cover the replaced layers (weight + bias, packed buffers after)."""
    fmt: str
    layers: list = field(default_factory=list)   # names of the replaced layers
    skipped: list = field(default_factory=list)  # linear layers left in 16/32-bit (skip_modules / not targeted)
    params: int = 0                              # weight elements quantized
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def bytes_per_param_before(self) -> float:
        return self.bytes_before / max(1, self.params)

    @property
    def bytes_per_param_after(self) -> float:
        return self.bytes_after / max(1, self.params)

    def __str__(self) -> str:
        return (f"quantize({self.fmt}): {len(self.layers)} linear layers, {self.params} weights: "
                f"{self.bytes_before} -> {self.bytes_after} bytes "
                f"({self.bytes_per_param_before:.3f} -> {self.bytes_per_param_after:.3f} bytes/param); "
                f"left unquantized: {self.skipped}")


def _matches(name: str, patterns: Union[None, str, Iterable[str]]) -> bool:
    # Same rules as LoraConfig.target_modules; None matches nothing.
    return patterns is not None and name_matches(name, patterns)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize(model: nn.Module, fmt: str, target_modules: Union[None, str, Iterable[str]] = None,
             skip_modules: Union[None, str, Iterable[str]] = ("lm_head",), blocksize: int = 64,
             double_quant: bool = False, group_size: int = 128, progressbar: bool = True,
             fp8_block_size=128) -> QuantizeReport:
    """Quantize the nn.Linear layers of ``model`` in place to ``fmt`` ("nf4", "int8", "int4" or "fp8").

    target_modules: None = every nn.Linear; else names/suffixes (list) or a full-match regex (str).
    skip_modules: layers never quantized (same matching), by default the output head.
    blocksize: nf4 block size (32..4096, a power of two); double_quant: nf4 8-bit absmax.
    group_size: int4 group along K (-1 = one group per row); a K it does not divide gets a partial
    last group. fp8_block_size: fp8 scale blocks, 128 (128x128, transformers' fine-grained FP8),
    an int b (b x b), [block_n, block_k], None (one scale per output channel) or "tensor".
    Returns a QuantizeReport with bytes per parameter before and after.
    """
    fmt = check_format(fmt)
    if fmt == "nf4" and blocksize not in NF4_BLOCKSIZES:
        raise ValueError(f"nf4 blocksize must be one of {NF4_BLOCKSIZES}; got {blocksize!r}")
    if fmt == "int4" and (not isinstance(group_size, int) or (group_size <= 0 and group_size != -1)):
        raise ValueError(f"int4 group_size must be a positive int or -1 (per row); got {group_size!r}")
    if fmt == "fp8":
        fp8_block(1, 1, fp8_block_size)  # a bad block size fails here, naming it, before any layer changes
    report = QuantizeReport(fmt=fmt)
    todo = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:  # exact type: not QuantLinear, not LoRA/other subclasses
            continue
        if _matches(name, skip_modules) or (target_modules is not None and not _matches(name, target_modules)):
            report.skipped.append(name)
            continue
        todo.append(name)
    if target_modules is not None and not todo:
        raise ValueError(f"quantize: target_modules={target_modules!r} matched no nn.Linear layer; linear layers "
                         f"in the model: {report.skipped[:10]}")
    it = todo
    if progressbar:
        try:
            from tqdm.auto import tqdm
            it = tqdm(todo, desc=f"Quantizing to {fmt}", unit="layer")
        except ImportError:  # tqdm is optional
            pass
    for name in it:
        parent, lin, attr = get_submodules(model, name)
        with torch.no_grad():
            q = QuantLinear.from_linear(lin, fmt, blocksize=blocksize, double_quant=double_quant, group_size=group_size,
                                     fp8_block_size=fp8_block_size)
        report.layers.append(name)
        report.params += lin.weight.numel()
        report.bytes_before += _nbytes(lin.weight, lin.bias)
        report.bytes_after += q.packed_nbytes() + _nbytes(q.bias)
        setattr(parent, attr, q)
    return report


def merge_and_unload(model: nn.Module, requantize: bool = False, **kwargs) -> nn.Module:
    """``model.merge_and_unload(**kwargs)`` for a PeftModel/LoraModel over quantized layers.

    requantize=False: each QuantLinear base comes back as a 16-bit nn.Linear (compute dtype) holding
    dequantize(W) + the adapter deltas. requantize=True: that merged weight is quantized again to the
    base's format (a UserWarning per layer gives the measured max error) and a QuantLinear comes back.
    """
    # The LoRA-over-QuantLinear layers (fastpeft.tuners.lora.quant_linear.QuantLoraLinear) are found by
    # the switch they carry rather than by class: fastpeft.quant sits below the tuners and never imports them.
    layers = [m for m in model.modules() if hasattr(m, "requantize_on_merge")]
    for m in layers:
        m.requantize_on_merge = bool(requantize)
    try:
        return model.merge_and_unload(**kwargs)
    finally:
        for m in layers:
            m.requantize_on_merge = False
