"""DoRA (peft's ``use_dora=True``): the adapter also trains a magnitude m [out] that rescales each output
row of the adapted weight, W' = g * (W + s B A), g = m / ||W + s B A||_row (the norm detached).

The forward is one fastpeft.ops call: the op gets the adapter with its magnitude and its weight norm n and
applies g in the GEMM's epilogue (ops/dora.py has the math, and peft's extra base GEMM under dropout). What
this variant adds is the state around it, with peft's names and values:

- the magnitude is a parameter of the layer, ``lora_magnitude_vector[adapter].weight`` (saved by peft as
  ``<layer>.lora_magnitude_vector``), initialised to n with the adapter's initial A and B;
- ||W||^2_row is computed once per base weight and kept (W is frozen; a new weight object, a new device or
  an in-place change to W, e.g. a merge, makes it stale and it is recomputed);
- n itself changes with A and B; while they cannot change (no grad mode, or frozen adapters: inference) it
  is kept too, keyed on their versions, so a decode step costs no norm at all.

Several active adapters of which some are DoRA: peft applies them one after the other, each DoRA adapter
rescaling everything before it; :func:`chained_forward` reproduces that order with one op call per adapter.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from .... import ops
from ....ops import dora as dora_ops
from ....ops.contract import PACKED_FIELDS
from .base import LoraVariant


class DoraMagnitude(nn.Module):
    """Holds one adapter's magnitude vector as ``weight`` [out] (so its state_dict key is peft's)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude, requires_grad=True)

    def __repr__(self) -> str:
        # peft's repr, e.g. "lora.dora.DoraLinearLayer()" (str(model) is compared with peft's)
        return "lora.dora." + super().__repr__()


class DoraLinearLayer(DoraMagnitude):
    """The magnitude of a DoRA adapter on a linear layer (nn.Linear, Conv1D, QuantLinear)."""


class DoraEmbeddingLayer(DoraMagnitude):
    """The magnitude of a DoRA adapter on an nn.Embedding (one entry per embedding feature)."""

    def __repr__(self) -> str:
        # peft's class derives from its linear one and adds the prefix again: "lora.dora.lora.dora.Dora..."
        return "lora.dora." + super().__repr__()


class _WeightKey:
    """Identity of the base weight for the caches: the tensor itself (a weak reference to the parameter a
    view such as Conv1D's W^T comes from), its storage, layout and version (an in-place change bumps it)."""

    def __init__(self, base: ops.Base) -> None:
        t = base.weight if base.weight is not None else base.packed.qdata
        root = t._base if t._base is not None else t
        self._ref = weakref.ref(root)
        self._state = (t.data_ptr(), tuple(t.shape), t.stride(), t.device, t.dtype, t._version)

    def __eq__(self, other) -> bool:
        return (isinstance(other, _WeightKey) and self._state == other._state
                and self._ref() is not None and self._ref() is other._ref())

    __hash__ = None


class Dora(LoraVariant):
    name = "dora"

    def __init__(self) -> None:
        self._w_sq: Optional[tuple] = None     # (weight key, ||W||^2_row [out] fp32)
        self._norm: Optional[tuple] = None     # (key of W, A, B, s, n [out] fp32): inference only
        self._merge_norm: Optional[torch.Tensor] = None  # n at merge time, so unmerge inverts exactly

    # -- the norm ------------------------------------------------------------------------------------
    def _row_sq_norm(self, base: ops.Base) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # dynamo cannot trace the key (data_ptr, versions); the frozen W's ||W||^2 from eager mode (the
            # adapter's init computed it) is used as it is, else computed in the graph
            return self._w_sq[1] if self._w_sq is not None else dora_ops.weight_row_sq_norm(base)
        key = _WeightKey(base)
        if self._w_sq is None or self._w_sq[0] != key:
            self._w_sq = (key, dora_ops.weight_row_sq_norm(base))
        return self._w_sq[1]

    def weight_norm(self, layer, adapter_name: str) -> torch.Tensor:
        """n = ||W + s B A||_row [out] (detached), from the kept ||W||^2."""
        A, B = layer._adapter_weights(adapter_name)
        base, s = layer._op_base(), layer.scaling[adapter_name]
        if torch.compiler.is_compiling():
            return dora_ops.weight_norm(base, A, B, s, w_sq=self._row_sq_norm(base))
        frozen = not torch.is_grad_enabled() or not (A.requires_grad or B.requires_grad)
        key = (_WeightKey(base), id(A), A._version, id(B), B._version, s) if frozen else None
        if key is not None and self._norm is not None and self._norm[0] == key:
            return self._norm[1]
        n = dora_ops.weight_norm(base, A, B, s, w_sq=self._row_sq_norm(base))
        self._norm = (key, n) if key is not None else None
        return n

    def init_magnitude(self, layer, adapter_name: str, ephemeral_gpu_offload: bool = False) -> None:
        """Create ``lora_magnitude_vector[adapter_name]`` = n for the adapter's current A and B (peft's init),
        in the base weight's dtype (PeftModel upcasts it to fp32 with the other adapter weights).

        ephemeral_gpu_offload: with CPU-resident weights and a GPU present, compute n on the GPU and bring
        it back (peft's runtime option for offloaded models)."""
        A, B = layer._adapter_weights(adapter_name)
        base = layer._op_base()
        dev = A.device
        if ephemeral_gpu_offload and dev.type == "cpu" and torch.cuda.is_available():
            gpu = torch.device("cuda")
            moved = ops.Base(weight=None if base.weight is None else base.weight.to(gpu),
                             packed=None if base.packed is None else base.packed._replace(
                                 **{f: getattr(base.packed, f).to(gpu) for f in PACKED_FIELDS
                                    if getattr(base.packed, f) is not None}))
            n = dora_ops.weight_norm(moved, A.to(gpu), B.to(gpu), layer.scaling[adapter_name]).to(dev)
        else:
            n = dora_ops.weight_norm(base, A, B, layer.scaling[adapter_name], w_sq=self._row_sq_norm(base))
        w = getattr(layer.get_base_layer(), "weight", None)
        dtype = w.dtype if w is not None and w.dtype.is_floating_point else torch.float32
        cls = DoraEmbeddingLayer if layer._is_embedding else DoraLinearLayer
        layer.lora_magnitude_vector[adapter_name] = cls(n.to(dtype))

    def init_magnitude_on_meta(self, layer, adapter_name: str) -> None:
        """The magnitude as a meta tensor of the right shape and dtype, for low_cpu_mem_usage (a load fills it)."""
        w = getattr(layer.get_base_layer(), "weight", None)
        dtype = w.dtype if w is not None and w.dtype.is_floating_point else torch.float32
        cls = DoraEmbeddingLayer if layer._is_embedding else DoraLinearLayer
        layer.lora_magnitude_vector[adapter_name] = cls(torch.empty(layer.out_features, device="meta", dtype=dtype))

    # -- the variant interface -----------------------------------------------------------------------
    def magnitude(self, layer, adapter_name: str) -> torch.Tensor:
        return layer.lora_magnitude_vector[adapter_name].weight

    def op_adapter(self, layer, adapter_name: str) -> ops.Adapter:
        A, B = layer._adapter_weights(adapter_name)
        return ops.Adapter(A, B, layer.scaling[adapter_name], layer._dropout_p(adapter_name),
                           magnitude=self.magnitude(layer, adapter_name),
                           weight_norm=self.weight_norm(layer, adapter_name))

    def delta_weight(self, layer, adapter_name: str) -> torch.Tensor:
        """The change merging makes, [out, in]: g * (W + s B A) - W (W dequantized for a packed base)."""
        base = layer._op_base()
        W = base.weight.detach() if base.weight is not None else dora_ops.dequantize(base.packed, torch.float32)
        return self._merged(layer, adapter_name, W)[0] - W

    def _merged(self, layer, adapter_name: str, W: torch.Tensor) -> tuple:
        """(g * (W + s B A), n) for W [out, in] in any float dtype; n is the norm of exactly this W."""
        A, B = layer._adapter_weights(adapter_name)
        s = layer.scaling[adapter_name]
        acc = torch.promote_types(torch.float32, W.dtype)
        Wd = W.to(acc) + ops.lora_delta_weight(A.detach(), B.detach(), s).to(acc)
        n = Wd.norm(dim=1).to(dora_ops.weight_dtype(ops.Base(weight=W), A, B)).to(acc)
        g = dora_ops.column_scale(self.magnitude(layer, adapter_name).detach(), n)
        return g[:, None] * Wd, n

    def merged_weight(self, layer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        W = layer._to_weight_layout(weight)  # [out, in] (the layout maps are transposes: their own inverse)
        merged, self._merge_norm = self._merged(layer, adapter_name, W)
        return layer._to_weight_layout(merged).to(weight.dtype)

    def unmerged_weight(self, layer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """W = W' / g - s B A, with g from the norm kept at merge time (as peft does)."""
        if self._merge_norm is None:
            raise RuntimeError(f"Cannot unmerge DoRA adapter {adapter_name!r}: it was not merged by this layer "
                               f"(no weight norm was kept at merge time)")
        A, B = layer._adapter_weights(adapter_name)
        Wm = layer._to_weight_layout(weight)
        acc = torch.promote_types(torch.float32, Wm.dtype)
        g = dora_ops.column_scale(self.magnitude(layer, adapter_name).detach(), self._merge_norm)
        W = Wm.to(acc) / g[:, None] - ops.lora_delta_weight(A.detach(), B.detach(), layer.scaling[adapter_name]).to(acc)
        self._merge_norm = None
        return layer._to_weight_layout(W).to(weight.dtype)


def chained_forward(layer, x: torch.Tensor, names: list) -> torch.Tensor:
    """Several active adapters on a linear layer, some of them DoRA, in peft's order.

    peft starts from y = base(x) and, per adapter in order: plain LoRA adds its term; DoRA without dropout
    rescales everything so far, y <- g * (y - bias) + g * s S B^T + bias; DoRA with dropout adds
    (g - 1) (D x) W^T + g s S B^T. With Y_k the op's output for the DoRA adapter alone (ops/dora.py) and
    b0 = x W^T + bias, the two cases are y <- Y_k + g * (y - b0) and y <- y + (Y_k - b0). A rare setup (one
    adapter is active when training or serving), so this is one op call per adapter and a few [M, N] adds.
    """
    fn = f"lora.{type(layer).__name__}.forward"
    base = layer._op_base()
    b0 = ops.lora(x, base, (), fn=fn)
    y = b0
    for name in names:
        variant = layer.lora_variant[name]
        a = variant.op_adapter(layer, name)
        if a.magnitude is None:
            y = y + ops.lora(x, ops.Base.none(), [a], layer.training, fn=fn).to(y.dtype)
            continue
        yk = ops.lora(x, base, [a], layer.training, fn=fn)
        if layer.training and a.dropout_p > 0.0:
            y = y + (yk - b0)
        else:
            y = yk + (dora_ops.column_scale(a.magnitude, a.weight_norm) * (y - b0).float()).to(y.dtype)
    return y
