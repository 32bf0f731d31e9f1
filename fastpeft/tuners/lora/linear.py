"""LoRA on nn.Linear: forward and merge through fastpeft.ops (never a LoRA matmul here).

The kernel that runs forward() for a given device and dtype is listed in fastpeft/ops/__init__.py.
"""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn

from ... import ops
from .layer import LoraLayer
from .variants.alora import ALora, add_lora_bias, alora_forward, alora_mixed_rows
from .variants.dora import chained_forward


def init_lora_pair(lora_A: nn.Linear, lora_B: nn.Linear, r: int, init_lora_weights: Union[bool, str]) -> None:
    """peft's initialisations for a (lora_A, lora_B) pair of nn.Linear.

    True: kaiming-uniform A (a=sqrt(5), the nn.Linear default), zero B, so the adapter starts as a
    no-op; "gaussian": normal A with std 1/r, zero B; False: leave nn.Linear's random init on both
    (a non-zero adapter, used by tests).
    """
    if init_lora_weights is False:
        return
    with torch.no_grad():
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / r)
        else:
            raise ValueError(f"Unknown initialization init_lora_weights={init_lora_weights!r}; fastpeft "
                             f"supports True, False and 'gaussian'")
        nn.init.zeros_(lora_B.weight)
        if lora_B.bias is not None:
            nn.init.zeros_(lora_B.bias)


class Linear(nn.Module, LoraLayer):
    """LoRA around an nn.Linear (base weight [out, in])."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 init_lora_weights: Union[bool, str] = True, use_rslora: bool = False,
                 lora_bias: bool = False, **kwargs) -> None:
        super().__init__()
        self._init_lora_state(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = self._base_features(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          init_lora_weights=init_lora_weights, use_rslora=use_rslora, lora_bias=lora_bias,
                          **kwargs)

    @staticmethod
    def _base_features(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_features, base_layer.out_features

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)

    def _init_adapter_weights(self, adapter_name: str, init_lora_weights) -> None:
        init_lora_pair(self.lora_A[adapter_name], self.lora_B[adapter_name], self.r[adapter_name],
                       init_lora_weights)

    def _adapter_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        # attribute access, not _parameters lookups: DeepSpeed ZeRO-3 gathers a partitioned weight on access
        # (the submodules themselves by dict lookups, as Module.__getattr__ and ModuleDict would find them)
        mods = self._modules
        return mods["lora_A"]._modules[adapter_name].weight, mods["lora_B"]._modules[adapter_name].weight

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t() if self.fan_in_fan_out else delta

    def _op_base(self) -> ops.Base:
        """The base of the fused op (subclasses swap it: QuantLoraLinear passes the packed weight).

        The base weight goes in as [N, K], a transposed view when stored [in, out] (Conv1D). Under
        torch.autocast fastpeft.ops casts x, weight and bias as autocast casts nn.Linear's inputs.
        """
        base = self.get_base_layer()
        return ops.Base(base.weight.t() if self.fan_in_fan_out else base.weight, None, base.bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out, names = self._forward_route(x, args, kwargs)
        if names is None:
            return out
        # (plain loops, no generators: an eager decode step pays this code's host time once per layer)
        variants = [self.lora_variant[n] for n in names]
        for v in variants:
            if isinstance(v, ALora):  # aLoRA: variants/alora.py
                return alora_forward(self, x, names)
        # one op: the base GEMM and every active adapter's term (each adapter's entry from its variant)
        if len(names) > 1 and any(self.use_dora.get(n) for n in names):
            out = chained_forward(self, x, names)  # several adapters with DoRA among them: peft's order
        else:
            adapters = [v.op_adapter(self, n) for v, n in zip(variants, names)]
            out = ops.lora(x, self._op_base(), adapters, self.training, fn=f"lora.{type(self).__name__}.forward")
        return add_lora_bias(self, out, names, None)

    def _mixed_forward(self, x: torch.Tensor, batch) -> torch.Tensor:
        """Each sample with its own adapter (peft's adapter_names): one op call with a row plan. When every row
        names the same adapter (a server's batch for one client), the plain one-adapter call: the decode
        kernels without a plan, the same result as the adapter alone."""
        rows = batch.rows(x.numel() // x.shape[-1], f"the input of lora.{type(self).__name__}")
        rows = alora_mixed_rows(self, batch, rows, x)  # aLoRA adapters: base outside their invocation
        if len(batch.names) == 1 and rows.count(-1) == 0:
            name = batch.names[0]
            adapters = [self.lora_variant[name].op_adapter(self, name)] if self._has_adapter(name) else []
            out = ops.lora(x, self._op_base(), adapters, False,
                           fn=f"lora.{type(self).__name__}.forward (adapter_names)")
            return add_lora_bias(self, out, [name], None) if adapters else out
        pool = self._mixed_pool(batch.names, self.in_features, self.out_features)
        out = ops.lora(x, self._op_base(), ops.AdapterSet(row_index=rows, pool=pool), False,
                       fn=f"lora.{type(self).__name__}.forward (adapter_names)")
        for k, name in enumerate(batch.names if any(self.lora_bias.values()) else ()):
            if self.lora_bias.get(name) and rows.count(k):
                seg = rows.segment(k)
                bias = (self.lora_B[name].bias * self.scaling[name]).to(out.dtype)
                out.view(-1, out.shape[-1]).index_add_(0, seg, bias.expand(seg.numel(), -1))
        return out
