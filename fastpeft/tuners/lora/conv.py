"""LoRA on torch.nn.Conv1d / Conv2d / Conv3d with peft's layers, state_dict keys and behaviour.

peft's layout (and therefore the file format): ``lora_A[name]`` is a conv of the base's class with the base's
kernel size, stride and padding, but dilation 1, zero padding mode and groups 1 (weight [r, C_in, *k]);
``lora_B[name]`` is a 1x1 conv with the base's groups (weight [C_out, r/groups, 1, ..], bias with lora_bias).
The rank must be divisible by groups; merging a grouped conv is refused (peft's errors and warning, verbatim).
Forward runs through fastpeft.ops.lora_conv (one conv with W + s B A at inference; base conv plus the
r-channel terms, with peft's dropout but no stored dropout(x), in training).

DoRA (``use_dora``): the magnitude ``lora_magnitude_vector[name].weight`` has peft's shape [1, C_out, 1, ..];
the norm is peft's ||W + s * reshape(B.view(-1, r) @ A.view(r, -1))|| over all but the output dim. For
groups > 1 that reshape is not the conv B o A, but it is what peft computes (and saves as the magnitude), so
it is reproduced here to load peft's adapters with the same outputs. Under dropout in training peft adds
(g - 1) * conv(dropout(x), W) with the base's stride/padding/dilation/groups but zero padding mode; that path
runs as plain autograd here (it keeps dropout(x) like peft: DoRA with dropout on conv is a rare setup).
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...ops.contract import dora_column_scale
from ...ops.lora_conv import ConvSpec, lora_conv, lora_conv_delta_weight
from ..tuners_utils import adapters_to_merge
from .layer import LoraLayer
from .linear import init_lora_pair
from .variants import LoraVariant, variant_for
from .variants.dora import DoraMagnitude

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _groups_error(base: nn.Module, r: int) -> ValueError:
    return ValueError(f"Targeting a {base.__class__.__name__} with groups={base.groups} and rank {r}. Currently, "
                      f"support is limited to conv layers where the rank is divisible by groups. Either choose a "
                      f"different rank or do not target this specific layer.")


class DoraConvLayer(DoraMagnitude):
    """The magnitude of a DoRA adapter on a conv layer: ``weight`` [1, C_out, 1, ..] as peft stores it."""


class ConvDora(LoraVariant):
    """DoRA on a conv layer (see the module docstring). State: only the merge-time norm (unmerge divides by it)."""

    name = "dora"

    def __init__(self) -> None:
        self._merge_norm: Optional[torch.Tensor] = None

    def _peft_norm(self, layer, adapter_name: str, W: Optional[torch.Tensor] = None,
                   delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """n [C_out] (detached, fp32 or fp64) of W + s * peft's lora weight, or of W + delta when given."""
        with torch.no_grad():
            A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            W = layer.get_base_layer().weight if W is None else W
            wdt = torch.promote_types(torch.promote_types(W.dtype, A.dtype), B.dtype)
            acc = torch.promote_types(wdt, torch.float32)
            if delta is None:
                r = A.shape[0]
                delta = torch.mm(B.detach().reshape(-1, r).to(acc), A.detach().reshape(r, -1).to(acc))
                delta = delta.reshape(W.shape) * layer.scaling[adapter_name]
            Wd = W.detach().to(acc) + delta.to(acc)
            # peft takes the norm of W + delta in promote(W, A, B): round there, keep the accumulator dtype
            return Wd.flatten(1).norm(dim=1).to(wdt).to(acc)

    def _shape(self, layer, n: torch.Tensor) -> torch.Tensor:
        return n.view(1, -1, *([1] * (layer.get_base_layer().weight.dim() - 2)))

    def init_magnitude(self, layer, adapter_name: str, ephemeral_gpu_offload: bool = False) -> None:
        # ephemeral_gpu_offload: a conv weight is small, the norm is computed where it lives
        W = layer.get_base_layer().weight
        dtype = W.dtype if W.dtype.is_floating_point else torch.float32
        layer.lora_magnitude_vector[adapter_name] = DoraConvLayer(
            self._shape(layer, self._peft_norm(layer, adapter_name)).to(dtype))

    def init_magnitude_on_meta(self, layer, adapter_name: str) -> None:
        W = layer.get_base_layer().weight
        dtype = W.dtype if W.dtype.is_floating_point else torch.float32
        empty = torch.empty(layer.out_features, device="meta", dtype=dtype)
        layer.lora_magnitude_vector[adapter_name] = DoraConvLayer(self._shape(layer, empty))

    def magnitude(self, layer, adapter_name: str) -> torch.Tensor:
        return layer.lora_magnitude_vector[adapter_name].weight.view(-1)

    def col_scale(self, layer, adapter_name: str) -> torch.Tensor:
        """g = m / ||W + s B A|| [C_out] (the norm detached, as in peft); differentiable in m."""
        return dora_column_scale(self.magnitude(layer, adapter_name), self._peft_norm(layer, adapter_name))

    def op_adapter(self, layer, adapter_name: str) -> ops.Adapter:
        raise NotImplementedError(f"DoRA on {type(layer).__name__} runs through ops.lora_conv (col_scale), not "
                                  f"the linear op")

    def _merged(self, layer, adapter_name: str, W: torch.Tensor) -> tuple:
        """(g * (W + s B A) in fp32/fp64, n) for a conv-shaped W (groups 1: merge refuses groups > 1)."""
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        delta = lora_conv_delta_weight(A.detach(), B.detach(), layer.scaling[adapter_name])
        n = self._peft_norm(layer, adapter_name, W, delta)
        g = dora_column_scale(self.magnitude(layer, adapter_name).detach(), n)
        acc = n.dtype
        return g.view(-1, *([1] * (W.dim() - 1))) * (W.to(acc) + delta.to(acc)), n

    def delta_weight(self, layer, adapter_name: str) -> torch.Tensor:
        W = layer.get_base_layer().weight.detach()
        merged = self._merged(layer, adapter_name, W)[0]
        return (merged - W.to(merged.dtype)).flatten(1)  # [out, in*k]: the layer reshapes it back

    def merged_weight(self, layer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        merged, self._merge_norm = self._merged(layer, adapter_name, weight)
        return merged.to(weight.dtype)

    def unmerged_weight(self, layer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """W = W' / g - s B A, with g from the norm kept at merge time (as peft does)."""
        if self._merge_norm is None:
            raise RuntimeError(f"Cannot unmerge DoRA adapter {adapter_name!r}: it was not merged by this layer "
                               f"(no weight norm was kept at merge time)")
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        g = dora_column_scale(self.magnitude(layer, adapter_name).detach(), self._merge_norm)
        acc = g.dtype
        delta = lora_conv_delta_weight(A.detach(), B.detach(), layer.scaling[adapter_name], dtype=acc)
        self._merge_norm = None
        return (weight.to(acc) / g.view(-1, *([1] * (weight.dim() - 1))) - delta).to(weight.dtype)


class _ConvNd(nn.Module, LoraLayer):
    """LoRA around an nn.ConvNd (see the module docstring); subclasses fix the number of spatial dims."""

    _dims = 0

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights: Union[bool, str] = True, use_rslora: bool = False,
                 lora_bias: bool = False, **kwargs) -> None:
        super().__init__()
        if base_layer.weight.dim() != self._dims + 2:
            raise ValueError(f"{type(self).__name__} layer kernel must have {self._dims + 2} dimensions, not "
                             f"{base_layer.weight.dim()}")
        if base_layer.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.")
        if isinstance(r, int) and r % base_layer.groups != 0:
            raise _groups_error(base_layer, r)
        self._init_lora_state(base_layer)
        self.fan_in_fan_out = False
        self._kernel_dim = base_layer.weight.dim()  # peft's attribute
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          init_lora_weights=init_lora_weights, use_rslora=use_rslora, lora_bias=lora_bias, **kwargs)

    # -- LoraLayer hooks -------------------------------------------------------------------------
    def _variant_for(self, **options) -> LoraVariant:
        return ConvDora() if options.get("use_dora") else variant_for(**options)

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        base = self.get_base_layer()
        if r % base.groups:  # a later adapter (add_adapter, rank_pattern) must fit the groups too
            raise _groups_error(base, r)
        # peft builds both with the base's own class (a subclass's forward then runs in the LoRA branch too, see
        # _lora_term), in its order (A, then B) with the default init, so seeded inits draw the same numbers
        conv, ones = type(base), (1,) * self._dims
        self.lora_A[adapter_name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                         bias=False)
        self.lora_B[adapter_name] = conv(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias)

    def _init_adapter_weights(self, adapter_name: str, init_lora_weights) -> None:
        init_lora_pair(self.lora_A[adapter_name], self.lora_B[adapter_name], self.r[adapter_name],
                       init_lora_weights)

    def _adapter_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, C_in * prod(k)], B [C_out, r / groups]): the conv weights as the matrices of W's flat rows."""
        return self.lora_A[adapter_name].weight.flatten(1), self.lora_B[adapter_name].weight.flatten(1)

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(self.get_base_layer().weight.shape)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        if self.get_base_layer().groups > 1:
            raise NotImplementedError(f"The delta weight of a LoRA adapter on a {type(self.get_base_layer()).__name__}"
                                      f" with groups={self.get_base_layer().groups} is not a weight of that conv "
                                      f"(lora_A spans all input channels); peft does not merge it either")
        return super().get_delta_weight(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if self.get_base_layer().groups > 1 and any(self._has_adapter(n) for n in adapters_to_merge(self, adapter_names)):
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    # -- forward ----------------------------------------------------------------------------------
    def _spec(self) -> ConvSpec:
        return ConvSpec.of(self.get_base_layer())

    def _plain_base(self) -> bool:
        """The base is exactly nn.ConvNd, so ops.lora_conv may compute it (a subclass may change forward)."""
        return type(self.get_base_layer()) is _CONV[self._dims]

    def _adapter(self, name: str, dropout: bool = True) -> ops.Adapter:
        return ops.Adapter(self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]),
                           self._dropout_p(name) if dropout else 0.0)

    def _lora_term(self, x: torch.Tensor, name: str, dropout: bool, fn: str) -> torch.Tensor:
        """s * B(A(dropout(x))) of one adapter: through ops.lora_conv for a plain nn.ConvNd; for a subclassed
        base, whose class peft also gives lora_A and lora_B, through their own forward, as peft computes it."""
        if self._plain_base():
            return lora_conv(x, None, None, [self._adapter(name, dropout)], self._spec(), self.training and dropout,
                             fn=fn)
        A = self.lora_A[name]
        xin = self.lora_dropout[name](x) if dropout else x
        return self.lora_B[name](A(xin.to(A.weight.dtype))) * self.scaling[name]

    def _bias_term(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return (self.lora_B[name].bias * self.scaling[name]).to(like.dtype).view(1, -1, *([1] * self._dims))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out, names = self._forward_route(x, args, kwargs)
        if names is None:
            return out
        fn = f"lora.{type(self).__name__}.forward"
        base, spec = self.get_base_layer(), self._spec()
        if any(self.use_dora.get(n) for n in names):
            out = self._chained_forward(x, names, fn)
        elif self._plain_base():
            # the base conv and every active adapter in one op
            out = lora_conv(x, base.weight, base.bias, [self._adapter(n) for n in names], spec, self.training, fn=fn)
        else:
            out = self.base_layer(x)
            for n in names:
                out = out + self._lora_term(x, n, True, fn).to(out.dtype)
        for name in names:
            if self.lora_bias.get(name):
                out = out + self._bias_term(name, out)
        return out

    def _chained_forward(self, x: torch.Tensor, names: list, fn: str) -> torch.Tensor:
        """Adapters in order with DoRA among them, as peft applies them: plain LoRA adds its term; DoRA without
        dropout makes y <- g * (y - bias) + bias + g * s * LoRA(x); DoRA with dropout (training) adds
        (g - 1) * conv(D x, W) + g * s * LoRA(D x)."""
        base, spec = self.get_base_layer(), self._spec()
        bias = None if base.bias is None else base.bias.view(1, -1, *([1] * self._dims))
        y = None
        for name in names:
            if not self.use_dora.get(name):
                y = self.base_layer(x) if y is None else y
                y = y + self._lora_term(x, name, True, fn).to(y.dtype)
                continue
            variant: ConvDora = self.lora_variant[name]
            g = variant.col_scale(self, name)
            gv = g.view(1, -1, *([1] * self._dims))
            if self.training and self._dropout_p(name) > 0.0:
                y = self.base_layer(x) if y is None else y
                xd = self.lora_dropout[name](x)
                base_d = _CONV_FN[self._dims](xd, base.weight, None, base.stride, base.padding, base.dilation,
                                              base.groups)
                lora = self._lora_term(xd, name, False, fn)
                y = y + ((gv - 1) * base_d + gv * lora).to(y.dtype)
            elif y is None and self._plain_base():
                # the usual case (one DoRA adapter): g * (conv(x, W) + s LoRA(x)) + bias in one op (one conv at
                # inference: g * (W + s B A))
                y = lora_conv(x, base.weight, base.bias, [self._adapter(name, dropout=False)], spec, False,
                              col_scale=g, fn=fn)
            else:
                y = self.base_layer(x) if y is None else y
                lora = self._lora_term(x, name, False, fn)
                z = y if bias is None else y - bias.to(y.dtype)
                z = gv * (z + lora)
                y = (z if bias is None else z + bias).to(y.dtype)
        return y

    def _mixed_forward(self, x: torch.Tensor, batch) -> torch.Tensor:
        """peft's adapter_names: each sample with its own adapter ("__base__": none); one LoRA term per adapter
        over its samples, added into the base output."""
        out = self.base_layer(x)
        if x.dim() != self._dims + 2:
            raise ValueError(f"adapter_names needs a batched input [N, C, ...] for lora.{type(self).__name__}; "
                             f"got {tuple(x.shape)}")
        rows = batch.rows(x.shape[0], f"the input of lora.{type(self).__name__}")
        fn = f"lora.{type(self).__name__}.forward (adapter_names)"
        for k, name in enumerate(batch.names):
            if not self._has_adapter(name) or not rows.count(k):
                continue
            seg = rows.segment(k)
            term = self._lora_term(x.index_select(0, seg), name, False, fn)
            if self.lora_bias.get(name):
                term = term + self._bias_term(name, term)
            out.index_add_(0, seg, term.to(out.dtype))
        return out


class Conv1d(_ConvNd):
    _dims = 1


class Conv2d(_ConvNd):
    _dims = 2


class Conv3d(_ConvNd):
    _dims = 3


def conv_layer_for(target: nn.Module) -> Optional[type]:
    """The LoRA layer class for a torch conv module (peft's dispatch: Conv2d, Conv3d, Conv1d), else None."""
    for base_cls, cls in ((nn.Conv2d, Conv2d), (nn.Conv3d, Conv3d), (nn.Conv1d, Conv1d)):
        if isinstance(target, base_cls):
            return cls
    return None


__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvDora", "DoraConvLayer", "conv_layer_for"]
