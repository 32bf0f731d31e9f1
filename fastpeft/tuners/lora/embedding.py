"""LoRA on nn.Embedding: lora_embedding_A [r, V] and lora_embedding_B [D, r] as in peft.

The lookup goes through fastpeft.ops.lora_embedding with the base layer's options (padding_idx,
max_norm, ...) applied to both tables, like peft. LoRA dropout is not applied to embeddings (peft
creates the dropout module but does not use it on this path either).
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from ... import ops
from ...ops.dora import column_scale as dora_column_scale
from .layer import LoraLayer


class Embedding(nn.Module, LoraLayer):
    _is_embedding = True
    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights: Union[bool, str] = True,
                 use_rslora: bool = False, lora_bias: bool = False, **kwargs) -> None:
        super().__init__()
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for nn.Embedding targets (peft refuses it "
                             "too); target only linear layers or set lora_bias=False.")
        self._init_lora_state(base_layer)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          init_lora_weights=init_lora_weights, use_rslora=use_rslora, lora_bias=False,
                          **kwargs)

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        # random normal start; _init_adapter_weights overwrites it unless init_lora_weights=False
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))

    def _init_adapter_weights(self, adapter_name: str, init_lora_weights) -> None:
        # peft's embedding init (True and "gaussian" alike): zero A, standard-normal B
        if init_lora_weights is False:
            return
        if not (init_lora_weights is True or (isinstance(init_lora_weights, str)
                                              and init_lora_weights.lower() == "gaussian")):
            raise ValueError(f"Unknown initialization init_lora_weights={init_lora_weights!r}; fastpeft "
                             f"supports True, False and 'gaussian'")
        with torch.no_grad():
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])

    def _adapter_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        # (A [r, V], B [D, r]): the table maps V ids ("in") to D features ("out")
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t()  # deltas are [D, V]; the embedding table is [V, D]

    def _op_base(self) -> ops.Base:
        """The table as the [D, V] weight of the (out = D, in = V) map the adapters use (DoRA's norm is
        taken over its rows: one magnitude per embedding feature, as peft has it)."""
        return ops.Base.dense(self.get_base_layer().weight.t())

    def _lookup_options(self) -> dict:
        base = self.get_base_layer()
        return dict(padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                    scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out, names = self._forward_route(x, args, kwargs)
        if names is None:
            return out
        base = self.get_base_layer()
        opts = self._lookup_options()
        # Adapters apply in order, as in peft: plain LoRA adds its rows; DoRA scales all so far and its own
        # rows by g, y <- g * (y + s A^T[ids] B^T) (g = m / ||W^T + s B A||, one per feature).
        out = None
        for name in names:
            a = self.lora_variant[name].op_adapter(self, name)
            if out is None:
                out = ops.lora_embedding(x, base.weight, a.A, a.B, a.scale, **opts)
            else:
                out = out + ops.lora_embedding(x, None, a.A, a.B, a.scale, **opts).to(out.dtype)
            if a.magnitude is not None:
                out = (dora_column_scale(a.magnitude, a.weight_norm) * out).to(out.dtype)
        return out

    def _mixed_forward(self, ids: torch.Tensor, batch) -> torch.Tensor:
        """Each sample with its own adapter: the base lookup for every token, then each adapter's rows
        looked up in its own tables and added (a lookup per adapter, not per token)."""
        out = self.base_layer(ids)
        flat_ids, flat = ids.reshape(-1), out.view(-1, out.shape[-1])
        rows = batch.rows(flat_ids.numel(), "the ids of lora.Embedding")
        opts = self._lookup_options()
        for k, name in enumerate(batch.names):
            if not self._has_adapter(name) or not rows.count(k):
                continue
            seg = rows.segment(k)
            a = self.lora_variant[name].op_adapter(self, name)
            flat.index_add_(0, seg, ops.lora_embedding(flat_ids.index_select(0, seg), None, a.A, a.B, a.scale,
                                                       **opts).to(out.dtype))
        return out
