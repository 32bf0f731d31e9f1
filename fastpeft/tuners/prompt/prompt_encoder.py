"""P-tuning's prompt network (peft's ``PromptEncoder`` layout, so state_dict keys match).

MLP:  embedding -> Linear(D, H) -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, D)      (``mlp_head``)
LSTM: embedding -> bidirectional LSTM(D, H, encoder_num_layers) (``lstm_head``)
      -> Linear(2H, 2H) -> ReLU -> Linear(2H, D)                                      (``mlp_head``)
D = token_dim, H = encoder_hidden_size (token_dim when None). A saved adapter stores the network's
output, not the network: in inference mode only ``embedding`` exists and holds that output.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import PromptEncoderReparameterizationType


class PromptEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.token_dim = config.token_dim
        self.input_size = config.token_dim
        self.output_size = config.token_dim
        self.hidden_size = config.encoder_hidden_size or config.token_dim
        self.total_virtual_tokens = config.num_virtual_tokens * config.num_transformer_submodules
        self.encoder_type = PromptEncoderReparameterizationType(
            getattr(config.encoder_reparameterization_type, "value", config.encoder_reparameterization_type))
        self.inference_mode = bool(config.inference_mode)
        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        if self.inference_mode:
            return
        d, h = self.token_dim, self.hidden_size
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(input_size=d, hidden_size=h, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if self.inference_mode:
            return embeds
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            squeeze = embeds.dim() == 2  # the LSTM wants a batch dimension
            out = self.lstm_head(embeds.unsqueeze(0) if squeeze else embeds)[0]
            return self.mlp_head(out.squeeze(0) if squeeze else out)
        return self.mlp_head(embeds)
