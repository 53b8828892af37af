"""DeepFM student (Guo et al., 2017): the FM of student.models.fm plus an MLP over the
concatenated field embeddings [e_hist, (e_last,) e_udom, e_item, e_cdom], sharing the embeddings.

The MLP runs per (user, candidate) pair, so it is the expensive part of full-catalogue scoring.
Its first layer is linear in the concatenation and splits into a user half and an item half
(W [u; i] = W_u u + W_i i), computed once per row and once per candidate; only the broadcast sum,
the activation and the (small) later layers run per pair, over candidate chunks. Under autograd
each chunk is checkpointed, so training memory holds one chunk of pair activations, not B x C.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from student.models.base import StudentBatch, StudentModel, register_student
from student.models.fm import FieldEmbeddings, fm_scores


@register_student
class DeepFM(StudentModel):
    kind = "deepfm"

    def __init__(self, vocab_size: int, num_domains: int = 1, hidden: int = 64,
                 item_domain: np.ndarray | torch.Tensor | None = None, mlp: Sequence[int] = (32,),
                 dropout: float = 0.0, init_std: float = 0.05, chunk: int = 1024,
                 domain_ranges: Sequence[tuple[int, int]] | None = None, last_item: bool = True):
        super().__init__()
        if not mlp:
            raise ValueError("DeepFM needs at least one hidden MLP layer (mlp=(32,) for example)")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.vocab_size = vocab_size
        self.num_domains = num_domains
        self.chunk = int(chunk)
        # [start, stop) global ids per domain: forward() runs the MLP only on each row's domain.
        self.domain_ranges = [tuple(map(int, r)) for r in domain_ranges] if domain_ranges else None
        self.fields = FieldEmbeddings(vocab_size, num_domains, hidden, item_domain, init_std, last_item)
        self.drop = nn.Dropout(dropout)
        self.user_proj = nn.Linear(self.fields.num_user_fields * hidden, mlp[0])
        self.item_proj = nn.Linear(2 * hidden, mlp[0], bias=False)
        layers: list[nn.Module] = []
        for a, b in zip(mlp[:-1], mlp[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(mlp[-1], 1))
        self.head = nn.Sequential(*layers)

    @classmethod
    def from_dataset(cls, dataset, **kwargs) -> "DeepFM":
        ranges = [dataset.domain_range(d) for d in range(dataset.num_domains)]
        return cls(dataset.vocab_size, dataset.num_domains, item_domain=dataset.item_domain,
                   domain_ranges=ranges, **kwargs)

    def _pairs(self, u: torch.Tensor, i: torch.Tensor, block: torch.Tensor | None = None) -> torch.Tensor:
        """Deep logits for user projections [B, H] and item projections [C, H] or [B, C, H]; the
        [B, C, H] pair sum goes into ``block`` when given (a buffer reused across chunks)."""
        x = torch.add(u[:, None, :], i[None] if i.dim() == 2 else i, out=block)
        # In place: x is a fresh (or reused) [B, c, H] temporary, and the add's backward does not need it.
        return self.head(self.drop(x.relu_())).squeeze(-1)

    def _deep(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        axis = 0 if i.dim() == 2 else 1
        if not (torch.is_grad_enabled() and (u.requires_grad or i.requires_grad)):
            return self._deep_no_grad(u, i, axis)
        parts = []
        for s in range(0, i.shape[axis], self.chunk):
            ic = i.narrow(axis, s, min(self.chunk, i.shape[axis] - s))
            parts.append(checkpoint(self._pairs, u, ic, use_reentrant=False))
        return torch.cat(parts, dim=1)

    def _deep_no_grad(self, u: torch.Tensor, i: torch.Tensor, axis: int) -> torch.Tensor:
        """``_deep`` without autograd (ranking, serving): the same ``_pairs`` per chunk, bit for bit,
        with one [B, chunk, H] pair block reused for every full chunk and each chunk's logits written
        straight into the [B, C] output, instead of a fresh block and a list to concatenate per chunk
        (thousands of chunks per ranked catalogue): its peak memory no longer swings between runs
        (docs/benchmarks.md §6)."""
        n = i.shape[axis]
        out = u.new_empty(u.shape[0], n)
        block = u.new_empty(u.shape[0], min(self.chunk, n), u.shape[1])
        for s in range(0, n, self.chunk):
            c = min(self.chunk, n - s)
            out[:, s:s + c] = self._pairs(u, i.narrow(axis, s, c), block if c == block.shape[1] else None)
        return out

    def score(self, batch: StudentBatch, candidates: torch.Tensor) -> torch.Tensor:
        user = self.fields.user_side(batch, self.drop)
        item = self.fields.item_side(candidates)
        u = self.user_proj(torch.cat(user[0], -1))
        i = self.item_proj(torch.cat(item[0], -1))
        return fm_scores(user, item) + self._deep(u, i)

    def forward(self, batch: StudentBatch) -> torch.Tensor:
        """[B, vocab] logits; with ``domain_ranges`` the per-pair MLP runs only on each row's own
        domain (the only columns the training losses read) and every other column (PAD, other
        domains) holds -1e4, a finite "never": the losses mask those columns anyway."""
        if self.domain_ranges is None or len(self.domain_ranges) == 1:
            return super().forward(batch)
        rows_dom = self.fields.item_domain[batch.histories[:, 0]]
        out = None
        for d, (start, stop) in enumerate(self.domain_ranges):
            rows = (rows_dom == d).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            block = self.full_scores(batch.select(rows), start, stop)
            if out is None:
                out = block.new_full((len(batch), self.vocab_size), -1e4)
            out = out.index_put((rows[:, None], torch.arange(start, stop, device=out.device)[None]), block)
        if out is None:
            raise ValueError("no row of the batch has a history item in a known domain")
        return out
