"""SASRec student (Kang & McAuley, 2018): ID embeddings + causal Transformer, last-position output.

Item embeddings are shared between input and output (scores are dot products), as in RecBole's
SASRec; the prediction for an instance is read at its last real position.
"""
from __future__ import annotations

import torch
from torch import nn

from student.models.base import StudentBatch, StudentModel, register_student
from student.models.transformer import CausalTransformer


@register_student
class SASRec(StudentModel):
    kind = "sasrec"

    def __init__(self, vocab_size: int, max_len: int = 50, hidden: int = 64, layers: int = 2, heads: int = 2,
                 inner: int | None = None, dropout: float = 0.2, attn_dropout: float = 0.2,
                 scale_input: bool = False):
        super().__init__()
        # Kang & McAuley's code multiplies input item embeddings by sqrt(hidden); RecBole does not.
        self.input_scale = float(hidden) ** 0.5 if scale_input else 1.0
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.item_emb = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.encoder = CausalTransformer(hidden, heads, inner or hidden * 4, layers, dropout, attn_dropout)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("causal", torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), 1),
                             persistent=False)
        self.apply(self._init)

    @classmethod
    def from_dataset(cls, dataset, **kwargs) -> "SASRec":
        return cls(dataset.vocab_size, **kwargs)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def sequence_states(self, histories: torch.Tensor) -> torch.Tensor:
        """[B, L] right-padded ids -> [B, L, D]: position k's state has seen items 0..k."""
        L = histories.shape[1]
        pos = torch.arange(L, device=histories.device)
        x = self.item_emb(histories) * self.input_scale + self.pos_emb(pos)[None]
        x = self.drop(self.norm(x))
        pad = histories == 0
        return self.encoder(x, self.causal[:L, :L], pad)

    def seq_repr(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, L] right-padded ids -> [B, D] representation at the last real position."""
        x = self.sequence_states(histories)
        last = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, x.shape[-1])
        return x.gather(1, last).squeeze(1)

    def forward(self, batch: StudentBatch) -> torch.Tensor:
        """Logits over the vocabulary: [B, V] at each row's last position, or, with
        ``position_targets``, [P, V] at the P supervised positions in row-major order."""
        if batch.position_targets is None:
            return super().forward(batch)
        states = self.sequence_states(batch.histories)
        return states[batch.position_targets != 0] @ self.item_emb.weight.T

    def score(self, batch: StudentBatch, candidates: torch.Tensor) -> torch.Tensor:
        seq = self.seq_repr(batch.histories, batch.lengths)
        items = self.item_emb(candidates)
        if items.dim() == 2:
            return seq @ items.T
        return torch.einsum("bd,bcd->bc", seq, items)

    def full_scores(self, batch: StudentBatch, start: int, stop: int) -> torch.Tensor:
        seq = self.seq_repr(batch.histories, batch.lengths)
        return seq @ self.item_emb.weight[start:stop].T
