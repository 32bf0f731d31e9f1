"""TrainableTokensLayer: the selected rows of an embedding (or of an output head tied to it) train.

State, with peft's names (they are state_dict keys): ``base_layer``; ``trainable_tokens_delta``
(ParameterDict, adapter -> [n, D]: despite the name, the new rows themselves, not a difference);
``trainable_tokens_original`` (the rows as they were, kept out of the state_dict, for unmerge);
``token_indices`` (adapter -> list of ids). A layer built with ``tied_adapter`` (the output head of
a model whose head shares the input embedding's weight) holds the same three dicts as that adapter
and owns nothing: its rows follow the embedding's, the owner saves, loads and trains them (so the
tied layer lists no ``adapter_layer_names``: fastpeft's save/load and requires_grad handling skip it).

The forward runs through fastpeft.ops (ops/trainable_tokens.py): no [V, D] copy of the table per step
(peft builds one, and a dense [V, D] gradient in backward).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from ... import ops
from ...ops.trainable_tokens import last_occurrences
from ..tuners_utils import BaseTunerLayer, adapters_to_merge

__all__ = ["BufferDict", "TrainableTokensLayer"]


class BufferDict(nn.Module):
    """adapter name -> tensor, held as non-persistent buffers: they follow ``.to()`` but stay out of the
    state_dict (peft does not save the original rows either)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=False)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: str) -> bool:
        return key in self._buffers

    def __iter__(self):
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()

    def items(self):
        return self._buffers.items()


def _base_kind(base: nn.Module) -> str:
    if isinstance(base, nn.Embedding):
        return "embedding"
    if isinstance(base, nn.Linear):
        return "linear"
    raise TypeError(f"Trainable tokens need an nn.Embedding (or an nn.Linear output head tied to one); got "
                    f"{type(base).__name__}. Check the module names in trainable_token_indices / target_modules.")


class TrainableTokensLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")

    def __init__(self, base_layer: nn.Module, adapter_name: str,
                 tied_adapter: Optional["TrainableTokensLayer"] = None) -> None:
        super().__init__()
        self._init_tuner_state()
        self.base_layer = base_layer
        self._kind = _base_kind(base_layer)
        self._active_adapter = adapter_name
        # a list keeps the tied adapter out of named_modules()/state_dict under this layer's name
        self._tied_adapter = [tied_adapter] if tied_adapter is not None else []
        if tied_adapter is None:
            self.trainable_tokens_delta = nn.ParameterDict({})
            self.trainable_tokens_original = BufferDict()
            self.token_indices: dict[str, list[int]] = {}
        else:
            if tuple(tied_adapter.base_layer.weight.shape) != tuple(base_layer.weight.shape):
                raise ValueError(f"Tied trainable tokens: the tied layer's weight {tuple(base_layer.weight.shape)} "
                                 f"differs from the embedding's {tuple(tied_adapter.base_layer.weight.shape)}")
            self.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            self.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices
            self.adapter_layer_names = ()  # owned (saved, loaded, trained) by the tied adapter
        self._index_cache: dict = {}  # adapter -> (device, the id list, index tensors of _index_tensors)
        self.in_features, self.out_features = base_layer.weight.shape[1], base_layer.weight.shape[0]

    @property
    def tied_adapter(self) -> Optional["TrainableTokensLayer"]:
        return self._tied_adapter[0] if self._tied_adapter else None

    # -- adapters ------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, token_indices: Sequence[int], init_weights: bool = True) -> None:
        """Add ``adapter_name`` training rows ``token_indices`` (initialised to the current rows, or random
        with init_weights=False). A tied layer follows its adapter and adds nothing."""
        if self.tied_adapter is not None:
            return
        weight = self.base_layer.weight
        ids = [int(t) for t in token_indices]
        bad = [t for t in ids if not -weight.shape[0] <= t < weight.shape[0]]
        if bad:
            raise IndexError(f"trainable token ids {bad} of adapter {adapter_name!r} are out of range for the "
                             f"{type(self.base_layer).__name__} with {weight.shape[0]} rows (weight "
                             f"{tuple(weight.shape)})")
        ids = [t % weight.shape[0] for t in ids]
        with torch.no_grad():
            originals = weight.index_select(0, torch.tensor(ids, dtype=torch.int64, device=weight.device))
            values = originals if init_weights else torch.randn(originals.shape, dtype=weight.dtype,
                                                                device=weight.device)
        self.token_indices[adapter_name] = ids
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values.clone(), requires_grad=True)
        self.trainable_tokens_original[adapter_name] = originals.detach().clone()
        self._index_cache.pop(adapter_name, None)

    def _cast_adapter_dtype(self, adapter_name: str) -> None:
        """fp16/bf16 rows -> fp32 (peft's autocast_adapter_dtype); the forward casts them back per call."""
        if self.tied_adapter is not None or adapter_name not in self.trainable_tokens_delta:
            return
        p = self.trainable_tokens_delta[adapter_name]
        if p.dtype in (torch.float16, torch.bfloat16):
            self.trainable_tokens_delta[adapter_name] = nn.Parameter(p.data.float(), requires_grad=p.requires_grad)
        o = self.trainable_tokens_original[adapter_name]
        if o.dtype in (torch.float16, torch.bfloat16):
            self.trainable_tokens_original[adapter_name] = o.float()

    def delete_adapter(self, adapter_name: str) -> None:
        self._index_cache.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def _owned(self, names: Sequence[str]) -> list[str]:
        # an adapter without rows here (e.g. a LoRA-only adapter) changes nothing in this layer
        return [n for n in names if n in self.trainable_tokens_delta]

    def _check_overlapping_tokens(self, adapter_names: Sequence[str]) -> None:
        """peft's refusal: adapters whose rows overlap cannot be active or merged together."""
        seen: set = set()
        for name in dict.fromkeys(list(self.merged_adapters) + list(adapter_names)):
            if name not in self.token_indices:
                continue
            ids = set(self.token_indices[name])
            if seen & ids:
                raise ValueError(f"Token indices of adapter {name} are already defined and would result in "
                                 f"undefined merging behavior. Only disjunct token indices are currently supported.")
            seen |= ids

    def _rows(self, names: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(distinct ids [n], their new rows [n, D]) of ``names`` together (disjoint by the check above)."""
        idx, vals = [], []
        for name in names:
            listed = self.token_indices[name]
            hit = self._index_cache.get(name)
            # keyed by the list object too: a tied layer shares token_indices with its owner, which may
            # re-create an adapter under the same name
            if hit is None or hit[0] != device or hit[1] is not listed:
                hit = (device, listed) + self._index_tensors(listed, device)
                self._index_cache[name] = hit
            _, _, ids, keep, src, dst = hit
            delta = self.trainable_tokens_delta[name]
            idx.append(ids)
            if keep is None:
                vals.append(delta)
            else:
                # a repeated id: the last copy's value (peft's CPU index_copy keeps it), while every copy gets
                # the row's gradient (peft's index_copy backward hands it to each): the other copies enter as
                # d - d.detach(), which adds zero
                extra = delta.index_select(0, src)
                vals.append(delta.index_select(0, keep).index_add(0, dst, extra - extra.detach()))
        if len(idx) == 1:
            return idx[0], vals[0]
        dtype = vals[0].dtype
        return torch.cat(idx), torch.cat([v.to(dtype) for v in vals])

    @staticmethod
    def _index_tensors(listed: Sequence[int], device) -> tuple:
        """(distinct ids, last-copy positions, other copies' positions, their slots), the last three None
        without repeats."""
        ids, keep = last_occurrences(listed)
        as_tensor = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
        if keep is None:
            return as_tensor(ids), None, None, None
        slot = {t: i for i, t in enumerate(ids)}
        kept = set(keep)
        others = [p for p in range(len(listed)) if p not in kept]
        return as_tensor(ids), as_tensor(keep), as_tensor(others), as_tensor([slot[int(listed[p])] for p in others])

    def get_merged_weights(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """The table with the rows of ``adapter_names`` in place (a new tensor; differentiable in the rows)."""
        weight = self.base_layer.weight
        names = self._owned(adapter_names)
        if not names:
            return weight
        idx, vals = self._rows(names, weight.device)
        return ops.token_merged_weight(weight, idx, vals)

    # -- merging ---------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = self._owned(adapters_to_merge(self, adapter_names))
        if not names:
            return
        self._check_overlapping_tokens(names)
        weight = self.base_layer.weight
        for name in names:
            idx, vals = self._rows([name], weight.device)
            with torch.no_grad():
                rows = vals.detach().to(weight.dtype)
                if safe_merge and not (torch.isfinite(rows).all() and torch.isfinite(weight).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                # in place: a tied head shares this Parameter and sees the merge
                weight.index_copy_(0, idx, rows)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.trainable_tokens_original:
                continue
            ids = torch.tensor(self.token_indices[name], dtype=torch.int64, device=weight.device)
            with torch.no_grad():
                weight.index_copy_(0, ids, self.trainable_tokens_original[name].to(weight))

    # -- forward ---------------------------------------------------------------------------------
    def _embed_scale(self) -> Optional[torch.Tensor]:
        # embeddings that scale their output in forward (e.g. Gemma's ScaledWordEmbedding): peft applies the
        # scale after its own lookup, so do we
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return None
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, device=self.base_layer.weight.device, dtype=self.base_layer.weight.dtype)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        warnings.warn(f"Found embed_scale attribute with shape {tuple(scale.shape)}, expected scalar. Embedding "
                      f"scaling will not be applied.")
        return None

    def forward_adapters(self, x: torch.Tensor, adapter_names: Sequence[str], *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        names = self._owned(adapter_names)
        if self.disable_adapters or not names:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
        self._check_overlapping_tokens(names)
        idx, vals = self._rows(names, base.weight.device)
        if self._kind == "embedding":
            out = ops.token_embedding(x, base.weight, idx, vals, padding_idx=base.padding_idx,
                                      max_norm=base.max_norm, norm_type=base.norm_type,
                                      scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
            scale = self._embed_scale()
            return out if scale is None else out * scale.to(out.dtype)
        return ops.token_linear(x, base.weight, base.bias, idx, vals)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.forward_adapters(x, self.active_adapters, *args, **kwargs)
