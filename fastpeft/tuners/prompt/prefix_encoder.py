"""Prefix tuning's key/value table and its conversion into a transformers Cache.

Layout (peft's ``PrefixEncoder``): ``embedding`` [num_virtual_tokens, num_layers * 2 * token_dim],
or with prefix_projection ``embedding`` [num_virtual_tokens, token_dim] followed by ``transform`` =
Linear(token_dim, H) -> Tanh -> Linear(H, num_layers * 2 * token_dim). A saved adapter stores the
(projected) table; in inference mode only the full-width ``embedding`` exists.

Each row splits into 2 * num_layers blocks of token_dim = heads * head_dim values; for decoder-only
and encoder models block 2i is layer i's key and block 2i+1 its value.
"""
from __future__ import annotations

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.prefix_projection = bool(config.prefix_projection) and not config.inference_mode
        width = config.num_layers * 2 * config.token_dim
        zero = config.init_weights == "zero"
        if self.prefix_projection:
            hidden = config.encoder_hidden_size or config.token_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            if zero:  # the prefix starts at exactly zero while the projection can still learn
                nn.init.zeros_(self.transform[2].weight)
                nn.init.zeros_(self.transform[2].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if zero:
                nn.init.zeros_(self.embedding.weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        out = self.embedding(indices)
        return self.transform(out) if self.prefix_projection else out


def _seq2seq_layer_order(num_layers: int) -> list[tuple[int, int]]:
    """(key block, value block) per decoder self-attention layer for encoder-decoder models.

    This reproduces what peft 0.21 with transformers 5 builds (found by running it for 1-6 layers
    and matching every cache tensor to a block of the table): the table is read in groups of four
    blocks (self key, self value, cross key, cross value); the decoder self-attention layers get the
    groups' self blocks first, followed by the cross blocks for an odd layer count, or the self
    blocks once more for an even count. The cross-attention cache stays empty (it is computed from
    the encoder output). Matching it exactly is what makes adapters interchangeable with peft.
    """
    groups = range(0, 2 * num_layers, 4)
    selfs = [(g, g + 1) for g in groups]
    crosses = [(g + 2, g + 3) for g in groups if g + 3 < 2 * num_layers]
    order = selfs + (selfs if num_layers % 2 == 0 else crosses)
    return order[:num_layers]


def build_prefix_cache(table: torch.Tensor, config, dtype: torch.dtype):
    """A transformers Cache holding the prefix; ``table`` is [batch, num_virtual_tokens, layers*2*token_dim]."""
    from transformers import DynamicCache, EncoderDecoderCache

    batch, nvt, width = table.shape
    layers, heads = config.num_layers, config.num_attention_heads
    if width != layers * 2 * config.token_dim or config.token_dim % heads:
        raise ValueError(
            f"Prefix table width {width} does not fit num_layers={layers} x 2 x token_dim={config.token_dim} "
            f"split into num_attention_heads={heads}"
        )
    blocks = table.to(dtype).view(batch, nvt, 2 * layers, heads, config.token_dim // heads)
    blocks = blocks.permute(2, 0, 3, 1, 4)  # [2 * layers, batch, heads, nvt, head_dim]
    if (config.num_transformer_submodules or 1) == 2:
        order = _seq2seq_layer_order(layers)
    else:
        order = [(2 * i, 2 * i + 1) for i in range(layers)]
    cache = DynamicCache()
    for layer_idx, (k, v) in enumerate(order):
        cache.update(blocks[k], blocks[v], layer_idx)
    if (config.num_transformer_submodules or 1) == 2:
        return EncoderDecoderCache(cache, DynamicCache())
    return cache
