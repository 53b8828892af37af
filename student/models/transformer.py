"""Post-LN causal Transformer block as in RecBole's SASRec (the published baseline's code).

``nn.TransformerEncoderLayer`` also drops out inside the feed-forward (after the activation); RecBole
does not, and at SASRec's dropout of 0.5 that extra mask is a different, weaker model. This block keeps
RecBole's placement: attention-probability dropout, then dropout on each sub-layer's output before the
residual add and LayerNorm (eps 1e-12).
"""
from __future__ import annotations

import torch
from torch import nn


class CausalTransformerLayer(nn.Module):
    """Self-attention + feed-forward, each as LayerNorm(x + Dropout(sublayer(x)))."""

    def __init__(self, hidden: int, heads: int, inner: int, hidden_dropout: float, attn_dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=attn_dropout, batch_first=True)
        self.attn_drop = nn.Dropout(hidden_dropout)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ff = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))
        self.ff_drop = nn.Dropout(hidden_dropout)
        self.ff_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, causal: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x, x, x, attn_mask=causal, key_padding_mask=pad, need_weights=False)
        x = self.attn_norm(x + self.attn_drop(a))
        return self.ff_norm(x + self.ff_drop(self.ff(x)))


class CausalTransformer(nn.Module):
    """A stack of :class:`CausalTransformerLayer`."""

    def __init__(self, hidden: int, heads: int, inner: int, layers: int, hidden_dropout: float,
                 attn_dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(CausalTransformerLayer(hidden, heads, inner, hidden_dropout, attn_dropout)
                                    for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, causal, pad)
        return x
