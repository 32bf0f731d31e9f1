"""BD-LoRA (peft's ``use_bdlora=BdLoraConfig(...)``): lora_A or lora_B of a module is block-diagonal.

Why it exists: under tensor parallelism a row-sharded layer (o_proj, down_proj) with a block-diagonal
lora_A, or a column-sharded one (q/k/v, up, gate) with a block-diagonal lora_B, needs no extra
all-gather for its adapter. Which factor is block-diagonal is chosen per module by substring match of
the module name (``pattern in name``) against ``target_modules_bd_a`` / ``target_modules_bd_b``.

File format (peft 0.21.2's): a block-diagonal factor with n blocks is stored as only its diagonal
blocks stacked along the output dimension, under the usual key ``lora_A.weight`` / ``lora_B.weight``:

    lora_A [r, in / n]   (block i maps inputs i*in/n.. to ranks i*r/n..)
    lora_B [out, r / n]  (block i maps ranks i*r/n.. to outputs i*out/n..)

Compute: the factor is expanded to its dense form (``torch.block_diag`` of the n blocks: zeros off the
diagonal) and the adapter is an ordinary LoRA term of the fused ``fastpeft.ops.lora`` call; the expansion
is in the autograd graph, so gradients reach only the stored blocks. It costs the FLOPs of a plain LoRA of
the same rank (a dense r x in / out x r factor instead of n blocks of it), against a base GEMM that is
in/r times larger; merging adds s B_dense A_dense.

peft's behaviour kept: a block-diagonal A is drawn Kaiming-uniform (a = 0, fan_in = in / n) and a
block-diagonal B starts at zero, whatever init_lora_weights says; both in the base weight's dtype and
device (PeftModel's adapter autocast later makes them fp32, as for every adapter). Only lora.Linear over
nn.Linear takes it; quantized linears (peft's bnb / GPTQ layers) ignore it; embeddings, convolutions and
MultiheadAttention refuse it as peft does.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .plain import PlainLora


@dataclass
class BdLoraConfig:
    """Which LoRA factor is block-diagonal where (peft 0.21.2's field names and defaults: the keys of
    ``use_bdlora`` in adapter_config.json)."""

    target_modules_bd_a: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Name substrings of modules whose lora_A is block-diagonal (row-sharded layers in "
                          "tensor-parallel serving, e.g. ['o_proj', 'down_proj'])."},
    )
    target_modules_bd_b: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Name substrings of modules whose lora_B is block-diagonal (column-sharded layers, e.g. "
                          "['q_proj', 'k_proj', 'v_proj', 'up_proj', 'gate_proj'])."},
    )
    nblocks: int = field(
        default=1,
        metadata={"help": "Number of diagonal blocks (the tensor-parallel degree the adapter is served with)."},
    )
    match_strict: bool = field(
        default=True,
        metadata={"help": "Refuse a target module that matches neither list; False lets such modules get a "
                          "plain LoRA."},
    )

    def __post_init__(self):
        both = set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or [])
        if both:  # peft's check (and words): equal entries only; substring overlaps are caught per module
            raise ValueError("Found overlapping modules in target_modules_bd lists:"
                             f"{self.target_modules_bd_a} (A) and {self.target_modules_bd_b} (B).")


def as_bdlora_config(value: Any) -> Optional[BdLoraConfig]:
    """LoraConfig.use_bdlora as a BdLoraConfig: None, one of ours, a dict (read from JSON; keys the class
    does not take are dropped, as peft drops them) or another object with the same fields (peft's class)."""
    if value is None or isinstance(value, BdLoraConfig):
        return value
    names = [f.name for f in dataclasses.fields(BdLoraConfig) if f.init]
    if isinstance(value, dict):
        return BdLoraConfig(**{k: v for k, v in value.items() if k in names})
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and type(value).__name__ == "BdLoraConfig":
        return BdLoraConfig(**{n: getattr(value, n) for n in names if hasattr(value, n)})
    raise TypeError(f"`BdLoraConfig` must be a `BdLoraConfig`, a dict, or None. (use_bdlora got "
                    f"{type(value).__name__}: {value!r})")


class BlockDiagonalLinear(nn.Module):
    """A block-diagonal [out, in] factor stored as its n diagonal blocks stacked: ``weight`` [out, in / n].

    The name and the parameter name are peft's (state_dict key ``...lora_A.<adapter>.weight``). The LoRA
    layer does not call forward (it expands the factor into the fused op); forward is there for code that
    calls ``layer.lora_A[name](x)`` directly, as with an nn.Linear factor."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, *, zero: bool,
                 dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        if in_features % nblocks or out_features % nblocks:
            # peft's words (its BlockDiagonalLinear refuses the same shapes)
            raise ValueError(f"self.in_features={in_features} or self.out_features={out_features} not divisible "
                             f"by {nblocks}")
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, dtype=dtype, device=device))
        if self.weight.device.type != "meta":  # low_cpu_mem_usage: a load fills it
            with torch.no_grad():
                if zero:
                    self.weight.zero_()
                else:  # Kaiming-uniform with a = 0 over fan_in = in / n (peft's draw for a block-diagonal A)
                    bound = math.sqrt(6.0 / (in_features // nblocks))
                    self.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.weight.reshape(self.nblocks, self.out_features // self.nblocks, -1)  # [n, out/n, in/n]
        xb = x.reshape(*x.shape[:-1], self.nblocks, self.in_features // self.nblocks)
        return torch.einsum("...ni,noi->...no", xb, blocks.to(x.dtype)).reshape(*x.shape[:-1], self.out_features)


def expand_blocks(weight: torch.Tensor, nblocks: int, dense_shape: tuple, what: str) -> torch.Tensor:
    """The dense [out, in] form of a stored block-diagonal factor ``weight`` [out, in / nblocks]."""
    out_f, in_f = dense_shape
    if weight.dim() != 2 or tuple(weight.shape) != (out_f, in_f // nblocks):
        raise ValueError(f"BD-LoRA {what}: stored weight is {tuple(weight.shape)}, expected "
                         f"[{out_f}, {in_f} / nblocks={nblocks} = {in_f // nblocks}] (the {nblocks} diagonal blocks "
                         f"of a [{out_f}, {in_f}] factor, stacked)")
    return torch.block_diag(*weight.chunk(nblocks, dim=0))


class BdLora(PlainLora):
    """A LoRA adapter whose lora_A (side "A") or lora_B (side "B") is block-diagonal with ``nblocks`` blocks."""

    name = "bdlora"

    def __init__(self, side: str, nblocks: int) -> None:
        if side not in ("A", "B"):
            raise ValueError(f"BdLora side must be 'A' or 'B'; got {side!r}")
        if not isinstance(nblocks, int) or isinstance(nblocks, bool) or nblocks <= 0:
            raise ValueError(f"BdLoraConfig.nblocks must be a positive int; got {nblocks!r}")
        self.side, self.nblocks = side, nblocks

    def init_adapter(self, layer, adapter_name: str) -> None:
        """Replace the chosen factor by a BlockDiagonalLinear (peft's init: A Kaiming, B zero)."""
        r = layer.r[adapter_name]
        old = (layer.lora_A if self.side == "A" else layer.lora_B)[adapter_name]
        kw = dict(dtype=old.weight.dtype, device=old.weight.device)
        if self.side == "A":
            layer.lora_A[adapter_name] = BlockDiagonalLinear(layer.in_features, r, self.nblocks, zero=False, **kw)
        else:
            layer.lora_B[adapter_name] = BlockDiagonalLinear(r, layer.out_features, self.nblocks, zero=True, **kw)
            # peft's block-diagonal B has no bias, so a lora_bias adapter adds none there (peft's forward adds
            # none either); the layer must not look for one
            layer.lora_bias[adapter_name] = False

    def op_weights(self, layer, adapter_name: str) -> tuple:
        A, B = layer._adapter_weights(adapter_name)
        r, what = layer.r[adapter_name], f"adapter {adapter_name!r} ({type(layer).__name__})"
        if self.side == "A":
            return expand_blocks(A, self.nblocks, (r, layer.in_features), f"lora_A of {what}"), B
        return A, expand_blocks(B, self.nblocks, (layer.out_features, r), f"lora_B of {what}")

    def __repr__(self) -> str:
        return f"BdLora(side={self.side!r}, nblocks={self.nblocks})"


def bdlora_variant(layer, options: dict):
    """The variant for a layer whose LoraConfig sets use_bdlora, or None where peft ignores BD-LoRA.

    peft 0.21.2: lora.Linear takes it (not with DoRA or aLoRA); its bnb / GPTQ layers ignore it (fastpeft:
    QuantLoraLinear); every other layer type refuses it. A module matching neither list is refused with
    match_strict, else it gets a plain LoRA."""
    from ..linear import Linear
    from ..quant_linear import QuantLoraLinear

    if isinstance(layer, QuantLoraLinear):
        return None
    keys = ["use_bdlora"] + (["use_dora"] if options.get("use_dora") else []) \
        + (["alora_invocation_tokens"] if options.get("alora_invocation_tokens") is not None else [])
    keys = tuple(sorted(keys))
    if not isinstance(layer, Linear) or getattr(layer, "_kernel_dim", None) or len(keys) > 1:
        where = "" if layer is None else f" (on {type(layer).__name__})"
        raise ValueError(f"Invalid or unsupported variant combination: {keys}{where}")
    base = layer.get_base_layer()
    if not (hasattr(base, "in_features") and hasattr(base, "out_features")):
        # peft builds the block-diagonal factor from base_layer.in_features / out_features and fails on a layer
        # without them (transformers' Conv1D); an adapter fastpeft made here could not be loaded by peft
        raise ValueError(f"BD-LoRA (use_bdlora) on {options.get('target_name') or 'a module'!r} of type "
                         f"{type(base).__name__}: peft 0.21.2 supports it only on layers with in_features and "
                         f"out_features (nn.Linear), so fastpeft refuses it too")
    cfg = as_bdlora_config(options["use_bdlora"])
    name = options.get("target_name", "") or ""
    on_a = any(p in name for p in cfg.target_modules_bd_a or [])
    on_b = any(p in name for p in cfg.target_modules_bd_b or [])
    if on_a and on_b:
        raise ValueError(f"Target {name} matches both A and B block-diagonal patterns")
    if not (on_a or on_b):
        if cfg.match_strict:
            raise ValueError(f"Target {name} matches neither A nor B block-diagonal patterns.If this is intentional, "
                             f"set match_strict=False in BdLoraConfig during initialization. ")
        return PlainLora()
    return BdLora("A" if on_a else "B", cfg.nblocks)
