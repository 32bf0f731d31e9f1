"""LoRA on torch.nn.MultiheadAttention, with peft's layout: one adapter on the fused in_proj_weight
[3E, E] (``lora_A [r, E]``, ``lora_B [3E, r]`` on this layer) and one on out_proj (a LoRA Linear put in
place of ``base_layer.out_proj``), so the state_dict keys are peft's:

    <mha>.lora_A.<adapter>.weight, <mha>.lora_B.<adapter>.weight,
    <mha>.base_layer.in_proj_weight, <mha>.base_layer.out_proj.lora_A.<adapter>.weight, ...

Why the adapted weight is formed as a tensor (fastpeft.ops.lora_weight) instead of fusing the adapter into
a GEMM: nn.MultiheadAttention's forward reads in_proj_weight and out_proj.weight itself and hands them to
F.multi_head_attention_forward (or the fused native kernel in inference), which does the q/k/v projection,
masks, add_bias_kv / add_zero_attn, attention dropout, batch_first and the out projection. Re-implementing
that to call fastpeft.ops.lora per projection would duplicate torch's attention code and its options. The
price of the weight route is one [3E, E] (and [E, E]) GEMM of rank r per forward, independent of the batch
size. So the forward calls the base module with W_in + s B A and W_out + s B_o A_o substituted for its
parameters (torch.func.functional_call): autograd reaches A and B through the op, the module's parameters are
never replaced or re-registered (peft merges and unmerges the weights around every forward instead).

Options as peft 0.21.2 handles them (learned by running it): kdim/vdim different from embed_dim refused
(ValueError, peft's words); batch_first, bias=False, add_bias_kv, add_zero_attn, need_weights,
attn_mask/key_padding_mask work (they are torch's); use_dora refused (peft's words); several adapters (the
active ones are summed); merge/unmerge/merge_and_unload; adapter_names (mixed batches) refused with peft's
TypeError. lora_dropout has no effect (there is no per-sample input term on the weight route; peft ignores it
too); a warning says so.

Known differences from peft 0.21.2, on purpose:
- peft adds the out_proj delta twice in forward and when merging (MultiheadAttention.merge writes W + dW
  into out_proj and then calls out_proj.merge, which adds dW again; unmerge subtracts twice, so the weights
  come back; upstream fix: huggingface/peft PR #3774). fastpeft applies it once: W_out + s B_o A_o. Outputs
  agree with peft while out_proj's lora_B is zero (peft's default init, i.e. the start of training), and
  gradients agree there too; an adapter with a trained out_proj gives different outputs in the two libraries.
- lora_bias=True is refused: peft accepts it with a warning but never applies the in_proj LoRA bias, and the
  out_proj one only through an in-place merge that gets no gradient.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import nn

from ... import ops
from ..mixed_batch import current as current_mixed_batch
from ..tuners_utils import adapters_to_merge
from .layer import LoraLayer
from .linear import Linear, init_lora_pair

_OUT_WEIGHT = "out_proj.base_layer.weight"  # path of out_proj's weight from the MHA module (out_proj is a LoRA Linear)


def _refuse_options(use_dora: bool, lora_bias: bool) -> None:
    if use_dora:
        raise ValueError("MultiheadAttention does not support DoRA (yet), please set use_dora to False")
    if lora_bias:
        raise ValueError("lora_bias=True is not supported on nn.MultiheadAttention by fastpeft (peft accepts it "
                         "but never applies the in_proj LoRA bias); set lora_bias=False or target other layers.")


class MultiheadAttention(nn.Module, LoraLayer):
    """LoRA around an nn.MultiheadAttention: in_proj_weight adapted here, out_proj by a LoRA Linear."""

    def __init__(self, base_layer: nn.MultiheadAttention, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights: Union[bool, str] = True, use_rslora: bool = False,
                 lora_bias: bool = False, use_dora: bool = False, **kwargs) -> None:
        if not getattr(base_layer, "_qkv_same_embed_dim", True):
            raise ValueError("Only same embed for query/key/value is supported as of now for MultiheadAttention.")
        _refuse_options(use_dora, lora_bias)
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError("out_proj must be an instance of nn.Linear for MultiheadAttention.")
        super().__init__()
        self._init_lora_state(base_layer)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.embed_dim, 3 * base_layer.embed_dim
        opts = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, init_lora_weights=init_lora_weights,
                    use_rslora=use_rslora, **kwargs)
        out = Linear(base_layer.out_proj, adapter_name, **opts)
        # this layer merges out_proj with itself; LoraModel.merge_adapter skips it (no second merge attempt)
        out._merged_by_parent = True
        base_layer.out_proj = out
        self._active_adapter = adapter_name
        self._warn_dropout(lora_dropout)
        LoraLayer.update_layer(self, adapter_name, **opts)

    @staticmethod
    def _warn_dropout(lora_dropout: float) -> None:
        if lora_dropout:
            warnings.warn(f"lora_dropout={lora_dropout} has no effect on nn.MultiheadAttention: its LoRA acts "
                          f"through the projection weights, which have no per-sample input term to drop (peft "
                          f"ignores it there too).")

    # -- what LoraLayer asks of a layer type ------------------------------------------------------
    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)

    def _init_adapter_weights(self, adapter_name: str, init_lora_weights) -> None:
        init_lora_pair(self.lora_A[adapter_name], self.lora_B[adapter_name], self.r[adapter_name], init_lora_weights)

    def _adapter_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        w = self.get_base_layer().in_proj_weight
        dtype = w.dtype if w.dtype.is_floating_point else None
        for d in (self.lora_A, self.lora_B):
            d[adapter_name].to(device=w.device, dtype=dtype)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: Union[bool, str] = True, use_rslora: bool = False, lora_bias: bool = False,
                     use_dora: bool = False, **kwargs) -> None:
        """A further adapter: on in_proj here and on out_proj (peft adapts both, always)."""
        _refuse_options(use_dora, lora_bias)
        self._warn_dropout(lora_dropout)
        opts = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, init_lora_weights=init_lora_weights,
                    use_rslora=use_rslora, **kwargs)
        LoraLayer.update_layer(self, adapter_name, **opts)
        self.get_base_layer().out_proj.update_layer(adapter_name, **opts)

    # -- nn.MultiheadAttention's attributes, read through (code around an MHA reads them) ------------
    embed_dim = property(lambda self: self.get_base_layer().embed_dim)
    kdim = property(lambda self: self.get_base_layer().kdim)
    vdim = property(lambda self: self.get_base_layer().vdim)
    _qkv_same_embed_dim = property(lambda self: self.get_base_layer()._qkv_same_embed_dim)
    num_heads = property(lambda self: self.get_base_layer().num_heads)
    dropout = property(lambda self: self.get_base_layer().dropout)
    batch_first = property(lambda self: self.get_base_layer().batch_first)
    head_dim = property(lambda self: self.get_base_layer().head_dim)
    in_proj_weight = property(lambda self: self.get_base_layer().in_proj_weight)
    in_proj_bias = property(lambda self: self.get_base_layer().in_proj_bias)
    out_proj = property(lambda self: self.get_base_layer().out_proj.get_base_layer())
    bias_k = property(lambda self: self.get_base_layer().bias_k)
    bias_v = property(lambda self: self.get_base_layer().bias_v)
    add_zero_attn = property(lambda self: self.get_base_layer().add_zero_attn)

    def merge_masks(self, *args, **kwargs):
        return self.get_base_layer().merge_masks(*args, **kwargs)

    # -- the math -------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change of in_proj_weight, s * B A [3E, E] (out_proj's is out_proj.get_delta_weight)."""
        A, B = self._adapter_weights(adapter_name)
        return ops.lora_delta_weight(A, B, self.scaling[adapter_name])

    def _adapted_weights(self, names: list) -> dict:
        """{parameter path in the MHA module: in_proj / out_proj weight with the adapters ``names`` added}."""
        base = self.get_base_layer()
        out = base.out_proj
        w_in = base.in_proj_weight
        w_out = out.get_base_layer().weight
        for name in names:
            A, B = self._adapter_weights(name)
            w_in = ops.lora_weight(w_in, A, B, self.scaling[name])
            if name in out.lora_A:
                oA, oB = out._adapter_weights(name)
                w_out = ops.lora_weight(w_out, oA, oB, out.scaling[name])
        return {"in_proj_weight": w_in, _OUT_WEIGHT: w_out}

    def forward(self, query: torch.Tensor, *args, **kwargs):
        if kwargs.pop("adapter_names", None) is not None or current_mixed_batch() is not None:
            raise TypeError(f"lora.{type(self).__name__} does not support mixed adapter batches.")
        dtype = query.dtype
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = base(query, *args, **kwargs)
        elif self.merged:
            result = base(query, *args, **kwargs)
        else:
            if base.out_proj.active_adapters != self.active_adapters:
                name = type(base).__name__
                raise ValueError(f"The out_proj layer of {name} has merged layers but {name} itself doesn't; please "
                                 f"ensure that either both or none have merged layers")
            names = [a for a in self.active_adapters if a in self.lora_A]
            if not names:
                result = base(query, *args, **kwargs)
            else:
                # the base module's own forward on the adapted weights (see the module docstring)
                result = torch.func.functional_call(base, self._adapted_weights(names), (query,) + args, kwargs,
                                                    tie_weights=False, strict=False)
        return result[0].to(dtype), (result[1].to(dtype) if result[1] is not None else None)

    # -- merge / unmerge ------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        """Add the adapters into in_proj_weight (here) and out_proj.weight (by out_proj's own merge)."""
        base = self.get_base_layer()
        for name in adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            A, B = self._adapter_weights(name)
            w = base.in_proj_weight
            with torch.no_grad():
                new_w = ops.lora_weight(w.detach(), A.detach(), B.detach(), self.scaling[name])
                if safe_merge and not torch.isfinite(new_w).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            base.out_proj.merge(safe_merge=safe_merge, adapter_names=[name])
            with torch.no_grad():
                w.copy_(new_w)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        w = base.in_proj_weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            A, B = self._adapter_weights(name)
            with torch.no_grad():
                w.copy_(ops.lora_weight(w.detach(), A.detach(), B.detach(), -self.scaling[name]))
        base.out_proj.unmerge()

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list]) -> nn.MultiheadAttention:
        """The plain nn.MultiheadAttention (adapters merged first when ``merge``), its out_proj unwrapped too."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.get_base_layer()
        base.out_proj = base.out_proj.get_base_layer()
        return base
